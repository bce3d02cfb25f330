"""SD1.5 / SD2.x-base (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline): eps-prediction UNets.

* Forward: unet(x_t, t, encoder_hidden_states) with the integer timestep; SDXL adds the pooled text_encoder_2
  embedding (`text_embeds`) and add_time_ids = (original size, crop top-left, target size) = (R, R, 0, 0, R, R).
* Prompts: the pipeline's encode_prompt (SDXL: both encoders' penultimate hidden states concatenated, the pooled
  projection of the second). The null condition of CFG: zeros on SDXL (force_zeros_for_empty_prompt, with no
  negative prompt), the encoded negative prompt ("") on SD1.5.
* LoRA: peft on the attention projections to_q / to_k / to_v / to_out.0 (diffusers' train_text_to_image_lora /
  train_dreambooth_lora examples), saved as unet_lora_layers in the diffusers key format
  (convert_state_dict_to_diffusers).
"""
from __future__ import annotations

import torch

from . import Family

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def forward(net, x: torch.Tensor, t: torch.Tensor, cond: dict, schedule) -> torch.Tensor:
    kw = {"encoder_hidden_states": cond["prompt_embeds"]}
    if "text_embeds" in cond:  # SDXL: pooled text_encoder_2 embedding and add_time_ids
        kw["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return net(x, t, **kw, return_dict=False)[0]


class UNetFamily(Family):
    net = "unet"
    flow = False

    def lora_targets(self, net_config) -> list[str]:
        return LORA_TARGETS

    def forward(self, net, x, t, cond, schedule):
        return forward(net, x, t, cond, schedule)

    def encode(self, pipe, texts, device, max_sequence_length, spec):
        # (prompt_embeds, negative_prompt_embeds[, pooled_prompt_embeds, negative_pooled_prompt_embeds])
        out = pipe.encode_prompt(list(texts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"prompt_embeds": out[0]}

    def pipeline_embeds(self, cond, null, world):
        kw = {"prompt_embeds": cond["prompt_embeds"].to(world.dtype)}
        if null is not None:
            kw["negative_prompt_embeds"] = null["prompt_embeds"].to(world.dtype)
        return kw

    def lora_layers(self, peft_state):
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(peft_state)


class SD15Family(UNetFamily):
    name, pipeline = "sd15", "StableDiffusionPipeline"
    pipeline_module = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"
    pipeline_extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


class SDXLFamily(UNetFamily):
    name, pipeline = "sdxl", "StableDiffusionXLPipeline"
    prompt_keys = ("prompt_embeds", "text_embeds")
    force_zeros_for_empty_prompt = True
    pipeline_module = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"
    text = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))

    def encode(self, pipe, texts, device, max_sequence_length, spec):
        out = pipe.encode_prompt(list(texts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"prompt_embeds": out[0], "text_embeds": out[2]}

    def null_is_zeros(self, parts, spec):
        return parts.force_zeros_for_empty_prompt and not spec.negative_prompt

    def extra_condition(self, cond, world):
        """add_time_ids: (original size, crop top-left, target size) = (R, R, 0, 0, R, R)."""
        r, e = world.resolution, cond["prompt_embeds"]
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=e.dtype, device=e.device)
        return {"time_ids": time_ids.expand(len(e), 6).clone()}

    def pipeline_embeds(self, cond, null, world):
        kw = super().pipeline_embeds(cond, null, world)
        kw["pooled_prompt_embeds"] = cond["text_embeds"].to(world.dtype)
        if null is not None:
            kw["negative_pooled_prompt_embeds"] = null["text_embeds"].to(world.dtype)
        return kw


SD15, SDXL = SD15Family(), SDXLFamily()
