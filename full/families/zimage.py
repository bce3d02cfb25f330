"""Z-Image (ZImagePipeline, ZImageTransformer2DModel): Z-Image-Turbo (8 steps, no CFG) and Z-Image (its
undistilled base, ~50 steps with CFG), as diffusers 0.42.1 runs them.

What the pipeline does (diffusers/pipelines/z_image/pipeline_z_image.py):
* Prompts: a Qwen3 text encoder (`Qwen3Model`, hidden 2560) on the prompt wrapped in the tokenizer's chat template
  (`apply_chat_template(..., add_generation_prompt=True, enable_thinking=True)`), padded to max_sequence_length
  (512), and the *penultimate* hidden state (`hidden_states[-2]`) of the non-padding tokens: one variable-length
  [L_i, 2560] tensor per prompt, passed to the transformer as a list. The negative prompt ("" by default) is
  encoded the same way (not zeros). Here a condition keeps them padded to a fixed length with their lengths
  (`prompt_embeds` [B, L, D], `prompt_len` [B]) so condition rows can be indexed and concatenated; the forward cuts
  each row back to its length.
* Latents: the VAE's 16-channel latents (AutoencoderKL, FLUX.1's: scaling 0.3611, shift 0.1159) in [B, 16, H, W];
  the transformer takes a list of [16, 1, H, W] (a frame axis) and patchifies 2x2 itself.
* Time: the scheduler's timestep t = 1000 sigma enters as (1000 - t) / 1000 = 1 - sigma (0 = noise, 1 = clean).
* Output: the transformer predicts x_0 - eps; the pipeline negates it before FlowMatchEulerDiscreteScheduler.step,
  so the velocity (eps - x_0, docs/design.md section 10) is minus the output.
* Grid: sigmas = linspace(1, 1/N, N) (`get_default_z_image_sigmas`, since diffusers PR #13730; before it, a 9-step
  call made 8 network calls and the model cards still say "num_inference_steps=9") and mu = calculate_shift(image
  tokens), which the shipped schedulers ignore (use_dynamic_shifting false): a static shift of 3.0 (Turbo) / 6.0
  (Z-Image).
* CFG: `guidance_scale` w > 0 turns it on with pred = pos + w (pos - neg) = neg + (1 + w)(pos - neg): the usual
  scale is 1 + w. cfg_truncation (default 1.0) and cfg_normalization (default False) leave it unchanged.
* LoRA: diffusers' examples/dreambooth/train_dreambooth_lora_z_image.py targets to_k / to_q / to_v / to_out.0 (every
  attention of the refiners and main layers) and saves with ZImagePipeline.save_lora_weights(transformer_lora_layers)
  (ZImageLoraLoaderMixin, whose load_lora_weights reads it back).
"""
from __future__ import annotations

import torch

from . import Family, pipeline_shift

PIPELINE = "ZImagePipeline"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default
STEPS = {"Tongyi-MAI/Z-Image-Turbo": 8, "Tongyi-MAI/Z-Image": 50}  # the model cards' step counts


def model_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's time input for noise level sigma, computed as the pipeline does from t = 1000 sigma."""
    t = sigma * 1000
    return (1000 - t) / 1000


def unpad(embeds: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """[B, L, D] padded prompt embeddings and their lengths -> the pipeline's list of [L_i, D] tensors."""
    return [e[:n] for e, n in zip(embeds, lengths.tolist())]


def pad(embeds: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's list of [L_i, D] prompt embeddings -> ([B, length, D] zero-padded, [B] lengths)."""
    if any(len(e) > length for e in embeds):
        raise ValueError(f"a prompt embedding has {max(len(e) for e in embeds)} tokens, more than {length}")
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        out[i, :len(e)] = e
    return out, torch.tensor([len(e) for e in embeds], dtype=torch.long)


def forward(net, x: torch.Tensor, t: torch.Tensor, cond: dict, schedule) -> torch.Tensor:
    """The velocity of ZImageTransformer2DModel at x_t ([B, 16, H, W]) and integer times t (common.FlowSchedule),
    called as ZImagePipeline calls it: a list of [16, 1, H, W] latents, 1 - sigma, the unpadded prompt embeddings;
    the output negated."""
    sigma = schedule.sigma(t).to(x.device).expand(x.shape[0])
    out = net(list(x.unsqueeze(2).unbind(0)), model_timestep(sigma), unpad(cond["prompt_embeds"], cond["prompt_len"]),
              return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


@torch.no_grad()
def encode_prompt(pipe, texts: list[str], device, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> dict:
    """{prompt_embeds [B, max_sequence_length, D], prompt_len [B]} from the pipeline's own encode_prompt."""
    embeds, _ = pipe.encode_prompt(list(texts), device=device, do_classifier_free_guidance=False,
                                   max_sequence_length=max_sequence_length)
    padded, lengths = pad(embeds, max_sequence_length)
    return {"prompt_embeds": padded, "prompt_len": lengths.to(padded.device)}


def pipeline_embeds(cond: dict) -> list[torch.Tensor]:
    """A condition's prompt embeddings as ZImagePipeline's `prompt_embeds` / `negative_prompt_embeds` (a list)."""
    return unpad(cond["prompt_embeds"], cond["prompt_len"])


def guidance_scale(cfg_scale: float) -> float:
    """ZImagePipeline's guidance_scale for the usual CFG scale (neg + s (pos - neg)): s - 1 (0: no CFG)."""
    return cfg_scale - 1.0


def pipeline_sigmas(steps: int) -> list[float]:
    """The unshifted sigmas ZImagePipeline gives its scheduler for `steps` steps (get_default_z_image_sigmas)."""
    return torch.linspace(1.0, 1 / steps, steps).tolist()


def pipeline_mu(scheduler_config, image_seq_len: int) -> float:
    """The mu ZImagePipeline passes to set_timesteps: FLUX.1's calculate_shift of the image token count
    ((H / 2) (W / 2) latent patches) with the scheduler config's bounds."""
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    c = scheduler_config
    return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def shift(scheduler_config, image_seq_len: int) -> float:
    """The static shift of the sigmas the pipeline samples on (3.0 / 6.0 for the shipped schedulers)."""
    return pipeline_shift(scheduler_config, pipeline_mu(scheduler_config, image_seq_len))


class ZImageFamily(Family):
    name, pipeline = "zimage", PIPELINE
    prompt_keys = ("prompt_embeds", "prompt_len")
    latent_patch = 2  # the transformer's 2x2 patches
    max_sequence_length = MAX_SEQUENCE_LENGTH
    pipeline_module = "diffusers.pipelines.z_image.pipeline_z_image"

    def lora_targets(self, net_config):
        return LORA_TARGETS

    def forward(self, net, x, t, cond, schedule):
        return forward(net, x, t, cond, schedule)

    def encode(self, pipe, texts, device, max_sequence_length, spec):
        return encode_prompt(pipe, texts, device, max_sequence_length or MAX_SEQUENCE_LENGTH)

    def pipeline_embeds(self, cond, null, world):
        """ZImagePipeline takes lists of unpadded embeddings."""
        kw = {"prompt_embeds": [e.to(world.dtype) for e in pipeline_embeds(cond)]}
        if null is not None:
            kw["negative_prompt_embeds"] = [e.to(world.dtype) for e in pipeline_embeds(null)]
        return kw

    def pipeline_guidance(self, guidance, world):
        """ZImagePipeline's CFG scale is the usual one minus 1 (0: off)."""
        return {"guidance_scale": guidance_scale(guidance) if guidance > 1 else 0.0}

    def pipeline_sigmas(self, steps):
        return pipeline_sigmas(steps)

    def example_condition(self, rows, text_tokens, net_config, device, dtype):
        return {"prompt_embeds": torch.empty(rows, text_tokens, net_config["cap_feat_dim"], device=device, dtype=dtype),
                "prompt_len": torch.full((rows,), text_tokens, dtype=torch.long)}  # the longest prompts: an upper bound


ZIMAGE = ZImageFamily()
