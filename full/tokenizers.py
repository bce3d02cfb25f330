"""Offline stand-ins for the pipelines' tokenizers, built in memory from a tiny vocabulary (no download).

A random text encoder needs token ids, not a language: each builder keeps the real tokenizer class, its special
tokens, padding and truncation rules and `model_max_length`, and replaces the learned vocabulary by one token per
character (or byte), so a prompt of n characters is about n tokens. `save_pretrained` / `from_pretrained` round-trip
each of them, so a tiny pipeline folder loads through the real loading code. Used by the tests' tiny pipelines
(full/tiny.py) and by the real architectures with random weights (full/architectures.py).

* `clip_tokenizer`: CLIPTokenizer on CLIP's byte-to-unicode alphabet with no merges (514 tokens: 256 symbols with and
  without the end-of-word mark, <|startoftext|>, <|endoftext|>), SD / SDXL / SD3 / FLUX.1.
* `t5_tokenizer`: T5TokenizerFast (Unigram, sentencepiece metaspace), printable ASCII with and without the word-start
  mark (192 tokens), SD3 / FLUX.1.
* `qwen_tokenizer`: Qwen2Tokenizer (byte-level BPE, no merges: one token per UTF-8 byte) with Qwen3's special tokens
  and a chat template that renders a conversation as Qwen3's does (<|im_start|>role\\n...<|im_end|>\\n, the assistant
  prompt, and the empty <think> block when `enable_thinking=False`), Z-Image / FLUX.2-klein, whose pipelines encode
  a prompt through `apply_chat_template`.
"""
from __future__ import annotations


def byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol with and without the end-of-word mark, plus bos/eos."""
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return vocab


def byte_symbols() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP, Qwen) writes the bytes 0..255 as: printable Latin-1
    bytes stand for themselves, the others are shifted past 255 (these come last)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def clip_tokenizer(**settings):
    """CLIPTokenizer on the byte vocabulary; `settings` are the real tokenizer's (default model_max_length=77)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_vocab(), merges=[], **{"model_max_length": 77, **settings})


def t5_tokenizer(model_max_length: int = 256):
    """A T5-style (Unigram, sentencepiece-metaspace) tokenizer: <pad>=0, </s>=1, <unk>=2, then every printable ASCII
    character with and without the word-start mark, no sentinels (192 tokens)."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars]
             + [("\u2581" + c, -2.5) for c in chars])
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


# Qwen3's special tokens the chat template uses, after the 256 byte symbols (ids 256..260)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
QWEN_VOCAB_SIZE = 256 + len(QWEN_SPECIAL)
# Qwen3's chat template reduced to what the pipelines use (plain-text messages, a generation prompt, the thinking
# switch): a message is <|im_start|>{role}\n{content}<|im_end|>\n; the generation prompt <|im_start|>assistant\n is
# followed by an empty <think>\n\n</think>\n\n block when enable_thinking is false (Qwen3's own behaviour)
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)


def qwen_tokenizer(model_max_length: int = 131072):
    """Qwen2Tokenizer (what Z-Image's and FLUX.2-klein's model_index.json name) with a byte vocabulary: one token per
    UTF-8 byte (ids 0..255), Qwen3's special tokens at 256..260 (pad = eos = <|endoftext|>, as in Qwen3), padding
    on the right, and QWEN_CHAT_TEMPLATE."""
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(byte_symbols())}
    vocab.update({t: 256 + i for i, t in enumerate(QWEN_SPECIAL)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, chat_template=QWEN_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    return tok


def from_settings(settings: dict):
    """The stand-in for a real tokenizer described by its class name and settings (full/configs/tokenizer_*.json:
    `_class_name` and e.g. `model_max_length`)."""
    kw = {k: v for k, v in settings.items() if not k.startswith("_")}
    cls = settings.get("_class_name", "CLIPTokenizer")
    if cls == "CLIPTokenizer":
        return clip_tokenizer(**kw)
    if cls == "T5TokenizerFast":
        return t5_tokenizer(kw.pop("model_max_length"))
    if cls in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
        return qwen_tokenizer(kw.pop("model_max_length", 131072))
    raise ValueError(f"random_weights: no offline stand-in for the tokenizer class {cls!r} (CLIPTokenizer, "
                     "T5TokenizerFast and Qwen2Tokenizer have one)")
