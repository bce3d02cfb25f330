"""Loading SD1.5 / SDXL / SD3 / FLUX-class checkpoints with the real diffusers API, and validating them against the
methods' MDPs.

* `PipelineParts`: VAE, text encoder(s), tokenizer(s) and scheduler of `spec.base`, loaded component by component
  with `from_pretrained(base, subfolder=...)` (each class read from model_index.json) so a missing part is named in
  the error. KINDS says, per pipeline class, which denoiser (unet/ or transformer/) and text parts it has:
  SD3 two CLIPTextModelWithProjection + a T5EncoderModel, FLUX a CLIPTextModel (pooled) + a T5EncoderModel.
* `load_unet(spec, role)`: the denoiser network of a role (a UNet, or an SD3 / FLUX transformer) — the base's,
  another pipeline's (SDXL-Turbo, SD-Turbo, SD3.5-Large-Turbo), a bare folder, or a single state-dict file loaded
  into the base architecture (DMD2's `dmd2_sdxl_4step_unet_fp16.bin`) — with a distillation LoRA (LCM-LoRA, DMD2
  LoRA) fused first through `pipeline.load_lora_weights` + `fuse_lora`.
* `role_sampler`: the MDP kernel and grid of a role, checked against its scheduler: an SDXL-Turbo checkpoint
  (EulerAncestralDiscreteScheduler, "trailing") is the `euler_ancestral` MDP; DMD2 / LCM (LCMScheduler) is
  `x0_renoise` at [999, 749, 499, 249]; a multi-step teacher is sampled with DDIM whatever its scheduler. A flow
  model (FlowMatchEulerDiscreteScheduler) has the flow kernels only: `flow_sde` for the teacher (eta = 0 is the
  scheduler's Euler step), `flow_x0_renoise` for few-step distilled students and generators. Anything else is an
  error that says how to fix the spec.
* `schedule_name`: the scheduler config's betas must be one of common.SCHEDULES, eps-prediction, T = 1000.
  `flow_shift`: the shift of a FlowMatchEulerDiscreteScheduler config (static, or FLUX's resolution-dependent
  exp(mu)), refusing the options the flow kernels do not model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import common

from .spec import ModelSpec, RoleSpec, looks_like_hub_id

# scheduler class -> the MDP kernel it samples (docs/design.md section 3)
FEW_STEP_SCHEDULERS = {
    "EulerAncestralDiscreteScheduler": "euler_ancestral",  # SDXL-Turbo (trailing)
    "LCMScheduler": "x0_renoise",  # DMD2, LCM, LCM-LoRA
    "TCDScheduler": "x0_renoise",  # TCD with gamma = 0 is the same x0-renoise chain
}
SAMPLER_SCHEDULERS = {"euler_ancestral": {"EulerAncestralDiscreteScheduler"},
                      "x0_renoise": {"LCMScheduler", "TCDScheduler"}}
DEFAULT_TIMESTEPS = {"teacher": common.few_step_timesteps(25), "student": common.few_step_timesteps(4),
                     "generator": common.few_step_timesteps(1)}
PIPELINES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionPipeline": "sd15",
             "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
# kind -> the denoiser's subfolder and the (text encoder, tokenizer) pairs, in the pipeline's order; `optional` parts
# may be [null, null] in model_index.json (none so far: an SD3 without T5 would need the transformer to encode a
# prompt, as the pipeline fills its zeros from transformer.config)
KINDS = {
    "sd15": dict(net="unet", text=[("text_encoder", "tokenizer")], optional=()),
    "sdxl": dict(net="unet", text=[("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")], optional=()),
    "sd3": dict(net="transformer", text=[("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
                                         ("text_encoder_3", "tokenizer_3")], optional=()),
    "flux": dict(net="transformer", text=[("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")],
                 optional=()),
}
FLOW_KINDS = ("sd3", "flux")
FLOW_SAMPLERS = ("flow_sde", "flow_x0_renoise")
FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler"}
# the prompt length the pipelines encode by default (their max_sequence_length)
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}
COMPONENTS = ("unet", "transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
              "text_encoder_3", "tokenizer_3")


class ModelError(ValueError):
    """A checkpoint or spec that cannot be used, with what is missing or wrong."""


def _local(source: str, what: str) -> Path | None:
    """The local folder of `source`, None for a hub id, or an error naming the missing path."""
    p = Path(source).expanduser()
    if p.exists():
        return p
    if looks_like_hub_id(source):
        return None
    raise ModelError(f"{what} {source!r} does not exist (neither a local path nor a hub id like 'org/name')")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _offline_hint(source: str) -> str:
    """Why a hub id failed when the hub is switched off, instead of the loaders' guess about the network."""
    if _local(source, "model") is None and hub_offline():
        from huggingface_hub import constants

        return (f" -- the hub is offline (HF_HUB_OFFLINE=1) and {source!r} is not in the local cache "
                f"{constants.HF_HUB_CACHE}: download it first (huggingface-cli download {source}), unset "
                "HF_HUB_OFFLINE, or name a local folder")
    return ""


def _from_pretrained(cls, source: str, what: str, random_weights: bool = False, empty: bool = False, **kw):
    if empty:  # the architecture alone, on the meta device: no weights read (full/fsdp.py, FSDP processes > 0)
        return _empty(cls, source, what, random_weights, **kw)
    if random_weights:  # the real architecture from full/configs, random weights (full/architectures.py)
        from . import architectures

        try:
            obj = architectures.build(cls, source, kw.get("subfolder"))
        except ValueError as e:
            raise ModelError(f"cannot build {what} of {source} with random weights: {e}") from e
        dtype = kw.get("torch_dtype")
        return obj.to(dtype) if dtype is not None and isinstance(obj, torch.nn.Module) else obj
    try:
        return cls.from_pretrained(source, **kw)
    except (OSError, EnvironmentError, ValueError) as e:
        sub = f"/{kw['subfolder']}" if kw.get("subfolder") else ""
        hint = _offline_hint(source)
        raise ModelError(f"cannot load {what} from {source}{sub}{hint or ': ' + str(e)}") from e


def _empty(cls, source: str, what: str, random_weights: bool, subfolder=None, revision=None, torch_dtype=None,
           **_):
    from accelerate import init_empty_weights

    if random_weights:
        from . import architectures

        config = architectures.component_config(source, subfolder or "unet")
        config = architectures.shallow(config, architectures.config_class_name(config, cls))
    else:
        try:
            config = cls.load_config(source, subfolder=subfolder, revision=revision)
        except (OSError, EnvironmentError, ValueError) as e:
            raise ModelError(f"cannot read the config of {what} from {source}{_offline_hint(source) or ': ' + str(e)}") from e
    with init_empty_weights():
        net = cls.from_config(config)
    return net.to(torch_dtype) if torch_dtype is not None else net


def read_model_index(base: str, what: str = "base pipeline", random_weights: bool = False) -> dict:
    if random_weights:
        from . import architectures

        try:
            return architectures.model_index(base)
        except ValueError as e:
            raise ModelError(str(e)) from e
    local = _local(base, what)
    if local is None:
        from diffusers import DiffusionPipeline

        try:
            return _check_index(DiffusionPipeline.load_config(base), f"model_index.json of {what} {base!r}")
        except ModelError:
            raise
        except Exception as e:
            hint = _offline_hint(base)
            raise ModelError(f"cannot read model_index.json of {what} {base!r}{hint or ': ' + str(e)}") from e
    index = local / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{what} {base!r} lacks model_index.json: it is not a diffusers pipeline folder "
                         f"(found {sorted(x.name for x in local.iterdir())[:12]})")
    try:
        d = json.loads(index.read_text())
    except UnicodeDecodeError as e:
        raise ModelError(f"{index} is not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise ModelError(f"{index} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected the "
                         "mapping save_pretrained writes, e.g. {\"_class_name\": \"StableDiffusionXLPipeline\", "
                         "\"unet\": [\"diffusers\", \"UNet2DConditionModel\"], ...}") from e
    return _check_index(d, str(index))


def _check_index(d, where: str) -> dict:
    """model_index.json: a mapping whose components are [library, class] pairs."""
    if not isinstance(d, dict):
        raise ModelError(f"{where}: expected a JSON object (component -> [library, class]), found a "
                         f"{type(d).__name__}")
    for k in COMPONENTS:
        v = d.get(k)
        if v is not None and not (isinstance(v, list) and len(v) == 2 and all(x is None or isinstance(x, str) for x in v)):
            raise ModelError(f"{where}: key {k!r} must be [library, class] (e.g. [\"diffusers\", "
                             f"\"UNet2DConditionModel\"]), found {v!r}")
    return d


def _require_parts(base: str, index: dict, parts: list[str]) -> None:
    missing = [p for p in parts if not index.get(p) or index[p][0] is None]
    local = _local(base, "base pipeline")
    if local is not None:
        missing += [p for p in parts if p not in missing and not (local / p).is_dir()]
    if missing:
        raise ModelError(f"pipeline {base!r} lacks {', '.join(m + '/' for m in missing)} "
                         f"(the full backend needs {', '.join(parts)})")


def schedule_name(config: dict, where: str) -> str:
    """The common.Schedule name of a scheduler config, or an error saying what does not match."""
    if config.get("num_train_timesteps", 1000) != common.T:
        raise ModelError(f"{where}: num_train_timesteps={config['num_train_timesteps']}, the methods assume {common.T}")
    pred = config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise ModelError(f"{where}: prediction_type={pred!r}; the methods are written for eps-prediction models "
                         "(SD2.x-768 and other v-prediction checkpoints are not supported)")
    if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
        raise ModelError(f"{where}: custom trained_betas / zero-SNR rescaling is not supported")
    for name, kw in common.SCHEDULES.items():
        if config.get("beta_schedule", "linear") == kw["beta_schedule"] and all(
                abs(config.get(k, kw[k]) - kw[k]) < 1e-9 for k in ("beta_start", "beta_end") if k in kw):
            return name
    raise ModelError(f"{where}: beta schedule {config.get('beta_schedule')!r} ({config.get('beta_start')}, "
                     f"{config.get('beta_end')}) is none of {sorted(common.SCHEDULES)}")


def flow_shift(config: dict, image_seq_len: int, where: str, max_shift_default: float = 1.15) -> float:
    """The shift of FlowSchedule for a FlowMatchEulerDiscreteScheduler config: `shift` (SD3 / SD3.5: 3.0,
    FLUX.1-schnell: 1.0), or with use_dynamic_shifting (FLUX.1-dev) the resolution-dependent one the pipelines
    compute: mu linear in the image sequence length between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift) (diffusers' calculate_shift), and time_shift_type "exponential" (exp(mu) /
    (exp(mu) + 1/s - 1) = a static shift of exp(mu)) or "linear" (a shift of mu). The scheduler options the flow
    kernels do not model are an error."""
    if config.get("num_train_timesteps", 1000) != common.T:
        raise ModelError(f"{where}: num_train_timesteps={config['num_train_timesteps']}, the methods assume {common.T}")
    # stochastic_sampling=true is allowed: its step is the flow_x0_renoise kernel, the sigmas are unchanged
    for key in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if config.get(key):
            raise ModelError(f"{where}: {key}=true is not supported (the flow kernels use the plain shifted sigmas "
                             "s' = shift s / (1 + (shift - 1) s)); set it to false in \"scheduler_config\"")
    if config.get("shift_terminal"):
        raise ModelError(f"{where}: shift_terminal={config['shift_terminal']} (sigmas stretched to end above 0) is not "
                         "supported; set \"scheduler_config\": {\"shift_terminal\": null}")
    if not config.get("use_dynamic_shifting"):
        shift = config.get("shift", 1.0)
    else:
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        lo, hi = config.get("base_shift", 0.5), config.get("max_shift", max_shift_default)
        if None in (lo, hi) or top == base:
            raise ModelError(f"{where}: use_dynamic_shifting needs base_shift, max_shift and base_image_seq_len != "
                             f"max_image_seq_len, found {lo}, {hi}, {base}, {top}")
        m = (hi - lo) / (top - base)
        mu = image_seq_len * m + (lo - m * base)  # diffusers' calculate_shift
        kind = config.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise ModelError(f"{where}: time_shift_type {kind!r} is neither 'exponential' nor 'linear'")
        shift = math.exp(mu) if kind == "exponential" else mu
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ModelError(f"{where}: the flow shift must be a number > 0, found {shift!r}")
    return float(shift)


def role_sampler(role: str, scheduler, sampler: str | None = None, timesteps: list[int] | None = None,
                 where: str = "", flow: bool = False) -> tuple[str, list[int]]:
    """(sampler, timesteps) of a role, checked against its scheduler (a scheduler that does not match the MDP is
    an error). The teacher is a multi-step eps-model: DDIM with eta is exact for it whatever scheduler it ships.
    `flow`: a flow-matching model (SD3 / FLUX): FlowMatchEulerDiscreteScheduler and the flow kernels only — the
    teacher flow_sde, a few-step student / generator flow_x0_renoise."""
    cls = type(scheduler).__name__
    where = where or f"role {role}"
    if flow:
        if cls not in FLOW_SCHEDULERS:
            raise ModelError(f"{where}: a flow-matching model needs FlowMatchEulerDiscreteScheduler (its sigmas are "
                             f"what common.FlowSchedule models), found {cls}; fix \"scheduler\" in the model spec")
        sampler = sampler or ("flow_sde" if role == "teacher" else "flow_x0_renoise")
        if sampler not in FLOW_SAMPLERS:
            raise ModelError(f"{where}: sampler {sampler!r} is a DDPM kernel; a flow-matching model (velocity "
                             f"prediction) samples with one of {list(FLOW_SAMPLERS)}")
    elif sampler is None:
        if role == "teacher":
            sampler = "ddim"
        elif cls in FEW_STEP_SCHEDULERS:
            sampler = FEW_STEP_SCHEDULERS[cls]
        elif role == "generator":
            sampler = "x0_renoise"  # one step: every sampler gives x0 = f(noise); no re-noising is involved
        else:
            raise ModelError(
                f"{where}: scheduler {cls} is not a few-step sampler; a {role} needs EulerAncestralDiscreteScheduler "
                "('trailing', SDXL-Turbo) or LCMScheduler (DMD2, LCM). For SDXL-DMD2 set \"scheduler\": "
                "\"LCMScheduler\" in the role, or name \"sampler\" explicitly")
    elif sampler in FLOW_SAMPLERS:
        raise ModelError(f"{where}: sampler {sampler!r} is a flow-matching kernel, but this is an eps-prediction "
                         "model; choose one of x0_renoise, euler_ancestral, ddim")
    if sampler not in common.KERNELS:
        raise ModelError(f"{where}: unknown sampler {sampler!r}; choose one of {sorted(common.KERNELS)}")
    timesteps = list(timesteps) if timesteps else list(DEFAULT_TIMESTEPS[role])
    if sampler in SAMPLER_SCHEDULERS and len(timesteps) > 1:  # one step: x0 = f(noise), no scheduler involved
        if cls not in SAMPLER_SCHEDULERS[sampler]:
            raise ModelError(f"{where}: the {sampler} MDP does not match the checkpoint's scheduler {cls} (it samples "
                             f"with {', '.join(sorted(SAMPLER_SCHEDULERS[sampler]))}); fix \"scheduler\" or \"sampler\" "
                             "in the model spec")
        spacing = scheduler.config.get("timestep_spacing", "leading")
        if sampler == "euler_ancestral" and spacing != "trailing":
            raise ModelError(f"{where}: EulerAncestralDiscreteScheduler with timestep_spacing={spacing!r}; the "
                             "euler_ancestral MDP starts at sigma_max at t=999 ('trailing', as SDXL-Turbo ships it). "
                             "Set \"scheduler_config\": {\"timestep_spacing\": \"trailing\"}")
    if any(not 0 <= t < common.T for t in timesteps) or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ModelError(f"{where}: timesteps {timesteps} must be strictly decreasing within [0, {common.T - 1}]")
    return sampler, timesteps


@dataclass
class PipelineParts:
    """The non-denoiser components of `spec.base` and the facts the world needs about them."""

    kind: str  # "sdxl" | "sd15" | "sd3" | "flux"
    pipeline_class: Any
    index: dict
    vae: Any
    text_encoders: list  # in the pipeline's order (text_encoder, text_encoder_2[, text_encoder_3]); None if absent
    tokenizers: list
    scheduler: Any
    force_zeros_for_empty_prompt: bool

    @property
    def net_folder(self) -> str:
        """unet or transformer: the denoiser's subfolder and its name in the pipeline."""
        return KINDS[self.kind]["net"]

    @property
    def flow(self) -> bool:
        return self.kind in FLOW_KINDS

    def net_class(self):
        """The denoiser class model_index.json names (UNet2DConditionModel, SD3Transformer2DModel, ...)."""
        import diffusers

        entry = self.index.get(self.net_folder) or ["diffusers", None]
        name = entry[1] or {"unet": "UNet2DConditionModel", "transformer": None}[self.net_folder]
        if not hasattr(diffusers, name or ""):
            raise ModelError(f"model_index.json: {self.net_folder} class {name!r} is not a diffusers class")
        return getattr(diffusers, name)

    def text_components(self) -> dict:
        """{text_encoder: ..., tokenizer: ..., ...} as the pipeline class takes them (absent ones None)."""
        out = {}
        for k, (enc, tok) in enumerate(KINDS[self.kind]["text"]):
            out[enc] = self.text_encoders[k] if k < len(self.text_encoders) else None
            out[tok] = self.tokenizers[k] if k < len(self.tokenizers) else None
        return out


def _component_class(index: dict, part: str, base: str):
    import diffusers
    import transformers

    lib, name = index[part]
    module = {"diffusers": diffusers, "transformers": transformers}.get(lib)
    if module is None or not hasattr(module, name or ""):
        raise ModelError(f"model_index.json of {base!r}: {part} is [{lib!r}, {name!r}], not a diffusers / "
                         "transformers class")
    return getattr(module, name)


def load_parts(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> PipelineParts:
    """The non-denoiser components; text encoders loaded in `dtype` (torch_dtype), the VAE in fp32 when `dtype` is
    fp16 (whether it must stay fp32 depends on its config: world.vae_dtype), else in `dtype`."""
    import diffusers

    index = read_model_index(spec.base, random_weights=spec.random_weights)
    cls_name = index.get("_class_name", "")
    if cls_name not in PIPELINES:
        raise ModelError(f"pipeline {spec.base!r} is a {cls_name or 'pipeline of unknown class'}; the full backend "
                         f"supports {sorted(PIPELINES)}")
    kind = PIPELINES[cls_name]
    layout = KINDS[kind]
    present = [(e, t) for e, t in layout["text"]
               if not (e in layout["optional"] and (not index.get(e) or index[e][0] is None))]
    _require_parts(spec.base, index, [layout["net"], "vae", "scheduler", *[x for pair in present for x in pair]])
    kw = dict(revision=spec.revision, random_weights=spec.random_weights)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    if spec.vae:
        local = _local(spec.vae, "VAE")
        sub = "vae" if local is not None and (local / "vae").is_dir() else None
        vae = _from_pretrained(diffusers.AutoencoderKL, spec.vae, "the VAE", subfolder=sub, torch_dtype=vae_dtype,
                               random_weights=spec.random_weights)
    else:
        vae = _from_pretrained(diffusers.AutoencoderKL, spec.base, "the VAE", subfolder="vae", variant=spec.variant,
                               torch_dtype=vae_dtype, **kw)
    encoders, tokenizers = [], []
    for enc, tok in layout["text"]:
        if (enc, tok) not in present:
            encoders.append(None)
            tokenizers.append(None)
            continue
        encoders.append(_from_pretrained(_component_class(index, enc, spec.base), spec.base, enc, subfolder=enc,
                                         variant=spec.variant, torch_dtype=dtype, **kw))
        tokenizers.append(_from_pretrained(_component_class(index, tok, spec.base), spec.base, tok, subfolder=tok, **kw))
    sched_name = index["scheduler"][1]
    if not hasattr(diffusers, sched_name or ""):
        raise ModelError(f"model_index.json of {spec.base!r}: scheduler class {sched_name!r} is not a diffusers class")
    sched_cls = getattr(diffusers, sched_name)
    scheduler = _from_pretrained(sched_cls, spec.base, "the scheduler", subfolder="scheduler", **kw)
    return PipelineParts(kind, getattr(diffusers, cls_name), index, vae, encoders, tokenizers, scheduler,
                         bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl")))


def role_scheduler(spec: ModelSpec, role: RoleSpec, parts: PipelineParts):
    """The role's scheduler: its own pipeline's (when its UNet comes from one) or the base's, optionally replaced
    by another class from the same config (DMD2: LCMScheduler over SDXL base's config)."""
    import diffusers

    scheduler = parts.scheduler
    if role.unet and role.unet_file is None:
        local = _local(role.unet, "UNet source")
        if local is None or (local / "model_index.json").is_file():
            index = read_model_index(role.unet, "UNet source pipeline", spec.random_weights) if (
                local is not None or spec.random_weights) else None
            if index is None:
                try:
                    index = diffusers.DiffusionPipeline.load_config(role.unet)
                except Exception:
                    index = None
            if index and index.get("scheduler"):
                cls = getattr(diffusers, index["scheduler"][1])
                scheduler = _from_pretrained(cls, role.unet, "the scheduler", subfolder="scheduler",
                                             random_weights=spec.random_weights)
    if role.scheduler:
        if not hasattr(diffusers, role.scheduler):
            raise ModelError(f"unknown diffusers scheduler class {role.scheduler!r}")
        scheduler = getattr(diffusers, role.scheduler).from_config(scheduler.config, **role.scheduler_config)
    elif role.scheduler_config:
        scheduler = type(scheduler).from_config(scheduler.config, **role.scheduler_config)
    return scheduler


def load_unet(spec: ModelSpec, role: RoleSpec, parts: PipelineParts, where: str,
              dtype: torch.dtype = torch.float32, empty: bool = False):
    """The role's denoiser network (UNet, or the SD3 / FLUX transformer: parts.net_class from unet/ or
    transformer/) on the CPU, loaded in `dtype` (torch_dtype: never materialised in fp32 first), with its
    distillation LoRA fused. `empty`: its architecture on the meta device, no weights read (an FSDP process > 0,
    which receives process 0's weights when the network is sharded: full/fsdp.py)."""
    cls, folder = parts.net_class(), parts.net_folder
    kw = dict(variant=spec.variant, torch_dtype=dtype, random_weights=spec.random_weights, empty=empty)
    if role.unet is None:
        unet = _from_pretrained(cls, spec.base, f"the {folder} of {where}", subfolder=folder,
                                revision=spec.revision, **kw)
    elif role.unet_file and (spec.random_weights or empty):  # the base architecture is the file's architecture
        unet = _from_pretrained(cls, spec.base, f"the {folder} of {where}", subfolder=folder,
                                revision=spec.revision, **kw)
    elif role.unet_file:  # DMD2: a bare state dict for the base architecture, loaded into an empty (meta) network
        from accelerate import init_empty_weights

        with init_empty_weights():
            unet = cls.from_config(read_unet_config(spec, parts))
        state = _read_state_dict(role.unet, role.unet_file, where)
        expected = unet.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or shapes:
            raise ModelError(f"{role.unet_file} of {role.unet} ({where}) does not fit the {folder} of {spec.base}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}")
        unet.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
        del state
    else:
        local = None if spec.random_weights else _local(role.unet, f"{folder} source of {where}")
        sub = role.unet_subfolder
        if sub is None and (local is None or (local / folder).is_dir() or (local / "model_index.json").exists()):
            sub = folder
        if local is not None and not (local / (sub or "") / "config.json").is_file():
            looked = (f"{sub}/config.json" if sub else
                      f"{folder}/config.json (a pipeline) or config.json (a bare {cls.__name__})")
            raise ModelError(f"{folder} source {role.unet!r} of {where} lacks {looked}")
        unet = _from_pretrained(cls, role.unet, f"the {folder} of {where}", subfolder=sub, **kw)
    if role.lora and not spec.random_weights and not empty:  # a fused LoRA changes no shape: random weights skip it
        unet = fuse_lora(unet, role, parts, where)
    return unet.requires_grad_(False).eval()


def read_unet_config(spec: ModelSpec, parts: PipelineParts | None = None) -> dict:
    """The config of the base's denoiser (unet/config.json, or transformer/config.json for SD3 / FLUX)."""
    folder = parts.net_folder if parts is not None else "unet"
    if spec.random_weights:
        from . import architectures

        return architectures.component_config(spec.base, folder)
    cls = parts.net_class() if parts is not None else __import__("diffusers").UNet2DConditionModel
    try:
        return cls.load_config(spec.base, subfolder=folder, revision=spec.revision)
    except Exception as e:
        raise ModelError(f"cannot read {folder}/config.json of {spec.base}: {e}") from e


def _read_state_dict(source: str, filename: str, where: str) -> dict[str, torch.Tensor]:
    local = _local(source, f"UNet weights of {where}")
    if local is None:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, filename))
        except Exception as e:
            raise ModelError(f"cannot download {filename} from {source} for {where}: {e}") from e
    else:
        path = local / filename if local.is_dir() else local
    if not path.is_file():
        raise ModelError(f"UNet weights file {path} of {where} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def fuse_lora(unet, role: RoleSpec, parts: PipelineParts, where: str):
    """Fuse a distillation LoRA (LCM-LoRA, DMD2 LoRA, a FLUX / SD3 LoRA) into the denoiser weights with diffusers'
    own loaders: the pipeline class's `lora_state_dict` (which converts kohya / old diffusers formats), the network's
    `load_lora_adapter` and `fuse_lora`, then `unload_lora`. Needs no text encoder (precompute_embeddings)."""
    _local(role.lora, f"LoRA of {where}")
    try:
        state, alphas, metadata = parts.pipeline_class.lora_state_dict(role.lora, weight_name=role.lora_weight_name,
                                                                       return_lora_metadata=True)
        unet.load_lora_adapter(state, network_alphas=alphas, metadata=metadata, prefix=parts.net_folder,
                               adapter_name="distill")
    except Exception as e:
        raise ModelError(f"cannot load the LoRA {role.lora!r} of {where}{_offline_hint(role.lora) or ': ' + str(e)}") from e
    if not getattr(unet, "peft_config", None) or "distill" not in unet.peft_config:
        raise ModelError(f"the LoRA {role.lora!r} of {where} holds no {parts.net_folder} layers (keys starting with "
                         f"'{parts.net_folder}.')")
    unet.fuse_lora(lora_scale=role.lora_scale, adapter_names=["distill"])
    unet.unload_lora()
    return unet
