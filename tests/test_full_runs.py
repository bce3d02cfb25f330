"""full/ end to end: every method and variant through its launcher setting on tiny random SDXL / SD1.5 pipelines
(the real loading code: model spec -> harness.load_world -> full.load_world), the saved LoRA in a fresh pipeline,
resume after an interruption, and a 2-process CPU (gloo) run whose ranks end with identical adapters."""
import csv
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import harness
from full import launch, tiny

ROOT = Path(__file__).resolve().parents[1]
PSO_SMALL = ["--steps", "2", "--batch", "2", "--eval-samples", "2", "--eval-every", "1", "--reference-images", "2",
             "--concept-images", "2", "--no-naive-baseline", "--save-every", "1"]
SHARPENING_SMALL = ["--steps", "2", "--batch", "2", "--eval-samples", "2", "--final-samples", "2", "--eval-every", "1",
                    "--save-every", "1"]
DIPP_SMALL = ["--steps", "2", "--batch", "2", "--eval-samples", "2", "--save-every", "1"]
SMALL = {"pso.py": PSO_SMALL, "sharpening.py": SHARPENING_SMALL, "diff_instruct_pp.py": DIPP_SMALL}

# (launcher setting, tiny world, extra method flags): every variant of every method. SD1.5 carries the trailing
# Euler-ancestral scheduler (the SDXL-Turbo MDP), SDXL the LCMScheduler (DMD2 / LCM).
CASES = [
    ("pso-style-turbo", "sd15", []),  # Eq. 5 on an image-caption target set
    ("pso-style-turbo", "sd15", ["--variant", "naive"]),  # the eps-MSE baseline of Fig. 1b
    ("pso-customize-turbo", "sd15", []),  # App. B.3 on a concept folder
    ("pso-offline-turbo", "sd15", []),  # Eq. 6 on Pick-a-Pic-style pairs
    ("pso-offline-lcm", "xl", ["--offline-pairs", "target"]),  # Eq. 6 against the frozen model's samples
    ("pso-online-dmd2", "xl", []),  # Eq. 7, PickScore-ranked pairs of the model's own samples
    ("sharpening-sft-sdxl", "xl", []),  # Alg. 1, full UNet
    ("sharpening-rlhf-sdxl", "xl", []),  # Alg. 2
    ("dipp-sdxl-dmd2", "xl", []),  # DI++ on a one-step generator, LoRA
    ("dipp-sd-turbo", "sd15", []),  # DI++, full generator, CFG reward 4.5
    ("di-pretrain-sd21", "sd15", []),  # Diff-Instruct pre-training from the reference
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"xl": tiny.save_tiny_setup(root / "xl", "sdxl", "lcm"),
            "sd15": tiny.save_tiny_setup(root / "sd15", "sd15", "euler_ancestral")}


def run_setting(name, spec, out, extra=()):
    s = launch.SETTINGS[name]
    script, argv = launch.method_argv(name, model=str(spec), extra=[*SMALL[s.script], "--out", str(out), *extra])
    method = importlib.import_module(script.stem)
    return method.main(argv)


@pytest.mark.parametrize("name, world, extra", CASES, ids=[f"{c[0]}{'-' + c[2][1] if c[2] else ''}" for c in CASES])
def test_every_method_and_variant_runs_through_its_launcher_setting(name, world, extra, specs, tmp_path):
    metrics = run_setting(name, specs[world], tmp_path / "run", extra)
    for key in ("reward_base", "reward_tuned", "quality_base", "quality_tuned"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header + one row per update
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file() or (adapter / "unet" / "config.json").is_file()
    assert (tmp_path / "run" / "samples.png").is_file() and (tmp_path / "run" / "metrics.json").is_file()


def test_a_trained_lora_loads_into_a_fresh_pipeline_and_changes_its_output(specs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    run_setting("pso-online-dmd2", specs["xl"], tmp_path / "run", ["--lr", "1e-2"])
    pipe = StableDiffusionXLPipeline.from_pretrained(specs["xl"].parent / "pipeline")
    draw = lambda: pipe("a red cube", timesteps=[999, 749, 499, 249], guidance_scale=0.0, output_type="latent",  # noqa: E731
                        generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        before = draw()
        pipe.load_lora_weights(tmp_path / "run" / "adapter")
        after = draw()
    assert (after - before).abs().max() > 1e-4


def test_resume_after_an_interruption_gives_the_same_adapter(specs, tmp_path, monkeypatch):
    import pso

    args = lambda out: ["--model", str(specs["xl"]), "--variant", "online", "--steps", "3", "--batch", "2",  # noqa: E731
                        "--lr", "1e-3", "--eval-samples", "2", "--eval-every", "100", "--save-every", "2", "--out", str(out)]
    pso.main(args(tmp_path / "a"))
    real = harness.Run.check_finite

    def killed_at_update_3(self, loss, step):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(self, loss, step)

    monkeypatch.setattr(harness.Run, "check_finite", killed_at_update_3)
    with pytest.raises(KeyboardInterrupt):
        pso.main(args(tmp_path / "b"))
    monkeypatch.setattr(harness.Run, "check_finite", real)
    assert json.loads((tmp_path / "b" / "checkpoint-2" / "state.json").read_text())["step"] == 2
    pso.main(args(tmp_path / "b") + ["--resume"])
    a = load_file(str(tmp_path / "a" / "adapter" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k or "lora.up" in k)  # it did train


DRIVER = """
import sys, json
sys.path.insert(0, {root!r})
import torch
from safetensors.torch import save_file
import full, common
torch.set_num_threads(1)
worlds, drawn = [], []
load = full.load_world
def capture(model, **kw):
    world = load(model, **kw)
    conditions = world.conditions
    def logged(n, generator):
        cond = conditions(n, generator)
        drawn.append(cond["prompt_id"].tolist())
        return cond
    world.conditions = logged
    worlds.append(world)
    return world
full.load_world = capture
import sharpening
sharpening.main({argv!r})
world = worlds[0]
rank = world.accelerator.process_index
assert world.accelerator.num_processes == 2, world.accelerator.num_processes
save_file(world.denoisers[0].adapter_state(), {out!r} + f"/rank{{rank}}.safetensors")
json.dump(drawn, open({out!r} + f"/drawn{{rank}}.json", "w"))
"""


def test_two_cpu_processes_end_with_identical_adapters(specs, tmp_path):
    """torchrun with 2 processes (gloo): each rank draws its own prompts, the LoRA gradients are averaged in
    accelerator.backward, so both ranks hold the same adapter at the end (and it moved)."""
    argv = ["--model", str(specs["xl"]), "--variant", "rlhf", *SHARPENING_SMALL, "--n", "2", "--m", "2", "--lr", "1e-3",
            "--out", str(tmp_path / "run")]
    (tmp_path / "driver.py").write_text(DRIVER.format(root=str(ROOT), argv=argv, out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    port = str(29400 + os.getpid() % 500)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, str(tmp_path / "driver.py")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # trained, not still at B = 0
    drawn0 = json.loads((tmp_path / "drawn0.json").read_text())
    drawn1 = json.loads((tmp_path / "drawn1.json").read_text())
    assert drawn0 != drawn1  # the ranks trained on different prompts: the equality comes from the all-reduce


DDP_DRIVER = """
import sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import full
torch.set_num_threads(1)
world = full.load_world({spec!r})
acc = world.accelerator
assert acc.num_processes == 2
den = world.denoiser("student", lora_rank=4)
assert isinstance(den.module, torch.nn.parallel.DistributedDataParallel), type(den.module)
with torch.no_grad():  # the same non-zero LoRA on both ranks, so every LoRA weight gets a gradient
    g = torch.Generator().manual_seed(0)
    for p in den.trainable_parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
rank = acc.process_index
prompts = [["a red cube", "a blue sphere"], ["a green cone", "a small house"]]

def loss_fn(seed):
    g = torch.Generator().manual_seed(100 * seed + rank)
    x = torch.randn(2, *world.shape, generator=g)
    cond = world.encode(prompts[rank])
    e1 = den(x, 700, cond)  # a training forward (DDP)
    e2 = den(0.5 * x, 300, cond)  # a second one before the backward
    with torch.no_grad(), den.frozen():
        ref1 = den(x, 700, cond)  # the reference without a graph
    with den.frozen():
        ref2 = den(0.5 * x, 300, cond)  # the reference with grad enabled: plain UNet, adapter off
    return (e1 - ref1).square().mean() + (e2 - ref2.detach()).square().mean()

def grads():
    return torch.cat([p.grad.reshape(-1) for p in den.trainable_parameters()])

def zero():
    for p in den.trainable_parameters():
        p.grad = None

# 1. several forwards (some frozen / no-grad) and one backward: DDP averages exactly the local gradients
ddp, den.module = den.module, den.unet  # the local gradient, without DDP
loss_fn(1).backward()
local = grads().clone()
zero()
den.module = ddp
acc.backward(loss_fn(1))
expected = local.clone()
dist.all_reduce(expected)
assert torch.allclose(grads(), expected / 2, rtol=1e-4, atol=1e-7), (grads() - expected / 2).abs().max()
zero()

# 2. accelerate's accumulation (INTERFACE.md): 2 micro-batches, one synchronised optimizer step
acc.gradient_accumulation_steps = 2
opt = acc.prepare(torch.optim.SGD(den.trainable_parameters(), lr=1.0))
local = 0
ddp, den.module = den.module, den.unet
for s in (2, 3):
    loss_fn(s).backward()
    local = local + grads().clone()
    zero()
den.module = ddp
before = [p.detach().clone() for p in den.trainable_parameters()]
steps = 0
for s in (2, 3):
    with acc.accumulate(den.module):
        acc.backward(loss_fn(s))
        if acc.sync_gradients:
            synced = grads().clone()
        opt.step()
        opt.zero_grad()
        steps += acc.sync_gradients
expected = local.clone()
dist.all_reduce(expected)
assert steps == 1 and torch.allclose(synced, expected / 4, rtol=1e-4, atol=1e-7), (synced - expected / 4).abs().max()
moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(den.trainable_parameters(), before)])
assert moved.abs().max() > 0
state = torch.cat([v.reshape(-1) for v in den.adapter_state().values()])
other = state.clone()
dist.broadcast(other, src=0)
assert torch.equal(state, other), "the ranks' adapters differ"
print("rank", rank, "ok")
"""


def test_ddp_averages_several_forwards_and_accumulates_with_accelerate(specs, tmp_path):
    """2 CPU processes (gloo): the LoRA'd UNet under DDP with two training forwards, a no-grad frozen pass and a
    grad-enabled frozen pass before one backward gets exactly the mean of the ranks' local gradients; with
    accelerator.accumulate over 2 micro-batches, one optimizer step with the mean over ranks and micro-batches,
    and identical adapters on both ranks."""
    (tmp_path / "driver.py").write_text(DDP_DRIVER.format(root=str(ROOT), spec=str(specs["xl"])))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    port = str(29900 + os.getpid() % 90)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, str(tmp_path / "driver.py")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 2, proc.stdout  # both ranks passed every check (prints may interleave)


@pytest.mark.slow
def test_two_cpu_processes_resume_to_the_adapter_of_an_uninterrupted_run(specs, tmp_path):
    """torchrun, 2 processes: 2 updates, then --resume to 3, ends on both ranks with the adapter of a straight
    3-update run (each rank restores the checkpoint onto its own device; the log continues without duplicates).
    Slow (three 2-process launches); the fast suite covers its parts: a rank's restore onto its own device
    (tests/test_harness.py), the ranks ending identical (test_two_cpu_processes_end_with_identical_adapters) and a
    resumed full-backend run ending on the straight run's adapter (test_resume_after_an_interruption_...)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def launch(out, steps, *extra):
        small = [a if a != "2" or i != 1 else str(steps) for i, a in enumerate(SHARPENING_SMALL)]
        argv = ["--model", str(specs["xl"]), "--variant", "rlhf", *small, "--n", "2", "--m", "2", "--lr", "1e-3",
                "--out", str(out), *extra]
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / f"driver-{out.name}.py").write_text(DRIVER.format(root=str(ROOT), argv=argv, out=str(out.parent)))
        port = str(29400 + (os.getpid() + steps * 7 + len(extra)) % 500)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               port, str(out.parent / f"driver-{out.name}.py")], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [load_file(str(out.parent / f"rank{r}.safetensors")) for r in (0, 1)]

    straight = launch(tmp_path / "a" / "run", 3)[0]
    launch(tmp_path / "b" / "run", 2)
    r0, r1 = launch(tmp_path / "b" / "run", 3, "--resume")
    for k in straight:
        assert torch.equal(r0[k], r1[k]) and torch.equal(r0[k], straight[k]), k
    with open(tmp_path / "b" / "run" / "log.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["1", "2", "3"]
