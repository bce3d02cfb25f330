"""Tiny random SD1.5 / SDXL pipelines and a tiny random CLIP reward model, built offline in a second.

They have the real architectures (diffusers' own test configurations: two UNet levels, one cross-attention
level, a 2-level VAE, 2-5 layer CLIP text encoders) and random weights, so everything the full backend does
(loading with `from_pretrained`, SDXL's two encoders and add_time_ids, peft LoRA, `save_lora_weights` /
`load_lora_weights`, the reward wrappers) runs for real on a CPU in the tests, with no network. The CLIP
tokenizer is byte-level with no merges (a 514-token vocabulary, `model_max_length=77`): every character is a
token, which is all a random text encoder needs.

    python -m full.tiny OUT [--kind sdxl|sd15] [--scheduler euler_ancestral|lcm|ddim|euler] [--setup]

writes a pipeline folder that `--model OUT` loads; with --setup, OUT/spec.json plus everything it names (a tiny
reward model, prompts, image-caption data, a concept folder, preference pairs): `--model OUT/spec.json`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# What each kind's tiny pipeline folder is built with; the shapes follow diffusers' pipeline tests.
TEXT = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513, vocab_size=514, hidden_size=32, intermediate_size=37,
            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
            hidden_act="gelu")
SCHEDULERS = {  # sampler name -> (diffusers scheduler class, extra config) of a few-step checkpoint
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing")),  # SDXL-Turbo
    "lcm": ("LCMScheduler", dict(timestep_spacing="trailing")),  # DMD2 / LCM
    "ddim": ("DDIMScheduler", dict(timestep_spacing="trailing", set_alpha_to_one=False)),
    "euler": ("EulerDiscreteScheduler", dict()),  # SDXL base ships this one
}


def byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol with and without the end-of-word mark, plus bos/eos."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    symbols = [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return vocab


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=77)


def tiny_t5_tokenizer(model_max_length: int = 256):
    """A T5-style (Unigram, sentencepiece-metaspace) tokenizer built offline: <pad>=0, </s>=1, <unk>=2, then every
    printable ASCII character with and without the word-start mark, no sentinels (192 tokens). Every character is a
    token, which is all a random T5 encoder needs; `save_pretrained` / `from_pretrained` round-trip it."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars]
             + [("\u2581" + c, -2.5) for c in chars])
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_unet(sdxl: bool, sample_size: int = 16):
    from diffusers import UNet2DConditionModel

    common = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4,
                  out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
    if sdxl:  # text_time conditioning: 6 time ids x 8 + the 32-dim pooled embedding of text_encoder_2
        return UNet2DConditionModel(**common, attention_head_dim=(2, 4), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                    cross_attention_dim=64)
    return UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=8)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=32, sample_size=32)


def make_scheduler(sampler: str):
    import diffusers

    if sampler not in SCHEDULERS:
        raise ValueError(f"unknown tiny scheduler {sampler!r}; choose one of {sorted(SCHEDULERS)}")
    name, extra = SCHEDULERS[sampler]
    return getattr(diffusers, name)(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, prediction_type="epsilon", **extra)


def tiny_pipeline(kind: str = "sdxl", scheduler: str = "euler_ancestral", seed: int = 0, sample_size: int = 16):
    """A random pipeline of the real class (StableDiffusionXLPipeline or StableDiffusionPipeline)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind not in ("sdxl", "sd15"):
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose 'sdxl' or 'sd15'")
    torch.manual_seed(seed)
    unet, vae = tiny_unet(kind == "sdxl", sample_size), tiny_vae()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
                 scheduler=make_scheduler(scheduler))
    if kind == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, projection_dim=32))
        parts["tokenizer_2"] = tiny_tokenizer()
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_pipeline(path: str | Path, kind: str = "sdxl", scheduler: str = "euler_ancestral", seed: int = 0,
                       sample_size: int = 16) -> Path:
    path = Path(path)
    tiny_pipeline(kind, scheduler, seed, sample_size).save_pretrained(path)
    return path


def save_tiny_unet(path: str | Path, kind: str = "sdxl", seed: int = 1, sample_size: int = 16) -> Path:
    """A second random UNet of the same architecture (a stand-in for e.g. the DMD2 UNet weights)."""
    torch.manual_seed(seed)
    tiny_unet(kind == "sdxl", sample_size).save_pretrained(Path(path))
    return Path(path)


def save_tiny_clip(path: str | Path, projection_dim: int = 16, seed: int = 0) -> Path:
    """A random CLIPModel + tokenizer + image-processor config: the stand-in for PickScore / CLIP / the
    aesthetic predictor's backbone in the reward tests."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = {k: v for k, v in TEXT.items()}
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8, layer_norm_eps=1e-5, hidden_act="gelu")
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    path = Path(path)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_tiny_aesthetic_head(path: str | Path, embed_dim: int = 16, seed: int = 0) -> Path:
    """Random weights in the layout of the LAION improved-aesthetic-predictor MLP (see rewards.AestheticHead)."""
    from .rewards import AestheticHead

    torch.manual_seed(seed)
    torch.save(AestheticHead(embed_dim).state_dict(), path)
    return Path(path)


def _png(path: Path, seed: int, size: int = 32) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.cos(5 * yy + rng.uniform(0, 6)), xx * yy], -1)
    Image.fromarray(((img * 0.5 + 0.5) * 255).clip(0, 255).astype("uint8")).save(path)


def save_tiny_setup(out: str | Path, kind: str = "sdxl", scheduler: str = "lcm", sample_size: int = 8,
                    roles: dict | None = None, **spec_overrides) -> Path:
    """Everything a full-backend run needs, tiny and offline, under `out`: a random pipeline, a random CLIP
    reward model with an aesthetic head, prompt files, an image-caption "target" set, a "concept" folder and
    Pick-a-Pic-style preference pairs (one tied row, which must be dropped). Returns the model-spec path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tiny_pipeline(out / "pipeline", kind, scheduler, sample_size=sample_size)
    save_tiny_clip(out / "clip")
    save_tiny_aesthetic_head(out / "aesthetic_head.pth")
    (out / "prompts.txt").write_text("a red cube\na blue sphere\na green cone\na small house\n")
    (out / "eval_prompts.txt").write_text("a yellow star\na purple ring\n")
    for name, prompts in (("base", ["a red cube", "a blue sphere", "a green cone"]),
                          ("target", ["a red cube in pokemon style", "a blue sphere in pokemon style",
                                      "a green cone in pokemon style"]), ("concept", [None] * 3)):
        (out / name).mkdir(exist_ok=True)
        for i, text in enumerate(prompts):
            _png(out / name / f"{i}.png", seed={"base": 0, "target": 10, "concept": 20}[name] + i)
            if text:
                (out / name / f"{i}.txt").write_text(text)
    (out / "pairs").mkdir(exist_ok=True)
    rows = []
    for i, (caption, label) in enumerate([("a red cube", 1), ("a blue sphere", 0), ("a green cone", 0.5),
                                          ("a small house", 1)]):
        _png(out / "pairs" / f"{i}_0.png", seed=100 + i)
        _png(out / "pairs" / f"{i}_1.png", seed=200 + i)
        rows.append({"caption": caption, "jpg_0": f"{i}_0.png", "jpg_1": f"{i}_1.png", "label_0": label})
    (out / "pairs" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": f"tiny-{kind}-{scheduler}", "base": "pipeline", "roles": roles or {},
        "reward": {"name": "pickscore", "model": "clip"},
        "quality": {"name": "aesthetic", "model": "clip", "head": "aesthetic_head.pth"},
        "eval_rewards": [{"name": "clip", "model": "clip"}],
        "prompts": "prompts.txt", "eval_prompts": "eval_prompts.txt",
        "data": {"base": {"folder": "base"}, "target": {"folder": "target"},
                 "concept": {"folder": "concept", "prompt": "a photo of sks cube", "class_prompt": "a photo of a cube"}},
        "pairs": {"folder": "pairs"}, **spec_overrides,
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=2))
    return out / "spec.json"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--kind", default="sdxl", choices=["sdxl", "sd15"])
    p.add_argument("--scheduler", default="euler_ancestral", choices=sorted(SCHEDULERS))
    p.add_argument("--sample-size", type=int, default=16, help="latent side; the image side is twice that")
    p.add_argument("--setup", action="store_true", help="also write a tiny reward model, prompts, data and spec.json")
    a = p.parse_args(argv)
    if a.setup:
        print(save_tiny_setup(a.out, a.kind, a.scheduler, a.sample_size))
    else:
        print(save_tiny_pipeline(a.out, a.kind, a.scheduler, sample_size=a.sample_size))


if __name__ == "__main__":
    main()
