"""The Qwen3-encoded DiT families (full/families: Z-Image, FLUX.2-klein) against their own diffusers pipelines, on
tiny random pipelines built offline (full/tiny.py), and their real architectures (full/configs) on the meta device.

Each family function is checked against what the pipeline itself does: the prompt encoding equals the pipeline's
encode_prompt, every transformer call the pipeline makes (captured with a forward hook) is reproduced by the
family's forward from the same inputs, and a whole sample with common.sample and the flow kernel on the family's
grid ends where `pipe(...)` ends from the same noise at the model card's step count (Z-Image-Turbo 8, Z-Image 50 with
CFG, FLUX.2-klein 4, klein-base 50 with CFG)."""
import json

import pytest
import torch

import common
from full import architectures, tiny, tokenizers
from full.families import flux2, grid_from_sigmas, zimage

pytestmark = pytest.mark.usefixtures("one_thread")
SIDE = 16  # image side of the tiny pipelines (VAE factor 2: 8x8 latents)
MAX_LEN = 64  # a short prompt length keeps the tiny text encoders fast (the chat template takes ~40 tokens)
PROMPTS = ["a red cube", "a blue sphere on a table"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """The four tiny pipelines, saved with save_pretrained and loaded back with DiffusionPipeline.from_pretrained."""
    from diffusers import DiffusionPipeline

    root = tmp_path_factory.mktemp("families")
    out = {}
    for kind in tiny.QWEN_KINDS:
        tiny.save_tiny_pipeline(root / kind, kind)
        out[kind] = DiffusionPipeline.from_pretrained(root / kind)
    return out


def _denoiser(family, net, schedule):
    return lambda x, t, cond: family.forward(net, x, torch.as_tensor(t), cond, schedule)


def _hooked_calls(net):
    """Record every forward call of `net` (its positional and keyword inputs and its output)."""
    calls = []
    handle = net.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs, out)),
                                       with_kwargs=True)
    return calls, handle


# --- the offline Qwen tokenizer -------------------------------------------------------------------------------------
def test_qwen_tokenizer_renders_qwen3s_chat_template_and_round_trips(tmp_path):
    from transformers import Qwen2Tokenizer

    tok = tokenizers.qwen_tokenizer(MAX_LEN)
    msgs = [{"role": "user", "content": "a red cube"}]
    thinking = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    plain = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert thinking == "<|im_start|>user\na red cube<|im_end|>\n<|im_start|>assistant\n"
    assert plain == thinking + "<think>\n\n</think>\n\n"  # Qwen3's empty thinking block
    ids = tok(plain, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
    assert len(ids) == MAX_LEN and ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.pad_token_id
    assert max(ids) < tokenizers.QWEN_VOCAB_SIZE and tok.decode(ids, skip_special_tokens=True).startswith("user\na red")
    tok.save_pretrained(tmp_path)
    back = Qwen2Tokenizer.from_pretrained(tmp_path)
    assert back(plain).input_ids == tok(plain).input_ids
    assert back.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False) == plain
    assert architectures.tokenizer({"_class_name": "Qwen2TokenizerFast", "model_max_length": 7}).model_max_length == 7


# --- Z-Image --------------------------------------------------------------------------------------------------------
def test_zimage_prompt_encoding_is_the_pipelines(pipes):
    pipe = pipes["zimage_turbo"]
    cond = zimage.encode_prompt(pipe, PROMPTS, "cpu", MAX_LEN)
    ref, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False, max_sequence_length=MAX_LEN)
    assert cond["prompt_embeds"].shape == (2, MAX_LEN, tiny.QWEN_LAYERS["zimage"][0])
    assert cond["prompt_len"].tolist() == [len(r) for r in ref] and len(ref[0]) < len(ref[1]) < MAX_LEN
    assert all(torch.equal(a, b) for a, b in zip(zimage.pipeline_embeds(cond), ref))
    assert (cond["prompt_embeds"][0, len(ref[0]):] == 0).all()  # padding, cut off again by the forward


@pytest.mark.parametrize("kind, steps, cfg", [("zimage_turbo", 8, 1.0), ("zimage", 50, 5.0)])
def test_zimage_sampling_is_the_pipelines_at_the_model_cards_step_count(kind, steps, cfg, pipes):
    """Every transformer call ZImagePipeline makes is the family forward's on the same inputs (time 1 - sigma, the
    negated output, the unpadded prompts), and common.sample with the flow Euler kernel (flow_sde, eta 0) on the
    family's grid and shift ends where the pipeline ends from the same noise: Z-Image-Turbo at 8 steps without CFG,
    Z-Image at 50 steps with CFG (guidance_scale 4 = the usual scale 5) against the encoded empty prompt."""
    pipe = pipes[kind]
    latent = SIDE // pipe.vae_scale_factor
    seq = (latent // 2) ** 2
    schedule = common.FlowSchedule(zimage.shift(pipe.scheduler.config, seq))
    assert schedule.shift == (6.0 if kind == "zimage" else 3.0)
    grid = grid_from_sigmas(zimage.pipeline_sigmas(steps))
    assert len(grid) == steps and grid[:2] == [999, 999 - 1000 // steps]
    cond = zimage.encode_prompt(pipe, PROMPTS, "cpu", MAX_LEN)
    null = zimage.encode_prompt(pipe, ["", ""], "cpu", MAX_LEN)
    noise = torch.randn(2, 16, latent, latent, generator=torch.Generator().manual_seed(3))
    den = _denoiser(zimage, pipe.transformer, schedule)
    kernel = common.make_kernel("flow_sde", schedule, eta=0.0)
    ours = common.sample(den, kernel, noise, cond, grid, cfg_scale=cfg, null_cond=null)
    calls, handle = _hooked_calls(pipe.transformer)
    with torch.no_grad():
        out = pipe(prompt_embeds=zimage.pipeline_embeds(cond), negative_prompt_embeds=zimage.pipeline_embeds(null),
                   guidance_scale=zimage.guidance_scale(cfg), num_inference_steps=steps, latents=noise.clone(),
                   height=SIDE, width=SIDE, max_sequence_length=MAX_LEN, output_type="latent").images
    handle.remove()
    assert len(calls) == steps  # one batched call per step (CFG rows stacked in it)
    both = common.cond_cat([cond, null]) if cfg != 1 else cond
    for k in (0, steps // 2, steps - 1):  # the pipeline's own inputs through the family forward
        (x_list, t_in, caps), _, (pred,) = calls[k][0], calls[k][1], calls[k][2]
        assert all(torch.equal(a, b) for a, b in zip(caps, zimage.pipeline_embeds(both)))
        assert torch.allclose(t_in, zimage.model_timestep(schedule.sigma(torch.tensor(grid[k]))).expand(len(t_in)))
        with torch.no_grad():
            v = zimage.forward(pipe.transformer, torch.stack(x_list).squeeze(2), torch.tensor(grid[k]), both, schedule)
        assert torch.allclose(v, -torch.stack(pred).squeeze(2), atol=1e-6)
    assert out.shape == ours.shape
    assert torch.allclose(ours, out, atol=1e-4), float((ours - out).abs().max())
    assert (ours - noise).abs().max() > 0.1


def test_zimage_turbo_grid_is_the_pipelines_on_the_shipped_scheduler_at_1024():
    """On the real Z-Image-Turbo / Z-Image scheduler configs (full/configs) at 1024^2 (64 x 64 latent patches): the
    family's shift and integer grid give the sigmas set_timesteps gives the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for hub_id, steps in zimage.STEPS.items():
        sched = architectures.build(FlowMatchEulerDiscreteScheduler, hub_id, "scheduler")
        seq = 64 * 64
        sched.set_timesteps(sigmas=zimage.pipeline_sigmas(steps), mu=zimage.pipeline_mu(sched.config, seq))
        schedule = common.FlowSchedule(zimage.shift(sched.config, seq))
        grid = grid_from_sigmas(zimage.pipeline_sigmas(steps))
        assert torch.allclose(schedule.sigma(torch.tensor(grid)), sched.sigmas[:-1], atol=1e-6, rtol=0), hub_id
        assert schedule.shift == {"Tongyi-MAI/Z-Image-Turbo": 3.0, "Tongyi-MAI/Z-Image": 6.0}[hub_id]


# --- FLUX.2-klein ---------------------------------------------------------------------------------------------------
def test_flux2_prompt_encoding_is_the_pipelines(pipes):
    pipe = pipes["flux2_klein"]
    cond = flux2.encode_prompt(pipe, PROMPTS, "cpu", MAX_LEN)
    ref, text_ids = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=MAX_LEN)
    assert torch.equal(cond["prompt_embeds"], ref) and ref.shape == (2, MAX_LEN, 3 * tiny.QWEN_LAYERS["flux2"][0])
    assert torch.equal(text_ids, pipe._prepare_text_ids(cond["prompt_embeds"]))  # the forward's text ids


def test_flux2_latents_round_trip_through_the_vaes_batch_norm(pipes):
    vae = pipes["flux2_klein"].vae
    assert vae.bn.running_mean.abs().max() > 0.05 and (vae.bn.running_var - 1).abs().max() > 0.05
    z = torch.randn(2, 4, 8, 8)
    x = flux2.from_vae(z, vae)
    assert x.shape == (2, 16, 4, 4) and torch.allclose(flux2.to_vae(x, vae), z, atol=1e-5)


@pytest.mark.parametrize("kind, steps, cfg", [("flux2_klein", 4, 1.0), ("flux2_klein_base", 50, 4.0)])
def test_flux2_sampling_is_the_pipelines_at_the_model_cards_step_count(kind, steps, cfg, pipes):
    """Every transformer call Flux2KleinPipeline makes is the family forward's on the same inputs (packed tokens,
    position ids, timestep sigma), and common.sample with flow_sde at eta 0 on the family's grid and step-count
    dependent shift ends where the pipeline ends from the same noise (the pipeline returns the latents with the
    batch-norm and the patchify undone: to_vae): klein at 4 steps (is_distilled: no CFG), klein-base at 50 steps
    with guidance_scale 4 against the encoded empty prompt."""
    pipe = pipes[kind]
    side = SIDE // pipe.vae_scale_factor // 2  # the patchified side
    seq = side * side
    schedule = common.FlowSchedule(flux2.shift(pipe.scheduler.config, seq, steps))
    other = flux2.shift(pipe.scheduler.config, seq, 54 - steps)  # 4 <-> 50
    assert abs(schedule.shift - other) > 0.1  # the shift depends on the step count
    grid = grid_from_sigmas(flux2.pipeline_sigmas(steps))
    cond = flux2.encode_prompt(pipe, PROMPTS, "cpu", MAX_LEN)
    null = flux2.encode_prompt(pipe, ["", ""], "cpu", MAX_LEN)
    noise = torch.randn(2, 16, side, side, generator=torch.Generator().manual_seed(4))
    den = _denoiser(flux2, pipe.transformer, schedule)
    ours = common.sample(den, common.make_kernel("flow_sde", schedule, eta=0.0), noise, cond, grid, cfg_scale=cfg,
                         null_cond=null)
    calls, handle = _hooked_calls(pipe.transformer)
    with torch.no_grad():
        out = pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=null["prompt_embeds"],
                   guidance_scale=cfg, num_inference_steps=steps, latents=noise.clone(), height=SIDE, width=SIDE,
                   max_sequence_length=MAX_LEN, output_type="latent").images
    handle.remove()
    assert len(calls) == steps * (2 if cfg != 1 else 1)
    for k in (0, len(calls) - 1):  # the pipeline's own inputs through the family forward
        kw, (pred,) = calls[k][1], calls[k][2]
        step = k // (2 if cfg != 1 else 1)
        assert torch.allclose(kw["timestep"], schedule.sigma(torch.tensor(grid[step])).expand(2), atol=1e-7)
        x = pipe._unpack_latents_with_ids(kw["hidden_states"], kw["img_ids"], side, side)
        c = {"prompt_embeds": kw["encoder_hidden_states"]}
        with torch.no_grad():
            v = flux2.forward(pipe.transformer, x, torch.tensor(grid[step]), c, schedule)
        assert torch.allclose(v, pipe._unpack_latents_with_ids(pred, kw["img_ids"], side, side), atol=1e-6)
    ours = flux2.to_vae(ours, pipe.vae)
    assert out.shape == ours.shape == (2, 4, 2 * side, 2 * side)
    assert torch.allclose(ours, out, atol=1e-4), float((ours - out).abs().max())


def test_flux2_klein_grids_are_the_pipelines_on_the_shipped_scheduler_at_1024():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for hub_id, steps in flux2.STEPS.items():
        sched = architectures.build(FlowMatchEulerDiscreteScheduler, hub_id, "scheduler")
        seq = 64 * 64  # 1024^2: the VAE's factor 8, then 2x2 patches
        sched.set_timesteps(sigmas=flux2.pipeline_sigmas(steps), mu=flux2.pipeline_mu(seq, steps))
        schedule = common.FlowSchedule(flux2.shift(sched.config, seq, steps))
        grid = grid_from_sigmas(flux2.pipeline_sigmas(steps))
        assert torch.allclose(schedule.sigma(torch.tensor(grid)), sched.sigmas[:-1], atol=1e-6, rtol=0), hub_id


# --- LoRA targets ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["zimage_turbo", "flux2_klein"])
def test_lora_targets_are_diffusers_training_scripts(kind):
    """The family's targets put a LoRA on exactly the layers diffusers' train_dreambooth_lora_z_image /
    _flux2_klein defaults train: Z-Image every attention's q / k / v / out (refiners and main layers); klein the
    double-stream blocks' image q / k / v / out, and each single-stream block's fused input projection and output
    projection (the text stream's add_*_proj / to_add_out are not in that default)."""
    from peft import LoraConfig

    net = tiny.tiny_zimage_transformer() if kind == "zimage_turbo" else tiny.tiny_flux2_transformer()
    targets = zimage.LORA_TARGETS if kind == "zimage_turbo" else flux2.lora_targets(net.config)
    linear = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    net.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in net.named_modules() if n.endswith("lora_A")}
    if kind == "zimage_turbo":
        expected = {n for n in linear if ".attention." in n}
        assert {n.split(".")[0] for n in expected} == {"noise_refiner", "context_refiner", "layers"}
    else:
        expected = {n for n in linear if n.startswith("transformer_blocks.") and n.split(".")[-2:] in (
            ["attn", "to_q"], ["attn", "to_k"], ["attn", "to_v"], ["to_out", "0"])}
        expected |= {n for n in linear if n.startswith("single_transformer_blocks.") and ".attn." in n}
        assert len(expected) == 4 + 2
    assert lora == expected, sorted(lora ^ expected)


# --- the real architectures (meta device) ---------------------------------------------------------------------------
# Public parameter counts: Z-Image (6B class; 6.15 B in the Z-Image technical report arXiv:2511.22699 and its
# transformer's fp32 checkpoint, 24.6 GB), Qwen3-4B / Qwen3-8B model cards (4.0 B, 3.6 B non-embedding; 8.2 B,
# 6.95 B non-embedding), FLUX.2 [klein] 4B / 9B (black-forest-labs/flux2 README: a 4 B and a 9 B flow model).
COUNTS = {
    ("ZImageTransformer2DModel", "transformer_zimage.json"): (6_154_908_736, 6.15, 2),
    ("Qwen3Model", "text_qwen3_4b_model.json"): (4_022_468_096, 4.0, 1),  # Z-Image's text encoder
    ("Qwen3ForCausalLM", "text_qwen3_4b.json"): (4_022_468_096, 4.0, 1),  # klein 4B's (tied embeddings)
    ("Qwen3ForCausalLM", "text_qwen3_8b.json"): (8_190_735_360, 8.2, 1),  # klein 9B's
    ("Flux2Transformer2DModel", "transformer_flux2_klein_4b.json"): (3_875_544_576, 4, 0),
    ("Flux2Transformer2DModel", "transformer_flux2_klein_9b.json"): (9_078_581_248, 9, 0),
    ("AutoencoderKLFlux2", "vae_flux2.json"): (84_046_115, None, None),
}


def _cls(name):
    import diffusers
    import transformers

    return getattr(diffusers, name, None) or getattr(transformers, name)


@pytest.mark.parametrize("cls, file", sorted(COUNTS))
def test_family_configs_have_the_public_parameter_counts(cls, file):
    exact, billions, digits = COUNTS[(cls, file)]
    n = architectures.parameter_count(_cls(cls), file)
    assert n == exact
    if billions is not None:
        assert round(n / 1e9, digits) == billions
    if cls.startswith("Qwen3"):  # the model cards' non-embedding counts
        c = architectures.read_config(file)
        embed = c["vocab_size"] * c["hidden_size"] * (1 if c["tie_word_embeddings"] else 2)
        assert round((n - embed) / 1e9, 2) == {2560: 3.63, 4096: 6.95}[c["hidden_size"]]


def test_family_architectures_fit_together():
    """The transformers' text width is their encoder's (Z-Image: the hidden size; klein: 3 stacked layers, all within
    the encoder's depth); the VAEs give the latent channels the transformers take; the FLUX.2 VAE config is
    diffusers' AutoencoderKLFlux2 default (what convert_flux2_to_diffusers.py builds)."""
    from diffusers import AutoencoderKLFlux2

    z, q4 = architectures.read_config("transformer_zimage.json"), architectures.read_config("text_qwen3_4b.json")
    assert z["cap_feat_dim"] == q4["hidden_size"] and z["in_channels"] == architectures.read_config(
        "vae_flux.json")["latent_channels"]
    vae2 = architectures.read_config("vae_flux2.json")
    for size, enc in (("4b", "text_qwen3_4b.json"), ("9b", "text_qwen3_8b.json")):
        t, q = architectures.read_config(f"transformer_flux2_klein_{size}.json"), architectures.read_config(enc)
        assert t["joint_attention_dim"] == len(flux2.TEXT_ENCODER_OUT_LAYERS) * q["hidden_size"]
        assert max(flux2.TEXT_ENCODER_OUT_LAYERS) <= q["num_hidden_layers"]
        assert t["in_channels"] == vae2["latent_channels"] * 4
    with torch.device("meta"):
        default = AutoencoderKLFlux2().config
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in default.items() if not k.startswith("_")} == {
        k: v for k, v in vae2.items() if not k.startswith("_")}
    index = json.loads((architectures.CONFIGS / "index.json").read_text())
    assert architectures.model_index("black-forest-labs/FLUX.2-klein-4B")["is_distilled"] is True
    assert "is_distilled" not in architectures.model_index("black-forest-labs/FLUX.2-klein-base-4B")
    assert index["Tongyi-MAI/Z-Image"]["transformer"] == index["Tongyi-MAI/Z-Image-Turbo"]["transformer"]


# --- the families in the world: FullWorld / FullDenoiser and the methods on tiny setups ------------------------------
# zimage_turbo: Z-Image-Turbo-like base pipeline (student, 8 steps) with a Z-Image-like base pipeline as the teacher
# role; flux2_klein: klein-like (4 steps) with klein-base as the teacher (full.tiny.save_tiny_setup, BASE_OF)
WORLD_KINDS = ("zimage_turbo", "flux2_klein")
FAMILY = {"zimage_turbo": zimage, "flux2_klein": flux2}
TEACHER_CFG = {"zimage_turbo": 5.0, "flux2_klein": 4.0}  # the base models' cards: Z-Image w = 4 (scale 5), klein-base 4


@pytest.fixture(scope="module")
def fam_specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("familyworlds")
    return {k: tiny.save_tiny_setup(root / k, k, sample_size=8) for k in WORLD_KINDS}


@pytest.fixture(scope="module")
def fam_worlds(fam_specs):
    import full

    return {k: full.load_world(str(v)) for k, v in fam_specs.items()}


def _role_pipe(kind, spec, role):
    """The role's own pipeline as a user loads it: the student's is the base folder, the teacher's the base model's."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(spec.parent / ("pipeline" if role == "student" else "base_pipeline"))


def _sigmas_called(kind, pipe, kw, steps, side):
    """The sigmas the pipeline's own __call__ gives its transformer at `steps` steps (Z-Image's time input is
    1 - sigma, klein's sigma), captured with a forward pre-hook."""
    seen = []

    def hook(module, args, kwargs):
        t = args[1] if kind == "zimage_turbo" else kwargs["timestep"]
        seen.append(float(t.flatten()[0]))
    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**kw, num_inference_steps=steps, height=side, width=side, output_type="latent")
    finally:
        handle.remove()
    seen = torch.tensor(seen)
    return 1 - seen if kind == "zimage_turbo" else seen


@pytest.mark.parametrize("kind", WORLD_KINDS)
def test_world_roles_sample_on_their_own_pipelines_grids(kind, fam_worlds, fam_specs):
    """Each role's grid is the sigmas its own pipeline calls the transformer with at the role's step count: the
    distilled student at the card's 8 (Z-Image-Turbo, shift 3) / 4 (klein) steps, the base teacher at the methods'
    25 steps with its own scheduler (Z-Image: shift 6; klein-base: mu at 25 steps), carried exactly by integer
    times of the one world schedule."""
    w = fam_worlds[kind]
    for role, steps in (("student", tiny.CARD_STEPS[kind]), ("teacher", 25)):
        sampler, grid = w.role_sampler(role)
        assert len(grid) == steps and sampler == ("flow_x0_renoise" if role == "student" else "flow_sde")
        pipe = _role_pipe(kind, fam_specs[kind], role)
        called = _sigmas_called(kind, pipe, {**w.pipeline_guidance(1.0), **w.pipeline_embeds(["a red cube"])},
                                steps, w.resolution)
        assert torch.allclose(w.schedule.sigma(torch.tensor(grid)), called, atol=1e-6, rtol=0), role
    s_student = w.schedule.sigma(torch.tensor(w.role_sampler("student")[1][1]))
    s_teacher = w.schedule.sigma(torch.tensor(w.role_sampler("teacher")[1][1]))
    assert abs(float(s_student - s_teacher)) > 1e-3  # the two roles do not share a grid


@pytest.mark.parametrize("kind, role", [(k, r) for k in WORLD_KINDS for r in ("student", "teacher")])
def test_world_sampling_and_decoding_are_the_role_pipelines(kind, role, fam_worlds, fam_specs):
    """The world's denoiser with flow_sde at eta 0 (the scheduler's Euler step) on the role's grid, from the same
    noise and the world's cached prompt embeddings, ends where the role's own pipeline ends (the student without
    CFG, the base teacher with its card's CFG against the encoded empty prompt), and world.decode gives the
    pipeline's images: the forward, the grid, the CFG convention and the VAE path (klein's batch norm) all enter."""
    w = fam_worlds[kind]
    den = w.denoiser(role, lora_rank=2)
    _, grid = w.role_sampler(role)
    cfg = 1.0 if role == "student" else TEACHER_CFG[kind]
    prompts = ["a red cube", "a blue sphere"]
    noise = torch.randn(2, *w.shape, generator=torch.Generator().manual_seed(7))
    null = w.null_condition(2) if cfg != 1 else None
    ours = common.sample(den, common.make_kernel("flow_sde", w.schedule, eta=0.0), noise, w.encode(prompts), grid,
                         cfg_scale=cfg, null_cond=null)
    pipe = _role_pipe(kind, fam_specs[kind], role)
    kw = {**w.pipeline_guidance(cfg), **w.pipeline_embeds(prompts, cfg), "num_inference_steps": len(grid),
          "height": w.resolution, "width": w.resolution}
    with torch.no_grad():
        out = w.pipeline_latents(pipe(**kw, latents=noise.clone(), output_type="latent").images, pipe)
        images = pipe(**kw, latents=noise.clone(), output_type="pt").images
        decoded = (w.decode(ours) + 1) / 2
    assert out.shape == ours.shape and (ours - noise).abs().max() > 0.1
    assert torch.allclose(ours, out, atol=1e-4), float((ours - out).abs().max())
    assert torch.allclose(decoded, images, atol=1e-4), float((decoded - images).abs().max())


def test_world_conditions_and_null_conditions_are_the_pipelines(fam_worlds):
    z, k = fam_worlds["zimage_turbo"], fam_worlds["flux2_klein"]
    c = z.encode(["a red cube"])
    assert set(c) == {"prompt_embeds", "prompt_len", "prompt_id"} and c["prompt_embeds"].shape[1] == 64
    ref, _ = z._encoder_pipe.encode_prompt([""], device="cpu", do_classifier_free_guidance=False, max_sequence_length=64)
    null = z.null_condition(2)  # ZImagePipeline's negative: the encoded "" (chat template included), not zeros
    assert null["prompt_len"].tolist() == [len(ref[0])] * 2 and torch.equal(zimage.pipeline_embeds(null)[1], ref[0])
    f = k.encode(["a red cube", "a blue sphere"])
    assert set(f) == {"prompt_embeds", "prompt_id"} and f["prompt_embeds"].shape == (2, 64, 48)
    ref, _ = k._encoder_pipe.encode_prompt([""], device="cpu", max_sequence_length=64)
    assert torch.equal(k.null_condition(1)["prompt_embeds"], ref)


def test_world_encodes_images_as_the_klein_pipeline_does(fam_worlds):
    """Data images become the state as Flux2KleinPipeline encodes its reference images (_encode_vae_image: the
    posterior mode, patchified, batch-norm normalised)."""
    w = fam_worlds["flux2_klein"]
    images = torch.rand(2, 3, w.resolution, w.resolution) * 2 - 1
    with torch.no_grad():
        ref = w._encoder_pipe._encode_vae_image(images, generator=None)
    assert torch.allclose(w.encode_images(images), ref, atol=1e-6)


@pytest.mark.parametrize("kind", WORLD_KINDS)
def test_world_saved_lora_loads_with_load_lora_weights_and_reproduces_the_denoiser(kind, fam_worlds, fam_specs,
                                                                                  tmp_path):
    """world.save_adapter writes transformer_lora_layers that ZImagePipeline / Flux2KleinPipeline
    .load_lora_weights(dir) load onto every LoRA'd layer: the pipeline's transformer then predicts what the trained
    denoiser does, and differs from the base."""
    w = fam_worlds[kind]
    den = w.denoiser("student", lora_rank=2)
    with torch.no_grad():
        for p in den.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    w.save_adapter(den, tmp_path / "adapter")
    pipe = _role_pipe(kind, fam_specs[kind], "student")
    x, c = torch.randn(2, *w.shape), w.encode(["a red cube", "a blue sphere"])
    c = {k: v for k, v in c.items() if k != "prompt_id"}
    fam, t = FAMILY[kind], torch.full((2,), 749)
    with torch.no_grad():
        base = fam.forward(pipe.transformer, x, t, c, w.schedule)
        pipe.load_lora_weights(tmp_path / "adapter")
        tuned = fam.forward(pipe.transformer, x, t, c, w.schedule)
        ours = den(x, 749, c)
    n_lora = sum(1 for m in pipe.transformer.modules() if hasattr(m, "lora_A") and len(m.lora_A))
    assert n_lora == sum(1 for m in den.unet.modules() if hasattr(m, "lora_A") and len(m.lora_A)) > 0
    assert (tuned - base).abs().max() > 1e-3
    assert torch.allclose(tuned, ours, atol=1e-5), float((tuned - ours).abs().max())


@pytest.mark.parametrize("kind", WORLD_KINDS)
def test_evaluate_samples_the_family_pipelines_and_scores_a_lora(kind, fam_worlds, fam_specs, tmp_path):
    from full import evaluate

    w = fam_worlds[kind]
    den = w.denoiser("student", lora_rank=2)
    with torch.no_grad():
        for p in den.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    w.save_adapter(den, tmp_path / "run" / "adapter")
    results = evaluate.evaluate(str(fam_specs[kind]), [str(tmp_path / "run" / "adapter")], None, 2, 0, "student",
                                0.0, None, str(tmp_path / "eval"))
    assert set(results) == {"base", "run/adapter"} and results["base"] != results["run/adapter"]
    x = evaluate.sample_latents(w, w.pipeline("teacher"), ["a yellow star"], 0, w.role_sampler("teacher")[1][:3],
                                "flow_sde", TEACHER_CFG[kind])  # the base teacher with CFG through its pipeline
    assert x.shape == (1, *w.shape) and torch.isfinite(x).all()


# --- every method and variant: runs, NFEs, resume --------------------------------------------------------------------
SMALL = {"pso": ["--batch", "2", "--eval-samples", "2", "--eval-every", "100", "--reference-images", "2",
                 "--concept-images", "2", "--no-naive-baseline", "--lora-rank", "2", "--adapter-steps", "2"],
         "sharpening": ["--batch", "2", "--eval-samples", "2", "--final-samples", "2", "--eval-every", "100", "--n", "2",
                        "--m", "2", "--lora-rank", "2", "--eval-cfg", "2"],
         "diff_instruct_pp": ["--batch", "2", "--eval-samples", "2", "--lora-rank", "2", "--ta-lora-rank", "2",
                              "--cfg-scale", "4.5"]}
VARIANTS = [("pso", "pso"), ("pso", "offline"), ("pso", "online"), ("pso", "customize"), ("pso", "naive"),
            ("pso", "base-transfer"), ("pso", "dedistill-adapter"), ("pso", "dedistill"),  # the practitioners'
            ("sharpening", "sft"), ("sharpening", "rlhf"), ("diff_instruct_pp", "dipp")]
# the fast suite: one variant per family (online PSO on the distilled student; Sharpening RLHF on the base teacher)
FAST = {("pso", "online", "zimage_turbo"), ("sharpening", "rlhf", "flux2_klein")}
RUN_CASES = [pytest.param(m, v, k, marks=[] if (m, v, k) in FAST else [pytest.mark.slow], id=f"{m}-{v}-{k}")
             for m, v in VARIANTS for k in WORLD_KINDS]


def _run(method, variant, spec, out, steps, *extra):
    import importlib

    argv = ["--model", str(spec), "--variant", variant, *SMALL[method], "--steps", str(steps), "--save-every", "1",
            "--lr", "1e-2", "--out", str(out), *extra]
    return importlib.import_module(method).main(argv)


@pytest.mark.parametrize("method, variant, kind", RUN_CASES)
def test_every_method_and_variant_counts_its_nfes_and_resumes_bit_identically(method, variant, kind, fam_specs,
                                                                             tmp_path):
    import csv

    from safetensors.torch import load_file

    straight = _run(method, variant, fam_specs[kind], tmp_path / "a", 3)
    rows = list(csv.DictReader(open(tmp_path / "a" / "log.csv")))
    assert len(rows) == 3 and all(float(r["nfe"]) == straight["nfe_per_update"] for r in rows), rows
    assert straight["nfe_per_update"] > 0 and all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    a = load_file(str(tmp_path / "a" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    _run(method, variant, fam_specs[kind], tmp_path / "b", 2)  # interrupted after update 2 ...
    _run(method, variant, fam_specs[kind], tmp_path / "b", 3, "--resume")  # ... and resumed to 3
    b = load_file(str(tmp_path / "b" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in csv.DictReader(open(tmp_path / "b" / "log.csv"))] == [r["loss"] for r in rows]


def test_base_transfer_trains_the_base_and_its_lora_loads_into_the_distilled_pipeline(fam_specs, tmp_path):
    """The practitioners' base transfer on Z-Image-Turbo: the LoRA is trained on the teacher role (the Z-Image base,
    sampled on its own shift-6 grid) with the ordinary loss, evaluated on the student, and the delivered file loads
    into the Z-Image-Turbo pipeline with load_lora_weights, reproducing the student with that LoRA."""
    import full
    import pso
    from safetensors.torch import load_file

    spec, out = fam_specs["zimage_turbo"], tmp_path / "bt"
    metrics = pso.main(["--model", str(spec), "--variant", "base-transfer", "--lr", "0.05", *SMALL["pso"],
                        "--steps", "2", "--save-every", "1", "--out", str(out)])
    w = full.load_world(str(spec))
    teacher, student = w.denoiser("teacher", lora_rank=2), w.denoiser("student", lora_rank=2)
    assert metrics["trained_role"] == "teacher" and (metrics["sampler"], metrics["sample_grid"]) == (
        student.sampler, student.timesteps)  # trained on the base, evaluated on the distilled model
    lora = load_file(str(out / "checkpoint-2" / "model-teacher.safetensors"))
    x, c = torch.randn(1, *w.shape), w.encode(["a red cube"])
    c = {k: v for k, v in c.items() if k != "prompt_id"}
    with torch.no_grad():
        assert not torch.allclose(teacher(x, 749, c), student(x, 749, c), atol=1e-4)  # two networks
        student.load_adapter_state(lora)
        ours = student(x, 749, c)
        pipe = _role_pipe("zimage_turbo", spec, "student")
        before = zimage.forward(pipe.transformer, x, torch.tensor([749]), c, w.schedule)
        pipe.load_lora_weights(out / "adapter")
        after = zimage.forward(pipe.transformer, x, torch.tensor([749]), c, w.schedule)
    assert torch.allclose(after, ours, atol=1e-5) and not torch.allclose(before, after, atol=1e-4)


def test_text_encoder_out_layers_is_the_pipelines_option_and_errors_name_it(fam_specs, tmp_path):
    """The spec's text_encoder_out_layers reaches Flux2KleinPipeline.encode_prompt's (a shallow random-weight encoder
    needs it); a layer the encoder does not have, or the key on a family that reads no chosen layers, is an error."""
    import full
    from full.models import ModelError

    w = full.load_world(str(fam_specs["flux2_klein"]), text_encoder_out_layers=[1, 2, 3],
                        embedding_cache=str(tmp_path / "cache"))
    ref, _ = w._encoder_pipe.encode_prompt(["a red cube"], device="cpu", max_sequence_length=64,
                                           text_encoder_out_layers=(1, 2, 3))
    assert torch.equal(w.encode(["a red cube"])["prompt_embeds"], ref)
    assert not torch.equal(ref, w._encoder_pipe.encode_prompt(["a red cube"], device="cpu", max_sequence_length=64)[0])
    with pytest.raises(ModelError, match=r"text_encoder_out_layers \[9, 30\]: the text encoder has 27 layers"):
        full.load_world(str(fam_specs["flux2_klein"]), text_encoder_out_layers=[9, 30],
                        embedding_cache=str(tmp_path / "cache")).encode(["a red cube"])
    with pytest.raises(ModelError, match="reads no chosen hidden-state layers"):
        full.load_world(str(fam_specs["zimage_turbo"]), text_encoder_out_layers=[1])
    with pytest.raises(ValueError, match="text_encoder_out_layers must be a list"):
        full.load_world(str(fam_specs["flux2_klein"]), text_encoder_out_layers=9)
