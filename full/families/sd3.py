"""SD3 / SD3.5 (StableDiffusion3Pipeline, SD3Transformer2DModel).

* Forward: transformer(hidden_states=x_t, timestep=scheduler timestep = 1000 sigma (float), encoder_hidden_states,
  pooled_projections); the output is the velocity (eps - x_0) in the latent layout.
* Prompts: the pipeline's encode_prompt: two CLIP encoders' penultimate hidden states (padded to T5's width) then
  max_sequence_length T5 tokens (256 by default); pooled = the two CLIP projections concatenated. The null
  condition: the encoded negative prompt ("" by default; not zeros).
* LoRA: the attention projections of both streams, to_q / to_k / to_v / to_out.0 and add_q_proj / add_k_proj /
  add_v_proj / to_add_out (diffusers' train_dreambooth_lora_sd3; the last block has no to_add_out: peft takes the
  ones present), saved as transformer_lora_layers.
"""
from __future__ import annotations

import torch

import common

from . import Family

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def forward(net, x: torch.Tensor, t: torch.Tensor, cond: dict, schedule) -> torch.Tensor:
    """SD3 / SD3.5: the pipeline passes scheduler.timesteps = sigma_t * 1000 (float) as the timestep."""
    timestep = schedule.sigma(t).to(x.device) * common.T
    return net(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"],
               pooled_projections=cond["pooled_projections"], return_dict=False)[0]


class SD3Family(Family):
    name, pipeline = "sd3", "StableDiffusion3Pipeline"
    prompt_keys = ("prompt_embeds", "pooled_projections")
    text = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
    max_sequence_length = 256
    pipeline_module = "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3"
    max_shift = 1.16

    def lora_targets(self, net_config):
        return LORA_TARGETS

    def forward(self, net, x, t, cond, schedule):
        return forward(net, x, t, cond, schedule)

    def encode(self, pipe, texts, device, max_sequence_length, spec):
        # (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        out = pipe.encode_prompt(list(texts), None, None, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
        return {"prompt_embeds": out[0], "pooled_projections": out[2]}

    def pipeline_embeds(self, cond, null, world):
        kw = {"prompt_embeds": cond["prompt_embeds"].to(world.dtype),
              "pooled_prompt_embeds": cond["pooled_projections"].to(world.dtype)}
        if null is not None:
            kw["negative_prompt_embeds"] = null["prompt_embeds"].to(world.dtype)
            kw["negative_pooled_prompt_embeds"] = null["pooled_projections"].to(world.dtype)
        return kw

    def pipeline_sigmas(self, steps):
        return None  # StableDiffusion3Pipeline lets the scheduler space its own sigmas (set_timesteps(N))


SD3 = SD3Family()
