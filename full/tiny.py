"""Tiny random SD1.5 / SDXL / SD3 / FLUX / Z-Image / FLUX.2-klein pipelines and a tiny random CLIP reward model,
built offline in a second.

They have the real architectures (diffusers' own test configurations: two UNet levels, one cross-attention
level, a 2-level VAE, 2-5 layer CLIP text encoders) and random weights, so everything the full backend does
(loading with `from_pretrained`, SDXL's two encoders and add_time_ids, peft LoRA, `save_lora_weights` /
`load_lora_weights`, the reward wrappers) runs for real on a CPU in the tests, with no network. The tokenizers are
full/tokenizers.py's offline stand-ins (one token per character or byte). The flow kinds follow diffusers' SD3 / FLUX
pipeline tests: a 2-block SD3Transformer2DModel (patch 2) or a 1 + 1-block FluxTransformer2DModel, a 16-channel VAE
with a shift_factor, two CLIP encoders (SD3, with projection) or one (FLUX), a 2-layer T5EncoderModel, and
FlowMatchEulerDiscreteScheduler: sd3 (shift 3), flux (FLUX.1-dev-like: guidance_embeds, use_dynamic_shifting),
flux_schnell (no guidance, shift 1). The Qwen3-encoded kinds (full/families) follow diffusers' Z-Image / FLUX.2-klein
tests: zimage_turbo (ZImagePipeline, shift 3) and zimage (its undistilled base, shift 6) with a 2 + 1 + 1-layer
ZImageTransformer2DModel, FLUX.1's VAE factors and a 2-layer Qwen3Model; flux2_klein (Flux2KleinPipeline,
is_distilled) and flux2_klein_base with a 1 + 1-block Flux2Transformer2DModel, an AutoencoderKLFlux2 with non-trivial
batch-norm statistics and a 27-layer Qwen3ForCausalLM (the pipeline reads its layers 9, 18, 27); both Qwen kinds
use the byte-level Qwen tokenizer with Qwen3's chat template. Their transformers have no sample size: the image side
is the caller's (the spec's resolution, or height / width of a pipeline call).

    python -m full.tiny OUT [--kind sdxl|sd15|sd3|flux|flux_schnell|zimage|zimage_turbo|flux2_klein|flux2_klein_base]
                            [--scheduler euler_ancestral|lcm|ddim|euler] [--setup]

writes a pipeline folder that `--model OUT` loads; with --setup, OUT/spec.json plus everything it names (a tiny
reward model, prompts, image-caption data, a concept folder, preference pairs): `--model OUT/spec.json`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .tokenizers import QWEN_VOCAB_SIZE, clip_tokenizer, qwen_tokenizer, t5_tokenizer

tiny_tokenizer, tiny_t5_tokenizer = clip_tokenizer, t5_tokenizer  # their names before full/tokenizers.py

# What each kind's tiny pipeline folder is built with; the shapes follow diffusers' pipeline tests.
TEXT = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513, vocab_size=514, hidden_size=32, intermediate_size=37,
            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
            hidden_act="gelu")
SCHEDULERS = {  # sampler name -> (diffusers scheduler class, extra config) of a few-step checkpoint
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing")),  # SDXL-Turbo
    "lcm": ("LCMScheduler", dict(timestep_spacing="trailing")),  # DMD2 / LCM
    "ddim": ("DDIMScheduler", dict(timestep_spacing="trailing", set_alpha_to_one=False)),
    "euler": ("EulerDiscreteScheduler", dict()),  # SDXL base ships this one
}


def tiny_unet(sdxl: bool, sample_size: int = 16):
    from diffusers import UNet2DConditionModel

    common = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4,
                  out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
    if sdxl:  # text_time conditioning: 6 time ids x 8 + the 32-dim pooled embedding of text_encoder_2
        return UNet2DConditionModel(**common, attention_head_dim=(2, 4), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                    cross_attention_dim=64)
    return UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=8)


T5 = dict(vocab_size=192, d_model=64, d_ff=37, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# flow kinds: sd3 (static shift 3, SD3 / SD3.5), flux (FLUX.1-dev-like: guidance-distilled, resolution-dependent
# shift), flux_schnell (FLUX.1-schnell-like: no guidance input, shift 1)
FLOW_KINDS = ("sd3", "flux", "flux_schnell")


def tiny_t5(seed: int | None = None):
    from transformers import T5Config, T5EncoderModel

    if seed is not None:
        torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**T5))


def tiny_sd3_transformer(sample_size: int = 16):
    """Two joint blocks (the last one context_pre_only, as in every SD3), patch 2, 16 latent channels; the joint
    attention width is T5's d_model (the CLIP hidden states, 2 x 32, are padded to it), the pooled projection the
    two CLIP projections concatenated."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                 joint_attention_dim=T5["d_model"], pooled_projection_dim=2 * 32)


def tiny_flux_transformer(guidance_embeds: bool = True):
    """One double and one single block, 2x2-packed 16-channel latents (64 input channels), rotary axes 4 + 4 + 8."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5["d_model"],
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)


def tiny_flow_vae(scaling_factor: float = 1.5035, shift_factor: float = 0.0609):
    """The SD3 / FLUX / Z-Image VAE layout: 16 latent channels, a shift_factor, no quant convs (default: SD3's
    values; FLUX.1 and Z-Image: 0.3611, 0.1159)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=32, sample_size=32, shift_factor=shift_factor, scaling_factor=scaling_factor,
                         use_quant_conv=False, use_post_quant_conv=False)


def flow_scheduler(kind: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if kind == "flux":  # FLUX.1-dev's scheduler config
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=3.0 if kind == "sd3" else 1.0)


def tiny_flow_pipeline(kind: str = "sd3", seed: int = 0, sample_size: int = 16):
    """A random StableDiffusion3Pipeline (kind sd3) or FluxPipeline (flux, flux_schnell)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind not in FLOW_KINDS:
        raise ValueError(f"unknown tiny flow pipeline kind {kind!r}; choose one of {list(FLOW_KINDS)}")
    torch.manual_seed(seed)
    vae = tiny_flow_vae()
    if kind == "sd3":
        return StableDiffusion3Pipeline(
            transformer=tiny_sd3_transformer(sample_size), vae=vae, scheduler=flow_scheduler(kind),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, projection_dim=32)),
            tokenizer=clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, projection_dim=32)),
            tokenizer_2=clip_tokenizer(), text_encoder_3=tiny_t5(), tokenizer_3=t5_tokenizer())
    return FluxPipeline(transformer=tiny_flux_transformer(guidance_embeds=kind == "flux"), vae=vae,
                        scheduler=flow_scheduler(kind), text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
                        tokenizer=clip_tokenizer(), text_encoder_2=tiny_t5(), tokenizer_2=t5_tokenizer(512))


# Qwen3-encoded DiT families (full/families): zimage (Z-Image-like, the undistilled base: static shift 6),
# zimage_turbo (Z-Image-Turbo-like: shift 3), flux2_klein (FLUX.2-klein-like: step-distilled, is_distilled),
# flux2_klein_base (its base). Z-Image's prompt features are the penultimate hidden state of a Qwen3Model; FLUX.2's the
# hidden states of layers (9, 18, 27) of a Qwen3ForCausalLM (the pipeline's default), so its tiny encoder has 27 layers.
QWEN_KINDS = ("zimage", "zimage_turbo", "flux2_klein", "flux2_klein_base")
QWEN = dict(intermediate_size=37, num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=QWEN_VOCAB_SIZE,
            max_position_embeddings=512, pad_token_id=256, bos_token_id=256, eos_token_id=258)
QWEN_LAYERS = {"zimage": (32, 2), "flux2": (16, 27)}  # (hidden size, layers) of each family's tiny Qwen3
BASE_OF = {"zimage_turbo": "zimage", "flux2_klein": "flux2_klein_base"}  # save_tiny_setup's teacher role
CARD_STEPS = {"zimage_turbo": 8, "flux2_klein": 4}  # the student's steps the real model cards give (no card here)


def tiny_qwen3(family: str):
    """A random Qwen3Model (Z-Image) or Qwen3ForCausalLM (FLUX.2-klein) over full/tokenizers.py's byte vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    hidden, layers = QWEN_LAYERS[family]
    config = Qwen3Config(**QWEN, hidden_size=hidden, num_hidden_layers=layers)
    return Qwen3Model(config) if family == "zimage" else Qwen3ForCausalLM(config)


def tiny_zimage_transformer():
    """Two main layers and one noise / context refiner, patch 2, 16 latent channels, caption width the tiny
    Qwen3's hidden size, rotary axes 8 + 4 + 4 (diffusers' Z-Image test configuration)."""
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True,
                                    cap_feat_dim=QWEN_LAYERS["zimage"][0], axes_dims=[8, 4, 4],
                                    axes_lens=[256, 32, 32])


def tiny_flux2_transformer():
    """One double- and one single-stream block; 4-channel VAE latents patchified 2x2 (16 input channels); the text
    width 3 x the tiny Qwen3's hidden size (three hidden-state layers stacked); no guidance embedder (klein)."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=3 * QWEN_LAYERS["flux2"][0], axes_dims_rope=[4, 4, 4, 4],
                                   guidance_embeds=False)


def tiny_flux2_vae():
    """AutoencoderKLFlux2 with 2 levels and 4 latent channels; its batch-norm statistics (which normalise the
    patchified latents) get non-trivial values, so a decode that skips them is seen."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(32, 64), latent_channels=4, layers_per_block=1, norm_num_groups=32,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             sample_size=32)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae


def qwen_scheduler(kind: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if kind.startswith("flux2"):  # the klein checkpoints' config: dynamic shifting (exponential), mu from the pipeline
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096,
                                               time_shift_type="exponential")
    return FlowMatchEulerDiscreteScheduler(shift=6.0 if kind == "zimage" else 3.0)  # Z-Image / Z-Image-Turbo


def tiny_qwen_pipeline(kind: str = "zimage_turbo", seed: int = 0, transformer_seed: int | None = None):
    """A random ZImagePipeline (zimage, zimage_turbo) or Flux2KleinPipeline (flux2_klein, flux2_klein_base).
    `transformer_seed`: another transformer with the same VAE and text encoder (as a base and its distilled model
    share them)."""
    from diffusers import Flux2KleinPipeline, ZImagePipeline

    if kind not in QWEN_KINDS:
        raise ValueError(f"unknown tiny Qwen3-family pipeline kind {kind!r}; choose one of {list(QWEN_KINDS)}")
    torch.manual_seed(seed)
    zimage = kind.startswith("zimage")
    parts = dict(vae=tiny_flow_vae(0.3611, 0.1159) if zimage else tiny_flux2_vae(),
                 text_encoder=tiny_qwen3("zimage" if zimage else "flux2"), tokenizer=qwen_tokenizer(),
                 scheduler=qwen_scheduler(kind))
    if transformer_seed is not None:
        torch.manual_seed(transformer_seed)
    transformer = tiny_zimage_transformer() if zimage else tiny_flux2_transformer()
    if zimage:
        return ZImagePipeline(transformer=transformer, **parts)
    return Flux2KleinPipeline(transformer=transformer, **parts, is_distilled=kind == "flux2_klein")


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=32, sample_size=32)


def make_scheduler(sampler: str):
    import diffusers

    if sampler not in SCHEDULERS:
        raise ValueError(f"unknown tiny scheduler {sampler!r}; choose one of {sorted(SCHEDULERS)}")
    name, extra = SCHEDULERS[sampler]
    return getattr(diffusers, name)(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, prediction_type="epsilon", **extra)


def tiny_pipeline(kind: str = "sdxl", scheduler: str = "euler_ancestral", seed: int = 0, sample_size: int = 16):
    """A random pipeline of the real class (StableDiffusionXLPipeline, StableDiffusionPipeline; for the flow kinds
    StableDiffusion3Pipeline / FluxPipeline with their own FlowMatchEulerDiscreteScheduler, `scheduler` unused)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind in FLOW_KINDS:
        return tiny_flow_pipeline(kind, seed, sample_size)
    if kind in QWEN_KINDS:  # their transformers have no sample size: the image side is the caller's
        return tiny_qwen_pipeline(kind, seed)
    if kind not in ("sdxl", "sd15"):
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose one of "
                         f"{['sdxl', 'sd15', *FLOW_KINDS, *QWEN_KINDS]}")
    torch.manual_seed(seed)
    unet, vae = tiny_unet(kind == "sdxl", sample_size), tiny_vae()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                 scheduler=make_scheduler(scheduler))
    if kind == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, projection_dim=32))
        parts["tokenizer_2"] = clip_tokenizer()
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_pipeline(path: str | Path, kind: str = "sdxl", scheduler: str = "euler_ancestral", seed: int = 0,
                       sample_size: int = 16) -> Path:
    path = Path(path)
    tiny_pipeline(kind, scheduler, seed, sample_size).save_pretrained(path)
    return path


def save_tiny_unet(path: str | Path, kind: str = "sdxl", seed: int = 1, sample_size: int = 16) -> Path:
    """A second random UNet (or SD3 / FLUX transformer) of the same architecture (a stand-in for e.g. the DMD2 UNet
    weights, or a distilled turbo / schnell transformer)."""
    torch.manual_seed(seed)
    if kind == "sd3":
        net = tiny_sd3_transformer(sample_size)
    elif kind in ("flux", "flux_schnell"):
        net = tiny_flux_transformer(guidance_embeds=kind == "flux")
    elif kind in QWEN_KINDS:
        net = tiny_zimage_transformer() if kind.startswith("zimage") else tiny_flux2_transformer()
    else:
        net = tiny_unet(kind == "sdxl", sample_size)
    net.save_pretrained(Path(path))
    return Path(path)


def save_tiny_clip(path: str | Path, projection_dim: int = 16, seed: int = 0) -> Path:
    """A random CLIPModel + tokenizer + image-processor config: the stand-in for PickScore / CLIP / the
    aesthetic predictor's backbone in the reward tests."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = {k: v for k, v in TEXT.items()}
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8, layer_norm_eps=1e-5, hidden_act="gelu")
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    path = Path(path)
    model.save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    return path


def save_tiny_aesthetic_head(path: str | Path, embed_dim: int = 16, seed: int = 0) -> Path:
    """Random weights in the layout of the LAION improved-aesthetic-predictor MLP (see rewards.AestheticHead)."""
    from .rewards import AestheticHead

    torch.manual_seed(seed)
    torch.save(AestheticHead(embed_dim).state_dict(), path)
    return Path(path)


def _png(path: Path, seed: int, size: int = 32) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.cos(5 * yy + rng.uniform(0, 6)), xx * yy], -1)
    Image.fromarray(((img * 0.5 + 0.5) * 255).clip(0, 255).astype("uint8")).save(path)


def save_tiny_setup(out: str | Path, kind: str = "sdxl", scheduler: str = "lcm", sample_size: int = 8,
                    roles: dict | None = None, **spec_overrides) -> Path:
    """Everything a full-backend run needs, tiny and offline, under `out`: a random pipeline, a random CLIP
    reward model with an aesthetic head, prompt files, an image-caption "target" set, a "concept" folder and
    Pick-a-Pic-style preference pairs (one tied row, which must be dropped). Returns the model-spec path. A distilled
    Qwen3-family kind (zimage_turbo, flux2_klein) also gets its base pipeline (BASE_OF) as the teacher role, as the
    shipped specs have Z-Image for Z-Image-Turbo and klein-base for klein."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tiny_pipeline(out / "pipeline", kind, scheduler, sample_size=sample_size)
    save_tiny_clip(out / "clip")
    save_tiny_aesthetic_head(out / "aesthetic_head.pth")
    (out / "prompts.txt").write_text("a red cube\na blue sphere\na green cone\na small house\n")
    (out / "eval_prompts.txt").write_text("a yellow star\na purple ring\n")
    for name, prompts in (("base", ["a red cube", "a blue sphere", "a green cone"]),
                          ("target", ["a red cube in pokemon style", "a blue sphere in pokemon style",
                                      "a green cone in pokemon style"]), ("concept", [None] * 3)):
        (out / name).mkdir(exist_ok=True)
        for i, text in enumerate(prompts):
            _png(out / name / f"{i}.png", seed={"base": 0, "target": 10, "concept": 20}[name] + i)
            if text:
                (out / name / f"{i}.txt").write_text(text)
    (out / "pairs").mkdir(exist_ok=True)
    rows = []
    for i, (caption, label) in enumerate([("a red cube", 1), ("a blue sphere", 0), ("a green cone", 0.5),
                                          ("a small house", 1)]):
        _png(out / "pairs" / f"{i}_0.png", seed=100 + i)
        _png(out / "pairs" / f"{i}_1.png", seed=200 + i)
        rows.append({"caption": caption, "jpg_0": f"{i}_0.png", "jpg_1": f"{i}_1.png", "label_0": label})
    (out / "pairs" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flow = {"max_sequence_length": 8} if kind in FLOW_KINDS else {}  # a short T5 prompt keeps the tests fast
    if kind in ("flux", "flux_schnell"):  # FluxPipeline's default side is 128 latents: the tiny one is sample_size
        flow["resolution"] = 2 * sample_size
    if kind in QWEN_KINDS:  # the chat template takes ~40 of the 64 tokens; the transformers have no sample size
        flow = {"max_sequence_length": 64, "resolution": 2 * sample_size}
        if kind in BASE_OF:  # the distilled model's undistilled base (another transformer, the same VAE and text
            # encoder) is the teacher role
            tiny_qwen_pipeline(BASE_OF[kind], transformer_seed=1).save_pretrained(out / "base_pipeline")
            roles = {"teacher": {"transformer": "base_pipeline"}, "student": {"steps": CARD_STEPS[kind]},
                     **(roles or {})}
    spec = {
        "name": f"tiny-{kind}" + ("" if flow else f"-{scheduler}"), "base": "pipeline", "roles": roles or {}, **flow,
        "reward": {"name": "pickscore", "model": "clip"},
        "quality": {"name": "aesthetic", "model": "clip", "head": "aesthetic_head.pth"},
        "eval_rewards": [{"name": "clip", "model": "clip"}],
        "prompts": "prompts.txt", "eval_prompts": "eval_prompts.txt",
        "data": {"base": {"folder": "base"}, "target": {"folder": "target"},
                 "concept": {"folder": "concept", "prompt": "a photo of sks cube", "class_prompt": "a photo of a cube"}},
        "pairs": {"folder": "pairs"}, **spec_overrides,
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=2))
    return out / "spec.json"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--kind", default="sdxl", choices=["sdxl", "sd15", *FLOW_KINDS, *QWEN_KINDS])
    p.add_argument("--scheduler", default="euler_ancestral", choices=sorted(SCHEDULERS),
                   help="SD1.5 / SDXL only: the flow kinds ship their FlowMatchEulerDiscreteScheduler")
    p.add_argument("--sample-size", type=int, default=16, help="latent side; the image side is twice that")
    p.add_argument("--setup", action="store_true", help="also write a tiny reward model, prompts, data and spec.json")
    a = p.parse_args(argv)
    if a.setup:
        print(save_tiny_setup(a.out, a.kind, a.scheduler, a.sample_size))
    else:
        print(save_tiny_pipeline(a.out, a.kind, a.scheduler, sample_size=a.sample_size))


if __name__ == "__main__":
    main()
