"""FLUX.1 (FluxPipeline, FluxTransformer2DModel): FLUX.1-schnell (timestep-distilled, no guidance input) and
FLUX.1-dev (guidance-distilled: an embedded guidance value, 3.5 by default).

* Forward: the latents packed into 2x2 patches (64 channels for the 16-channel VAE) with their (0, row, column)
  img_ids, zero txt_ids, timestep = scheduler.timesteps / 1000 (= sigma), `guidance` for a guidance-distilled
  transformer (cond["guidance"]); the output unpacked to [B, 16, H, W].
* Prompts: the pipeline's encode_prompt: T5 tokens (max_sequence_length, 512 by default) and CLIP-L's pooled
  embedding. The null condition of true CFG (`true_cfg_scale`): the encoded negative prompt.
* Grid: sigmas = linspace(1, 1/N, N), mu = calculate_shift(image tokens) (FLUX.1-dev's dynamic shifting; schnell:
  a static shift of 1).
* LoRA: the attention projections of both streams (diffusers' train_dreambooth_lora_flux; the single blocks have
  to_q / to_k / to_v only), saved as transformer_lora_layers.
"""
from __future__ import annotations

import torch

import common

from . import Family
from .sd3 import LORA_TARGETS


def forward(net, x: torch.Tensor, t: torch.Tensor, cond: dict, schedule) -> torch.Tensor:
    """FLUX: the latents packed into 2x2 patches with their (0, row, column) img_ids, zero txt_ids, the timestep
    scheduler.timesteps / 1000 (= sigma_t, computed as the pipeline does), and the embedded guidance of a
    guidance-distilled transformer (FLUX.1-dev; cond["guidance"]); the output unpacked to (B, C, H, W)."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x.device, dtype=cond["prompt_embeds"].dtype)
    timestep = schedule.sigma(t).to(x.device) * common.T / 1000
    out = net(hidden_states=packed, timestep=timestep, guidance=cond.get("guidance"),
              pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["prompt_embeds"],
              txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h, w, 1)


class FluxFamily(Family):
    name, pipeline = "flux", "FluxPipeline"
    prompt_keys = ("prompt_embeds", "pooled_projections")
    text = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    latent_patch = 2  # _pack_latents: 2x2 latent patches per token
    max_sequence_length = 512
    pipeline_module = "diffusers.pipelines.flux.pipeline_flux"

    def lora_targets(self, net_config):
        return LORA_TARGETS

    def forward(self, net, x, t, cond, schedule):
        return forward(net, x, t, cond, schedule)

    def in_channels(self, state_channels):
        return 4 * state_channels  # the packed 2x2 patches

    def encode(self, pipe, texts, device, max_sequence_length, spec):
        # (prompt_embeds (T5), pooled_prompt_embeds (CLIP), text_ids)
        out = pipe.encode_prompt(list(texts), None, device=device, num_images_per_prompt=1,
                                 max_sequence_length=max_sequence_length)
        return {"prompt_embeds": out[0], "pooled_projections": out[1]}

    default_guidance = 3.5  # FluxPipeline's guidance_scale

    def has_guidance(self, net_config):
        return bool(net_config.get("guidance_embeds"))  # FLUX.1-dev

    def extra_condition(self, cond, world):
        if world.guidance is None:
            return {}
        # FluxPipeline: torch.full([1], guidance_scale).expand(batch), float32
        n, device = len(cond["prompt_embeds"]), cond["prompt_embeds"].device
        return {"guidance": torch.full((n,), world.guidance, dtype=torch.float32, device=device)}

    def pipeline_embeds(self, cond, null, world):
        """A guidance-distilled FLUX gets the world's embedded guidance as guidance_scale (FluxPipeline's name
        for it)."""
        kw = {"prompt_embeds": cond["prompt_embeds"].to(world.dtype),
              "pooled_prompt_embeds": cond["pooled_projections"].to(world.dtype)}
        if world.guidance is not None:
            kw["guidance_scale"] = world.guidance
        if null is not None:
            kw["negative_prompt_embeds"] = null["prompt_embeds"].to(world.dtype)
            kw["negative_pooled_prompt_embeds"] = null["pooled_projections"].to(world.dtype)
        return kw

    def pipeline_guidance(self, guidance, world):
        """FluxPipeline's CFG is true_cfg_scale; its guidance_scale is the embedded guidance (pipeline_embeds)."""
        return {"guidance_scale": guidance, "true_cfg_scale": max(guidance, 1.0)}

    def pipeline_latents(self, latents, pipe, world):
        """FluxPipeline returns its packed latents with output_type="latent"."""
        return pipe._unpack_latents(latents, world.resolution, world.resolution, pipe.vae_scale_factor)


FLUX = FluxFamily()
