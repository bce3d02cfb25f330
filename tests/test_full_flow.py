"""full/ on flow-matching pipelines (SD3 / SD3.5 and FLUX), with tiny random pipelines built offline: the world's
schedule is the scheduler's, its sampling and its student step are the diffusers pipeline's / scheduler's own on
the tiny transformers, every method and variant runs, counts its stated NFEs and resumes bit-identically, and the
saved LoRA loads with the pipeline's load_lora_weights."""
import csv
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

import common
import full
from full import models, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = [999, 749, 499, 249]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyflow")
    return {k: tiny.save_tiny_setup(root / k, k, sample_size=8) for k in ("sd3", "flux", "flux_schnell")}


@pytest.fixture(scope="module")
def worlds(specs):
    return {k: full.load_world(str(v)) for k, v in specs.items()}


def _pipe(kind, spec):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    return cls.from_pretrained(spec.parent / "pipeline")


# --- the schedule, the conditioning and the sampler are the pipelines' ---------------------------------------------
def pipeline_sigmas_called(pipe, w, steps):
    """The sigmas the pipeline's own __call__ feeds its transformer at `steps` steps (its timestep argument: SD3
    sigma * 1000, FLUX sigma), captured with a forward pre-hook on the tiny pipeline saved with the world."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kw: seen.append(float(kw["timestep"].flatten()[0])), with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**w.pipeline_embeds(["a red cube"]), num_inference_steps=steps, height=w.resolution,
                 width=w.resolution, output_type="latent", **({"guidance_scale": 1.0} if w.kind == "sd3" else {}))
    finally:
        hook.remove()
    scale = 1000.0 if w.kind == "sd3" else 1.0
    return torch.tensor(seen) / scale


def test_flow_worlds_take_the_schedule_and_every_roles_grid_from_their_pipeline(worlds, specs):
    """The schedule is the scheduler's (FLUX.1-dev-like: its own training sigmas at diffusers' calculate_shift mu);
    every role samples on the sigmas its pipeline calls the transformer with at the role's step count (student 4,
    teacher 25, generator 1 here: tiny pipelines have no model card), carried exactly by integer times."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert worlds["sd3"].schedule.shift == 3.0 and worlds["flux_schnell"].schedule.shift == 1.0
    w = worlds["flux"]  # use_dynamic_shifting: mu from the packed sequence length
    sched = type(w.parts.scheduler).from_config(w.parts.scheduler.config)
    seq = (w.shape[1] // 2) * (w.shape[2] // 2)
    mu = calculate_shift(seq, sched.config.base_image_seq_len, sched.config.max_image_seq_len,
                         sched.config.base_shift, sched.config.max_shift)
    sched.set_timesteps(sigmas=[(t + 1) / 1000 for t in range(999, -1, -1)], mu=mu)
    unplaced = [t for t in range(1000) if t not in {u for r in ("teacher", "student", "generator")
                                                    for u in w.role_sampler(r)[1]}]
    assert torch.equal(w.schedule.sigma(torch.tensor(unplaced)), sched.sigmas.flip(0)[1:][unplaced])
    assert abs(w.schedule.shift - 1.0) > 0.1  # the test would not see a missing shift at shift 1
    for k in ("sd3", "flux", "flux_schnell"):
        w = worlds[k]
        assert isinstance(w.schedule, common.FlowSchedule)
        pipe = _pipe(k, specs[k])
        for role, sampler, steps in (("teacher", "flow_sde", 25), ("student", "flow_x0_renoise", 4),
                                     ("generator", "flow_x0_renoise", 1)):
            name, grid = w.role_sampler(role)
            called = pipeline_sigmas_called(pipe, w, steps)
            assert name == sampler and len(grid) == steps
            assert torch.allclose(w.schedule.sigma(torch.tensor(grid)), called, atol=1e-6, rtol=0), (k, role)
    # SD3 at shift 3, 4 steps: the pipeline's grid, not [999, 749, 499, 249] (sigmas [1.0, 0.9, 0.75, 0.5])
    assert worlds["sd3"].role_sampler("student")[1] == [999, 667, 334, 2]
    assert worlds["flux_schnell"].role_sampler("student")[1] == GRID  # shift 1: linspace(1, 1/4, 4)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_world_sampling_is_the_diffusers_pipeline(kind, worlds, specs):
    """The world's denoiser with the flow SDE at eta = 0 (the scheduler's Euler step) on the student's grid, from the
    same noise and the world's cached prompt embeddings, ends where the pipeline's own loop does when it is called
    with just num_inference_steps: its own grid, timestep scaling, shift, FLUX's packing / ids and guidance."""
    w = worlds[kind]
    den = w.denoiser("teacher", lora_rank=2)
    _, grid = w.role_sampler("student")
    prompts = ["a red cube", "a blue sphere"]
    noise = torch.randn(2, *w.shape, generator=torch.Generator().manual_seed(3))
    ours = common.sample(den, common.make_kernel("flow_sde", w.schedule, eta=0.0), noise, w.encode(prompts), grid)
    pipe = _pipe(kind, specs[kind])
    kw = w.pipeline_embeds(prompts)
    if kind == "flux":
        from diffusers import FluxPipeline

        latents = FluxPipeline._pack_latents(noise, 2, *w.shape)
        assert kw["guidance_scale"] == 3.5  # FLUX.1-dev's embedded guidance
    else:
        latents, kw["guidance_scale"] = noise, 1.0  # no CFG
    with torch.no_grad():
        out = pipe(**kw, num_inference_steps=len(grid), latents=latents, height=w.resolution, width=w.resolution,
                   output_type="latent").images
    if kind == "flux":
        out = FluxPipeline._unpack_latents(out, w.resolution, w.resolution, pipe.vae_scale_factor)
    assert out.shape == ours.shape
    assert torch.allclose(ours, out, atol=1e-4), float((ours - out).abs().max())
    assert (ours - noise).abs().max() > 0.1


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_student_step_is_the_flow_match_euler_scheduler_step(kind, worlds, specs):
    """On the tiny transformer's own prediction along the student's grid: flow_sde at eta = 0 is
    FlowMatchEulerDiscreteScheduler.step, and flow_x0_renoise with noise z is its stochastic_sampling step drawing the
    same z (the scheduler set to the grid's sigmas as the pipeline's own set_timesteps makes them)."""
    w = worlds[kind]
    den = w.denoiser("student", lora_rank=2)
    assert den.sampler == "flow_x0_renoise"
    grid = den.timesteps
    cond = w.encode(["a green cone", "a small house"])
    x = torch.randn(2, *w.shape, generator=torch.Generator().manual_seed(5))
    pipe = _pipe(kind, specs[kind])
    pipeline_sigmas_called(pipe, w, len(grid))  # leaves the pipeline's scheduler set as its own call sets it
    for stochastic, name in ((False, "flow_sde"), (True, "flow_x0_renoise")):
        ref = type(pipe.scheduler).from_config(pipe.scheduler.config, stochastic_sampling=stochastic)
        ref.sigmas, ref.timesteps = pipe.scheduler.sigmas.clone(), pipe.scheduler.timesteps.clone()
        assert torch.equal(ref.sigmas[:-1], w.schedule.sigma(torch.tensor(grid)))
        kernel = common.make_kernel(name, w.schedule, eta=0.0)
        state = x
        for k, (t, t_next) in enumerate(zip(grid, grid[1:] + [-1])):
            with torch.no_grad():
                v = den(state, t, cond)
            g = torch.Generator().manual_seed(10 + k)
            expected = ref.step(v, ref.timesteps[k], state, generator=g).prev_sample
            mean, std = kernel.step(state, v, t, t_next)
            z = torch.randn(state.shape, generator=torch.Generator().manual_seed(10 + k))
            ours = mean + std * z
            assert torch.allclose(ours, expected, atol=1e-5), (name, k, float((ours - expected).abs().max()))
            state = expected


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_vae_decode_and_encode_are_the_pipelines(kind, worlds, specs, monkeypatch):
    """world.decode is the end of the pipeline's own __call__ ((z / scaling_factor) + shift_factor, vae.decode; FLUX
    unpacks first) on a VAE with a non-zero shift factor: the pipeline is run on given latents with a transformer that
    predicts v = 0, so its Euler steps leave them as they are and it decodes exactly them. encode_images is the
    img2img pipelines' encode ((posterior - shift_factor) x scaling_factor; FluxImg2ImgPipeline._encode_vae_image,
    which StableDiffusion3Img2ImgPipeline.prepare_latents repeats) with the posterior mean for its sample."""
    from diffusers import FluxImg2ImgPipeline, FluxPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    w = worlds[kind]
    cfg = w.vae.config
    assert cfg.shift_factor and cfg.scaling_factor != 1  # the tiny flow VAE: 0.0609, 1.5035 (SD3's real values)
    pipe = _pipe(kind, specs[kind])
    pipe.transformer.forward = lambda hidden_states, **kw: (torch.zeros_like(hidden_states),)
    x0 = torch.randn(2, *w.shape, generator=torch.Generator().manual_seed(4))
    latents = FluxPipeline._pack_latents(x0, 2, *w.shape) if kind == "flux" else x0
    kw = w.pipeline_embeds(["a red cube", "a blue sphere"])
    with torch.no_grad():
        images = pipe(**kw, latents=latents, num_inference_steps=2, height=w.resolution, width=w.resolution,
                      output_type="pt", **({"guidance_scale": 1.0} if kind == "sd3" else {})).images
        ours = w.decode(x0)
    assert images.shape == ours.shape
    assert torch.allclose((ours + 1) / 2, images, atol=1e-5), float(((ours + 1) / 2 - images).abs().max())
    image = ours.clone()
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    with torch.no_grad():
        expected = FluxImg2ImgPipeline._encode_vae_image(pipe, image, torch.Generator())
    assert torch.allclose(w.encode_images(image), expected, atol=1e-6)


def test_flow_conditions_and_null_condition(worlds):
    sd3, flux, schnell = worlds["sd3"], worlds["flux"], worlds["flux_schnell"]
    c = sd3.encode(["a red cube"])
    assert set(c) == {"prompt_embeds", "pooled_projections", "prompt_id"}
    # SD3: 77 CLIP tokens then max_sequence_length T5 tokens, as the pipeline concatenates them
    assert c["prompt_embeds"].shape == (1, 77 + 8, tiny.T5["d_model"]) and c["pooled_projections"].shape == (1, 64)
    out = sd3._encoder_pipe.encode_prompt("", None, None, device="cpu", do_classifier_free_guidance=False,
                                          max_sequence_length=8)
    null = sd3.null_condition(2)  # the SD3 pipeline's negative: the encoded empty prompt (not zeros)
    assert torch.equal(null["prompt_embeds"][0], out[0][0]) and torch.equal(null["pooled_projections"][0], out[2][0])
    f = flux.encode(["a red cube", "a blue sphere"])
    assert set(f) == {"prompt_embeds", "pooled_projections", "guidance", "prompt_id"}
    assert f["prompt_embeds"].shape == (2, 8, tiny.T5["d_model"]) and torch.equal(f["guidance"], torch.full((2,), 3.5))
    assert "guidance" not in schnell.encode(["a red cube"])


def test_precomputed_embeddings_include_the_null_condition_and_evaluate_runs_without_text_encoders(specs):
    from full import evaluate

    w = full.load_world(str(specs["sd3"]), precompute_embeddings=True)
    assert w.parts.text_encoders == [] and w.null_condition(1)["prompt_embeds"].shape[0] == 1
    x = evaluate.sample_latents(w, w.pipeline("teacher"), ["a yellow star"], 0, [999, 499], "flow_sde", 2.0)
    assert x.shape == (1, *w.shape) and torch.isfinite(x).all()


def test_flow_spec_errors_name_the_problem(specs, tmp_path):
    spec = json.loads(specs["flux_schnell"].read_text())
    with pytest.raises(models.ModelError, match="no guidance input"):
        full.load_world(str(specs["flux_schnell"]), guidance=3.5)
    with pytest.raises(models.ModelError, match="is a DDPM kernel"):
        full.load_world(str(specs["sd3"]), roles={"student": {"sampler": "x0_renoise"}}).role_sampler("student")
    with pytest.raises(models.ModelError, match="needs FlowMatchEulerDiscreteScheduler"):
        full.load_world(str(specs["sd3"]), roles={"student": {"scheduler": "LCMScheduler"}})
    with pytest.raises(models.ModelError, match="use_dynamic_shifting needs base_shift, max_shift"):
        full.load_world(str(specs["sd3"]), roles={"student": {"scheduler_config": {"use_dynamic_shifting": True,
                                                                                   "max_shift": None}}})
    with pytest.raises(models.ModelError, match="use_karras_sigmas"):
        full.load_world(str(specs["sd3"]), roles={"student": {"scheduler_config": {"use_karras_sigmas": True}}})
    with pytest.raises(ValueError, match="not a multiple of the flux patch size"):
        full.load_world(str(specs["flux_schnell"]), resolution=spec["resolution"] - 2)
    with pytest.raises(ValueError, match="both 'unet' and 'transformer'"):
        full.load_world(str(specs["sd3"]), roles={"student": {"unet": "x", "transformer": "y"}})
    with pytest.raises(models.ModelError, match="flow-matching kernel"):
        models.role_sampler("student", __import__("diffusers").LCMScheduler(), "flow_sde", GRID)


def test_a_role_transformer_from_another_folder(specs, tmp_path):
    """"transformer" in a role names a bare transformer folder (a distilled turbo / schnell stand-in)."""
    tiny.save_tiny_unet(tmp_path / "turbo", "sd3", seed=7, sample_size=8)
    w = full.load_world(str(specs["sd3"]), roles={"student": {"transformer": str(tmp_path / "turbo")}})
    a, b = w.denoiser("student", lora_rank=2), w.denoiser("teacher", lora_rank=2)
    x, c = torch.randn(1, *w.shape), w.encode(["a red cube"])
    with torch.no_grad():
        assert (a(x, 999, c) - b(x, 999, c)).abs().max() > 1e-3


# --- every method and variant: runs, NFEs, resume, adapter ---------------------------------------------------------
SMALL = {"pso": ["--batch", "2", "--eval-samples", "2", "--eval-every", "100", "--reference-images", "2",
                 "--concept-images", "2", "--no-naive-baseline", "--lora-rank", "2"],
         "sharpening": ["--batch", "2", "--eval-samples", "2", "--final-samples", "2", "--eval-every", "100", "--n", "2",
                        "--m", "2", "--lora-rank", "2", "--eval-cfg", "2"],
         "diff_instruct_pp": ["--batch", "2", "--eval-samples", "2", "--lora-rank", "2", "--ta-lora-rank", "2",
                              "--cfg-scale", "4.5"]}
VARIANTS = [("pso", "pso"), ("pso", "offline"), ("pso", "online"), ("pso", "customize"), ("pso", "naive"),
            ("sharpening", "sft"), ("sharpening", "rlhf"), ("diff_instruct_pp", "dipp")]


def run(method, variant, spec, out, steps, *extra):
    argv = ["--model", str(spec), "--variant", variant, *SMALL[method], "--steps", str(steps), "--save-every", "1",
            "--lr", "1e-2", "--out", str(out), *extra]
    return importlib.import_module(method).main(argv)


def adapter(out):
    return load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))


# The fast suite runs each variant on one of the two kinds (alternating) and checks the resume for one variant of
# each method (a resume costs two more runs); every other pairing, each with its resume, is marked slow.
FAST_RESUME = {("pso", "online"), ("sharpening", "rlhf"), ("diff_instruct_pp", "dipp")}
CASES = [pytest.param(m, v, kind, (m, v) in FAST_RESUME or bool((i + j) % 2),
                      marks=[pytest.mark.slow] if (i + j) % 2 else [], id=f"{m}-{v}-{kind}")
         for i, (m, v) in enumerate(VARIANTS) for j, kind in enumerate(("sd3", "flux"))]


@pytest.mark.parametrize("method, variant, kind, resume", CASES)
def test_every_method_and_variant_counts_its_nfes_and_resumes_bit_identically(method, variant, kind, resume, specs,
                                                                             tmp_path):
    straight = run(method, variant, specs[kind], tmp_path / "a", 3)
    rows = list(csv.DictReader(open(tmp_path / "a" / "log.csv")))
    assert len(rows) == 3 and all(float(r["nfe"]) == straight["nfe_per_update"] for r in rows), rows
    assert straight["nfe_per_update"] > 0 and all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    a = adapter(tmp_path / "a")
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    if not resume:
        return
    run(method, variant, specs[kind], tmp_path / "b", 2)  # interrupted after update 2 ...
    run(method, variant, specs[kind], tmp_path / "b", 3, "--resume")  # ... and resumed to 3
    b = adapter(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in csv.DictReader(open(tmp_path / "b" / "log.csv"))] == [r["loss"] for r in rows]


def test_diff_instruct_refuses_flow_worlds(specs, tmp_path):
    with pytest.raises(ValueError, match="use --variant dipp"):
        run("diff_instruct_pp", "di", specs["sd3"], tmp_path / "di", 1)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_saved_lora_loads_with_the_pipelines_load_lora_weights_and_reproduces_the_denoiser(kind, worlds, specs,
                                                                                           tmp_path):
    """world.save_adapter writes transformer_lora_layers that StableDiffusion3Pipeline / FluxPipeline
    .load_lora_weights(dir) loads onto every LoRA'd projection: the pipeline's transformer then predicts what the
    trained denoiser does, and differs from the base."""
    w = worlds[kind]
    den = w.denoiser("student", lora_rank=2)
    with torch.no_grad():
        for p in den.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    w.save_adapter(den, tmp_path / "adapter")
    pipe = _pipe(kind, specs[kind])
    before = pipe.transformer
    x, c = torch.randn(2, *w.shape), w.encode(["a red cube", "a blue sphere"])
    fwd = {"sd3": __import__("full.world").world.sd3_forward, "flux": __import__("full.world").world.flux_forward}[kind]
    with torch.no_grad():
        base = fwd(before, x, torch.full((2,), 749), c, w.schedule)
        pipe.load_lora_weights(tmp_path / "adapter")
        tuned = fwd(pipe.transformer, x, torch.full((2,), 749), c, w.schedule)
        ours = den(x, 749, c)
    n_lora = sum(1 for m in pipe.transformer.modules() if hasattr(m, "lora_A") and len(m.lora_A))
    assert n_lora == sum(1 for m in den.unet.modules() if hasattr(m, "lora_A") and len(m.lora_A)) > 0
    assert any("add_q_proj" in n for n, _ in pipe.transformer.named_modules() if n.endswith("lora_A"))
    assert (tuned - base).abs().max() > 1e-3
    assert torch.allclose(tuned, ours, atol=1e-5), float((tuned - ours).abs().max())


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_evaluate_samples_flow_pipelines_and_scores_a_lora(kind, worlds, specs, tmp_path):
    """full.evaluate on a flow pipeline: the role's grid as sigmas, the x0-renoise MDP as the scheduler's
    stochastic step, FLUX's packed latents unpacked; a LoRA changes the samples."""
    from full import evaluate

    w = worlds[kind]
    den = w.denoiser("student", lora_rank=2)
    with torch.no_grad():
        for p in den.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    w.save_adapter(den, tmp_path / "run" / "adapter")
    pipe = w.pipeline("student")
    assert pipe.scheduler.config.stochastic_sampling  # flow_x0_renoise: the scheduler's stochastic step
    base = evaluate.sample_latents(w, pipe, ["a red cube"], 0, GRID, "flow_x0_renoise", 0.0)
    assert base.shape == (1, *w.shape)
    results = evaluate.evaluate(str(specs[kind]), [str(tmp_path / "run" / "adapter")], None, 2, 0, "student", 0.0,
                                None, str(tmp_path / "eval"))
    assert set(results) == {"base", "run/adapter"} and results["base"] != results["run/adapter"]
