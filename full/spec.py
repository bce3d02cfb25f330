"""The model spec: what `--model` names for the full backend.

`--model` is either a diffusers pipeline (local folder or hub id; every role comes from it and the sampler from
its scheduler) or a JSON/YAML file describing one run's models and data:

    {
      "name": "sdxl-dmd2",
      "base": "stabilityai/stable-diffusion-xl-base-1.0",        # VAE, text encoders, tokenizers, scheduler
      "roles": {                                                 # role -> where its UNet comes from
        "student":   {"unet": "tianweiy/DMD2", "unet_file": "dmd2_sdxl_4step_unet_fp16.bin",
                      "scheduler": "LCMScheduler"},              # -> the x0_renoise MDP at [999, 749, 499, 249]
        "teacher":   {},                                         # the base UNet, DDIM on a 25-step grid
        "generator": {"unet": "tianweiy/DMD2", "unet_file": "dmd2_sdxl_1step_unet_fp16.bin",
                      "scheduler": "LCMScheduler", "timesteps": [399]}
      },
      "reward": "pickscore", "quality": "aesthetic", "eval_rewards": ["clip"],
      "prompts": "prompts/pickapic_train.txt", "eval_prompts": "prompts/pickapic_test.txt",
      "data": {"target": {"folder": "data/pokemon"}}, "pairs": {"dataset": "yuvalkirstain/pickapic_v2"},
      "resolution": 1024, "dtype": "bf16", "gradient_checkpointing": true
    }

Relative paths in a spec file are resolved against the file's folder. Every key is documented on the dataclass
fields below; unknown keys are an error (a typo must not silently fall back to a default)."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("teacher", "student", "generator")
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class RoleSpec:
    # the role's denoiser: pipeline folder / hub id (its unet/ or, SD3 / FLUX, transformer/ is used) or a bare
    # UNet / transformer folder; default: base. A spec file may write "transformer" for it.
    unet: str | None = None
    unet_subfolder: str | None = None  # override the subfolder inside `unet`
    unet_file: str | None = None  # a single state-dict file inside `unet` loaded into the base UNet (DMD2)
    lora: str | None = None  # a distillation LoRA (LCM-LoRA, DMD2 LoRA) fused into the UNet before ours
    lora_weight_name: str | None = None
    lora_scale: float = 1.0
    scheduler: str | None = None  # diffusers scheduler class to use instead of the checkpoint's (e.g. LCMScheduler)
    scheduler_config: dict = field(default_factory=dict)  # overrides of its config (e.g. timestep_spacing)
    sampler: str | None = None  # MDP kernel; default: derived from the scheduler class
    # sampling grid: `steps` of the role's own pipeline (its scheduler's set_timesteps, as the pipeline calls it;
    # full/models.py pipeline_grid); default: the model card's (full/configs/pipelines.json) for a student / DMD2's
    # card timesteps, 25 for the teacher, 1 for the generator. `timesteps`: an explicit grid of integer times instead
    # (a flow model's times index its training sigmas, not the pipeline's)
    steps: int | None = None
    timesteps: list[int] | None = None


@dataclass
class ModelSpec:
    base: str  # pipeline folder or hub id: VAE, text encoder(s), tokenizer(s), scheduler and the default UNet
    name: str = ""
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files
    roles: dict[str, RoleSpec] = field(default_factory=dict)
    vae: str | None = None  # another VAE, e.g. madebyollin/sdxl-vae-fp16-fix (fp16-safe)
    resolution: int | None = None  # image side; default: the UNet's sample_size x the VAE factor
    dtype: str | None = None  # weights of the frozen parts and the autocast dtype (LoRA weights stay fp32);
    # None: accelerate's configured mixed precision (accelerate launch --mixed_precision bf16; "no" -> fp32)
    gradient_checkpointing: bool = False  # UNet (and VAE decoder for reward gradients)
    adam_8bit: bool = False  # swap the methods' torch AdamW for bitsandbytes' AdamW8bit in accelerator.prepare
    reward: Any = "clip"  # training reward: name or {"name": ..., "model": ..., "processor": ...}
    quality: Any = "clip"  # the reward reported as "quality" in metrics
    eval_rewards: list = field(default_factory=list)  # further rewards reported by metrics() and evaluate.py
    prompts: Any = None  # training prompts: file (.txt/.json/.jsonl/.csv) or list; default: a built-in list
    eval_prompts: Any = None  # evaluation prompts; default: the training prompts
    data: dict = field(default_factory=dict)  # split -> image-caption source (world.data)
    pairs: Any = None  # preference-pair source (world.preference_pairs)
    precompute_embeddings: bool = False  # encode the prompts at start-up (a data source's captions when the run
    # opens it), then free the text encoders
    embedding_cache: str | None = None  # folder of the on-disk prompt-embedding cache (default: $FEWSTEP_EMBEDDING_CACHE
    # or ~/.cache/fewstep-finetune/embeddings)
    negative_prompt: str = ""  # the null condition for CFG (SDXL: zeros when "" and force_zeros_for_empty_prompt)
    seed: int = 0  # seed of the LoRA initialisation (the same on every rank and every run)
    decode_batch: int = 4  # the most rows per sampling / evaluation / VAE-decode / reward call (world.decode_batch)
    guidance: float | None = None  # FLUX.1-dev-class guidance-distilled transformers (guidance_embeds): the
    # embedded guidance value every call gets (default 3.5, FluxPipeline's); an error for any other denoiser
    max_sequence_length: int | None = None  # SD3 / FLUX T5 prompt length (default: the pipeline's, 256 / 512)
    random_weights: bool = False  # the real architectures of the named checkpoints from full/configs, random
    # weights, nothing downloaded (full/architectures.py): memory plans, benchmarks and tests at real size

    @property
    def mixed_precision(self) -> str | None:
        """accelerate's name of `dtype`; None when the spec leaves it to accelerate's configuration."""
        return None if self.dtype is None else {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[self.dtype]


def looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", s)) and not s.startswith((".", "/")) and not Path(s).exists()


def resolve(value, root: Path | None, path: bool = False):
    """A relative path in a spec file is relative to the file; hub ids and absolute paths stay as they are.
    path=True: the key only takes a path (prompt files, data folders), so 'data/x.txt' is never a hub id."""
    if root is None or not isinstance(value, str) or Path(value).is_absolute():
        return value
    if looks_like_hub_id(value) and not path:
        return value
    if path:
        return str(root / value)
    cand = root / value
    return str(cand) if cand.exists() or "/" in value or "." in value else value


def _build(cls, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}")
    return cls(**d)


def from_dict(d: dict, root: Path | None = None, where: str = "model spec") -> ModelSpec:
    d = dict(d)
    if "base" not in d:
        raise ValueError(f"{where}: 'base' (a diffusers pipeline folder or hub id) is required")
    roles = {}
    given = d.pop("roles", None) or {}
    if not isinstance(given, dict):
        raise ValueError(f"{where}: 'roles' must map a role to its settings, found {given!r:.100}")
    for role, r in given.items():
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; roles are {list(ROLES)}")
        if r is not None and not isinstance(r, dict):
            raise ValueError(f"{where}: role {role} must be a mapping (e.g. {{\"unet\": ...}}), found {r!r:.100}")
        r = dict(r or {})
        if "transformer" in r:  # SD3 / FLUX: "transformer" names the same thing as "unet" (the denoiser's source)
            if "unet" in r:
                raise ValueError(f"{where}: role {role} names both 'unet' and 'transformer'; give one (the source of "
                                 "its denoiser network)")
            r["unet"] = r.pop("transformer")
        for k in ("unet", "lora"):
            if r.get(k):
                r[k] = resolve(r[k], root)
        roles[role] = _build(RoleSpec, r, f"{where}, role {role}")
        if roles[role].steps is not None and (not isinstance(roles[role].steps, int) or roles[role].steps < 1
                                              or roles[role].timesteps):
            raise ValueError(f"{where}: role {role}: \"steps\" must be an integer >= 1 and not given with "
                             f"\"timesteps\", found steps={roles[role].steps!r}, timesteps={roles[role].timesteps!r}")
    for k in ("base", "vae", "prompts", "eval_prompts", "embedding_cache"):
        if isinstance(d.get(k), str):
            d[k] = resolve(d[k], root, path=k in ("prompts", "eval_prompts", "embedding_cache"))
    for k in ("reward", "quality"):
        d[k] = _resolve_reward(d.get(k, "clip"), root)
    d["eval_rewards"] = [_resolve_reward(r, root) for r in d.get("eval_rewards", [])]
    d["data"] = {s: _resolve_source(v, root) for s, v in (d.get("data") or {}).items()}
    if d.get("pairs"):
        d["pairs"] = _resolve_source(d["pairs"], root)
    spec = _build(ModelSpec, {**d, "roles": roles}, where)
    if spec.dtype is not None and spec.dtype not in DTYPES:
        raise ValueError(f"{where}: dtype {spec.dtype!r} is not one of {list(DTYPES)}")
    if spec.max_sequence_length is not None and (not isinstance(spec.max_sequence_length, int)
                                                 or spec.max_sequence_length < 1):
        raise ValueError(f"{where}: max_sequence_length must be an integer >= 1, got {spec.max_sequence_length!r}")
    if spec.guidance is not None and not isinstance(spec.guidance, (int, float)):
        raise ValueError(f"{where}: guidance must be a number (FLUX.1-dev: 3.5), got {spec.guidance!r}")
    if not isinstance(spec.decode_batch, int) or spec.decode_batch < 1:
        raise ValueError(f"{where}: decode_batch must be an integer >= 1, got {spec.decode_batch!r}")
    return spec


def _resolve_reward(r, root):
    if not isinstance(r, dict):
        return r
    return {k: (resolve(v, root) if k in ("model", "processor", "head", "med_config") else v) for k, v in r.items()}


def _resolve_source(v, root):
    if isinstance(v, str):
        v = {"folder": v} if not looks_like_hub_id(v) else {"dataset": v}
    if not isinstance(v, dict):
        raise ValueError(f"a data source must be a folder path or a mapping ({{\"folder\": ...}} or {{\"dataset\": "
                         f"...}}), found {v!r:.100}")
    return {k: (resolve(x, root, path=True) if k in ("folder", "file") else x) for k, x in v.items()}


def load_spec(model: str, **overrides) -> ModelSpec:
    """`--model` -> ModelSpec. A .json/.yaml/.yml file is a spec; anything else is a pipeline folder / hub id."""
    path = Path(model).expanduser()
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"model spec file {model!r} does not exist")
        try:
            text = path.read_text()
        except UnicodeDecodeError as e:
            raise ValueError(f"model spec {model}: not UTF-8 text ({e})") from e
        if path.suffix.lower() == ".json":
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"model spec {model}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}"
                                 f"{'; the file is empty' if not text.strip() else ''}); expected an object such as "
                                 "{\"base\": \"stabilityai/sdxl-turbo\", ...}") from e
        else:
            try:
                import yaml
            except ImportError as e:
                raise ImportError("YAML model specs need PyYAML (pip install pyyaml); or write the spec as JSON") from e
            try:
                d = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"model spec {model}: not valid YAML ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"model spec {model} must hold a mapping (key: value, with 'base' required), "
                             f"found {'nothing (empty file)' if d is None else 'a ' + type(d).__name__}")
        d = {**d, **overrides}
        d.setdefault("name", path.stem)
        return from_dict(d, path.parent.resolve(), f"model spec {model}")
    return from_dict({"base": model, "name": Path(model).name or model, **overrides})
