"""The diffusers implementation of common.World / common.Denoiser (docs/design.md sections 8 and 10).

* `FullDenoiser`: the role's network called as its pipeline calls it, through the family adapter of the pipeline
  class (full/families: eps = unet(x_t, t, prompt embeddings [, SDXL pooled embeds + add_time_ids]); the velocity
  of an SD3 / FLUX / Z-Image / FLUX.2 transformer with its packing, position ids, timestep convention and guidance
  input), with a peft LoRA on the family's targets (`add_adapter`; the attention projections); `frozen()`
  disables the adapter, so the pre-trained model costs no memory. UNets are loaded in the weight dtype
  (torch_dtype), the trainable weights cast to fp32 with diffusers' `cast_training_params`, the forward runs under
  autocast; inputs follow the caller's device and come back on it. `module` is the UNet after `accelerator.prepare`
  (DDP with several processes), as diffusers' training examples do: the calls that can carry a gradient go through
  it, so DDP averages the gradients in the backward pass (and `accelerator.accumulate(module)` skips the sync
  between micro-batches); no-grad and frozen calls use the plain UNet. `adapter_state()` copies to the CPU.
* `FullAccelerator`: accelerate's Accelerator; `adam_8bit` makes `prepare` swap a torch Adam/AdamW for
  bitsandbytes' AdamW8bit with the same hyperparameters. Its mixed precision is the spec's dtype, or accelerate's
  configuration when the spec names none (`accelerate launch --mixed_precision bf16`).
* `FullWorld`: the schedule (common.Schedule, or common.FlowSchedule from a flow model's
  FlowMatchEulerDiscreteScheduler), every role's sampler and grid (its own pipeline's: models.role_grid; a flow
  grid's sigmas placed exactly on integer times once, at start-up), prompts -> embeddings through the pipeline's
  own encode_prompt, cached on disk behind a bounded RAM cache (data.EmbeddingCache; condition dicts with a
  `prompt_id` row so a reward can find the text),
  VAE encode / decode (outside the caller's autocast, in the VAE's dtype), rewards on decoded images in chunks of
  `decode_batch`, image-caption data, preference pairs and concept images as latents (a bounded latent cache; each
  source opened when the run first reads it),
  metrics, figures, LoRA export in the diffusers format (`pipe.load_lora_weights(dir)` loads it), and the paper's
  defaults for a run on a checkpoint (`method_defaults`). What differs between pipeline classes is the family
  adapter's (`world.family`, full/families); nothing here branches on the family.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import common

from . import data as data_lib
from . import models
from .families import flux as flux_family
from .families import sd3 as sd3_family
from .families import unet as unet_family
from .rewards import load_reward, reward_name
from .spec import ROLES, ModelSpec, RoleSpec

# the families' LoRA targets and forwards under their former names (full/memory_plan.py, tests)
LORA_TARGETS = unet_family.LORA_TARGETS  # the UNet's: to_q / to_k / to_v / to_out.0
TRANSFORMER_LORA_TARGETS = sd3_family.LORA_TARGETS  # + the joint attention's add_q/k/v_proj, to_add_out
LORA_TARGETS_BY_NET = {"unet": LORA_TARGETS, "transformer": TRANSFORMER_LORA_TARGETS}
unet_forward, sd3_forward, flux_forward = unet_family.forward, sd3_family.forward, flux_family.forward


def _to(module, device, dtype):
    """module.to(device[, dtype]) without diffusers' cast warning when the dtype does not change."""
    same = all(p.dtype == dtype for p in module.parameters())
    return module.to(device) if same else module.to(device, dtype)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # accelerate's names
LATENT_CACHE = 4096  # data latents kept (1 GiB at 1024^2); the rest are re-encoded when drawn again
PRECOMPUTE_LIMIT = 20000  # prompt embeddings precompute_embeddings may encode before training (per source opened)
EMBED_RAM_BYTES = 1 << 30  # prompt embeddings kept in RAM (the rest on disk): 256 T5-XXL ones at 512 tokens


def vae_dtype(dtype: torch.dtype, vae_config, fixed_vae: bool) -> torch.dtype:
    """fp16-safe VAE: SDXL's original VAE overflows in fp16 (config.force_upcast), so it runs in fp32 then, as the
    diffusers pipelines do, unless a fixed VAE (e.g. madebyollin/sdxl-vae-fp16-fix) is named in the spec."""
    upcast = dtype == torch.float16 and vae_config.get("force_upcast", False) and not fixed_vae
    return torch.float32 if upcast else dtype


def _accelerator_class():
    from accelerate import Accelerator

    class FullAccelerator(Accelerator):
        """accelerate's Accelerator; `adam_8bit` makes `prepare` swap a torch Adam/AdamW for bitsandbytes' AdamW8bit
        with the same hyperparameters (the methods keep writing torch.optim.AdamW)."""

        def __init__(self, *args, adam_8bit: bool = False, **kw):
            super().__init__(*args, **kw)
            self.adam_8bit = adam_8bit

        def prepare(self, *args, **kw):
            if self.adam_8bit:
                args = tuple(_adam_8bit(a) for a in args)
            from . import fsdp  # under FSDP2: a pending UNet is sharded together with its LoRA's optimizer

            return fsdp.prepare(self, super().prepare, args, kw)

    return FullAccelerator


def _adam_8bit(obj):
    if not isinstance(obj, (torch.optim.Adam, torch.optim.AdamW)):
        return obj
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("the model spec sets adam_8bit, which needs bitsandbytes (pip install bitsandbytes; "
                          "CUDA only): install it or set \"adam_8bit\": false") from e
    d = obj.defaults
    wd = d["weight_decay"] if isinstance(obj, torch.optim.AdamW) else 0.0
    return bnb.optim.AdamW8bit(obj.param_groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=wd)


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors copied straight to the CPU (a GPU tensor is not cloned on the GPU first)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def fold_lora(unet, state: dict[str, torch.Tensor], targets: list[str], where: str):
    """`unet` with a LoRA merged into its weights: `state` is the adapter_state() of a FullDenoiser of this network
    (peft keys, any rank; PSO's de-distill adapter). Added with add_adapter, loaded, then diffusers' fuse_lora and
    unload_lora: the weights keep it, no adapter is left for the trainable LoRA to share."""
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

    ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k}
    if len(ranks) != 1:
        raise ValueError(f"{where}: the adapter to merge has no LoRA of one rank (lora_A ranks: {sorted(ranks)})")
    rank = ranks.pop()
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=targets))
    expected = get_peft_model_state_dict(unet)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: the adapter to merge does not fit this network: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {shapes[:3]} ({len(missing)}, {len(unexpected)}, "
                         f"{len(shapes)} in all)")
    set_peft_model_state_dict(unet, {k: v.to(unet.device) for k, v in state.items()})
    unet.fuse_lora()
    unet.unload_lora()
    return unet


class FullDenoiser:
    """A role's denoiser network (UNet: an eps-model; a flow transformer: a velocity model) with a trainable
    LoRA (or every weight, `train_full`). `unet` is that network whatever its family; the call goes through the
    family's forward (full/families), which builds the network's inputs from the condition dict.

    `unet` is the plain UNet (its adapter is switched off by `frozen()`), `module` the same UNet after
    `accelerator.prepare` (DistributedDataParallel with several processes): the methods hand `module` to
    `accelerator.accumulate`. A call that can carry a gradient into the trained weights goes through `module`, so
    DDP averages the gradients in the backward pass; a call under no_grad or `frozen()` uses the plain UNet (DDP
    has nothing to synchronise there, and the adapter-disabled pass must not count as a use of the LoRA)."""

    def __init__(self, unet, sampler: str, timesteps: list[int], world: "FullWorld", lora_rank: int = 16,
                 train_full: bool = False, role: str = "", reference=None, guidance: float | None = None):
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.sampler, self.timesteps, self.train_full, self.role = sampler, list(timesteps), train_full, role
        self.guidance = guidance  # a guidance-distilled FLUX transformer's embedded guidance (FullWorld._role_guidance)
        self.device, self.dtype = world.device, world.dtype
        self.schedule, self._forward = world.schedule, world.family.forward
        self._frozen = False
        if train_full:  # `reference` (loaded in the weight dtype) is the frozen model; the trained UNet is fp32
            if reference is None:
                raise ValueError("train_full needs the frozen reference UNet (FullWorld.denoiser loads it)")
            self.reference_unet = reference.to(self.device).requires_grad_(False).eval()
            unet = unet.to(self.device).requires_grad_(True)
        else:
            if lora_rank < 1:
                raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
            from . import fsdp

            if not fsdp.is_fsdp(world.accelerator):  # under FSDP it reaches the GPU in shards (full/fsdp.py)
                unet = unet.to(self.device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(world.spec.seed)  # the same initial A on every rank and every run
                unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=True,
                                            target_modules=world.family.lora_targets(world.net_config)))
        cast_training_params(unet, dtype=torch.float32)  # trainable weights in fp32, frozen ones in the spec's dtype
        if world.spec.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = unet
        # DDP where there are several processes (it also broadcasts rank 0's weights, so every rank starts equal);
        # under FSDP2 the same object, sharded in place when its optimizer is prepared (full/fsdp.py)
        from . import fsdp

        self.module = fsdp.prepare_module(world.accelerator, unet, train_full)

    def __call__(self, x_t: torch.Tensor, t, cond: dict) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t.to(self.device)
        if self._frozen:
            net = self.reference_unet if self.train_full else self.unet
        else:
            net = self.module if torch.is_grad_enabled() else self.unet
        cond = {k: v.to(self.device) for k, v in cond.items() if k not in ("prompt_id", "guidance")}
        if self.guidance is not None:  # this network's own (the world's condition carries its base's)
            cond["guidance"] = torch.full((x_t.shape[0],), self.guidance, dtype=torch.float32, device=self.device)
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            out = self._forward(net, x_t.to(self.device), t, cond, self.schedule)
        return out.to(x_t.device, torch.float32)

    @contextlib.contextmanager
    def frozen(self):
        """The pre-trained prediction eps_pre: the same UNet with its adapter disabled."""
        self._frozen = True
        try:
            if self.train_full:
                yield
            else:
                self.unet.disable_adapters()
                try:
                    yield
                finally:
                    self.unet.enable_adapters()
        finally:
            self._frozen = False

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def _state_view(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return self.unet.state_dict() if self.train_full else get_peft_model_state_dict(self.unet)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained weights as CPU tensors (the LoRA in peft's key format, or the whole UNet with train_full)."""
        return _cpu_copy(self._state_view())

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = self._state_view()
        unexpected, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if unexpected or missing or shapes:
            what = "this UNet" if self.train_full else "this UNet's LoRA"
            raise ValueError(f"adapter state does not fit {what}: unexpected {unexpected[:3]}, missing "
                             f"{missing[:3]}, other shapes {shapes[:3]} (a different lora_rank or checkpoint?)")
        if self.train_full:
            self.unet.load_state_dict(state)
            return
        set_peft_model_state_dict(self.unet, {k: v.to(self.device) for k, v in state.items()})

    def train(self, mode: bool = True):
        self.unet.train(mode)
        return self

    def eval(self):
        return self.train(False)


class FullWorld:
    """common.World for SD1.5 / SDXL / SD3 / FLUX-class diffusers checkpoints; built by full.load_world from a
    ModelSpec."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.name = spec.name or Path(spec.base).name
        data_lib.check_paths(spec)  # a missing prompt / data / reward file fails now, before any download
        # precision: the spec's dtype if it names one, else accelerate's configuration (accelerate launch
        # --mixed_precision bf16, or `accelerate config`); weights of the frozen parts are loaded in it
        self.accelerator = _accelerator_class()(mixed_precision=spec.mixed_precision, adam_8bit=spec.adam_8bit,
                                                cpu=not torch.cuda.is_available())  # cpu: gloo under torchrun
        from .launch import check_processes

        check_processes(self.accelerator)  # as many processes as were asked for (accelerate's CPU mode may start one)
        mp = self.accelerator.mixed_precision
        if mp not in MIXED_PRECISION:
            raise ValueError(f"mixed precision {mp!r} (from accelerate's configuration) is not supported by the full "
                             f"backend; choose one of {sorted(MIXED_PRECISION)} or set \"dtype\" in the model spec")
        self.device, self.dtype = self.accelerator.device, MIXED_PRECISION[mp]
        self.decode_batch = spec.decode_batch  # the largest batch any sampling / decoding / scoring call may use
        self.parts = models.load_parts(spec, self.dtype)
        self.kind, self.family = self.parts.kind, self.parts.family  # full/families: what differs per pipeline
        vae = self.parts.vae
        self.vae_dtype = vae_dtype(self.dtype, vae.config, fixed_vae=bool(spec.vae))
        self.vae = _to(vae, self.device, self.vae_dtype).requires_grad_(False).eval()
        if spec.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for enc in self.parts.text_encoders:
            _to(enc, self.device, self.dtype).requires_grad_(False).eval()
        self.net_config = models.read_unet_config(spec, self.parts)
        # the default image side as the pipelines take it: sample_size x the VAE factor (FLUX: 128 x the factor)
        self.resolution = spec.resolution or self.net_config.get("sample_size", 128) * self.vae_factor
        if self.resolution % self.vae_factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE factor {self.vae_factor}")
        try:  # the state's side (the VAE latents', or FLUX.2's 2x2-patchified half) and its image tokens
            side = self.family.state_side(self.resolution // self.vae_factor)
            self.image_seq_len = models.image_tokens(self.kind, self.resolution // self.vae_factor, self.net_config)
        except ValueError as e:
            raise ValueError(f"resolution {self.resolution}: {e}; use a multiple of the patch size x "
                             f"{self.vae_factor}") from e
        self.shape = (self.family.state_channels(self.vae.config), side, side)
        self.family.check(self)  # e.g. a transformer whose input channels do not fit the VAE's
        self.guidance = self._guidance()
        self.schedule = self._schedule(self.parts.scheduler, f"scheduler of {spec.base}")
        self._table = getattr(self.schedule, "sigmas", None)  # a flow table before grids are placed; None: DDPM
        self._table = None if self._table is None else self._table.clone()
        # every role's scheduler must match and its grid is its pipeline's (fails now, not after an hour of
        # training); a flow role's pipeline sigmas are placed on the schedule's integer times here, once
        self._grids: dict[tuple, tuple[str, list[int]]] = {}
        for role in ROLES:
            try:
                self.role_sampler(role)
            except models.ModelError:
                if role in spec.roles:
                    raise  # a role this checkpoint cannot play (a student of SDXL base) fails when it is asked for
        self.prompts = data_lib.load_prompts(spec.prompts)
        self.eval_prompts = data_lib.load_prompts(spec.eval_prompts) if spec.eval_prompts else self.prompts
        self._texts: list[str] = []
        self._ids: dict[str, int] = {}
        # prompt embeddings: on disk (keyed by model + prompt) behind a bounded RAM cache (data.EmbeddingCache)
        self.embeddings = data_lib.EmbeddingCache(self._embedding_folder(), self._embedding_key(), EMBED_RAM_BYTES)
        # VAE latents of data images, bounded: a data set of any size costs at most LATENT_CACHE latents
        self._latents: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self.denoisers: list[FullDenoiser] = []
        self._encoder_pipe = self._make_encoder_pipe()
        if spec.precompute_embeddings:
            # the text every run reads (+ the negative prompt: the null condition of CFG is its encoding in SD1.5, SD3,
            # FLUX's true CFG); a data source's captions when the run opens it (_precompute in _dataset / _pairs)
            self._precompute([self.spec.negative_prompt] + self.prompts + self.eval_prompts, "the prompts")
            self.free_text_encoders()

    def _precompute(self, texts: list[str], what: str) -> None:
        """precompute_embeddings: encode the texts not in the embedding cache yet (with the text encoders loaded again
        if they were freed), at most PRECOMPUTE_LIMIT of them: every one is a network pass before training and a file
        on disk (T5-XXL at 512 tokens: 4 MiB)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.embeddings]
        if len(missing) > PRECOMPUTE_LIMIT:
            raise ValueError(f"precompute_embeddings would encode {len(missing):,} prompt embeddings of {what} before "
                             f"training (more than {PRECOMPUTE_LIMIT:,}; {len(dict.fromkeys(texts)) - len(missing):,} "
                             f"are in the cache {self.embeddings.dir} already): take a subset of the source "
                             f"(\"split\": \"train[:10000]\", or \"streaming\": true with \"rows\"), or set "
                             f"\"precompute_embeddings\": false in the model spec of {self.name} (the text encoders "
                             "then stay loaded and prompts are encoded as they are drawn)")
        if missing:
            with self._text_encoders(what, len(missing)):
                self._encode_texts(missing)

    @contextlib.contextmanager
    def _text_encoders(self, what: str, n: int):
        """The text encoders for a batch of encoding: the loaded ones, or (after precompute_embeddings freed them)
        loaded again for it and freed after, so a data source opened during the run gets its captions encoded."""
        if self._encoder_pipe is not None:
            yield
            return
        self._say(f"precompute_embeddings: loading the text encoders of {self.spec.base} again to encode {n:,} "
                  f"captions of {what} (kept in {self.embeddings.dir}: a later run reads them from there)")
        encoders, tokenizers = models.load_text_parts(self.spec, self.parts.index, self.kind, self.dtype)
        for enc in encoders:
            if enc is not None:
                _to(enc, self.device, self.dtype).requires_grad_(False).eval()
        self.parts.text_encoders, self.parts.tokenizers = encoders, tokenizers
        self._encoder_pipe = self._make_encoder_pipe()
        try:
            yield
        finally:
            self.free_text_encoders()

    def _say(self, line: str) -> None:
        if self.accelerator.is_main_process:
            data_lib.say(line)

    def _embedding_folder(self) -> Path:
        return Path(self.spec.embedding_cache or os.environ.get("FEWSTEP_EMBEDDING_CACHE")
                    or Path.home() / ".cache" / "fewstep-finetune" / "embeddings")

    def _embedding_key(self) -> dict:
        """What a prompt's embedding depends on: the text encoders (the base, its revision / variant, or a local
        folder with the modification times of its text-encoder files), their dtype and device type, the prompt
        length, random weights."""
        base = Path(self.spec.base).expanduser()
        key = {"base": self.spec.base, "revision": self.spec.revision, "variant": self.spec.variant,
               "kind": self.kind, "dtype": str(self.dtype), "device": self.device.type,
               "max_sequence_length": self.max_sequence_length, "random_weights": self.spec.random_weights}
        if self.spec.text_encoder_out_layers is not None:  # FLUX.2: which hidden states the features stack
            key["text_encoder_out_layers"] = list(self.spec.text_encoder_out_layers)
        if base.is_dir():
            key["base"] = str(base.resolve())
            parts = [base / p for pair in self.family.text for p in pair if (base / p).is_dir()]
            key["files"] = {str(f.relative_to(base)): f.stat().st_mtime_ns for d in parts for f in sorted(d.iterdir())}
        return key

    def method_defaults(self, method: str, variant: str) -> dict:
        """The paper's settings of `method` / `variant` for config fields the user did not set (the harness applies
        them and prints which it used): a checkpoint run must not fall back to the toy defaults."""
        from .defaults import method_defaults

        return method_defaults(method, variant, self)

    # ----------------------------------------------------------------------------------------- denoisers
    def _schedule(self, scheduler, where: str):
        """common.Schedule of a DDPM scheduler config, or common.FlowSchedule of a flow model's
        FlowMatchEulerDiscreteScheduler (FLUX's dynamic shift at this world's image sequence length)."""
        if not self.parts.flow:
            return common.Schedule(models.schedule_name(scheduler.config, where))
        if type(scheduler).__name__ not in models.FLOW_SCHEDULERS:
            raise models.ModelError(f"{where}: a {self.family.pipeline} needs FlowMatchEulerDiscreteScheduler, found "
                                    f"{type(scheduler).__name__}")
        return models.flow_schedule(self.kind, scheduler, self.image_seq_len, where)

    def _guidance(self) -> float | None:
        """The embedded guidance value of a guidance-distilled transformer (FLUX.1-dev: config guidance_embeds):
        spec "guidance", else the model card's guidance_scale (full/configs/pipelines.json), else the family's
        default; None for every other model (a spec "guidance" there is an error)."""
        value = self.family.guidance(self.net_config, self.spec)
        if value is None or self.spec.guidance is not None:
            return value
        return float(models.pipeline_facts(self.spec.base).get("guidance_scale", value))

    def _role_guidance(self, role: str, rspec: RoleSpec, config) -> float | None:
        """The embedded guidance of a role's network: a guidance-distilled FLUX transformer (guidance_embeds) gets the
        role's "guidance", else the spec's (the base's, _guidance), else its model card's (3.5); None for any other.
        So FLUX.1-dev can be the teacher role of a FLUX.1-schnell spec (base transfer: a LoRA trained on the base)."""
        embeds = self.family.has_guidance(config)
        if rspec.guidance is not None and not embeds:
            raise models.ModelError(f"model spec of {self.name}, role {role}: \"guidance\" is set but its denoiser "
                                    "has no guidance input (only guidance-distilled FLUX transformers take one)")
        if not embeds:
            return None
        if rspec.guidance is not None:
            return float(rspec.guidance)
        return self.guidance if self.guidance is not None else float(
            models.pipeline_facts(rspec.unet).get("guidance_scale", self.family.default_guidance))

    def _role_scheduler(self, role: str):
        """The role's scheduler, checked: an eps-model role must have the base's noise schedule. A flow role may
        have its own shift (Z-Image's base samples at 6.0, Z-Image-Turbo at 3.0): the forward process is the same,
        each role samples on its own pipeline's sigmas placed exactly on the world's integer times (role_sampler),
        and the world's table (the base's) is the one training draws times from."""
        rspec = self.spec.roles.get(role, RoleSpec())
        sched = models.role_scheduler(self.spec, rspec, self.parts.scheduler)
        where = f"scheduler of role {role}"
        own = self._schedule(sched, where)
        if self._table is None and own.name != self.schedule.name:
            raise models.ModelError(f"role {role} uses the {own.name} noise schedule but the base uses "
                                    f"{self.schedule.name}: every role must share one schedule")
        return sched

    def denoiser(self, role: str, lora_rank: int = 16, train_full: bool = False, sampler: str | None = None,
                 timesteps: list[int] | None = None, merged_adapter: dict | None = None) -> FullDenoiser:
        if role not in ROLES:
            raise ValueError(f"unknown model role {role!r}; choose one of {list(ROLES)}")
        rspec = self.spec.roles.get(role, RoleSpec())
        where = f"role {role} of {self.name}"
        if timesteps:
            sampler, timesteps = models.role_sampler(role, self._role_scheduler(role), sampler or rspec.sampler,
                                                     timesteps, where, flow=self.parts.flow)
        else:
            sampler, timesteps = self.role_sampler(role, sampler)
        if merged_adapter is not None and train_full:
            raise ValueError(f"{where}: merged_adapter needs a LoRA denoiser (train_full=False)")
        if train_full:  # the trained copy in fp32, the frozen reference in the weight dtype: two loads, no deepcopy
            unet = models.load_unet(self.spec, rspec, self.parts, where, torch.float32)
            reference = models.load_unet(self.spec, rspec, self.parts, where, self.dtype)
        else:  # frozen weights in the weight dtype; FullDenoiser casts the LoRA to fp32 (cast_training_params)
            from . import fsdp  # under FSDP only process 0 reads the weights

            empty = fsdp.reads_no_weights(self.accelerator)
            unet = models.load_unet(self.spec, rspec, self.parts, where, self.dtype, empty=empty)
            reference = None
            if merged_adapter is not None and not empty:  # in the weights before our LoRA goes on: part of the
                # frozen model (folded where the weights were read; under FSDP process 0's weights reach the others)
                unet = fold_lora(unet, merged_adapter, self.family.lora_targets(self.net_config), where)
        den = FullDenoiser(unet, sampler, timesteps, self, lora_rank, train_full, role, reference,
                           self._role_guidance(role, rspec, unet.config))
        self.denoisers.append(den)
        return den

    # ----------------------------------------------------------------------------------------- prompts
    def _make_encoder_pipe(self):
        p = self.parts
        return p.pipeline_class(vae=self.vae, **p.text_components(), **{p.net_folder: None}, scheduler=p.scheduler,
                                **self.family.pipeline_extra)

    @property
    def max_sequence_length(self) -> int | None:
        """The prompt length of a flow pipeline's T5 / Qwen encoder (spec max_sequence_length, else the model card's,
        else the pipeline's default); None for the CLIP-only UNet pipelines."""
        if not self.family.max_sequence_length:
            return None
        card = models.pipeline_facts(self.spec.base).get("max_sequence_length")
        return self.spec.max_sequence_length or card or self.family.max_sequence_length

    def free_text_encoders(self) -> None:
        """After precomputing every prompt's embedding the text encoders are dropped (SDXL: ~1.6 GB)."""
        self._encoder_pipe = None
        self.parts.text_encoders = []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _id(self, text: str) -> int:
        if text not in self._ids:
            self._ids[text] = len(self._texts)
            self._texts.append(text)
        return self._ids[text]

    def prompt_texts(self, cond: dict) -> list[str]:
        return [self.spec.negative_prompt if i < 0 else self._texts[i] for i in cond["prompt_id"].tolist()]

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> None:
        """Encode the prompts not in the embedding cache yet, one at a time: a BLAS matmul's result for a row can
        depend on the batch it is in (SD3's CLIP text projection differs in the last bits), and a prompt's embedding
        must not depend on which prompts were drawn with it, or a resumed run would not repeat the uninterrupted one
        bit for bit."""
        todo = [t for t in dict.fromkeys(texts) if t not in self.embeddings]
        if todo and self._encoder_pipe is None:
            raise RuntimeError(f"prompt {todo[0]!r} was not precomputed and the text encoders were freed "
                               "(precompute_embeddings): add it to the spec's prompts")
        keys = self.family.prompt_keys
        for text in todo:
            out = self.family.encode(self._encoder_pipe, [text], self.device, self.max_sequence_length, self.spec)
            self.embeddings.put(text, tuple(out[k][0] for k in keys))

    def _rows(self, texts: list[str]) -> list[tuple[torch.Tensor, ...]]:
        """The embedding rows of `texts` (encoded first where the cache has none): the family's prompt_keys tensors."""
        self._encode_texts(texts)
        return [self.embeddings.get(t) for t in texts]

    @functools.cached_property
    def _null_embeds(self) -> tuple[torch.Tensor, ...]:
        """The unconditional embedding for CFG, as the pipelines make it (SDXL: zeros for an empty negative; the
        others: the encoded negative prompt, "" by default)."""
        if self.family.null_is_zeros(self.parts, self.spec):
            return tuple(torch.zeros_like(e) for e in self._rows([self.prompts[0]])[0])
        return self._rows([self.spec.negative_prompt])[0]

    def encode(self, texts: list[str]) -> dict:
        """Prompts -> condition dict on the world's device: the family's prompt tensors (prompt_embeds and SDXL's
        text_embeds, SD3 / FLUX's pooled_projections, Z-Image's prompt_len), what the pipeline makes from settings
        (SDXL's time_ids, FLUX.1-dev's guidance) and a prompt_id row."""
        return self._cond(self._rows(texts), [self._id(t) for t in texts])

    def _cond(self, rows, ids) -> dict:
        cond = {k: torch.stack([r[j] for r in rows]).to(self.device) for j, k in enumerate(self.family.prompt_keys)}
        cond.update(self.family.extra_condition(cond, self))
        cond["prompt_id"] = torch.tensor(ids, dtype=torch.long, device=self.device)
        return cond

    def conditions(self, n: int, generator: torch.Generator) -> dict:
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator).tolist()
        return self.encode([self.prompts[i] for i in idx])

    def eval_conditions(self, n: int) -> dict:
        return self.encode([self.eval_prompts[i % len(self.eval_prompts)] for i in range(n)])

    def null_condition(self, n: int) -> dict:
        return self._cond([self._null_embeds] * n, [-1] * n)

    # ----------------------------------------------------------------------------------------- VAE
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (differentiable). Runs outside any autocast the caller opened, in the VAE's
        own dtype: under the methods' `accelerator.autocast()` an fp16 autocast would otherwise undo the fp32
        upcast of a VAE that needs it (vae_dtype). One call decodes all of x0: callers chunk by decode_batch. The
        family maps the state to the VAE's latents (scaling / shift factors; FLUX.2's batch norm and patches)."""
        with torch.autocast(self.device.type, enabled=False):
            z = self.family.to_vae(x0.to(self.device, self.vae_dtype), self.vae)
            return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    def decode_in_chunks(self, x0: torch.Tensor) -> torch.Tensor:
        """decode(), decode_batch latents at a time."""
        return torch.cat([self.decode(x0[k:k + self.decode_batch]) for k in range(0, len(x0), self.decode_batch)])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (the posterior mean, so the latents of an image can be cached)."""
        with torch.autocast(self.device.type, enabled=False):
            z = self.vae.encode(images.to(self.device, self.vae_dtype)).latent_dist.mean
            return self.family.from_vae(z, self.vae).float()

    def _latent(self, key: tuple, load) -> torch.Tensor:
        if key in self._latents:
            self._latents.move_to_end(key)
            return self._latents[key]
        z = self.encode_images(load()[None])[0].cpu()
        self._latents[key] = z
        if len(self._latents) > LATENT_CACHE:
            self._latents.popitem(last=False)
        return z

    # ----------------------------------------------------------------------------------------- data
    # A data source is opened (and validated) when the run first reads it, so a run never touches a source it does
    # not use (online PSO never opens the pairs); with precompute_embeddings its captions are encoded then.
    @functools.lru_cache(maxsize=None)
    def _dataset(self, split: str) -> data_lib.ImageCaptions:
        if split not in self.spec.data:
            raise ValueError(f"this run needs data split {split!r}, which the model spec of {self.name} does not "
                             f"define: add \"data\": {{\"{split}\": {{\"folder\": ...}}}} (it has "
                             f"{sorted(self.spec.data) or 'none'})")
        source = self.spec.data[split]
        ds = data_lib.ImageCaptions(source)
        self._say(f"data.{split}: {ds.where}: {len(ds):,} images")
        if self.spec.precompute_embeddings:
            self._precompute(ds.captions() + [source[k] for k in ("prompt", "class_prompt") if k in source],
                             f"data.{split} ({ds.where})")
        return ds

    def _data_latents(self, n: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, list[int]]:
        ds = self._dataset(split)
        idx = torch.randint(0, len(ds), (n,), generator=generator).tolist()
        x0 = torch.stack([self._latent((split, i), lambda i=i: ds.image(i, self.resolution)) for i in idx])
        return x0.to(self.device), idx

    def data(self, n: int, generator: torch.Generator, split: str = "base") -> tuple[torch.Tensor, dict]:
        x0, idx = self._data_latents(n, generator, split)
        return x0, self.encode([self._dataset(split).caption(i) for i in idx])

    @functools.lru_cache(maxsize=None)
    def _pairs(self, path: str | None = None) -> data_lib.PreferencePairs:
        source = {"folder": path} if path else self.spec.pairs
        if not source:
            raise ValueError(f"no preference pairs: the model spec of {self.name} has no \"pairs\" source "
                             "(a folder with pairs.jsonl, or {\"dataset\": \"yuvalkirstain/pickapic_v2\"})")
        pairs = data_lib.PreferencePairs(source, log=self._say)
        if self.spec.precompute_embeddings:
            self._precompute(pairs.captions(), f"the preference pairs ({pairs.where})")
        return pairs

    def preference_pairs(self, n: int, generator: torch.Generator, path=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """World.preference_pairs: n (preferred, rejected, caption) rows of Pick-a-Pic-style pairs as latents."""
        pairs = self._pairs(str(path) if path else None)
        idx = torch.randint(0, len(pairs), (n,), generator=generator).tolist()
        win, lose = [], []
        for j in idx:
            load = functools.lru_cache(maxsize=1)(lambda j=j: pairs.images(j, self.resolution))
            win.append(self._latent(("pairs", str(path), j, 0), lambda: load()[0]))
            lose.append(self._latent(("pairs", str(path), j, 1), lambda: load()[1]))
        return (torch.stack(win).to(self.device), torch.stack(lose).to(self.device),
                self.encode([pairs.caption(j) for j in idx]))

    def concept_images(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, dict, dict]:
        """World.concept_images: n images of the spec's "concept" folder (cycled when it has fewer), their
        condition (its "prompt", e.g. "a photo of sks dog", or per-image captions) and the class condition
        ("class_prompt", e.g. "a photo of a dog")."""
        source = self.spec.data.get("concept")
        if source is None or "class_prompt" not in source:
            raise ValueError(f"customization needs \"data\": {{\"concept\": {{\"folder\": ..., \"prompt\": \"a photo "
                             f"of sks dog\", \"class_prompt\": \"a photo of a dog\"}}}} in the model spec of {self.name}")
        ds = self._dataset("concept")
        order = torch.randperm(len(ds), generator=generator).tolist()
        idx = [order[k % len(ds)] for k in range(n)]
        x0 = torch.stack([self._latent(("concept", i), lambda i=i: ds.image(i, self.resolution)) for i in idx])
        return (x0.to(self.device), self.encode([ds.caption(i) for i in idx]),
                self.encode([source["class_prompt"]] * n))

    # ----------------------------------------------------------------------------------------- rewards
    @functools.lru_cache(maxsize=None)
    def reward_model(self, which: str = "reward"):
        spec = {"reward": self.spec.reward, "quality": self.spec.quality}.get(which)
        if spec is None:
            spec = next(r for r in self.spec.eval_rewards if reward_name(r) == which)
        return load_reward(spec, self.device, self.dtype, random_weights=self.spec.random_weights)

    def reward(self, x0: torch.Tensor, cond: dict) -> torch.Tensor:
        """The training reward of decoded latents (differentiable: gradients reach x0 through the VAE)."""
        model, texts, b = self.reward_model("reward"), self.prompt_texts(cond), self.decode_batch
        r = torch.cat([model(self.decode(x0[k:k + b]), texts[k:k + b]).float() for k in range(0, len(x0), b)])
        return r.to(x0.device)

    @torch.no_grad()
    def metrics(self, x0: torch.Tensor, cond: dict, split: str = "base") -> dict[str, float]:
        """reward (the training reward), quality (the spec's quality reward), every eval reward by name, and
        distance: sliced W2 between 8x8-pooled latents of the samples and of the split's images (NaN when the spec
        has no data for the split; the paper metrics come from full/evaluate.py)."""
        names = {"reward": "reward", "quality": "quality",
                 **{reward_name(r): reward_name(r) for r in self.spec.eval_rewards}}
        scores = {k: [] for k in names}
        texts = self.prompt_texts(cond)
        for k in range(0, len(x0), self.decode_batch):
            images = self.decode(x0[k:k + self.decode_batch])
            for key, which in names.items():
                scores[key].append(self.reward_model(which)(images, texts[k:k + self.decode_batch]).float().cpu())
        out = {k: float(torch.cat(v).mean()) for k, v in scores.items()}
        out["distance"] = self._distance(x0, split)
        return out

    def _distance(self, x0: torch.Tensor, split: str) -> float:
        if split not in self.spec.data:
            return math.nan
        from toy.metrics import sliced_wasserstein

        ref, _ = self._data_latents(len(x0), torch.Generator().manual_seed(1234), split)  # latents only
        pool = lambda x: F.adaptive_avg_pool2d(x.float().cpu(), min(8, x.shape[-1])).flatten(1)  # noqa: E731
        return sliced_wasserstein(pool(x0), pool(ref))

    # ----------------------------------------------------------------------------------------- outputs
    @torch.no_grad()
    def plot_samples(self, panels: dict, path, marks: str | None = None, columns: int = 6) -> None:
        """One row per panel (base, tuned, ...), the first `columns` samples of each, with their prompts. `marks`
        ("target" / "reward") is accepted for the interface; real images have nothing to mark."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = len(panels)
        fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
        for r, (title, (x0, cond)) in enumerate(panels.items()):
            k = min(columns, len(x0))
            images = ((self.decode_in_chunks(x0[:k]) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
            texts = self.prompt_texts(common.cond_index(cond, slice(0, k)))
            for c in range(columns):
                ax = axes[r, c]
                ax.axis("off")
                if c < k:
                    ax.imshow(images[c])
                    ax.set_title(texts[c][:28], fontsize=6)
            axes[r, 0].text(-0.05, 0.5, title, transform=axes[r, 0].transAxes, rotation=90, ha="right",
                            va="center", fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(path), dpi=110)
        plt.close(fig)

    def save_adapter(self, denoiser: FullDenoiser, path) -> None:
        """The LoRA in the diffusers format (pytorch_lora_weights.safetensors): pipe.load_lora_weights(path) loads it
        (UNet layers as unet_lora_layers in the diffusers key format; a transformer's as transformer_lora_layers, as
        diffusers' DreamBooth LoRA examples save them: the family's `lora_layers`). A fully fine-tuned network is
        saved with save_pretrained into path/unet (path/transformer) instead."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        folder = self.parts.net_folder
        if denoiser.train_full:
            denoiser.unet.save_pretrained(path / folder)
            return
        from peft import get_peft_model_state_dict

        layers = self.family.lora_layers(get_peft_model_state_dict(denoiser.unet))
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        metadata = denoiser.unet.peft_config["default"].to_dict()
        self.parts.pipeline_class.save_lora_weights(path, **{f"{folder}_lora_layers": layers,
                                                             f"{folder}_lora_adapter_metadata": metadata})

    def pipeline(self, role: str = "student", denoiser: FullDenoiser | None = None):
        """A diffusers pipeline of a role (its scheduler, its UNet / transformer or the given denoiser's), for
        evaluate.py. After precompute_embeddings freed the text encoders it has none: call it with prompt_embeds
        from `encode` (`pipeline_embeds`), which works either way."""
        p = self.parts
        unet = denoiser.unet if denoiser is not None else models.load_unet(
            self.spec, self.spec.roles.get(role, RoleSpec()), p, f"role {role}", self.dtype)
        unet = unet.to(self.device)
        scheduler = self._role_scheduler(role)
        if p.flow:  # the pipeline's step is the role's MDP: Euler (flow_sde, eta 0) or x0-renoise (stochastic_sampling)
            # and it takes the role's grid as its exact sigmas (`pipeline_sigmas`): no shift on top
            sampler, _ = self.role_sampler(role)
            scheduler = type(scheduler).from_config(scheduler.config, stochastic_sampling=sampler == "flow_x0_renoise",
                                                    shift=1.0, use_dynamic_shifting=False)
        return p.pipeline_class(vae=self.vae, **p.text_components(), **{p.net_folder: unet}, scheduler=scheduler,
                                **self.family.pipeline_extra)

    def pipeline_embeds(self, prompts: list[str], guidance: float = 0.0) -> dict:
        """The pipeline's prompt arguments (prompt_embeds [, pooled_prompt_embeds], and negative_... when guidance
        > 1) from this world's condition cache: the same embeddings the methods train on, with or without the text
        encoders loaded (the family's `pipeline_embeds`: a guidance-distilled FLUX also gets the world's embedded
        guidance as guidance_scale). The CFG arguments are `pipeline_guidance`'s."""
        null = self.null_condition(len(prompts)) if guidance > 1 else None
        return self.family.pipeline_embeds(self.encode(prompts), null, self)

    def pipeline_guidance(self, guidance: float) -> dict:
        """The pipeline's CFG arguments for the usual CFG scale (FLUX: true_cfg_scale; Z-Image: scale - 1)."""
        return self.family.pipeline_guidance(guidance, self)

    def pipeline_latents(self, latents: torch.Tensor, pipe) -> torch.Tensor:
        """A pipeline call's `output_type="latent"` result in the state layout (FLUX unpacks, FLUX.2 re-patchifies)."""
        return self.family.pipeline_latents(latents, pipe, self)

    def role_sampler(self, role: str, sampler: str | None = None, steps: int | None = None) -> tuple[str, list[int]]:
        """(sampler, timesteps) of a role from its spec and scheduler, without loading its UNet: its pipeline's
        grid (`models.role_grid`), or that pipeline's grid at `steps` steps."""
        if role not in ROLES:
            raise ValueError(f"unknown model role {role!r}; choose one of {list(ROLES)}")
        key = (role, sampler, steps)
        if key not in self._grids:
            rspec = self.spec.roles.get(role, RoleSpec())
            sched, where = self._role_scheduler(role), f"role {role} of {self.name}"
            n = len(rspec.timesteps) if rspec.timesteps and steps is None else (
                steps or models.role_steps(self.spec, role, rspec)[0])
            name = models.role_kernel(role, sched, sampler or rspec.sampler, where, self.parts.flow, n)
            grid = models.role_grid(self.spec, role, self.kind, sched, name, self.image_seq_len, self.schedule, steps)
            self._grids[key] = models.role_sampler(role, sched, name, grid, where, flow=self.parts.flow)
        return self._grids[key]

    def pipeline_sigmas(self, timesteps: list[int]) -> list[float]:
        """A flow role's grid as the sigmas its pipeline (`pipeline(role)`, unshifted scheduler) takes: exactly the
        schedule's sigma(t), so the pipeline samples where the methods do."""
        return self.schedule.sigma(torch.tensor(list(timesteps))).tolist()
