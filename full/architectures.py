"""Real architectures with random weights, built offline from the configurations shipped in full/configs/.

A model spec with `"random_weights": true` (or `load_world(spec, random_weights=True)`, or `--random-weights` in
full.bench / full.memory_plan) loads through the same code as a real checkpoint (full/models.py): every
`from_pretrained(hub_id, subfolder=...)` there becomes `from_config(<the shipped config of that hub id's part>)` with
random weights, so the shapes, parameter counts, memory and speed are the real ones and nothing is downloaded.

full/configs/index.json maps each hub id the shipped specs name to its components' config files (the values of
the public config.json files; tests/test_real_arch.py checks their parameter counts). Per component:

* UNet / transformer (SD3, FLUX) / VAE / text encoders (CLIP, T5): the module is built with its parameters on
  the meta device (no memory, no init cost), then each parameter gets a CPU tensor: norm weights 1 (GroupNorm,
  LayerNorm and every module whose class name has "Norm": T5's and the transformers' RMSNorms), biases 0, every
  other weight N(0, 1/fan_in) (finite activations through any depth; the values mean nothing). Buffers (CLIP's
  position ids, SD3's sin-cos position table) keep their values.
* Tokenizers: the shipped settings (model_max_length, pad token) on full/tokenizers.py's offline vocabularies:
  CLIP byte-level, T5 (`"_class_name": "T5TokenizerFast"`) character-level, Qwen (`"Qwen2Tokenizer"`) byte-level
  with Qwen3's chat template (token ids do not change memory or speed; a 256-token sequence is a 256-token
  sequence, and the pipelines pad T5 prompts to max_sequence_length).
* Schedulers: the shipped scheduler config (these are real: the MDP checks in models.py run on them).
* A state-dict file (DMD2's `unet_file`) is not read: its UNet is the base architecture with random weights.
  A distillation LoRA (LCM-LoRA) is not fused: fused, it changes no shape.

`with architectures.depth(1):` (full/rehearse.py) builds every network with at most that many blocks per stack
(UNet: layers_per_block and transformer_layers_per_block; SD3 / FLUX: num_layers, num_single_layers; CLIP / T5
text encoders and the reward towers: their layer counts) and every other config value real: the widths, token
counts, conditioning shapes, schedulers and the loading / LoRA / sampling code are the checkpoint's, at a size a CPU
machine runs in seconds (a 12 B FLUX.1 in fp32 needs 48 GB). Parameter counts and memory come from the full
depth on the meta device (parameter_count, full/memory_plan.py), never from these.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
PIPELINE_FLAGS = ("is_distilled",)  # pipeline config values an index entry may set (Flux2KleinPipeline's)
_DEPTH: list[tuple[int, bool]] = []  # the active depth() limits (blocks, denoisers too), innermost last
DENOISERS = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "ZImageTransformer2DModel",
             "Flux2Transformer2DModel")


@contextlib.contextmanager
def depth(blocks: int, denoisers: bool = True):
    """Build random-weight networks with at most `blocks` blocks per stack (see the module docstring);
    `denoisers=False`: the UNets / transformers keep their real depth (full.bench's CPU rows: the real network,
    shallow text encoders and reward towers)."""
    if blocks < 1:
        raise ValueError(f"depth: blocks must be >= 1, got {blocks}")
    _DEPTH.append((blocks, denoisers))
    try:
        yield
    finally:
        _DEPTH.pop()


# config keys that count blocks, per config class: at most `n` of each under depth(n)
DEPTH_KEYS = {"UNet2DConditionModel": ("layers_per_block", "transformer_layers_per_block",
                                       "reverse_transformer_layers_per_block"),
              "SD3Transformer2DModel": ("num_layers",), "FluxTransformer2DModel": ("num_layers", "num_single_layers"),
              "CLIPTextModel": ("num_hidden_layers",), "CLIPTextModelWithProjection": ("num_hidden_layers",),
              "CLIPTextConfig": ("num_hidden_layers",), "CLIPVisionConfig": ("num_hidden_layers",),
              "T5EncoderModel": ("num_layers",),
              "ZImageTransformer2DModel": ("n_layers", "n_refiner_layers"),
              "Flux2Transformer2DModel": ("num_layers", "num_single_layers"),
              "Qwen3Model": ("num_hidden_layers", "max_window_layers"),
              "Qwen3ForCausalLM": ("num_hidden_layers", "max_window_layers")}


def shallow(config: dict, name: str) -> dict:
    """`config` (of class `name`) with at most the active depth() blocks per stack; unchanged outside depth()."""
    if not _DEPTH or (name in DENOISERS and not _DEPTH[-1][1]):
        return config
    n, out = _DEPTH[-1][0], dict(config)
    clip = lambda v: [min(x, n) for x in v] if isinstance(v, (list, tuple)) else min(v, n)  # noqa: E731
    for key in DEPTH_KEYS.get(name, ()):
        if out.get(key) is not None:
            out[key] = clip(out[key])
    if name == "SD3Transformer2DModel" and out.get("dual_attention_layers"):  # SD3.5: MMDiT-X blocks by index
        out["dual_attention_layers"] = [i for i in out["dual_attention_layers"] if i < out["num_layers"]]
    if name == "CLIPModel":  # the reward towers: their sub-configs
        for sub, cls in (("text_config", "CLIPTextConfig"), ("vision_config", "CLIPVisionConfig")):
            out[sub] = shallow(out.get(sub) or {}, cls)
    return out


@functools.lru_cache(maxsize=None)
def index() -> dict:
    return {k: v for k, v in json.loads((CONFIGS / "index.json").read_text()).items() if not k.startswith("_")}


def entry(source: str, what: str = "model") -> dict:
    """The index entry of a hub id, or an error naming the known ones."""
    key = str(source).rstrip("/")
    if key not in index():
        raise ValueError(f"random_weights: {what} {source!r} has no shipped configuration in {CONFIGS / 'index.json'} "
                         f"(known: {sorted(index())}); add its component config files there")
    return index()[key]


def read_config(name: str) -> dict:
    path = CONFIGS / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"random_weights: cannot read the configuration file {path}: {e}") from e


def component_config(source: str, part: str) -> dict:
    e = entry(source)
    if part not in e:
        raise ValueError(f"random_weights: {source!r} in {CONFIGS / 'index.json'} has no {part!r} entry "
                         f"(it has {sorted(k for k in e if k != 'architecture')})")
    return read_config(e[part])


def model_index(source: str) -> dict:
    """A diffusers model_index.json for a hub id, made from its index entry."""
    e = entry(source, "pipeline")
    if "_class_name" not in e:
        raise ValueError(f"random_weights: {source!r} is not a whole pipeline in {CONFIGS / 'index.json'} "
                         "(only some of its parts are listed); use it as a role's UNet or as the VAE")
    out = {"_class_name": e["_class_name"],
           "force_zeros_for_empty_prompt": e.get("force_zeros_for_empty_prompt", False)}
    out.update({k: e[k] for k in PIPELINE_FLAGS if k in e})
    for part, file in e.items():  # each part's library and class, from its shipped config
        if part in ("_class_name", "force_zeros_for_empty_prompt", "architecture", "scheduler", *PIPELINE_FLAGS):
            continue
        config = read_config(file)
        if part in TOKENIZERS:
            out[part] = ["transformers", config.get("_class_name", "CLIPTokenizer")]
        elif "_class_name" in config:
            out[part] = ["diffusers", config["_class_name"]]
        else:
            out[part] = ["transformers", config["architectures"][0]]
    out["scheduler"] = ["diffusers", read_config(e["scheduler"])["_class_name"]]
    return out


def random_init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every meta parameter of `module` a CPU tensor with random values (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            value = torch.empty(p.shape, dtype=torch.float32)
            if name == "bias" or p.ndim == 0:
                value.zero_()
            elif isinstance(mod, norms) or (name == "weight" and p.ndim == 1 and "Norm" in type(mod).__name__):
                value.fill_(1.0)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.shape[-1]
                value.normal_(0.0, 1.0 / math.sqrt(max(1, fan_in)), generator=gen)
            mod._parameters[name] = torch.nn.Parameter(value, requires_grad=p.requires_grad)
    return module


def build(cls, source: str, part: str | None, seed: int = 0):
    """`cls.from_pretrained(source, subfolder=part)` with random weights: from the shipped config of that part."""
    from accelerate import init_empty_weights

    name = cls.__name__
    part = part or ("unet" if "UNet" in name else "transformer" if "Transformer2D" in name
                    else "vae" if "Autoencoder" in name else None)
    if part in TOKENIZERS:
        return tokenizer(component_config(source, part))
    if "Scheduler" in cls.__name__:
        return cls.from_config(read_config(entry(source)["scheduler"]))
    config = shallow(component_config(source, part), config_class_name(component_config(source, part), cls))
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "from_config") and not hasattr(cls, "config_class"):  # diffusers
            module = cls.from_config(config)
        else:  # transformers: CLIPTextModel(WithProjection) / CLIPModel / T5EncoderModel
            module = cls(cls.config_class(**{k: v for k, v in config.items() if not k.startswith("_")
                                              and k not in ("architectures", "model_type")}))
    return random_init_(module, seed).eval()


def config_class_name(config: dict, cls) -> str:
    """The class a shipped config describes: diffusers' _class_name, transformers' architectures[0], else cls's."""
    return config.get("_class_name") or (config.get("architectures") or [cls.__name__])[0]


def tokenizer(settings: dict):
    """The offline stand-in for a shipped tokenizer config (full/tokenizers.py)."""
    from . import tokenizers

    return tokenizers.from_settings(settings)


def reward_model(name: str, seed: int = 0):
    """A CLIP reward backbone (clip / aesthetic: ViT-L/14, pickscore: ViT-H/14) at real size with random weights."""
    from transformers import CLIPModel

    file = {"clip": "reward_clip_vit_l14.json", "aesthetic": "reward_clip_vit_l14.json",
            "pickscore": "reward_clip_vit_h14.json"}.get(name)
    if file is None:
        raise ValueError(f"random_weights: no shipped configuration for the {name!r} reward (clip, aesthetic and "
                         "pickscore have one); point the spec's reward at a local model instead")
    from accelerate import init_empty_weights
    from transformers import CLIPConfig

    config = {k: v for k, v in shallow(read_config(file), "CLIPModel").items() if not k.startswith("_")
              and k != "model_type"}
    with init_empty_weights(include_buffers=False):
        model = CLIPModel(CLIPConfig(**config))
    return random_init_(model, seed).eval()


def meta_module(cls, config_file: str) -> torch.nn.Module:
    """The module of a shipped config with every tensor on the meta device (no memory)."""
    config = read_config(config_file)
    with torch.device("meta"):
        if hasattr(cls, "config_class"):
            return cls(cls.config_class(**{k: v for k, v in config.items() if not k.startswith("_")
                                           and k not in ("architectures", "model_type")}))
        return cls.from_config(config)


def parameter_count(cls, config_file: str) -> int:
    """Parameters of a shipped config, counted on the meta device (no memory)."""
    return sum(p.numel() for p in meta_module(cls, config_file).parameters())


def checkpoint_elements(cls, config_file: str) -> tuple[int, int]:
    """(elements, tensors) of the module's state dict: what its safetensors file holds (parameters and persistent
    buffers, e.g. SD3's position table), which is what the hub's parameter counts report."""
    state = meta_module(cls, config_file).state_dict()
    return sum(v.numel() for v in state.values()), len(state)
