"""What differs between the model families the full backend supports: one small adapter per diffusers pipeline
class, one module per family. Adding a family is adding a module here and its row in FAMILIES.

An adapter (a `Family`) holds what its pipeline does that the rest of the backend must do the same way, and nothing
else: the denoiser's call (latent packing, position ids, timestep convention, guidance input), the prompt encoding
through the pipeline's own `encode_prompt` and the condition it makes, the null condition of CFG, the VAE latent
convention, the LoRA targets of diffusers' own training script and the format `save_lora_weights` writes, how the
pipeline turns a step count into its scheduler's sigmas (flow families), and the keyword arguments a pipeline call
takes for the world's embeddings. full/world.py (FullWorld, FullDenoiser), full/models.py and full/evaluate.py call
these and branch on no family. Tests compare each adapter with the pipeline it comes from.

* `unet`: StableDiffusionPipeline (SD1.5 / SD2.x-base) and StableDiffusionXLPipeline (eps-prediction UNets).
* `sd3`: StableDiffusion3Pipeline (SD3 / SD3.5); `flux`: FluxPipeline (FLUX.1-schnell / -dev).
* `zimage`: ZImagePipeline (Z-Image-Turbo, Z-Image); `flux2`: Flux2KleinPipeline (FLUX.2-klein 4B / 9B, their bases).
"""
from __future__ import annotations

import math

import torch


class Family:
    """The interface FullWorld calls. Class attributes describe the pipeline's layout; methods do what differs.
    Defaults are the common case (a transformer velocity model, one text encoder, an AutoencoderKL with scaling and
    shift factors, PEFT LoRA saved as transformer_lora_layers)."""

    name = ""  # the family's key in FAMILIES
    pipeline = ""  # the diffusers pipeline class name (model_index.json's _class_name)
    net = "transformer"  # the denoiser's subfolder and its name in the pipeline
    text = (("text_encoder", "tokenizer"),)  # (text encoder, tokenizer) component names, in the pipeline's order
    prompt_keys = ("prompt_embeds",)  # the condition entries `encode` makes per prompt, in a fixed order
    text_encoder_out_layers = None  # the hidden-state layers the pipeline stacks by default (FLUX.2: 9, 18, 27)
    flow = True  # a flow-matching (velocity) model: common.FlowSchedule and the flow kernels
    vae_class = "AutoencoderKL"
    latent_patch = 1  # the state's side must be a multiple of this (the packing / patches); 1: the net's patch_size
    max_sequence_length = None  # the pipeline's default prompt length (flow families' T5 / Qwen tokens)
    pipeline_extra: dict = {}  # extra constructor arguments of the pipeline class (SD1.5's safety checker)
    force_zeros_for_empty_prompt = False  # the pipeline's default when model_index.json does not say (SDXL: True)
    pipeline_module = ""  # the pipeline's module (its calculate_shift / retrieve_timesteps)
    max_shift = 1.15  # the max_shift the pipeline assumes when the scheduler config has none
    table_steps = None  # the step count mu is taken at for the training table, where mu depends on it (FLUX.2)

    # -- the network ---------------------------------------------------------------------------------------------
    def lora_targets(self, net_config) -> list[str]:
        raise NotImplementedError

    def forward(self, net, x: torch.Tensor, t: torch.Tensor, cond: dict, schedule) -> torch.Tensor:
        """The network's prediction (eps for a UNet, the velocity for a flow model) at x_t in the state layout
        [B, C, H, W] and integer times t (per row), called as the pipeline calls it."""
        raise NotImplementedError

    def state_channels(self, vae_config) -> int:
        """Channels of the state the sampler runs on (the VAE's latents unless the family repacks them)."""
        return vae_config["latent_channels"]

    def state_side(self, latent_side: int) -> int:
        """Side of the state for a VAE latent side (FLUX.2's state is 2x2-patchified: half of it)."""
        return latent_side

    def check(self, world) -> None:
        """Errors for a checkpoint / spec this family cannot run (e.g. channels that do not fit), before training."""
        if world.spec.text_encoder_out_layers is not None and not self.text_encoder_out_layers:
            from ..models import ModelError

            raise ModelError(f"model spec of {world.name}: \"text_encoder_out_layers\" is set, but a {self.pipeline} "
                             "reads no chosen hidden-state layers (only FLUX.2-klein's pipeline does); remove it")
        expected = self.in_channels(world.shape[0])
        got = world.net_config.get("in_channels", expected)
        if self.flow and got != expected:
            from ..models import ModelError

            raise ModelError(f"{world.spec.base}: the {self.net} takes {got} input channels, the VAE's "
                             f"{world.shape[0]}-channel state needs {expected}")

    def in_channels(self, state_channels: int) -> int:
        return state_channels

    def patch(self, net_config) -> int:
        """The side of the state's patches the denoiser turns into tokens (latent_patch, else the network's
        patch_size: SD3's 2; a UNet 1): the state's side must be a multiple of it."""
        return self.latent_patch if self.latent_patch > 1 else (net_config.get("patch_size") or 1)

    def image_tokens(self, state_side: int, net_config) -> int:
        """The image sequence length a flow pipeline's resolution-dependent shift is computed from."""
        return (state_side // self.patch(net_config)) ** 2

    # -- prompts -------------------------------------------------------------------------------------------------
    def encode(self, pipe, texts: list[str], device, max_sequence_length: int | None, spec) -> dict:
        """{name: [B, ...]} prompt tensors from the pipeline's own encode_prompt (one row per text)."""
        raise NotImplementedError

    def null_is_zeros(self, parts, spec) -> bool:
        """Whether the pipeline's unconditional embedding is zeros (SDXL's force_zeros_for_empty_prompt) rather than
        the encoded negative prompt."""
        return False

    def extra_condition(self, cond: dict, world) -> dict:
        """Condition entries the pipeline makes from settings, not from the prompt (SDXL time ids, FLUX guidance),
        for the rows of `cond` (its prompt tensors, on the world's device)."""
        return {}

    default_guidance = None  # the pipeline's default embedded guidance (FluxPipeline's guidance_scale: 3.5)

    def has_guidance(self, net_config) -> bool:
        """Whether the denoiser takes an embedded guidance value (a guidance-distilled FLUX.1-dev transformer)."""
        return False

    def guidance(self, net_config, spec) -> float | None:
        """The embedded guidance value of a guidance-distilled denoiser: spec "guidance", else the family's default;
        None for every other denoiser, where a spec "guidance" is an error."""
        if not self.has_guidance(net_config):
            if spec.guidance is not None:
                from ..models import ModelError

                raise ModelError(f"model spec of {spec.name or spec.base}: \"guidance\" is set but the denoiser of "
                                 f"{spec.base} has no guidance input (only guidance-distilled FLUX transformers, "
                                 "guidance_embeds=true, take one); remove it (CFG is the methods' cfg_scale)")
            return None
        return self.default_guidance if spec.guidance is None else float(spec.guidance)

    # -- the VAE -------------------------------------------------------------------------------------------------
    def to_vae(self, x: torch.Tensor, vae) -> torch.Tensor:
        """The state -> what vae.decode takes (AutoencoderKL: x / scaling_factor + shift_factor)."""
        cfg = vae.config
        z = x / cfg.scaling_factor
        return z + cfg.shift_factor if cfg.get("shift_factor") is not None else z

    def from_vae(self, z: torch.Tensor, vae) -> torch.Tensor:
        """vae.encode's latents -> the state ((z - shift_factor) * scaling_factor)."""
        cfg = vae.config
        if cfg.get("shift_factor") is not None:
            z = z - cfg.shift_factor
        return z * cfg.scaling_factor

    # -- the pipeline --------------------------------------------------------------------------------------------
    def pipeline_embeds(self, cond: dict, null: dict | None, world) -> dict:
        """The pipeline's prompt arguments for the world's condition (prompt_embeds[, pooled_prompt_embeds]) and,
        given a null condition, the negative ones (negative_prompt_embeds ...), in the world's dtype."""
        raise NotImplementedError

    def pipeline_guidance(self, guidance: float, world) -> dict:
        """The pipeline's CFG arguments for the usual CFG scale `guidance` (neg + guidance (pos - neg); <= 1: off)."""
        return {"guidance_scale": guidance}

    def example_condition(self, rows: int, text_tokens: int, net_config, device, dtype) -> dict:
        """A condition of `rows` rows with `text_tokens` prompt tokens and the network's widths (values unset: the
        memory plan's meta-device calls, full/memory_plan.py)."""
        raise NotImplementedError

    def pipeline_latents(self, latents: torch.Tensor, pipe, world) -> torch.Tensor:
        """A pipeline's `output_type="latent"` result -> the state layout."""
        return latents

    def lora_layers(self, peft_state: dict) -> dict:
        """The denoiser's peft LoRA state -> the layers `save_lora_weights` takes (transformer_lora_layers)."""
        return peft_state

    # -- sampling grids (flow families) ---------------------------------------------------------------------------
    def pipeline_sigmas(self, steps: int):
        """The unshifted sigmas the pipeline gives its scheduler for `steps` steps (None: the scheduler's own)."""
        import numpy as np

        return np.linspace(1.0, 1 / steps, steps)

    def pipeline_mu(self, config, image_seq_len: int, steps: int | None) -> float | None:
        """The mu the pipeline passes to set_timesteps at `steps` steps (None without use_dynamic_shifting, where
        set_timesteps ignores it): diffusers' calculate_shift of the pipeline's own module."""
        if not config.get("use_dynamic_shifting"):
            return None
        import importlib

        return importlib.import_module(self.pipeline_module).calculate_shift(
            image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", self.max_shift))


def pipeline_shift(config, mu: float | None) -> float:
    """The static shift s (sigma' = s sigma / (1 + (s - 1) sigma)) of a FlowMatchEulerDiscreteScheduler once a
    pipeline called `set_timesteps(..., mu=mu)`: config.shift, or with use_dynamic_shifting exp(mu) (time_shift_type
    "exponential": exp(mu) / (exp(mu) + 1/sigma - 1) is that map) or mu ("linear")."""
    if not config.get("use_dynamic_shifting"):
        return float(config.get("shift", 1.0))
    kind = config.get("time_shift_type", "exponential")
    if kind == "exponential":
        return math.exp(mu)
    if kind == "linear":
        return float(mu)
    raise ValueError(f"scheduler time_shift_type {kind!r} is neither 'exponential' nor 'linear'")


def grid_from_sigmas(sigmas) -> list[int]:
    """The integer times t of common.FlowSchedule ((t + 1) / 1000 = the unshifted sigma) of a pipeline's unshifted
    sigmas, e.g. linspace(1, 1/8, 8) -> [999, 874, ..., 124]; an error if one is not on the 1000-step grid."""
    out = []
    for s in sigmas:
        t = round(float(s) * 1000) - 1
        if abs((t + 1) / 1000 - float(s)) > 1e-6:
            raise ValueError(f"sigma {float(s)!r} is not on the 1000-step training grid (t + 1) / 1000")
        out.append(t)
    return out


def families() -> dict[str, Family]:
    """Every family by name (imported on first use: the modules import diffusers lazily)."""
    from . import flux, flux2, sd3, unet, zimage

    return {f.name: f for f in (unet.SD15, unet.SDXL, sd3.SD3, flux.FLUX, zimage.ZIMAGE, flux2.FLUX2)}


def by_pipeline(class_name: str) -> Family | None:
    """The family of a diffusers pipeline class name, or None."""
    return next((f for f in families().values() if f.pipeline == class_name), None)
