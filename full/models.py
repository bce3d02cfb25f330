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
  `x0_renoise` (on its pipeline's grid: DMD2's card [999, 749, 499, 249], LCM-LoRA's LCMScheduler at 4 steps
  [999, 759, 499, 259]); a multi-step teacher is sampled with DDIM (trailing) whatever its scheduler. A flow
  model (FlowMatchEulerDiscreteScheduler) has the flow kernels only: `flow_sde` for the teacher (eta = 0 is the
  scheduler's Euler step), `flow_x0_renoise` for few-step distilled students and generators. Anything else is an
  error that says how to fix the spec.
* `schedule_name`: the scheduler config's betas must be one of common.SCHEDULES, eps-prediction, T = 1000.
  `flow_schedule`: common.FlowSchedule of a FlowMatchEulerDiscreteScheduler config (static shift, or FLUX's
  resolution-dependent one through diffusers' calculate_shift and set_timesteps(mu=...)), refusing the options the
  flow kernels do not model.
* `pipeline_grid`, `role_steps`: the grid a role's own pipeline samples on (its scheduler's set_timesteps through the
  pipeline's retrieve_timesteps / calculate_shift; FLOW_PIPELINES holds how SD3 and FLUX differ) at the step
  count of the model card (full/configs/pipelines.json) or the spec.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


def _from_pretrained(cls, source: str, what: str, random_weights: bool = False, **kw):
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


def check_flow_scheduler(config: dict, where: str) -> None:
    """A FlowMatchEulerDiscreteScheduler config the flow kernels model: plain (optionally resolution-dependent)
    shifted sigmas. The options that change them otherwise are an error saying what to set."""
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
    if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise ModelError(f"{where}: time_shift_type {config['time_shift_type']!r} is neither 'exponential' nor "
                         "'linear'")
    if config.get("use_dynamic_shifting"):
        lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        if None in (lo, hi) or base == top:
            raise ModelError(f"{where}: use_dynamic_shifting needs base_shift, max_shift and base_image_seq_len != "
                             f"max_image_seq_len, found {lo}, {hi}, {base}, {top}")
    shift = config.get("shift", 1.0)
    if not config.get("use_dynamic_shifting") and not (
            isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ModelError(f"{where}: the flow shift must be a number > 0, found {shift!r}")


@dataclass(frozen=True)
class FlowPipeline:
    """How a flow pipeline class turns num_inference_steps into its sigmas (its __call__, "Prepare timesteps"): the
    module whose calculate_shift / retrieve_timesteps it calls, the max_shift it assumes when the scheduler config
    has none, and the unshifted sigmas it passes to set_timesteps (None: the scheduler's own linspace)."""

    module: str
    max_shift: float
    sigmas: Any  # steps -> np.ndarray | None


FLOW_PIPELINES = {  # one row per flow pipeline class (kind): the only place where their timestep code differs
    "sd3": FlowPipeline("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3", 1.16, lambda n: None),
    "flux": FlowPipeline("diffusers.pipelines.flux.pipeline_flux", 1.15,
                         lambda n: np.linspace(1.0, 1 / n, n)),
}
# the pipeline module whose retrieve_timesteps an eps-model pipeline calls with num_inference_steps / timesteps
EPS_PIPELINES = {"sdxl": "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
                 "sd15": "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"}


def flow_mu(kind: str, config: dict, image_seq_len: int) -> float | None:
    """The resolution-dependent shift parameter mu the pipeline passes to set_timesteps (diffusers' own
    calculate_shift of the pipeline's module, with the pipeline's defaults); None without use_dynamic_shifting."""
    if not config.get("use_dynamic_shifting"):
        return None
    import importlib

    p = FLOW_PIPELINES[kind]
    return importlib.import_module(p.module).calculate_shift(
        image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", p.max_shift))


def flow_schedule(kind: str, scheduler, image_seq_len: int, where: str) -> common.FlowSchedule:
    """common.FlowSchedule of a flow model's FlowMatchEulerDiscreteScheduler: its static shift, or with
    use_dynamic_shifting (FLUX.1-dev) the training sigmas the scheduler itself computes for this image size
    (set_timesteps(sigmas=t/T, mu=flow_mu(...)): diffusers' time shift, not re-implemented)."""
    config = scheduler.config
    check_flow_scheduler(config, where)
    mu = flow_mu(kind, config, image_seq_len)
    if mu is None:
        return common.FlowSchedule(float(config.get("shift", 1.0)))
    sched = type(scheduler).from_config(config)
    sched.set_timesteps(sigmas=torch.arange(common.T, 0, -1, dtype=torch.float32).div(common.T).numpy(), mu=mu)
    return common.FlowSchedule(sigmas=sched.sigmas[:-1].flip(0))


def pipeline_grid(kind: str, scheduler, steps: int | None, timesteps: list[int] | None = None,
                  image_seq_len: int | None = None) -> list:
    """The grid the model's own diffusers pipeline samples on at `steps` steps (or at the given `timesteps`, as
    DMD2's card passes them), computed by the pipeline's own code path on a copy of `scheduler`: an eps-model's
    retrieve_timesteps(scheduler, steps, timesteps=...) -> integer timesteps; a flow model's sigmas (without the
    final 0) from its retrieve_timesteps with the pipeline's sigmas and calculate_shift mu (FLOW_PIPELINES)."""
    import importlib

    sched = type(scheduler).from_config(scheduler.config)
    if kind in FLOW_PIPELINES:
        p = FLOW_PIPELINES[kind]
        sigmas = None if sched.config.get("use_flow_sigmas") else p.sigmas(steps)
        mu = flow_mu(kind, sched.config, image_seq_len)
        importlib.import_module(p.module).retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas,
                                                             **({} if mu is None else {"mu": mu}))
        return sched.sigmas[:-1].tolist()
    retrieve = importlib.import_module(EPS_PIPELINES[kind]).retrieve_timesteps
    try:
        ts, _ = retrieve(sched, None if timesteps else steps, "cpu", timesteps=list(timesteps) if timesteps else None)
    except ValueError as e:  # a scheduler without custom timesteps
        raise ModelError(f"{type(sched).__name__} cannot sample the timesteps {timesteps}: {e}") from e
    return [int(t) for t in ts]


# pipeline-level facts of the shipped checkpoints (their model cards' diffusers examples): full/configs/pipelines.json
PIPELINE_FACTS = Path(__file__).resolve().parent / "configs" / "pipelines.json"
# a role's number of sampling steps where no model card and no spec says: a few-step student 4 (PSO App. B.1:
# N = 4), the teacher the methods' K = 25 (Sharpening's DDIM grid), a generator 1 (DI++)
ROLE_STEPS = {"teacher": 25, "student": 4, "generator": 1}


def pipeline_facts(*sources) -> dict:
    """The facts entry of the first source (hub id) that has one in full/configs/pipelines.json, else {}."""
    facts = json.loads(PIPELINE_FACTS.read_text())
    for src in sources:
        if isinstance(src, str) and src.rstrip("/") in facts:
            return facts[src.rstrip("/")]
    return {}


def role_steps(spec: ModelSpec, role: str, rspec: RoleSpec | None = None) -> tuple[int, list[int] | None]:
    """(number of steps, the card's explicit timesteps or None) a role samples with: the spec's "steps"; else the
    card's timesteps (DMD2: per UNet file) or, for a student, the card's num_inference_steps; else ROLE_STEPS. The
    teacher keeps the methods' 25 steps whatever its card says (Sharpening's K; the cards say 28-50)."""
    rspec = rspec or spec.roles.get(role, RoleSpec())
    facts = pipeline_facts(rspec.lora, rspec.unet, spec.base)
    card = facts.get("timesteps")
    if isinstance(card, dict):
        card = card.get(rspec.unet_file)
    if rspec.steps is not None:
        return rspec.steps, None
    if card and role != "teacher":
        return len(card), list(card)
    if role == "student" and "num_inference_steps" in facts:
        return int(facts["num_inference_steps"]), None
    return ROLE_STEPS[role], None


def role_kernel(role: str, scheduler, sampler: str | None = None, where: str = "", flow: bool = False,
                steps: int = 2) -> str:
    """The MDP kernel of a role, checked against its scheduler (a scheduler that does not match the MDP is an
    error). The teacher is a multi-step eps-model: DDIM with eta is exact for it whatever scheduler it ships.
    `flow`: a flow-matching model (SD3 / FLUX): FlowMatchEulerDiscreteScheduler and the flow kernels only — the
    teacher flow_sde, a few-step student / generator flow_x0_renoise. A one-step grid (`steps` 1) fits any
    scheduler (x0 = f(noise))."""
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
    if sampler in SAMPLER_SCHEDULERS and steps > 1:  # one step: x0 = f(noise), no scheduler involved
        if cls not in SAMPLER_SCHEDULERS[sampler]:
            raise ModelError(f"{where}: the {sampler} MDP does not match the checkpoint's scheduler {cls} (it samples "
                             f"with {', '.join(sorted(SAMPLER_SCHEDULERS[sampler]))}); fix \"scheduler\" or \"sampler\" "
                             "in the model spec")
        spacing = scheduler.config.get("timestep_spacing", "leading")
        if sampler == "euler_ancestral" and spacing != "trailing":
            raise ModelError(f"{where}: EulerAncestralDiscreteScheduler with timestep_spacing={spacing!r}; the "
                             "euler_ancestral MDP starts at sigma_max at t=999 ('trailing', as SDXL-Turbo ships it). "
                             "Set \"scheduler_config\": {\"timestep_spacing\": \"trailing\"}")
    return sampler


# the scheduler whose set_timesteps gives an eps kernel's grid when the role's own scheduler is not that kernel's:
# DDIM always on its trailing grid (a multi-step teacher, whatever it ships), x0-renoise on LCMScheduler's (a
# one-step generator on a multi-step scheduler: LCM's 1-step grid starts at pure noise, t = 999)
KERNEL_SCHEDULERS = {"ddim": ("DDIMScheduler", {"timestep_spacing": "trailing"}), "x0_renoise": ("LCMScheduler", {})}


def kernel_scheduler(sampler: str, scheduler):
    """The scheduler implementing `sampler` (KERNEL_SCHEDULERS), built from the role's scheduler config."""
    if sampler not in KERNEL_SCHEDULERS or (sampler != "ddim" and type(scheduler).__name__ in
                                            SAMPLER_SCHEDULERS.get(sampler, ())):
        return scheduler
    import diffusers

    name, kw = KERNEL_SCHEDULERS[sampler]
    return getattr(diffusers, name).from_config(scheduler.config, **kw)


def role_sampler(role: str, scheduler, sampler: str | None = None, timesteps: list[int] | None = None,
                 where: str = "", flow: bool = False) -> tuple[str, list[int]]:
    """(sampler, timesteps) of a role, checked against its scheduler (role_kernel) and the grid's range.
    Without `timesteps`: DEFAULT_TIMESTEPS (the world passes its role's pipeline grid instead)."""
    timesteps = list(timesteps) if timesteps else list(DEFAULT_TIMESTEPS[role])
    sampler = role_kernel(role, scheduler, sampler, where, flow, len(timesteps))
    if any(not 0 <= t < common.T for t in timesteps) or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ModelError(f"{where or f'role {role}'}: timesteps {timesteps} must be strictly decreasing within "
                         f"[0, {common.T - 1}]")
    return sampler, timesteps


def role_grid(spec: ModelSpec, role: str, kind: str, scheduler, sampler: str, image_seq_len: int | None = None,
              schedule: common.FlowSchedule | None = None, steps: int | None = None) -> list[int]:
    """The integer times a role samples on: the spec's explicit "timesteps", else its own pipeline's grid
    (pipeline_grid) at its step count (role_steps, or `steps`): an eps-model's timesteps from the scheduler that
    implements its kernel (kernel_scheduler), a flow model's sigmas placed on `schedule`'s times exactly
    (FlowSchedule.grid_times)."""
    rspec = spec.roles.get(role, RoleSpec())
    if rspec.timesteps and steps is None:
        return list(rspec.timesteps)
    n, card = (steps, None) if steps is not None else role_steps(spec, role, rspec)
    if kind in FLOW_PIPELINES:
        sigmas = pipeline_grid(kind, scheduler, n, image_seq_len=image_seq_len)
        return schedule.grid_times(sigmas, f"the {n}-step grid of role {role} of {spec.name or spec.base}")
    return pipeline_grid(kind, kernel_scheduler(sampler, scheduler), n, card)


def image_tokens(kind: str, side: int, net_config: dict) -> int:
    """The image sequence length a flow pipeline's dynamic shift is computed from: latent side / patch, squared
    (FLUX packs 2x2 latent patches; SD3 patchifies by its transformer's patch_size); 0 for a UNet."""
    if kind not in FLOW_PIPELINES:
        return 0
    patch = LATENT_PATCH.get(kind) or net_config.get("patch_size", 1)
    if side % patch:
        raise ValueError(f"the latent side {side} is not a multiple of the {kind} patch size {patch}")
    return (side // patch) ** 2


LATENT_PATCH = {"flux": 2}  # FluxPipeline packs the latents into 2x2 patches (_pack_latents)


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
    encoders, tokenizers = load_text_parts(spec, index, kind, dtype)
    sched_name = index["scheduler"][1]
    if not hasattr(diffusers, sched_name or ""):
        raise ModelError(f"model_index.json of {spec.base!r}: scheduler class {sched_name!r} is not a diffusers class")
    sched_cls = getattr(diffusers, sched_name)
    scheduler = _from_pretrained(sched_cls, spec.base, "the scheduler", subfolder="scheduler", **kw)
    return PipelineParts(kind, getattr(diffusers, cls_name), index, vae, encoders, tokenizers, scheduler,
                         bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl")))


def load_text_parts(spec: ModelSpec, index: dict, kind: str, dtype: torch.dtype) -> tuple[list, list]:
    """The text encoders (in `dtype`) and tokenizers of `spec.base`, in the pipeline's order (None where absent):
    at start-up, and again when precompute_embeddings freed them and a data source's captions must be encoded."""
    layout = KINDS[kind]
    kw = dict(revision=spec.revision, random_weights=spec.random_weights)
    encoders, tokenizers = [], []
    for enc, tok in layout["text"]:
        if enc in layout["optional"] and (not index.get(enc) or index[enc][0] is None):
            encoders.append(None)
            tokenizers.append(None)
            continue
        encoders.append(_from_pretrained(_component_class(index, enc, spec.base), spec.base, enc, subfolder=enc,
                                         variant=spec.variant, torch_dtype=dtype, **kw))
        tokenizers.append(_from_pretrained(_component_class(index, tok, spec.base), spec.base, tok, subfolder=tok,
                                           **kw))
    return encoders, tokenizers


def role_scheduler(spec: ModelSpec, role: RoleSpec, base_scheduler):
    """The role's scheduler: its own pipeline's (when its UNet comes from one) or the base's (`base_scheduler`),
    optionally replaced by another class from the same config (DMD2: LCMScheduler over SDXL base's config)."""
    import diffusers

    scheduler = base_scheduler
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
              dtype: torch.dtype = torch.float32):
    """The role's denoiser network (UNet, or the SD3 / FLUX transformer: parts.net_class from unet/ or
    transformer/) on the CPU, loaded in `dtype` (torch_dtype: never materialised in fp32 first), with its
    distillation LoRA fused."""
    cls, folder = parts.net_class(), parts.net_folder
    kw = dict(variant=spec.variant, torch_dtype=dtype, random_weights=spec.random_weights)
    if role.unet is None:
        unet = _from_pretrained(cls, spec.base, f"the {folder} of {where}", subfolder=folder,
                                revision=spec.revision, **kw)
    elif role.unet_file and spec.random_weights:  # random weights: the base architecture is the file's architecture
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
    if role.lora and not spec.random_weights:  # a fused LoRA changes no shape: random weights skip it
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
