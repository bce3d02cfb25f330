"""FLUX.2-klein (Flux2KleinPipeline, Flux2Transformer2DModel, AutoencoderKLFlux2): the step- and guidance-distilled
klein 4B / 9B (4 steps, no CFG) and their undistilled bases klein-base 4B / 9B (~50 steps with CFG), as diffusers
0.42.1 runs them.

What the pipeline does (diffusers/pipelines/flux2/pipeline_flux2_klein.py):
* Prompts: a Qwen3 causal LM (`Qwen3ForCausalLM`: Qwen3-4B for klein 4B, Qwen3-8B for 9B) on the prompt in the
  tokenizer's chat template (`add_generation_prompt=True, enable_thinking=False`), padded to max_sequence_length
  (512, padding included in the attention), and the hidden states of layers (9, 18, 27) stacked per token:
  [B, 512, 3 x hidden] (7680 for 4B, 12288 for 9B). Text position ids (0, 0, 0, l) are made from the shape.
* Latents: the VAE's 32 channels are patchified 2x2 to 128 channels at half the side and normalised by the VAE's
  batch-norm running statistics, (z - mean) / sqrt(var + eps): the flow runs in that [B, 128, H/16, W/16] space,
  which is the state here. The transformer takes it packed to [B, h w, 128] tokens with position ids
  (0, row, column, 0); its output is scattered back by the same ids. Decoding undoes the normalisation and the
  patchify before `vae.decode` (no scaling / shift factor).
* Time: timestep = t / 1000 = sigma (the transformer multiplies by 1000 inside); guidance=None (klein has no
  guidance embedder; FLUX.2 [dev] has one).
* Grid: sigmas = linspace(1, 1/N, N) and mu = compute_empirical_mu(image tokens, N), a fit that depends on the step
  count N as well as the resolution, through the scheduler's dynamic shifting (exponential: a static shift exp(mu)
  per call). The 4-step student and the 50-step base sample on different shifts at the same resolution.
* CFG: only when `guidance_scale > 1` and the pipeline is not `is_distilled` (the klein model_index.json sets it):
  neg + s (pos - neg) with the encoded "" as the negative, the usual convention.
* LoRA: diffusers' examples/dreambooth/train_dreambooth_lora_flux2_klein.py targets to_k / to_q / to_v / to_out.0
  (the double-stream blocks), to_qkv_mlp_proj (the single-stream blocks' fused input projection) and each
  single-stream block's attn.to_out, and saves with Flux2KleinPipeline.save_lora_weights(transformer_lora_layers)
  (Flux2LoraLoaderMixin). The script writes range(24) for the single blocks; here it is the transformer's own
  num_single_layers (20 for klein 4B, 24 for 9B).
"""
from __future__ import annotations

import numpy as np
import torch

from . import Family, pipeline_shift

PIPELINE = "Flux2KleinPipeline"
MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's default
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)  # the pipeline's default text_encoder_out_layers
STEPS = {"black-forest-labs/FLUX.2-klein-4B": 4, "black-forest-labs/FLUX.2-klein-base-4B": 50,
         "black-forest-labs/FLUX.2-klein-9B": 4, "black-forest-labs/FLUX.2-klein-base-9B": 50}


def lora_targets(transformer_config) -> list[str]:
    """train_dreambooth_lora_flux2_klein.py's default targets for a transformer with this config."""
    single = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(transformer_config["num_single_layers"])]
    return ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", *single]


def _pipe_cls():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def forward(net, x: torch.Tensor, t: torch.Tensor, cond: dict, schedule) -> torch.Tensor:
    """The velocity of Flux2Transformer2DModel at x_t ([B, 128, h, w], the normalised patchified latents) and integer
    times t (common.FlowSchedule), called as Flux2KleinPipeline calls it (packed tokens, image / text position ids,
    timestep sigma, the embedded guidance only if the condition has one); the output unpacked to [B, 128, h, w]."""
    P = _pipe_cls()
    b, _, h, w = x.shape
    img_ids = P._prepare_latent_ids(x).to(x.device)
    packed = P._pack_latents(x)
    embeds = cond["prompt_embeds"]
    txt_ids = P._prepare_text_ids(embeds).to(x.device)
    timestep = (schedule.sigma(t).to(x.device).expand(b) * 1000).to(packed.dtype) / 1000  # the pipeline's t / 1000
    out = net(hidden_states=packed, timestep=timestep, guidance=cond.get("guidance"),
              encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return P._unpack_latents_with_ids(out[:, :packed.shape[1]], img_ids, h, w)


@torch.no_grad()
def encode_prompt(pipe, texts: list[str], device, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                  text_encoder_out_layers=TEXT_ENCODER_OUT_LAYERS) -> dict:
    """{prompt_embeds [B, max_sequence_length, 3 x hidden]} from the pipeline's own encode_prompt (its text ids
    depend on the shape only: the forward makes them)."""
    embeds, _ = pipe.encode_prompt(list(texts), device=device, max_sequence_length=max_sequence_length,
                                   text_encoder_out_layers=tuple(text_encoder_out_layers))
    return {"prompt_embeds": embeds}


def _bn(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def to_vae(x: torch.Tensor, vae) -> torch.Tensor:
    """The flow's state -> what vae.decode takes: batch-norm statistics undone, 2x2 patches unfolded (the pipeline's
    last steps before decoding; `output_type="latent"` returns this)."""
    mean, std = _bn(vae, x)
    return _pipe_cls()._unpatchify_latents(x * std + mean)


def from_vae(z: torch.Tensor, vae) -> torch.Tensor:
    """vae.encode's latents -> the flow's state (the pipeline's reference-image path and the training script's)."""
    x = _pipe_cls()._patchify_latents(z)
    mean, std = _bn(vae, x)
    return (x - mean) / std


def pipeline_sigmas(steps: int) -> list[float]:
    """The unshifted sigmas Flux2KleinPipeline gives its scheduler for `steps` steps."""
    return np.linspace(1.0, 1 / steps, steps).tolist()


def pipeline_mu(image_seq_len: int, steps: int) -> float:
    """compute_empirical_mu: the pipeline's mu for this many image tokens ((H / 16) (W / 16)) and steps."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)


def shift(scheduler_config, image_seq_len: int, steps: int) -> float:
    """The static shift of the sigmas the pipeline samples on at this resolution and step count."""
    return pipeline_shift(scheduler_config, pipeline_mu(image_seq_len, steps))


class Flux2Family(Family):
    name, pipeline = "flux2", PIPELINE
    vae_class = "AutoencoderKLFlux2"
    text_encoder_out_layers = TEXT_ENCODER_OUT_LAYERS
    table_steps = 50  # the training table's shift: mu at the pipeline's default num_inference_steps
    max_sequence_length = MAX_SEQUENCE_LENGTH
    pipeline_module = "diffusers.pipelines.flux2.pipeline_flux2_klein"

    def lora_targets(self, net_config):
        return lora_targets(net_config)

    def forward(self, net, x, t, cond, schedule):
        return forward(net, x, t, cond, schedule)

    def state_channels(self, vae_config):
        return 4 * vae_config["latent_channels"]  # 2x2-patchified

    def state_side(self, latent_side):
        if latent_side % 2:
            raise ValueError(f"the latent side {latent_side} is not a multiple of the flux2 patch size 2 (the "
                             "VAE latents are patchified 2x2)")
        return latent_side // 2

    def encode(self, pipe, texts, device, max_sequence_length, spec):
        """The spec's text_encoder_out_layers, else the pipeline's (9, 18, 27); a layer the encoder does not have is
        an error naming it (a shallow random-weight encoder needs the spec's)."""
        layers = spec.text_encoder_out_layers or TEXT_ENCODER_OUT_LAYERS
        depth = pipe.text_encoder.config.num_hidden_layers
        if max(layers) > depth:
            from ..models import ModelError

            raise ModelError(f"text_encoder_out_layers {list(layers)}: the text encoder has {depth} layers (hidden "
                             f"states 0..{depth}); set \"text_encoder_out_layers\" in the model spec")
        return encode_prompt(pipe, texts, device, max_sequence_length or MAX_SEQUENCE_LENGTH, layers)

    def to_vae(self, x, vae):
        return to_vae(x, vae)

    def from_vae(self, z, vae):
        return from_vae(z, vae)

    def pipeline_embeds(self, cond, null, world):
        kw = {"prompt_embeds": cond["prompt_embeds"].to(world.dtype)}
        if null is not None:
            kw["negative_prompt_embeds"] = null["prompt_embeds"].to(world.dtype)
        return kw

    def pipeline_guidance(self, guidance, world):
        """Flux2KleinPipeline's CFG is the usual scale (on above 1, and only for a pipeline that is not
        is_distilled)."""
        return {"guidance_scale": max(guidance, 1.0)}

    def pipeline_latents(self, latents, pipe, world):
        """The pipeline returns the VAE's latents (batch norm and patchify undone): back to the state."""
        return from_vae(latents, pipe.vae)

    def pipeline_sigmas(self, steps):
        return pipeline_sigmas(steps)

    def pipeline_mu(self, config, image_seq_len, steps):
        return pipeline_mu(image_seq_len, steps) if config.get("use_dynamic_shifting") else None

    def example_condition(self, rows, text_tokens, net_config, device, dtype):
        return {"prompt_embeds": torch.empty(rows, text_tokens, net_config["joint_attention_dim"], device=device,
                                             dtype=dtype)}


FLUX2 = Flux2Family()
