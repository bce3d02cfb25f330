"""Memory plan of every launcher setting, computed without a GPU: the real architectures (full/configs) run their
real forward and backward passes on the meta device, and every tensor they create is counted.

    python -m full.memory_plan                      # every setting, markdown table on stdout
    python -m full.memory_plan pso-online-dmd2 --json plan.json
    python -m full.memory_plan --write-docs          # replace the generated table in docs/full.md

How a number is computed (docs/full.md, "Real architectures and memory plan", says the same for users):

* Resident: the parameters of every model the run holds (UNets, VAE, text encoders unless
  `precompute_embeddings`, reward models), each in the dtype the world gives it (frozen weights in the spec's dtype,
  trained weights in fp32), the AdamW states (2 x fp32 per trained parameter; 8-bit: 2 x 1 byte) and, after the
  first backward, the fp32 gradients.
* Dynamic: one update (and one evaluation chunk) of the method, as a program of network calls with the rows each
  call gets and whether it keeps its graph (PROGRAMS, from the methods' code and NFE tables), executed on meta tensors
  under `LiveBytes`, a TorchDispatchMode that adds the bytes of each new tensor storage when an op creates it and
  subtracts them when the storage is freed: its peak is the largest sum of live activations, saved tensors,
  gradients and temporaries at any op boundary, backward (and checkpoint recomputation) included.
* Mixed precision as CUDA autocast does it (`Autocast`, a TorchFunctionMode above autograd, so the casts are part
  of the graph as they are under torch.autocast): linear / conv / matmul / attention inputs in bf16 or fp16, group
  norm, layer norm and softmax in fp32, everything else as its inputs.
* Attention as a fused kernel (flash / memory-efficient SDPA, what torch picks on a recent GPU): it saves q, k, v,
  the output and a [batch, heads, tokens] fp32 log-sum-exp; no tokens x tokens matrix (`FusedAttention`).

Flow models (SD3.5 / FLUX.1): the transformer with the pipelines' conditioning shapes (T5 tokens, pooled
projections, FLUX's packed latent tokens and guidance), the 16-channel VAE, T5-XXL among the resident text encoders.
FSDP rows (`Row.gpus` > 1, the settings with `fsdp`): the trained models' frozen weights / N, plus the root unit
(gathered for the whole forward) and two blocks gathered at a time; everything else per GPU as without FSDP.

What it ignores: the FSDP all-gather / reduce buffers and the LoRA gradient all-reduce's temporaries, the CUDA
context (~0.3-0.5 GiB per process, outside max_memory_allocated), allocator rounding and
fragmentation (reserved > allocated), cuDNN / cuBLAS workspaces, the fused attention's internal scratch, the
kernels' own temporaries inside one op, the CPU-side data pipeline, DDP buckets (the methods do not wrap the UNet
in DDP). The smallest GPU listed is the smallest of 24 / 40 / 48 / 80 GB whose capacity holds the peak plus a
10 % margin for what is ignored. Nothing here has been checked against a GPU yet (full.bench measures that).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import weakref
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import common

from .defaults import CARDS as GPUS, MARGIN  # GB of the common cards; the margin for what the count ignores

GiB = 2**30
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the schedule a family forward reads its time input from (Sim.generic): sigma's value does not change the memory
FLOW_SCHEDULE = common.FlowSchedule(3.0)


# ------------------------------------------------------------------------------------------------------- counting
class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages created under it that are still alive, and their peak.

    Every op output whose storage is new is added (views share their base's storage and are not counted twice)
    and removed by a weakref finalizer when the storage dies, so autograd's saved tensors, gradients and
    temporaries all count for exactly as long as they live. Works on the meta device (nothing is allocated) and on
    real tensors alike (tests compare the two)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.trace: list[int] | None = None  # with start_trace(): the live bytes after every new storage
        self._seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._seen:
            return
        n = st.nbytes()
        self._seen.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        if self.trace is not None:
            self.trace.append(self.live)
        weakref.finalize(st, self._free, key, n)

    def reset_peak(self) -> None:
        self.peak = self.live

    def start_trace(self) -> None:
        self.reset_peak()
        self.trace = []

    def stop_trace(self) -> list[int]:
        trace, self.trace = self.trace, None
        return trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:  # a view (of a weight, of an input) shares an input's storage: not new
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                self.track(t)
        return out


def affine_peaks(traces: dict[int, list[int]], batches) -> dict[int, float]:
    """The update's peak at every batch in `batches` from its traces at two batches a < b (live bytes after every
    new storage). Every tensor of an update is batch-independent (weights, gradients, optimizer states) or has the
    batch as a factor of its rows (each call's rows are a multiple of the batch), so once the op sequence is the
    same (it is from batch 2 on; at batch 1 some expands stay views) the live bytes after the k-th new storage are
    F_k + B V_k, and peak(B) = max_k F_k + B V_k exactly. tests/test_real_arch.py checks it against direct counts."""
    (a, ta), (b, tb) = sorted(traces.items())
    if len(ta) != len(tb):
        raise ValueError(f"the update's op sequence differs between batches {a} and {b} ({len(ta)} vs {len(tb)} new "
                         "storages): plan each batch directly")
    v = [(y - x) / (b - a) for x, y in zip(ta, tb)]
    f = [x - a * d for x, d in zip(ta, v)]
    return {B: max(x + B * d for x, d in zip(f, v)) for B in batches}


class FusedAttention(torch.autograd.Function):
    """The memory of a fused SDPA kernel (flash / memory-efficient): saves q, k, v, out and an fp32 log-sum-exp of
    [batch, heads, tokens]; backward makes dq, dk, dv. Values are not computed (meta tensors)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


LOW = {F.linear, F.conv1d, F.conv2d, F.conv_transpose2d, torch.matmul, torch.bmm, torch.baddbmm, torch.mm,
       torch.addmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.einsum}
FP32 = {F.group_norm, F.layer_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax}


class Autocast(TorchFunctionMode):
    """CUDA autocast's casting policy for the ops these models use (see the module docstring), above autograd;
    F.scaled_dot_product_attention becomes FusedAttention. With dtype None only the attention is replaced."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype = dtype

    def _cast(self, args, kwargs, dtype):
        def f(x):
            return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype else x

        return tree_map(f, args), tree_map(f, kwargs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:  # diffusers' attention dispatcher passes them by keyword
            q, k, v = (list(args[:3]) + [kwargs.get(n) for n in ("query", "key", "value")][len(args[:3]):])
            if self.dtype is not None:
                (q, k, v), _ = self._cast((q, k, v), {}, self.dtype)
            return FusedAttention.apply(q, k, v)
        if self.dtype is not None:
            if func in LOW:
                args, kwargs = self._cast(args, kwargs, self.dtype)
            elif func in FP32:
                args, kwargs = self._cast(args, kwargs, torch.float32)
                kwargs.pop("dtype", None) if func in (F.softmax, F.log_softmax) else None
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting(dtype: torch.dtype | None):
    """with counting(torch.bfloat16) as c: ...  -> c.peak, c.live (bytes)."""
    counter = LiveBytes()
    with Autocast(dtype if dtype != torch.float32 else None), counter:
        yield counter


def param_bytes(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)


def enable_checkpointing(module, dtype: torch.dtype | None) -> None:
    """module.enable_gradient_checkpointing() whose recomputation (in backward, where a TorchFunctionMode entered
    around the forward is not active) runs under the same Autocast, as torch.utils.checkpoint restores
    torch.autocast's state."""
    import torch.utils.checkpoint as ckpt

    def run(fn, *args):
        with Autocast(dtype if dtype != torch.float32 else None):
            return fn(*args)

    def func(fn, *args):
        return ckpt.checkpoint(run, fn, *args, use_reentrant=False)

    module.enable_gradient_checkpointing(gradient_checkpointing_func=func)


# ------------------------------------------------------------------------------------------------------- models
REWARD_CONFIGS = {"clip": "reward_clip_vit_l14.json", "aesthetic": "reward_clip_vit_l14.json",
                  "pickscore": "reward_clip_vit_h14.json",
                  "imagereward": "reward_clip_vit_l14.json"}  # stand-in: see STAND_INS
STAND_INS = {"imagereward": "ImageReward (BLIP) is counted as a CLIP ViT-L/14 (its image tower is a ViT-L at 224^2; "
                            "no BLIP config is shipped)"}


def _meta(cls, config: dict):
    with torch.device("meta"):
        if hasattr(cls, "config_class"):
            return cls(cls.config_class(**{k: v for k, v in config.items() if not k.startswith("_")
                                            and k not in ("architectures", "model_type")}))
        return cls.from_config(config)


def reward_image_size(name: str) -> int:
    from . import architectures

    return architectures.read_config(REWARD_CONFIGS[name])["vision_config"]["image_size"]


@dataclass
class Sim:
    """The models of one run on the meta device and the calls a method makes with them."""

    unet_config: dict  # the UNet's or the transformer's config
    vae_config: dict
    kind: str  # sdxl | sd | sd3 | flux | zimage | flux2 (the family, full/families; "sd": SD1.5 / SD2.x)
    side: int  # latent side
    dtype: torch.dtype
    checkpointing: bool
    resident_extra: int = 0  # bytes of models not built here (text encoders, reward models), counted from configs
    text_tokens: int = 77  # SD3: 77 CLIP + the T5 tokens; FLUX: the T5 tokens (the pipelines' max_sequence_length)
    unets: dict = field(default_factory=dict)
    vae: torch.nn.Module | None = None
    rewards: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    rows: int = 0  # UNet rows evaluated (NFE x batch), as common.CountingDenoiser counts them
    grad_rows: int = 0  # of which with autograd into the trained weights (forward + backward; full.bench's bound)

    def denoiser_class(self):
        import diffusers

        return getattr(diffusers, self.unet_config.get("_class_name", "UNet2DConditionModel"))

    def add_unet(self, role: str, lora_rank: int | None, train_full: bool) -> None:
        from peft import LoraConfig

        cls = self.denoiser_class()
        targets = self.family.lora_targets(self.unet_config)
        unet = _meta(cls, self.unet_config)
        ref = None
        if train_full:  # FullDenoiser: trained copy in fp32 + a frozen reference in the weight dtype
            ref = _meta(cls, self.unet_config).to(self.dtype).requires_grad_(False)
            unet.float().requires_grad_(True)
        else:
            unet.to(self.dtype).requires_grad_(False)
            unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=True,
                                        target_modules=targets))
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if self.checkpointing:
            enable_checkpointing(unet, self.dtype)
        self.unets[role] = (unet.train(), ref)

    @property
    def family(self):
        """The family adapter (full/families)."""
        from . import models

        return models.family({"sd": "sd15"}.get(self.kind, self.kind))

    @property
    def generic(self) -> bool:
        """A family whose calls are its adapter's own (forward, VAE latents) on meta tensors: the ones added after
        the hand-built calls below (Z-Image, FLUX.2)."""
        return self.kind not in ("sd", "sdxl", "sd3", "flux")

    def build_vae(self) -> None:
        import diffusers

        cls = getattr(diffusers, self.family.vae_class)
        self.vae = _meta(cls, self.vae_config).to(self.dtype).requires_grad_(False).eval()
        if self.checkpointing:
            enable_checkpointing(self.vae, self.dtype)
            self.vae.train()  # diffusers checkpoints only in training mode; no dropout in the VAE

    def build_reward(self, which: str, name: str) -> None:
        from transformers import CLIPModel

        from . import architectures

        if name in STAND_INS and STAND_INS[name] not in self.notes:
            self.notes.append(STAND_INS[name])
        model = _meta(CLIPModel, architectures.read_config(REWARD_CONFIGS[name]))
        self.rewards[which] = (name, model.to(self.dtype).requires_grad_(False).eval())

    def models(self) -> list[torch.nn.Module]:
        out = [m for pair in self.unets.values() for m in pair if m is not None] + [self.vae]
        return out + [m for _, m in self.rewards.values()]

    def trainable(self, role: str) -> list[torch.nn.Parameter]:
        return [p for p in self.unets[role][0].parameters() if p.requires_grad]

    # ---- the calls ----
    def cond(self, rows: int):
        c, meta = self.unet_config, dict(device="meta", dtype=self.dtype)
        if self.generic:
            return self.family.example_condition(rows, self.text_tokens, c, "meta", self.dtype)
        if self.kind == "sd3":  # CLIP-L + CLIP-G pooled, [CLIP-L | CLIP-G] padded to 4096 ++ T5 tokens
            return {"encoder_hidden_states": torch.empty(rows, self.text_tokens, c["joint_attention_dim"], **meta),
                    "pooled_projections": torch.empty(rows, c["pooled_projection_dim"], **meta)}
        if self.kind == "flux":  # T5 tokens, CLIP-L pooled, position ids of text and image tokens, guidance
            kw = {"encoder_hidden_states": torch.empty(rows, self.text_tokens, c["joint_attention_dim"], **meta),
                  "pooled_projections": torch.empty(rows, c["pooled_projection_dim"], **meta),
                  "txt_ids": torch.empty(self.text_tokens, 3, **meta),
                  "img_ids": torch.empty((self.side // 2) ** 2, 3, **meta)}
            if c.get("guidance_embeds"):
                kw["guidance"] = torch.empty(rows, device="meta")
            return kw
        d = self.unet_config["cross_attention_dim"]
        kw = {"encoder_hidden_states": torch.empty(rows, 77, d, device="meta", dtype=self.dtype)}
        if self.kind == "sdxl":
            pooled = self.unet_config["projection_class_embeddings_input_dim"] - 6 * self.unet_config[
                "addition_time_embed_dim"]  # SDXL: 2816 - 6 x 256 = 1280, text_encoder_2's projection
            kw["added_cond_kwargs"] = {"text_embeds": torch.empty(rows, pooled, device="meta", dtype=self.dtype),
                                       "time_ids": torch.empty(rows, 6, device="meta", dtype=self.dtype)}
        return kw

    def unet(self, role: str, rows: int, grad: bool, frozen: bool = False, repeat: int = 1) -> torch.Tensor:
        """One network call on `rows` rows (FullDenoiser.__call__: fp32 latents in, fp32 eps out). `repeat`: the
        same no-grad call made that many times in a row (a sampling loop): run once, since each call's
        temporaries are freed before the next, but counted `repeat` times in `rows` (the NFE check)."""
        self.rows += rows * repeat
        self.grad_rows += rows * repeat if grad and not frozen else 0
        unet, ref = self.unets[role]
        x = self.latents(rows)
        if self.generic:  # the family's forward (packing, ids, time), as FullDenoiser calls it; t only indexes
            with torch.set_grad_enabled(grad and not frozen), contextlib.ExitStack() as stack:
                if frozen and ref is None:
                    unet.disable_adapters()
                    stack.callback(unet.enable_adapters)
                net = ref if frozen and ref is not None else unet
                t = torch.full((rows,), common.T - 1, dtype=torch.long)  # the schedule's table on the CPU
                return self.family.forward(net, x, t, self.cond(rows), FLOW_SCHEDULE).float()
        t = torch.empty(rows, dtype=torch.long, device="meta")
        if self.kind in ("sd3", "flux"):  # flow models: float timesteps (sigma x 1000; FLUX takes sigma)
            t = torch.empty(rows, device="meta")
        if self.kind == "flux":  # 2x2 patches packed into 64-channel tokens, as FluxPipeline._pack_latents
            x = torch.empty(rows, (self.side // 2) ** 2, 4 * self.latent_channels, device="meta")
        with torch.set_grad_enabled(grad and not frozen), contextlib.ExitStack() as stack:
            if frozen and ref is None:
                unet.disable_adapters()
                stack.callback(unet.enable_adapters)
            net = ref if frozen and ref is not None else unet
            if self.kind in ("sd3", "flux"):
                return net(hidden_states=x, timestep=t, **self.cond(rows), return_dict=False)[0].float()
            return net(x, t, **self.cond(rows), return_dict=False)[0].float()

    def decode(self, x0: torch.Tensor, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            z = x0.to(self.dtype)
            if self.generic:  # the family's state -> the VAE's latents (FLUX.2: batch norm undone, 2x2 unfolded)
                z = self.family.to_vae(z, self.vae)
            return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    def encode_images(self, rows: int) -> None:
        with torch.no_grad():
            out = self.vae.encode(torch.empty(rows, 3, self.side * 8, self.side * 8, device="meta", dtype=self.dtype))
            if self.generic:
                self.family.from_vae(out.latent_dist.mean, self.vae)

    def reward(self, which: str, images: torch.Tensor, grad: bool) -> torch.Tensor:
        """rewards.CLIPReward: differentiable resize to the tower's input, image features, cosine with text."""
        name, model = self.rewards[which]
        size = reward_image_size(name)
        with torch.set_grad_enabled(grad):
            x = F.interpolate((images + 1) / 2, size=(size, size), mode="bicubic", antialias=True)
            feats = model.get_image_features(pixel_values=x.to(self.dtype))
            feats = getattr(feats, "pooler_output", feats)
            return F.normalize(feats.float(), dim=-1).sum(-1)

    @property
    def latent_channels(self) -> int:
        return self.vae_config.get("latent_channels", 4)

    def latents(self, rows: int, requires_grad: bool = False) -> torch.Tensor:
        """The sampler's state: the VAE's latents (FLUX.2: 2x2-patchified, 4x the channels at half the side)."""
        if self.generic:
            side = self.family.state_side(self.side)
            return torch.empty(rows, self.family.state_channels(self.vae_config), side, side, device="meta",
                               requires_grad=requires_grad)
        return torch.empty(rows, self.latent_channels, self.side, self.side, device="meta",
                           requires_grad=requires_grad)


def adamw(params, **kw):
    """The methods' torch.optim.AdamW with CUDA's default implementation (foreach: its temporaries count)."""
    return torch.optim.AdamW(params, lr=1e-5, foreach=True, **kw)


def optimizer_step(opt: torch.optim.Optimizer, params) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # per-tensor norms: small temporaries
    opt.step()
    opt.zero_grad(set_to_none=True)


def init_states(opt: torch.optim.Optimizer, params) -> None:
    """Create AdamW's states as after the first update (zero gradients, one step)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------------- programs
# One update and one evaluation chunk of each method, call by call, with the rows of each call (B = per-GPU
# batch, D = decode_batch). The comments name the code they follow; "kept" = the graph lives until backward.
def pso_update(sim: Sim, cfg, B: int, opts: dict) -> None:
    S = len(cfg.grid)
    kept = []
    if cfg.variant == "online":  # pso.py, variant online: two roll-outs per condition in one 2B-row batch
        for _ in range(S - 1):
            kept.append(sim.unet("student", 2 * B, grad=True))  # sample_trajectory, grad_steps = S - 1
        sim.unet("student", 2 * B, grad=False)  # the last (deterministic) step, no grad
        with torch.no_grad():  # world.reward(traj.x0): decode + reward on all 2B rows
            sim.reward("reward", sim.decode(sim.latents(2 * B), grad=False), grad=False)
        sim.unet("student", 2 * B * (S - 1), grad=False, frozen=True)  # trajectory_log_ratios: one frozen call
    elif cfg.variant == "pso":
        sim.encode_images(B)  # world.data: the target images' latents (cached after the first time)
        for _ in range(S - 1):
            kept.append(sim.unet("student", B, grad=True))
        sim.unet("student", B * (S - 1), grad=False, frozen=True)
        kept.append(sim.unet("student", B * (S - 1), grad=True))  # forward_log_ratios: predict() on S-1 states
        sim.unet("student", B * (S - 1), grad=False, frozen=True)
    elif cfg.variant in ("offline", "customize"):  # both sides forward-diffused: one call on 2B x (S-1) rows
        sim.encode_images(2 * B)  # world.preference_pairs / concept images: latents of 2B images
        times = 1 if cfg.one_timestep else S - 1
        kept.append(sim.unet("student", 2 * B * times, grad=True))
        if cfg.variant == "offline":
            sim.unet("student", 2 * B * times, grad=False, frozen=True)
    elif cfg.variant in ("naive", "dedistill", "base-transfer"):  # the ordinary loss on S noised copies of the data
        # (dedistill: on the student with the adapter A merged into its weights; base transfer: on the base network)
        sim.encode_images(B)
        kept.append(sim.unet(cfg.trained_role, B * S, grad=True))
    elif cfg.variant == "dedistill-adapter":  # A: the ordinary loss on the frozen student's own samples
        sim.unet("student", B, grad=False, frozen=True, repeat=cfg.model_steps)
        kept.append(sim.unet("student", B * S, grad=True))
    backward_and_step(sim, kept, opts, cfg.trained_role)


def backward_and_step(sim: Sim, kept: list, opts: dict, role: str) -> None:
    """One backward through every kept graph (their activations are freed by it), then the role's optimizer step."""
    loss = sum(k.mean() for k in kept)
    kept.clear()
    loss.backward()
    del loss
    optimizer_step(opts[role], sim.trainable(role))


def pso_eval(sim: Sim, cfg, D: int) -> None:
    """draw() in chunks of decode_batch on the model's grid, then world.metrics: decode + every reward."""
    sim.unet("student", D, grad=False, repeat=len(cfg.grid))
    metrics_chunk(sim, D)


def metrics_chunk(sim: Sim, D: int) -> None:
    with torch.no_grad():
        images = sim.decode(sim.latents(D), grad=False)
        for which in sim.rewards:
            sim.reward(which, images, grad=False)


def sharpening_update(sim: Sim, cfg, B: int, opts: dict) -> None:
    n, m, K = cfg.n, cfg.m, len(cfg.grid)
    if cfg.variant == "sft":
        sim.encode_images(B)  # sft_data: the data images' latents
    else:  # Alg. 2: n samples per condition, K no-grad DDIM steps on B*n rows
        sim.unet("teacher", B * n, grad=False, repeat=K)
    kept = []
    for _ in range(m):  # sharpening_rollout: m states of B*n rows, each scored (decode + reward, no grad)
        out = sim.unet("teacher", B * n, grad=not cfg.recompute)
        if not cfg.recompute:
            kept.append(out)
        del out
        with torch.no_grad():
            sim.reward("reward", sim.decode(sim.latents(B * n), grad=False), grad=False)
    rows = B if cfg.variant == "sft" else 2 * B
    if cfg.recompute:  # policy_eps: the chosen trajectories again, with autograd
        kept = [sim.unet("teacher", rows, grad=True) for _ in range(m)]
    if cfg.variant == "rlhf":
        for _ in range(m):  # the frozen reference at the winner's and loser's m states
            sim.unet("teacher", rows, grad=False, frozen=True)
        with torch.no_grad():  # logs: world.reward(x0, cond) of the B*n samples
            sim.reward("reward", sim.decode(sim.latents(B * n), grad=False), grad=False)
    backward_and_step(sim, kept, opts, "teacher")


def sharpening_eval(sim: Sim, cfg, D: int) -> None:
    """evaluate(): DDIM on the full grid, CFG = a second call on the null condition per step, then metrics."""
    calls = 2 if cfg.eval_cfg != 1 else 1
    sim.unet("teacher", D, grad=False, repeat=len(cfg.grid) * calls)
    metrics_chunk(sim, D)


def dipp_update(sim: Sim, cfg, B: int, opts: dict) -> None:
    g = "generator"
    x0 = sim.unet(g, B, grad=True)  # draw(grad=True): the generator's one step, graph kept
    sim.unet("teacher", B, grad=False)  # eps_ta
    sim.unet("teacher", 2 * B if cfg.cfg_scale != 1 else B, grad=False, frozen=True)  # eps_ref (+ null for CFG)
    loss = x0.mean()
    if cfg.reward_scale > 0:  # world.reward(x0): decode and reward model with autograd, into the generator
        loss = loss + sim.reward("reward", sim.decode(sim.latents(B, requires_grad=True) + 0, grad=True),
                                 grad=True).mean()
    del x0
    loss.backward()
    del loss
    optimizer_step(opts[g], sim.trainable(g))
    for k in range(cfg.ta_steps):  # ta_update: the first on this update's sample, then fresh ones
        if k:
            sim.unet(g, B, grad=False)
        loss = sim.unet("teacher", B, grad=True).mean()
        loss.backward()
        del loss
        optimizer_step(opts["teacher"], sim.trainable("teacher"))


def dipp_startup(sim: Sim, cfg, B: int) -> None:
    """check_reward_is_differentiable(world, x0_base, ...): the reward of ONE row, forward only with autograd on
    (its graph is dropped at once), before training."""
    if cfg.reward_scale > 0:
        sim.reward("reward", sim.decode(sim.latents(1, requires_grad=True) + 0, grad=True), grad=True)


def dipp_eval(sim: Sim, cfg, D: int) -> None:
    """generate_in_chunks(..., world.decode_batch): one generator call per chunk of D rows, then metrics."""
    sim.unet("generator", D, grad=False)
    metrics_chunk(sim, D)


# ------------------------------------------------------------------------------------------------------- plans
METHODS = {"pso.py": ("pso", pso_update, pso_eval, None, "student"),
           "sharpening.py": ("sharpening", sharpening_update, sharpening_eval, None, "teacher"),
           "diff_instruct_pp.py": ("diff_instruct_pp", dipp_update, dipp_eval, dipp_startup, "generator")}


@dataclass
class Row:
    setting: str
    training: str  # "LoRA r=16" | "full UNet"
    checkpointing: bool
    resolution: int
    batch: int  # per GPU
    global_batch: int
    resident_gib: float  # parameters of every model held
    update_gib: float  # peak of one update (resident + optimizer states + activations + gradients + temporaries)
    eval_gib: float  # peak of one evaluation chunk of decode_batch rows
    startup_gib: float | None  # DI++'s reward probe at start-up
    nfe: float  # UNet rows / batch in the planned update
    stated_nfe: float  # the method's nfe_per_update
    smallest_gpu: str
    notes: list = field(default_factory=list)
    gpus: int = 1  # > 1: FSDP2 over that many GPUs (full/fsdp.py), the state per GPU
    load_gpu_gib: float = 0.0  # per GPU once the models are loaded, before the first call (FSDP: the shards and
    # the one whole parameter being broadcast; the models are never whole on a GPU)
    load_host_rank0_gib: float = 0.0  # host RAM of process 0 while loading (FSDP: it alone reads the networks)
    load_host_rank_gib: float = 0.0  # host RAM of every other process while loading
    grad_nfe: float = 0.0  # of `nfe`: calls with autograd into the trained weights (forward + backward)

    @property
    def peak_gib(self) -> float:
        """The largest GPU memory of the run: update, evaluation chunk, start-up probe or loading."""
        return max(self.update_gib, self.eval_gib, self.startup_gib or 0.0, self.load_gpu_gib)

    def host_gib(self, processes: int) -> float:
        """Host RAM of a node running `processes` processes of this row while they load their models."""
        return self.load_host_rank0_gib + (processes - 1) * self.load_host_rank_gib


def smallest_gpu(peak_bytes: float) -> str:
    for gb in GPUS:
        if peak_bytes * MARGIN <= gb * 1e9:
            return f"{gb} GB"
    return f"> {GPUS[-1]} GB"


def method_config(name: str, training: str | None):
    """The method's own Config for a launcher setting (its argv parsed by the method's parser), with the
    training mode replaced when `training` is given ("lora" or "full")."""
    import importlib

    import harness

    from . import launch

    s = launch.SETTINGS[name]
    script, argv = launch.method_argv(name, extra=["--batch", "1"])  # the batch is the plan's (not the launcher's)
    sys.path.insert(0, str(script.parent))
    module = importlib.import_module(script.stem)
    full_flag = {"pso.py": "--train-full", "sharpening.py": "--full-finetune", "diff_instruct_pp.py": "--train-full"}
    flag = full_flag[s.script]
    if training == "lora":
        argv = [a for a in argv if a != flag]
    elif training == "full" and flag not in argv:
        argv = [*argv, flag]
    return module, harness.parse_config(module.Config, argv), s


# T5 tokens of the flow pipelines (their max_sequence_length: SD3 256 after CLIP's 77; FLUX.1-schnell 256, dev 512)
T5_TOKENS = {"sd3": 256, "flux": 256, "black-forest-labs/FLUX.1-dev": 512}


def setting_spec(s):
    """(ModelSpec, note) of a launcher setting: its spec file in full/specs."""
    from . import launch
    from .spec import load_spec

    return load_spec(str(launch.SPECS / s.spec)), None


def fsdp_units(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the largest FSDP unit's frozen weights, bytes of the root unit's): the units are the blocks of
    the model's `_no_split_modules` (the shipped FSDP config's TRANSFORMER_BASED_WRAP), the root holds the rest."""
    names = set(getattr(module, "_no_split_modules", None) or [])
    blocks, inside = [], set()
    for m in module.modules():
        if type(m).__name__ in names and not any(id(p) in inside for p in m.parameters()):
            blocks.append(m)
            inside |= {id(p) for p in m.parameters()}
    frozen = lambda ps: sum(p.numel() * p.element_size() for p in ps if not p.requires_grad)  # noqa: E731
    largest = max((frozen(b.parameters()) for b in blocks), default=0)
    return largest, frozen(p for p in module.parameters() if id(p) not in inside)


def role_grid(spec, role: str, rspec) -> list[int]:
    """A grid of the role's length (the spec's timesteps, else models.role_steps: the model card's / the methods'
    step count); its values do not change memory."""
    import common

    from . import models

    return list(rspec.timesteps) if rspec.timesteps else common.few_step_timesteps(
        models.role_steps(spec, role, rspec)[0])


def plan_setting(name: str, checkpointing: bool, training: str | None = None, batch: int = 1,
                 resolution: int | None = None, decode_batch: int = 1, gpus: tuple = (1,),
                 batches: tuple | None = None) -> list[Row]:
    """The rows of one setting: one simulation; with FSDP over N GPUs (N > 1) the frozen weights of the trained
    models are split N ways, one unit at a time is whole (the root unit for the whole forward, the current block
    and the prefetched next), and the rest (LoRA, optimizer, activations, other models) is per GPU as without.
    `batches`: rows at each of these per-GPU batches instead of `batch` (the update counted at batches 1, 2 and 4,
    the larger ones from affine_peaks; the evaluation and start-up do not depend on the batch)."""
    import common

    from . import architectures, models
    from .spec import RoleSpec

    module, cfg, s = method_config(name, training)
    spec, pending = setting_spec(s)
    e = architectures.entry(spec.base)
    dtype = DTYPES[spec.dtype]
    vae_source = spec.vae or spec.base
    unet_config = architectures.read_config(e["unet"] if "unet" in e else e["transformer"])
    vae_config = architectures.component_config(vae_source, "vae")
    side = (resolution or spec.resolution or unet_config["sample_size"] * 8) // 8
    method, update, evaluate, startup, role = METHODS[s.script]
    kind = {"sd15": "sd"}.get(models.PIPELINES[e["_class_name"]], models.PIPELINES[e["_class_name"]])
    t5 = T5_TOKENS.get(spec.base, T5_TOKENS.get(kind, 0))
    fam = models.family({"sd": "sd15"}.get(kind, kind))
    text_tokens = {"sd3": 77 + t5, "flux": t5, "sd": 77, "sdxl": 77}.get(
        kind, spec.max_sequence_length or fam.max_sequence_length)  # Z-Image / FLUX.2: the padded Qwen tokens
    sim = Sim(unet_config, vae_config, kind, side, dtype, checkpointing, text_tokens=text_tokens)
    train_full = cfg.full_finetune if method == "sharpening" else cfg.train_full
    lora = {"pso": cfg.lora_rank, "sharpening": cfg.lora_rank, "diff_instruct_pp": cfg.lora_rank}[method]
    import transformers

    text_bytes = sum(architectures.parameter_count(getattr(transformers, lib[1]), e[part]) * (torch.finfo(dtype).bits // 8)
                     for part, lib in architectures.model_index(spec.base).items() if part.startswith("text_encoder"))
    if not spec.precompute_embeddings:  # the text encoders stay resident (CLIP, OpenCLIP, T5-XXL)
        sim.resident_extra += text_bytes
    ns = dict(vars(cfg), batch=batch)  # the per-GPU batch planned
    trained = [role]  # the roles whose LoRA (or weights) the update trains
    if method == "pso":
        rs = spec.roles.get("student", RoleSpec())
        own = role_grid(spec, "student", rs)
        ns["grid"] = common.few_step_timesteps(cfg.train_steps) if cfg.train_steps else own
        ns["model_steps"] = len(own)
        sim.add_unet("student", lora, train_full)
        ns["trained_role"] = module.TRAINED_ROLE.get(cfg.variant, "student")  # pso.py's: base transfer's teacher
        if ns["trained_role"] != "student":  # the LoRA trains on the base network; the student evaluates it
            trained = [ns["trained_role"]]
            sim.add_unet(trained[0], lora, train_full)
        stated = module.nfe_per_update(cfg, len(ns["grid"]), len(own))
    elif method == "sharpening":
        rs = spec.roles.get("teacher", RoleSpec())
        ns["grid"] = role_grid(spec, "teacher", rs)
        sim.add_unet("teacher", lora, train_full)
        stated = cfg.n * cfg.m + (cfg.n * len(ns["grid"]) + 2 * cfg.m if cfg.variant == "rlhf" else 0) + (
            (cfg.m if cfg.variant == "sft" else 2 * cfg.m) if cfg.recompute else 0)
    else:
        sim.add_unet("generator", lora, train_full)
        sim.add_unet("teacher", cfg.ta_lora_rank, cfg.ta_train_full)
        trained = ["generator", "teacher"]
        stated = module.nfe_per_update(cfg)
    sim.build_vae()
    from .rewards import reward_name

    for which, r in [("reward", spec.reward), ("quality", spec.quality)] + [
            (reward_name(r), r) for r in spec.eval_rewards]:
        sim.build_reward(which, reward_name(r))
    c = SimpleNamespace(**ns)
    resident = sum(param_bytes(m) for m in sim.models()) + sim.resident_extra
    opts = {r: adamw([p for p in sim.unets[r][0].parameters() if p.requires_grad]) for r in trained}
    with counting(dtype) as counter:
        for r, opt in opts.items():
            init_states(opt, sim.trainable(r))
        base = counter.live  # the optimizer states (and nothing else) live between updates
        if batches is None:
            counter.reset_peak()
            sim.rows = sim.grad_rows = 0
            update(sim, c, batch, opts)
            update_peaks = {batch: counter.peak}
        else:  # batch 1 counted, and batches 2 and 4 traced for the larger ones (affine_peaks)
            update_peaks, traces = {}, {}
            for b in (1, 2, 4):
                sim.rows = sim.grad_rows = 0
                counter.start_trace()
                update(sim, c, b, opts)
                traces[b] = [x - base for x in counter.stop_trace()]
                update_peaks[b] = base + max(traces[b], default=0)
            del traces[1]
            more = [b for b in batches if b not in update_peaks]
            try:
                larger, batch = affine_peaks(traces, more), 4  # (the NFEs below: of the update at batch 4)
            except ValueError:  # ops per row (Z-Image's transformer takes a list of images): count each directly
                larger = {}
                for b in more:
                    sim.rows = sim.grad_rows = 0
                    counter.start_trace()
                    update(sim, c, b, opts)
                    larger[b] = max([x - base for x in counter.stop_trace()], default=0)
                    batch = b
            update_peaks = {**{b: update_peaks[b] for b in batches if b in update_peaks},
                            **{b: base + p for b, p in larger.items()}}
        nfe, grad_nfe = sim.rows / batch, sim.grad_rows / batch
        counter.reset_peak()
        evaluate(sim, c, decode_batch)
        eval_peak = counter.peak
        startup_peak = None
        if startup is not None and cfg.reward_scale > 0:
            counter.reset_peak()
            startup(sim, c, batch)
            startup_peak = counter.peak
    net = "transformer" if kind in ("sd3", "flux") else "UNet"
    mode = f"full {net}" if train_full else f"LoRA r={lora}"
    if method == "diff_instruct_pp":
        mode += f" + TA LoRA r={cfg.ta_lora_rank}"
    notes = list(sim.notes) + ([pending] if pending else [])
    if spec.precompute_embeddings:
        notes.append("text encoders freed after precomputing the prompts' embeddings (not counted)")
    rows = []
    frozen = sum(param_bytes(m, trainable=False) for m, _ in sim.unets.values())  # the trained models' frozen weights
    largest, root = max((fsdp_units(m) for m, _ in sim.unets.values()), default=(0, 0))
    biggest_param = max((p.numel() * p.element_size() for m, _ in sim.unets.values() for p in m.parameters()
                         if not p.requires_grad), default=0)  # (none frozen when every weight trains: no FSDP)
    # loading (FullWorld, FullDenoiser): the pipeline's parts are read into host RAM, then moved; each network is
    # read in the weight dtype (train_full: the fp32 copy and the reference) and moved; a reward model at its first
    # use. Under FSDP (full/fsdp.py) only process 0 reads the networks and keeps them in host RAM until each is
    # sharded (every FSDP network of the run: both DI++ networks are loaded before either optimizer is prepared)
    parts = text_bytes + param_bytes(sim.vae)
    nets = [param_bytes(m) + (param_bytes(ref) if ref is not None else 0) for m, ref in sim.unets.values()]
    reward = max((param_bytes(m) for _, m in sim.rewards.values()), default=0)
    for b, update_peak in sorted(update_peaks.items()):
        for n in gpus:
            if n > 1 and train_full:
                continue  # full/fsdp.py trains LoRAs only
            here = resident if n == 1 else (resident - frozen + frozen / n + root * (1 - 1 / n)
                                            + 2 * largest * (1 - 1 / n))
            load_gpu = resident if n == 1 else resident - frozen + frozen / n + biggest_param
            host0 = max(parts, reward, max(nets) if n == 1 else sum(nets))
            host = max(parts, reward, max(nets)) if n == 1 else max(parts, reward)
            worst = max(here + max(update_peak, eval_peak, startup_peak or 0), load_gpu)
            rows.append(Row(name, mode, checkpointing, side * 8, b, s.batch, here / GiB, (here + update_peak) / GiB,
                            (here + eval_peak) / GiB, None if startup_peak is None else (here + startup_peak) / GiB,
                            nfe, stated, smallest_gpu(worst), notes, n, load_gpu / GiB, host0 / GiB, host / GiB,
                            grad_nfe))
    return rows


FSDP_GPUS = 8  # the docs table's FSDP rows: the state per GPU of an 8-GPU node
LAUNCH_GPUS = (1, 2, 4, 8)  # the FSDP settings' process counts the launcher's table covers
PLANNED_BATCHES = (1, 2, 4, 8, 16)  # per-GPU batches planned for the launcher (full/defaults.py PLANNED_PEAK_GIB)


def full_training(name: str) -> bool:
    from . import launch

    return any(f in launch.SETTINGS[name].args for f in ("--full-finetune", "--train-full"))


def variants(name: str) -> list[tuple[str | None, bool, tuple]]:
    """(training, checkpointing, GPU counts) of a setting's rows in the docs table (per-GPU batch 1): its own
    training mode with checkpointing on and off, a LoRA r=16 alternative (with checkpointing) where the launcher
    trains every weight, and for the FSDP settings also the state per GPU under FSDP2 over FSDP_GPUS GPUs."""
    from . import launch

    s = launch.SETTINGS[name]
    gpus = (1, FSDP_GPUS) if s.fsdp else (1,)
    own = [(None, True, gpus), (None, False, gpus)]
    return own + ([("lora", True, (1,))] if full_training(name) else [])


def simulations(name: str) -> list[tuple[str | None, bool, tuple, tuple]]:
    """(training, checkpointing, per-GPU batches, GPU counts) of every simulation of a setting: the docs table's
    rows (batch 1) and the launcher's: its own training mode and the LoRA alternative of a full setting, with the
    spec's checkpointing, at every PLANNED_BATCHES batch, under FSDP at every LAUNCH_GPUS count."""
    from . import launch

    s = launch.SETTINGS[name]
    ckpt = setting_spec(s)[0].gradient_checkpointing
    out = {}
    for training, on, gpus in variants(name):
        out[(training, on)] = [(1,), set(gpus)]
    for training in [None] + (["lora"] if full_training(name) else []):
        entry = out.setdefault((training, ckpt), [(1,), set()])
        entry[0] = PLANNED_BATCHES
        entry[1].update(LAUNCH_GPUS if s.fsdp and training is None else (1,))
    return [(t, c, b, tuple(sorted(g))) for (t, c), (b, g) in out.items()]


def row_peak(r: dict) -> float:
    """Row.peak_gib of a row read back from JSON."""
    return max(r["update_gib"], r["eval_gib"], r["startup_gib"] or 0.0, r.get("load_gpu_gib", 0.0))


def docs_rows(rows: list[dict]) -> list[dict]:
    """The rows of the docs table: per-GPU batch 1, one GPU or FSDP_GPUS."""
    return ordered([r for r in rows if r["batch"] == 1 and r.get("gpus", 1) in (1, FSDP_GPUS)
                    and (r["variant"], r["checkpointing"]) in {(t or "own", c) for t, c, _ in variants(r["setting"])}])


def launcher_table(rows: list[dict]) -> dict:
    """{setting: {(training, GPUs): (peak GiB at each PLANNED_BATCHES batch)}} of the launcher (full/defaults.py):
    the rows with the spec's checkpointing."""
    from . import launch

    out: dict = {}
    for name, s in launch.SETTINGS.items():
        ckpt = setting_spec(s)[0].gradient_checkpointing
        mine = [r for r in rows if r["setting"] == name and r["checkpointing"] == ckpt]
        for r in mine:
            key = (r["variant"], r.get("gpus", 1))
            peaks = {x["batch"]: row_peak(x) for x in mine if (x["variant"], x.get("gpus", 1)) == key}
            if all(b in peaks for b in PLANNED_BATCHES):
                out.setdefault(name, {})[key] = tuple(round(peaks[b], 2) for b in PLANNED_BATCHES)
    return out


def python_table(table: dict) -> str:
    """full/defaults.py's generated block."""
    lines = [f"PLANNED_BATCHES = {PLANNED_BATCHES!r}", "PLANNED_PEAK_GIB = {"]
    for name, entries in table.items():
        lines.append(f"    {name!r}: {{")
        for key, peaks in sorted(entries.items()):
            lines.append(f"        {key!r}: {peaks!r},")
        lines.append("    },")
    return "\n".join(lines + ["}"]) + "\n"


def table(rows: list[dict]) -> str:
    head = ("| setting | training | checkpointing | GPUs (FSDP) | resolution | batch/GPU (global) | resident | "
            "update peak | evaluation peak | start-up peak | loading: GPU / host (process 0, each other) | "
            "NFE planned / stated | smallest GPU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        start = f"{r['startup_gib']:.1f}" if r["startup_gib"] is not None else "-"
        gpus = r.get("gpus", 1)
        lines.append(f"| {r['setting']} | {r['training']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{gpus if gpus > 1 else '1 (no FSDP)'} | {r['resolution']}² | {r['batch']} ({r['global_batch']}) | {r['resident_gib']:.1f} | "
                     f"{r['update_gib']:.1f} | {r['eval_gib']:.1f} | {start} | {r.get('load_gpu_gib', 0):.1f} / "
                     f"{r.get('load_host_rank0_gib', 0):.1f}, {r.get('load_host_rank_gib', 0):.1f} | "
                     f"{r['nfe']:g} / {r['stated_nfe']:g} | "
                     f"{r['smallest_gpu']} |")
    notes = sorted({n for r in rows for n in r["notes"]})
    return "\n".join(lines + ([""] + [f"* {n}" for n in notes] if notes else [])) + "\n"


def ordered(rows: list[dict]) -> list[dict]:
    """The table's order: launcher settings as listed, own training mode first, checkpointing on first, GPUs."""
    from . import launch

    order = {n: i for i, n in enumerate(launch.SETTINGS)}
    return sorted(rows, key=lambda r: (order[r["setting"]], r["variant"] != "own", not r["checkpointing"],
                                       r["batch"], r.get("gpus", 1)))


BEGIN, END = "<!-- memory-plan:begin (python -m full.memory_plan --write-docs) -->", "<!-- memory-plan:end -->"
PY_BEGIN, PY_END = "# memory-plan:begin (python -m full.memory_plan --write-docs; do not edit)", "# memory-plan:end"
ROWS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "memory_plan.json"


def write_between(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    doc = path.read_text()
    if begin not in doc or end not in doc:
        raise ValueError(f"{path} lacks the markers {begin!r} ... {end!r} around the generated table")
    head, rest = doc.split(begin, 1)
    path.write_text(head + begin + "\n" + text + rest[rest.index(end):])


def main(argv=None) -> list[dict]:
    from . import launch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="*", help=f"launcher settings (default: all of {sorted(launch.SETTINGS)})")
    p.add_argument("--batch", type=int, help="per-GPU batch (default: the docs table's 1 and the launcher's "
                                             f"{PLANNED_BATCHES})")
    p.add_argument("--decode-batch", type=int, default=1, help="rows per evaluation chunk (the spec's decode_batch)")
    p.add_argument("--resolution", type=int, help="image side (default: the setting's spec)")
    p.add_argument("--json", help=f"write the rows here as they are computed (a finished row is reused); with "
                                  f"--write-docs the default is {ROWS.relative_to(launch.ROOT)}")
    p.add_argument("--write-docs", action="store_true", help="replace the table in docs/full.md and the launcher's "
                                                             "table in full/defaults.py (every setting)")
    a = p.parse_args(argv)
    unknown = [s for s in a.settings if s not in launch.SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {unknown}; choose from {sorted(launch.SETTINGS)}")
    if a.write_docs and (a.settings or a.batch or a.resolution or a.decode_batch != 1):
        p.error("--write-docs plans every setting at the specs' resolution and decode batch 1: drop the other options")
    path = Path(a.json) if a.json else ROWS if a.write_docs else None
    done = json.loads(path.read_text()) if path is not None and path.is_file() else []
    rows = list(done)
    todo = [(name, *sim) for name in a.settings or list(launch.SETTINGS) for sim in simulations(name)]
    for name, training, ckpt, batches, gpus in sorted(todo, key=lambda x: len(x[3]) == 1):  # the launcher's first
        batches = (a.batch,) if a.batch is not None else batches
        key = dict(setting=name, checkpointing=ckpt, variant=training or "own")
        if any(all(r.get(k) == v for k, v in key.items()) and r["batch"] == batches[-1] for r in done):
            continue
        for r in plan_setting(name, ckpt, training, batches[0], a.resolution, a.decode_batch, gpus,
                              batches if len(batches) > 1 else None):
            row = {**asdict(r), "variant": training or "own"}
            rows.append(row)
            print(f"{name} {row['training']} checkpointing={ckpt} batch={row['batch']} GPUs={row['gpus']}: "
                  f"update {row['update_gib']:.1f} GiB, evaluation {row['eval_gib']:.1f} GiB, loading "
                  f"{row['load_gpu_gib']:.1f} GiB -> {row['smallest_gpu']}", file=sys.stderr, flush=True)
        if path is not None:
            path.write_text(json.dumps(ordered(rows), indent=1))
    rows = ordered(rows)
    text = table(docs_rows(rows))
    print(text)
    if a.write_docs:
        write_between(launch.ROOT / "docs" / "full.md", text)
        write_between(Path(__file__).resolve().parent / "defaults.py", python_table(launcher_table(rows)),
                      PY_BEGIN, PY_END)
    return rows


if __name__ == "__main__":
    main()
