"""The diffusers implementation of common.World / common.Denoiser (DESIGN.md section 8).

* `FullDenoiser`: eps = unet(x_t, t, prompt embeddings [, SDXL pooled embeds + add_time_ids]) with a peft LoRA on
  to_q / to_k / to_v / to_out.0 (`unet.add_adapter`); `frozen()` disables the adapter, so the pre-trained model
  costs no memory. Frozen weights live in the spec's dtype, LoRA weights in fp32 (diffusers' `cast_training_params`),
  the forward runs under autocast; inputs follow the caller's device and come back on it.
* `FullAccelerator`: accelerate's Accelerator whose `backward` also averages the LoRA gradients over the
  data-parallel ranks (one flat all-reduce). The methods prepare only their optimizers, not the UNets, so DDP's
  wrapper never sees the models; this does its job (DDP also broadcasts rank 0's initial weights: so do we), and it
  works whatever number of forward passes, frozen passes and backward calls an update makes.
  `adam_8bit` makes `prepare` swap a torch Adam/AdamW for bitsandbytes' AdamW8bit with the same hyperparameters.
* `FullWorld`: prompts -> cached embeddings (condition dicts with a `prompt_id` row so a reward can find the text),
  VAE encode / decode, rewards on decoded images, image-caption data, preference pairs and concept images as
  latents, metrics, figures, and LoRA export in the diffusers format (`pipe.load_lora_weights(dir)` loads it).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import common

from . import data as data_lib
from . import models
from .rewards import load_reward, reward_name
from .spec import ROLES, ModelSpec, RoleSpec

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _to(module, device, dtype):
    """module.to(device[, dtype]) without diffusers' cast warning when the dtype does not change."""
    same = all(p.dtype == dtype for p in module.parameters())
    return module.to(device) if same else module.to(device, dtype)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _accelerator_class():
    from accelerate import Accelerator

    class FullAccelerator(Accelerator):
        """Accelerator + cross-rank averaging of the registered trainable parameters' gradients in `backward`."""

        def __init__(self, *args, adam_8bit: bool = False, **kw):
            super().__init__(*args, **kw)
            self.synced_parameters: list[torch.nn.Parameter] = []
            self.adam_8bit = adam_8bit

        def backward(self, loss, **kw):
            super().backward(loss, **kw)
            self.average_gradients()

        @torch.no_grad()
        def average_gradients(self) -> None:
            """grad <- mean over ranks. Idempotent on gradients already equal across ranks, so several backward
            calls per update (accumulating into the same .grad) still end with the average of the sums."""
            if self.num_processes == 1:
                return
            grads = [p.grad for p in self.synced_parameters if p.grad is not None]
            if not grads:
                return
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            flat = self.reduce(flat, reduction="mean")
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

        def prepare(self, *args, **kw):
            if self.adam_8bit:
                args = tuple(_adam_8bit(a) for a in args)
            return super().prepare(*args, **kw)

    return FullAccelerator


def _adam_8bit(obj):
    if not isinstance(obj, (torch.optim.Adam, torch.optim.AdamW)):
        return obj
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("adam_8bit needs bitsandbytes (pip install bitsandbytes, CUDA only)") from e
    d = obj.defaults
    wd = d["weight_decay"] if isinstance(obj, torch.optim.AdamW) else 0.0
    return bnb.optim.AdamW8bit(obj.param_groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=wd)


class FullDenoiser:
    """A role's UNet as an eps-model with a trainable LoRA (or every weight, `train_full`)."""

    def __init__(self, unet, sampler: str, timesteps: list[int], world: "FullWorld", lora_rank: int = 16,
                 train_full: bool = False, role: str = ""):
        from peft import LoraConfig

        self.sampler, self.timesteps, self.train_full, self.role = sampler, list(timesteps), train_full, role
        self.device, self.dtype = world.device, world.dtype
        self._frozen = False
        if train_full:  # a frozen copy in the weight dtype is the reference; the trained copy keeps fp32 weights
            self.reference_unet = _to(copy.deepcopy(unet), self.device, self.dtype).requires_grad_(False)
            self.unet = unet.to(self.device).requires_grad_(True)
        else:
            if lora_rank < 1:
                raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
            unet = _to(unet, self.device, self.dtype)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(world.spec.seed)  # the same initial A on every rank and every run
                unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=True,
                                            target_modules=LORA_TARGETS))
            for p in unet.parameters():  # diffusers' cast_training_params: trainable weights in fp32
                if p.requires_grad:
                    p.data = p.data.float()
            self.unet = unet
        if world.spec.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        world.accelerator.synced_parameters.extend(self.trainable_parameters())
        if world.accelerator.num_processes > 1:  # what DDP's constructor does: rank 0's initial weights everywhere
            import torch.distributed as dist

            with torch.no_grad():
                for p in self.trainable_parameters():
                    dist.broadcast(p.data, src=0)

    def __call__(self, x_t: torch.Tensor, t, cond: dict) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t.to(self.device)
        unet = self.reference_unet if self._frozen and self.train_full else self.unet
        kw = {"encoder_hidden_states": cond["prompt_embeds"].to(self.device)}
        if "text_embeds" in cond:  # SDXL: pooled text_encoder_2 embedding and add_time_ids
            kw["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(self.device),
                                       "time_ids": cond["time_ids"].to(self.device)}
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            eps = unet(x_t.to(self.device), t, **kw, return_dict=False)[0]
        return eps.to(x_t.device, torch.float32)

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

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        if self.train_full:
            return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.unet).items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        if self.train_full:
            self.unet.load_state_dict(state)
            return
        expected = self.adapter_state()
        unexpected, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if unexpected or missing or shapes:
            raise ValueError(f"adapter state does not fit this UNet's LoRA: unexpected {unexpected[:3]}, missing "
                             f"{missing[:3]}, other shapes {shapes[:3]} (a different lora_rank or checkpoint?)")
        set_peft_model_state_dict(self.unet, {k: v.to(self.device) for k, v in state.items()})

    def train(self, mode: bool = True):
        self.unet.train(mode)
        return self

    def eval(self):
        return self.train(False)


class FullWorld:
    """common.World for SD1.5 / SDXL-class diffusers checkpoints; built by full.load_world from a ModelSpec."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.name = spec.name or Path(spec.base).name
        self.parts = models.load_parts(spec)
        self.kind = self.parts.kind
        self.schedule = common.Schedule(models.schedule_name(self.parts.scheduler.config, f"scheduler of {spec.base}"))
        for role in spec.roles:  # every role's scheduler must match (fails now, not after an hour of training)
            self._role_scheduler(role)
        self.accelerator = _accelerator_class()(mixed_precision=spec.mixed_precision, adam_8bit=spec.adam_8bit,
                                                cpu=not torch.cuda.is_available())  # cpu: gloo under torchrun
        self.device, self.dtype = self.accelerator.device, TORCH_DTYPES[spec.dtype]
        vae = self.parts.vae
        # fp16-safe VAE: SDXL's original VAE overflows in fp16 (config.force_upcast): keep it in fp32 then, as the
        # diffusers pipelines do, unless a fixed VAE (e.g. madebyollin/sdxl-vae-fp16-fix) is given in the spec.
        upcast = self.dtype == torch.float16 and vae.config.get("force_upcast", False) and not spec.vae
        self.vae_dtype = torch.float32 if upcast else self.dtype
        self.vae = _to(vae, self.device, self.vae_dtype).requires_grad_(False).eval()
        if spec.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for enc in self.parts.text_encoders:
            _to(enc, self.device, self.dtype).requires_grad_(False).eval()
        unet_config = models.read_unet_config(spec)
        self.resolution = spec.resolution or unet_config["sample_size"] * self.vae_factor
        if self.resolution % self.vae_factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE factor {self.vae_factor}")
        side = self.resolution // self.vae_factor
        self.shape = (self.vae.config.latent_channels, side, side)
        self.prompts = data_lib.load_prompts(spec.prompts)
        self.eval_prompts = data_lib.load_prompts(spec.eval_prompts) if spec.eval_prompts else self.prompts
        self._texts: list[str] = []
        self._ids: dict[str, int] = {}
        self._embeds: dict[int, tuple[torch.Tensor, ...]] = {}
        self._latents: dict[tuple, torch.Tensor] = {}
        self.denoisers: list[FullDenoiser] = []
        self._encoder_pipe = self._make_encoder_pipe()
        if spec.precompute_embeddings:
            texts = self.prompts + self.eval_prompts
            for split in spec.data:
                texts += [self._dataset(split).caption(i) for i in range(len(self._dataset(split)))]
                texts += [spec.data[split][k] for k in ("prompt", "class_prompt") if k in spec.data[split]]
            if spec.pairs:
                texts += [self._pairs().caption(i) for i in range(len(self._pairs()))]
            self._encode_ids([self._id(t) for t in dict.fromkeys(texts)])
            self.free_text_encoders()

    # ----------------------------------------------------------------------------------------- denoisers
    def _role_scheduler(self, role: str):
        rspec = self.spec.roles.get(role, RoleSpec())
        sched = models.role_scheduler(self.spec, rspec, self.parts)
        name = models.schedule_name(sched.config, f"scheduler of role {role}")
        if name != self.schedule.name:
            raise models.ModelError(f"role {role} uses the {name} noise schedule but the base uses "
                                    f"{self.schedule.name}: every role must share one schedule")
        return sched

    def denoiser(self, role: str, lora_rank: int = 16, train_full: bool = False, sampler: str | None = None,
                 timesteps: list[int] | None = None) -> FullDenoiser:
        if role not in ROLES:
            raise ValueError(f"unknown model role {role!r}; choose one of {list(ROLES)}")
        rspec = self.spec.roles.get(role, RoleSpec())
        sched = self._role_scheduler(role)
        where = f"role {role} of {self.name}"
        sampler, timesteps = models.role_sampler(role, sched, sampler or rspec.sampler, timesteps or rspec.timesteps,
                                                 where)
        unet = models.load_unet(self.spec, rspec, self.parts, where)
        den = FullDenoiser(unet, sampler, timesteps, self, lora_rank, train_full, role)
        self.denoisers.append(den)
        return den

    # ----------------------------------------------------------------------------------------- prompts
    def _make_encoder_pipe(self):
        p = self.parts
        extra = ({"text_encoder_2": p.text_encoders[1], "tokenizer_2": p.tokenizers[1]} if self.kind == "sdxl" else
                 {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False})
        return p.pipeline_class(vae=self.vae, text_encoder=p.text_encoders[0], tokenizer=p.tokenizers[0], unet=None,
                                scheduler=p.scheduler, **extra)

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
    def _encode_ids(self, ids: list[int], batch: int = 32) -> None:
        todo = [i for i in dict.fromkeys(ids) if i not in self._embeds]
        if todo and self._encoder_pipe is None:
            raise RuntimeError(f"prompt {self._texts[todo[0]]!r} was not precomputed and the text encoders were "
                               "freed (precompute_embeddings): add it to the spec's prompts")
        for k in range(0, len(todo), batch):
            chunk = todo[k:k + batch]
            out = self._encoder_pipe.encode_prompt([self._texts[i] for i in chunk], device=self.device,
                                                   num_images_per_prompt=1, do_classifier_free_guidance=False)
            embeds, pooled = out[0], (out[2] if self.kind == "sdxl" else None)
            for j, i in enumerate(chunk):
                self._embeds[i] = (embeds[j].cpu(),) + ((pooled[j].cpu(),) if pooled is not None else ())

    @functools.cached_property
    def _null_embeds(self) -> tuple[torch.Tensor, ...]:
        """The unconditional embedding for CFG, as the pipelines make it (SDXL: zeros for an empty negative)."""
        if self.kind == "sdxl" and self.parts.force_zeros_for_empty_prompt and not self.spec.negative_prompt:
            return tuple(torch.zeros_like(e) for e in self._embed_rows([self._id(self.prompts[0])]))
        return self._embed_rows([self._id(self.spec.negative_prompt)])

    def _embed_rows(self, ids: list[int]):
        self._encode_ids(ids)
        return self._embeds[ids[0]]

    def _time_ids(self, n: int) -> torch.Tensor:
        """SDXL add_time_ids: (original size, crop top-left, target size) = (R, R, 0, 0, R, R)."""
        r = self.resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32).expand(n, 6).clone()

    def encode(self, texts: list[str]) -> dict:
        """Prompts -> condition dict {prompt_embeds, [text_embeds, time_ids,] prompt_id} on the world's device."""
        ids = [self._id(t) for t in texts]
        self._encode_ids(ids)
        return self._cond([self._embeds[i] for i in ids], ids)

    def _cond(self, rows, ids) -> dict:
        cond = {"prompt_embeds": torch.stack([r[0] for r in rows]).to(self.device)}
        if self.kind == "sdxl":
            cond["text_embeds"] = torch.stack([r[1] for r in rows]).to(self.device)
            cond["time_ids"] = self._time_ids(len(ids)).to(self.device, cond["prompt_embeds"].dtype)
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
        """Latents -> images in [-1, 1] (differentiable)."""
        cfg = self.vae.config
        z = x0.to(self.device, self.vae_dtype) / cfg.scaling_factor
        if cfg.get("shift_factor") is not None:
            z = z + cfg.shift_factor
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (the posterior mean, so the latents of an image can be cached)."""
        cfg = self.vae.config
        z = self.vae.encode(images.to(self.device, self.vae_dtype)).latent_dist.mean
        if cfg.get("shift_factor") is not None:
            z = z - cfg.shift_factor
        return (z * cfg.scaling_factor).float()

    def _latent(self, key: tuple, load) -> torch.Tensor:
        if key not in self._latents:
            self._latents[key] = self.encode_images(load()[None])[0].cpu()
        return self._latents[key]

    # ----------------------------------------------------------------------------------------- data
    @functools.lru_cache(maxsize=None)
    def _dataset(self, split: str) -> data_lib.ImageCaptions:
        if split not in self.spec.data:
            raise ValueError(f"this run needs data split {split!r}, which the model spec of {self.name} does not "
                             f"define: add \"data\": {{\"{split}\": {{\"folder\": ...}}}} (it has "
                             f"{sorted(self.spec.data) or 'none'})")
        return data_lib.ImageCaptions(self.spec.data[split])

    def data(self, n: int, generator: torch.Generator, split: str = "base") -> tuple[torch.Tensor, dict]:
        ds = self._dataset(split)
        idx = torch.randint(0, len(ds), (n,), generator=generator).tolist()
        x0 = torch.stack([self._latent((split, i), lambda i=i: ds.image(i, self.resolution)) for i in idx])
        return x0.to(self.device), self.encode([ds.caption(i) for i in idx])

    @functools.lru_cache(maxsize=None)
    def _pairs(self, path: str | None = None) -> data_lib.PreferencePairs:
        source = {"folder": path} if path else self.spec.pairs
        if not source:
            raise ValueError(f"no preference pairs: the model spec of {self.name} has no \"pairs\" source "
                             "(a folder with pairs.jsonl, or {\"dataset\": \"yuvalkirstain/pickapic_v2\"})")
        return data_lib.PreferencePairs(source)

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
        r = self.reward_model("reward")(self.decode(x0), self.prompt_texts(cond))
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
        for k in range(0, len(x0), self.spec.decode_batch):
            images = self.decode(x0[k:k + self.spec.decode_batch])
            for key, which in names.items():
                scores[key].append(self.reward_model(which)(images, texts[k:k + self.spec.decode_batch]).float().cpu())
        out = {k: float(torch.cat(v).mean()) for k, v in scores.items()}
        out["distance"] = self._distance(x0, split)
        return out

    def _distance(self, x0: torch.Tensor, split: str) -> float:
        if split not in self.spec.data:
            return math.nan
        from toy.metrics import sliced_wasserstein

        ref, _ = self.data(len(x0), torch.Generator().manual_seed(1234), split)
        pool = lambda x: F.adaptive_avg_pool2d(x.float().cpu(), min(8, x.shape[-1])).flatten(1)  # noqa: E731
        return sliced_wasserstein(pool(x0), pool(ref))

    # ----------------------------------------------------------------------------------------- outputs
    @torch.no_grad()
    def plot_samples(self, panels: dict, path, columns: int = 6) -> None:
        """One row per panel (base, tuned, ...), the first `columns` samples of each, with their prompts."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = len(panels)
        fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
        for r, (title, (x0, cond)) in enumerate(panels.items()):
            k = min(columns, len(x0))
            images = ((self.decode(x0[:k]) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
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
        """The LoRA in the diffusers format (pytorch_lora_weights.safetensors): pipe.load_lora_weights(path).
        A fully fine-tuned UNet is saved with save_pretrained into path/unet instead."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if denoiser.train_full:
            denoiser.unet.save_pretrained(path / "unet")
            return
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser.unet))
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        metadata = denoiser.unet.peft_config["default"].to_dict()
        self.parts.pipeline_class.save_lora_weights(path, unet_lora_layers=layers,
                                                    unet_lora_adapter_metadata=metadata)

    def pipeline(self, role: str = "student", denoiser: FullDenoiser | None = None):
        """A diffusers pipeline of a role (its scheduler, its UNet or the given denoiser's), for evaluate.py."""
        p = self.parts
        unet = denoiser.unet if denoiser is not None else models.load_unet(
            self.spec, self.spec.roles.get(role, RoleSpec()), p, f"role {role}")
        unet = _to(unet, self.device, self.dtype)
        extra = ({"text_encoder_2": p.text_encoders[1], "tokenizer_2": p.tokenizers[1]} if self.kind == "sdxl" else
                 {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False})
        return p.pipeline_class(vae=self.vae, text_encoder=p.text_encoders[0], tokenizer=p.tokenizers[0], unet=unet,
                                scheduler=self._role_scheduler(role), **extra)
