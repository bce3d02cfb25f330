"""PSO's practitioners' baselines on full/ (issue 23), on tiny random pipelines built offline: base transfer with a
FLUX.1-dev-like teacher role (guidance-distilled) in a FLUX.1-schnell-like spec, whose LoRA loads into the student
pipeline with `load_lora_weights`; the de-distill adapter A saved in its own run folder, merged while B trains,
and not part of the delivered LoRA."""
import os

import pytest
import torch
from safetensors.torch import load_file

import full
import pso
from full import launch, models, tiny
from full.world import flux_forward, unet_forward

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["--steps", "2", "--batch", "2", "--eval-samples", "2", "--eval-every", "1", "--save-every", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def schnell_spec(tmp_path_factory):
    """A tiny FLUX.1-schnell-like spec (no guidance input, shift 1) whose teacher role is a FLUX.1-dev-like pipeline
    (guidance_embeds), on the student's noise schedule as the one-schedule rule asks (full/specs/
    flux_schnell_base_transfer.json does the same with the real checkpoints)."""
    root = tmp_path_factory.mktemp("schnell")
    tiny.save_tiny_pipeline(root / "dev", "flux", seed=3, sample_size=8)
    return tiny.save_tiny_setup(root, "flux_schnell", sample_size=8, roles={"teacher": {
        "unet": "dev", "scheduler_config": {"shift": 1.0, "use_dynamic_shifting": False}}})


@pytest.fixture(scope="module")
def sd15_spec(tmp_path_factory):
    return tiny.save_tiny_setup(tmp_path_factory.mktemp("sd15"), "sd15", "euler_ancestral")


def test_base_transfer_trains_the_dev_teachers_lora_and_it_loads_into_the_schnell_pipeline(schnell_spec, tmp_path):
    from diffusers import FluxPipeline

    out = tmp_path / "bt"
    metrics = pso.main(["--model", str(schnell_spec), "--variant", "base-transfer", "--lr", "0.05", *SMALL,
                        "--out", str(out)])
    assert metrics["trained_role"] == "teacher" and metrics["nfe_per_update"] == 4
    lora = load_file(str(out / "checkpoint-2" / "model-teacher.safetensors"))  # the trained network: the teacher's
    world = full.load_world(str(schnell_spec))
    teacher, student = world.denoiser("teacher"), world.denoiser("student")
    assert world.guidance is None and student.guidance is None and teacher.guidance == 3.5  # its own, embedded
    assert (metrics["sampler"], metrics["sample_grid"]) == (student.sampler, student.timesteps) != (
        teacher.sampler, teacher.timesteps)  # evaluated on the student
    x, cond = torch.randn(1, *world.shape), world.encode(["a red cube"])
    with torch.no_grad():
        assert not torch.allclose(teacher(x, 749, cond), student(x, 749, cond), atol=1e-4)  # two networks
        student.load_adapter_state(lora)
        ours = student(x, 749, cond)  # the delivered model: the student with the teacher's LoRA
        pipe = FluxPipeline.from_pretrained(schnell_spec.parent / "pipeline")
        before = flux_forward(pipe.transformer, x, torch.tensor([749]), cond, world.schedule)
        pipe.load_lora_weights(out / "adapter")
        after = flux_forward(pipe.transformer, x, torch.tensor([749]), cond, world.schedule)
    assert torch.allclose(after, ours, atol=1e-5) and not torch.allclose(before, after, atol=1e-4)


def test_a_guidance_distilled_role_takes_its_own_guidance_and_others_refuse_one(schnell_spec, tmp_path):
    world = full.load_world(str(schnell_spec), roles={"teacher": {
        "unet": str(schnell_spec.parent / "dev"), "guidance": 7.0,
        "scheduler_config": {"shift": 1.0, "use_dynamic_shifting": False}}})
    teacher = world.denoiser("teacher")
    x, cond = torch.randn(1, *world.shape), world.encode(["a red cube"])
    with torch.no_grad():
        seven = teacher(x, 749, cond)
        teacher.guidance = 3.5
        assert not torch.allclose(seven, teacher(x, 749, cond), atol=1e-5)  # the value reaches the network
    with pytest.raises(models.ModelError, match="role student: \"guidance\" is set but its denoiser has no guidance"):
        full.load_world(str(schnell_spec), roles={"student": {"guidance": 3.5}}).denoiser("student")
    with pytest.raises(ValueError, match="role teacher: guidance must be a number"):
        full.load_world(str(schnell_spec), roles={"teacher": {"guidance": "high"}})


def test_dedistill_delivers_b_without_the_adapter_kept_in_its_own_folder(sd15_spec, tmp_path):
    from diffusers import StableDiffusionPipeline

    adapter_run, out = tmp_path / "A", tmp_path / "B"
    pso.main(["--model", str(sd15_spec), "--variant", "dedistill-adapter", "--lr", "0.05", *SMALL,
              "--out", str(adapter_run)])
    metrics = pso.main(["--model", str(sd15_spec), "--variant", "dedistill", "--dedistill-adapter", str(adapter_run),
                        "--lr", "0.05", *SMALL, "--out", str(out)])
    a = load_file(str(adapter_run / pso.ADAPTER_A))
    b = load_file(str(out / "checkpoint-2" / "model-student.safetensors"))
    assert os.listdir(out / "adapter") == ["pytorch_lora_weights.safetensors"]  # the delivered LoRA only
    assert metrics["adapter_run"] == str(adapter_run) and metrics["adapter_updates"] == 2
    world = full.load_world(str(sd15_spec))
    x, cond = torch.randn(1, *world.shape), world.encode(["a red cube"])
    student_a, student_b = world.denoiser("student"), world.denoiser("student")
    student_a.load_adapter_state(a)
    student_b.load_adapter_state(b)
    merged = world.denoiser("student", merged_adapter=a)  # what B trained over: A in the weights
    merged.load_adapter_state(b)
    with torch.no_grad():
        with merged.frozen():
            assert torch.allclose(merged(x, 749, cond), student_a(x, 749, cond), atol=1e-5)
        pipe = StableDiffusionPipeline.from_pretrained(sd15_spec.parent / "pipeline", safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.load_lora_weights(out / "adapter")
        delivered = unet_forward(pipe.unet, x, torch.tensor([749]), cond, world.schedule)
        assert torch.allclose(delivered, student_b(x, 749, cond), atol=1e-5)  # student + B ...
        assert not torch.allclose(delivered, merged(x, 749, cond), atol=1e-4)  # ... not student + A + B


def test_a_merged_adapter_that_does_not_fit_is_named(sd15_spec):
    world = full.load_world(str(sd15_spec))
    state = world.denoiser("student", lora_rank=4).adapter_state()
    with pytest.raises(ValueError, match="the adapter to merge does not fit this network: missing"):
        world.denoiser("student", merged_adapter={k: v for k, v in list(state.items())[2:]})


def test_the_shipped_schnell_spec_gives_its_dev_teacher_the_students_schedule_and_its_own_guidance():
    """full/specs/flux_schnell_dev_teacher.json, read from the shipped configs (no download, no weights): the teacher
    role's scheduler (FLUX.1-dev's, with the spec's overrides) is the student's schedule, as a world requires, and its
    transformer embeds guidance while the schnell base does not."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from full import architectures
    from full.spec import load_spec

    spec = load_spec(str(launch.SPECS / "flux_schnell_dev_teacher.json"), random_weights=True)
    teacher = spec.roles["teacher"]
    assert teacher.unet == "black-forest-labs/FLUX.1-dev" and teacher.guidance == 3.5
    base = architectures.build(FlowMatchEulerDiscreteScheduler, spec.base, "scheduler")
    own = models.role_scheduler(spec, teacher, base)
    dev = architectures.build(FlowMatchEulerDiscreteScheduler, teacher.unet, "scheduler")
    assert dev.config.use_dynamic_shifting  # without the spec's overrides the teacher's schedule would differ
    schedules = [models.flow_schedule("flux", s, 4096, "test") for s in (base, own, dev)]
    assert torch.equal(schedules[0].sigmas, schedules[1].sigmas)
    assert not torch.equal(schedules[0].sigmas, schedules[2].sigmas)
    assert architectures.component_config(teacher.unet, "transformer")["guidance_embeds"]
    assert not architectures.component_config(spec.base, "transformer")["guidance_embeds"]


def test_a_checkpoint_run_of_a_baseline_gets_naives_budget_not_the_toy_defaults(sd15_spec):
    world = full.load_world(str(sd15_spec))
    naive = world.method_defaults("pso", "naive")
    for variant in ("base-transfer", "dedistill", "dedistill-adapter"):
        d = world.method_defaults("pso", variant)
        assert {k: d[k] for k in ("lr", "lora_rank", "steps", "batch")} == {
            k: naive[k] for k in ("lr", "lora_rank", "steps", "batch")}
    assert world.method_defaults("pso", "dedistill")["adapter_lr"] == 1e-5  # ostris' training adapters
