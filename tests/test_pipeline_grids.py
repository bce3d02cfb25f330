"""Every role of every shipped model spec samples on the grid its own diffusers pipeline uses (docs/full.md
"Sampling grids"), computed from the shipped scheduler configs without a weight: a flow role's sigmas are those the
real pipeline class calls its network with (captured on a stand-in network at the spec's resolution), an eps role's
timesteps those the pipeline's retrieve_timesteps returns; the step counts are the model cards' (full/configs/
pipelines.json) for students, DMD2's card timesteps, 25 for teachers (Sharpening's K), 1 for generators."""
import json
from pathlib import Path

import pytest
import torch

import common
from full import architectures, models, tiny
from full.spec import RoleSpec, load_spec

SPECS = sorted((Path(__file__).resolve().parents[1] / "full" / "specs").glob("*.json"))
FACTS = json.loads(models.PIPELINE_FACTS.read_text())
# (spec file, role) -> its step count; students follow their model card unless the spec says otherwise
STEPS = {("flux_dev", "teacher"): 25, ("flux_schnell", "student"): 4, ("flux_schnell", "generator"): 1,
         ("sd35_large_turbo", "student"): 4, ("sd35_large_turbo", "generator"): 1,
         ("sd35_large_turbo_dipp", "generator"): 1, ("sd35_large_turbo_dipp", "teacher"): 25,
         ("sd35_medium", "teacher"): 25, ("sd_turbo_dipp", "generator"): 1, ("sd_turbo_dipp", "teacher"): 25,
         ("sdxl_base", "teacher"): 25, ("sdxl_dmd2", "student"): 4, ("sdxl_dmd2", "generator"): 1,
         ("sdxl_dmd2", "teacher"): 25, ("sdxl_dmd2_dipp", "generator"): 1, ("sdxl_dmd2_dipp", "teacher"): 25,
         ("sdxl_lcm", "student"): 4, ("sdxl_turbo", "student"): 4}


def _setup(path):
    """What FullWorld computes a grid from, read from the shipped configs only: kind, base scheduler, the image
    token count at the spec's resolution and the flow schedule."""
    import diffusers

    spec = load_spec(str(path), random_weights=True)
    index = architectures.model_index(spec.base)
    kind = models.PIPELINES[index["_class_name"]]
    base_sched = architectures.build(getattr(diffusers, index["scheduler"][1]), spec.base, "scheduler")
    vae = architectures.component_config(spec.vae or spec.base, "vae")
    net = architectures.component_config(spec.base, models.KINDS[kind]["net"])
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    resolution = spec.resolution or net.get("sample_size", 128) * factor
    seq = models.image_tokens(kind, resolution // factor, net)
    schedule = models.flow_schedule(kind, base_sched, seq, spec.name) if kind in models.FLOW_PIPELINES else None
    return spec, kind, base_sched, resolution, schedule, net


def _stand_in_flow_pipeline(kind, scheduler, net_config):
    """The real pipeline class around tiny modules (a VAE with the real 8x factor) whose transformer records the
    timestep it is called with and returns zeros: what the pipeline's own __call__ feeds the network."""
    from diffusers import AutoencoderKL, FluxPipeline, StableDiffusion3Pipeline

    vae = AutoencoderKL(block_out_channels=[8, 8, 8, 8], latent_channels=16, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    if kind == "sd3":
        net = tiny.tiny_sd3_transformer(8)
        pipe = StableDiffusion3Pipeline(transformer=net, vae=vae, scheduler=scheduler, text_encoder=None,
                                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                        tokenizer_3=None)
    else:
        net = tiny.tiny_flux_transformer(guidance_embeds=bool(net_config.get("guidance_embeds")))
        pipe = FluxPipeline(transformer=net, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None)
    seen = []

    def forward(hidden_states, timestep, **kw):
        seen.append(float(timestep.flatten()[0]) / (1000.0 if kind == "sd3" else 1.0))  # SD3: sigma x 1000
        return (torch.zeros_like(hidden_states),)

    net.forward = forward
    return pipe, seen


def _pipeline_sigmas(kind, scheduler, net_config, steps, resolution):
    pipe, seen = _stand_in_flow_pipeline(kind, type(scheduler).from_config(scheduler.config), net_config)
    embeds = {"prompt_embeds": torch.zeros(1, 8, 32),
              "pooled_prompt_embeds": torch.zeros(1, 64 if kind == "sd3" else 32)}
    extra = {"guidance_scale": 1.0} if kind == "sd3" else {}
    with torch.no_grad():
        pipe(**embeds, num_inference_steps=steps, height=resolution, width=resolution, output_type="latent", **extra)
    return torch.tensor(seen)


def _pipeline_timesteps(kind, scheduler, sampler, steps, card):
    """retrieve_timesteps of the pipeline's module, as its __call__ calls it, on the scheduler of the role's kernel:
    DDIM "trailing" for a DDIM teacher (sampled with DDIM whatever it ships), else the role's own."""
    import importlib

    import diffusers

    if sampler == "ddim":
        scheduler = diffusers.DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    sched = type(scheduler).from_config(scheduler.config)
    retrieve = importlib.import_module(models.EPS_PIPELINES[kind]).retrieve_timesteps
    ts, _ = retrieve(sched, None if card else steps, "cpu", timesteps=card)
    return [int(t) for t in ts]


CASES = [(p, role) for p in SPECS for role in json.loads(p.read_text())["roles"]]


@pytest.mark.parametrize("path, role", CASES, ids=[f"{p.stem}-{r}" for p, r in CASES])
def test_every_shipped_roles_grid_is_its_pipelines(path, role):
    spec, kind, base_sched, resolution, schedule, net = _setup(path)
    rspec = spec.roles[role]
    assert not rspec.timesteps, "a shipped spec names no hand-written grid: the pipeline's is the role's"
    sched = models.role_scheduler(spec, rspec, base_sched)
    steps, card = models.role_steps(spec, role, rspec)
    assert steps == STEPS[(path.stem, role)]
    facts = models.pipeline_facts(rspec.lora, rspec.unet, spec.base)
    if role == "student" and rspec.steps is None:  # the model card's step count (or its explicit timesteps)
        assert steps == len(card) if card else steps == facts["num_inference_steps"]
    sampler = models.role_kernel(role, sched, rspec.sampler, flow=kind in models.FLOW_PIPELINES, steps=steps)
    grid = models.role_grid(spec, role, kind, sched, sampler, models.image_tokens(kind, resolution // 8, net), schedule)
    assert len(grid) == steps
    if schedule is not None:
        called = _pipeline_sigmas(kind, sched, net, steps, resolution)
        assert torch.equal(schedule.sigma(torch.tensor(grid)), called.float()), (grid, called)
    else:
        assert grid == _pipeline_timesteps(kind, sched, sampler, steps, card)


def test_sd35_large_turbo_samples_its_pipelines_4_step_grid_not_a_ddpm_one():
    """The issue's case: SD3.5-Large-Turbo's student at 4 steps samples sigmas ~ [1.0, 0.858, 0.602, 0.009] (shift 3,
    FlowMatchEulerDiscreteScheduler.set_timesteps(4)), not [1.0, 0.9, 0.75, 0.5] ([999, 749, 499, 249])."""
    path = next(p for p in SPECS if p.stem == "sd35_large_turbo")
    spec, kind, base_sched, resolution, schedule, net = _setup(path)
    sched = models.role_scheduler(spec, spec.roles["student"], base_sched)
    grid = models.role_grid(spec, "student", kind, sched, "flow_x0_renoise", 4096, schedule)
    sigmas = schedule.sigma(torch.tensor(grid))
    assert [round(float(s), 3) for s in sigmas] == [1.0, 0.858, 0.602, 0.009]
    assert grid != [999, 749, 499, 249] and grid[0] == common.T - 1


def test_the_shipped_cards_facts_reach_the_worlds_defaults():
    """FLUX.1-schnell's card encodes prompts with max_sequence_length 256 (the pipeline's default is 512); FLUX.1-dev's
    embedded guidance is 3.5; SD3.5-Large-Turbo's card samples 4 steps."""
    assert models.pipeline_facts("black-forest-labs/FLUX.1-schnell")["max_sequence_length"] == 256
    assert models.pipeline_facts("black-forest-labs/FLUX.1-dev")["guidance_scale"] == 3.5
    spec = load_spec(str(next(p for p in SPECS if p.stem == "sd35_large_turbo")))
    assert models.role_steps(spec, "student") == (4, None) and models.role_steps(spec, "teacher") == (25, None)
    dmd2 = load_spec(str(next(p for p in SPECS if p.stem == "sdxl_dmd2")))
    assert models.role_steps(dmd2, "generator") == (1, [399])
    assert models.role_steps(dmd2, "student", RoleSpec(steps=2)) == (2, None)
    assert all("source" in v for k, v in FACTS.items() if not k.startswith("_"))
