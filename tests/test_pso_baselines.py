"""The practitioners' baselines in pso.py (issue 23), loop by loop: what goes into each loss (rows, states, timesteps),
which network is trained (base transfer: the teacher's LoRA; dedistill: B over the merged adapter A, never A),
that A is trained on the student's own samples, that the delivered adapter holds B only, that evaluation samples
the student (its role, sampler and grid), and `python pso.py --baselines all`'s one summary table.

The real `train()` runs on the tiny toy2d world, recorded by test_pso_loops' `rec` fixture (every network row the
trained model evaluates in the last update, and the loss helpers' arguments)."""
import json

import pytest
import torch
from safetensors.torch import load_file

import common
import harness
import pso
from test_pso_loops import rec, run  # noqa: F401  (rec is a fixture)

GRID = [999, 749, 499, 249]


def probe_rows(world, n=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.randint(0, 1000, (n,), generator=g), world.conditions(n, g)


def outputs(den, world, frozen=False):
    """den's prediction on fixed rows (its pre-trained model with `frozen`): how a test tells the networks apart."""
    x, t, c = probe_rows(world)
    with torch.no_grad(), den.frozen() if frozen else torch.no_grad():
        return den(x, t, c)


def role_output(world, role, adapter=None, merged=None):
    """The prediction of a fresh denoiser of `role`, with an adapter state loaded (and `merged` one folded in)."""
    den = world.denoiser(role, merged_adapter=merged)
    if adapter is not None:
        den.load_adapter_state(adapter)
    return outputs(den, world)


@pytest.fixture
def steps(monkeypatch):
    """Record, for every optimizer step: the parameters handed to it, the gradient of the loss into each of them,
    and the trained denoiser (rec.setup.net) is read by the tests."""
    seen = []
    real = harness.Run.optimizer_step

    def record(self, loss, optimizer, params, max_norm=0.0):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        seen.append({"params": list(params), "grads": grads})
        return real(self, loss, optimizer, params, max_norm)
    monkeypatch.setattr(harness.Run, "optimizer_step", record)
    return seen


@pytest.fixture
def draws(monkeypatch):
    """Every call of pso.draw (the evaluation's sampling): the denoiser, its kernel, the times, frozen or not."""
    seen = []
    real = pso.draw

    def record(den, kernel, world, cond, times, seed, frozen=False):
        seen.append({"den": den, "kernel": kernel, "times": list(times), "frozen": frozen})
        return real(den, kernel, world, cond, times, seed, frozen)
    monkeypatch.setattr(pso, "draw", record)
    return seen


def check_plain_loss_on(rec, world, x0, cond):
    """naive_loss's arguments: eps_theta = the policy's output at x_t = alpha x0 + sigma eps for the S = 4 copies of
    each sample at t ~ U[0, T) (the rows' own t), regressed on eps; no frozen call."""
    (args, _, _), = rec.calls["naive_loss"]
    eps, eps_theta = args[:2]
    tab = rec.table(frozen=False)
    t = tab["t"][-len(eps):]  # the loss's rows are the update's last policy call
    x_t = common.add_noise(world.schedule, x0.repeat(4, 1), eps, t)
    out, grad = rec.output(x_t, t, frozen=False, cond=cond.repeat(4))
    assert torch.equal(out, eps_theta.detach()) and eps_theta.requires_grad and grad.all()
    assert len(set(t.tolist())) > 10  # t ~ U[0, T), not the grid
    return out


# ----------------------------------------------------------------------------------------------- base transfer
def test_base_transfer_trains_the_teachers_lora_on_the_target_and_delivers_it_to_the_student(rec, steps, draws,
                                                                                          tmp_path, toy2d_tiny):
    metrics, delivered = run(tmp_path, toy2d_tiny, variant="base-transfer", steps=1, batch=16)
    (args, kw, (x0, cond)), = rec.calls["data"]
    assert args[2:] == ("target",) or kw.get("split") == "target"
    out = check_plain_loss_on(rec, toy2d_tiny, x0, cond)
    assert rec.table(frozen=True) is None
    # the policy is the teacher (its LoRA is zero before the first step), not the student
    tab = rec.table(frozen=False)
    with torch.no_grad():
        teacher = toy2d_tiny.denoiser("teacher")(tab["x"], tab["t"], tab["cond"])
        student = toy2d_tiny.denoiser("student")(tab["x"], tab["t"], tab["cond"])
    assert torch.allclose(tab["out"], teacher, atol=1e-6) and not torch.allclose(tab["out"], student, atol=1e-3)
    # the gradient goes into the teacher's LoRA, and only there
    trained = rec.setup.net.denoiser
    assert torch.equal(outputs(trained, toy2d_tiny, frozen=True), role_output(toy2d_tiny, "teacher"))
    (step,) = steps
    check_gradients(step, trained)
    assert metrics["trained_role"] == "teacher" and metrics["nfe_per_update"] == 4
    check_delivered_on_student(draws, delivered, trained.adapter_state(), toy2d_tiny, tmp_path / "run")


def check_gradients(step, trained):
    """The optimizer stepped exactly the trained denoiser's LoRA, and the loss reaches every lora_B (the factor
    that starts at zero; lora_A's gradient is zero until then)."""
    assert [id(p) for p in step["params"]] == [id(p) for p in trained.trainable_parameters()]
    names = {id(q): n for n, q in trained.net.named_parameters()}
    lora_b = [g for g, p in zip(step["grads"], step["params"]) if "lora_B" in names[id(p)]]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)


def check_delivered_on_student(draws, delivered, state, world, folder):
    """Every evaluation draw samples the student (its own x0-renoise kernel and grid, or one step) carrying exactly
    the trained LoRA `state`; the exported adapter is that state."""
    assert {id(d["den"]) for d in draws} == {id(delivered)}  # the quick evaluation's draw too
    assert [(d["times"], d["frozen"]) for d in draws[-4:]] == [(GRID, True), (GRID, False), ([999], False),
                                                               ([999], True)]  # base, tuned at the grid; at 1 step
    assert all(type(d["kernel"]).__name__ == "X0Renoise" for d in draws) and delivered.sampler == "x0_renoise"
    assert delivered.timesteps == GRID
    assert torch.equal(outputs(delivered, world, frozen=True), role_output(world, "student"))
    assert torch.allclose(outputs(delivered, world), role_output(world, "student", adapter=state), atol=1e-6)
    saved = load_file(str(folder / "adapter" / "adapter.safetensors"))
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


# ----------------------------------------------------------------------------------------------- de-distill adapter
def test_the_dedistill_adapter_trains_on_samples_the_frozen_student_draws_on_its_own_grid(rec, steps, tmp_path,
                                                                                       toy2d_tiny):
    metrics, den = run(tmp_path, toy2d_tiny, variant="dedistill-adapter", steps=1, batch=16)
    (_, _, cond), = rec.calls["conditions"]
    frozen = rec.table(frozen=True)
    assert frozen["t"].tolist() == [t for t in GRID for _ in range(16)]  # the student's own 4 steps, once each
    assert torch.equal(frozen["cond"], cond.repeat(4))
    assert not frozen["grad"].any()
    x0 = rec.setup.kernel.step(frozen["x"][-16:], frozen["out"][-16:], 249, -1)[0]  # the samples' last step
    check_plain_loss_on(rec, toy2d_tiny, x0, cond)
    assert "data" not in rec.calls  # no real data: the student's own samples only
    # the sampler is the frozen student (not the teacher); the policy is the student with A
    trained = rec.setup.net.denoiser
    assert torch.equal(outputs(trained, toy2d_tiny, frozen=True), role_output(toy2d_tiny, "student"))
    assert rec.setup.net.timesteps == GRID and type(rec.setup.kernel).__name__ == "X0Renoise"
    assert metrics["nfe_per_update"] == 8 and metrics["eval_split"] == "base"
    a = load_file(str(tmp_path / "run" / pso.ADAPTER_A))
    assert all(torch.equal(a[k], v) for k, v in trained.adapter_state().items())


@pytest.fixture
def adapter_run(tmp_path, toy2d_tiny):
    """A finished de-distill adapter run (3 updates) and its A."""
    cfg = pso.Config(variant="dedistill-adapter", steps=3, batch=8, lr=3e-3, eval_samples=8, eval_every=1000,
                     save_every=1000, out=str(tmp_path / "adapter-run"), progress=False)
    pso.train(cfg, toy2d_tiny)
    return tmp_path / "adapter-run", load_file(str(tmp_path / "adapter-run" / pso.ADAPTER_A))


def test_dedistill_trains_b_over_the_merged_adapter_and_delivers_the_student_with_b_only(adapter_run, rec, steps,
                                                                                        draws, tmp_path, toy2d_tiny):
    folder, a = adapter_run
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # A is not zero: a swap would show
    metrics, delivered = run(tmp_path, toy2d_tiny, variant="dedistill", dedistill_adapter=str(folder), steps=1,
                             batch=16)
    (args, kw, (x0, cond)), = rec.calls["data"]
    assert args[2:] == ("target",) or kw.get("split") == "target"
    check_plain_loss_on(rec, toy2d_tiny, x0, cond)
    # the policy is the student with A in its weights (B = 0 before the first step) ...
    tab = rec.table(frozen=False)
    student, student_a = toy2d_tiny.denoiser("student"), toy2d_tiny.denoiser("student")
    student_a.load_adapter_state(a)
    with torch.no_grad():
        with_a, without = (d(tab["x"], tab["t"], tab["cond"]) for d in (student_a, student))
    assert torch.allclose(tab["out"], with_a, atol=1e-5) and not torch.allclose(tab["out"], without, atol=1e-3)
    trained = rec.setup.net.denoiser  # merged: A stays when the adapter (B) is switched off
    assert torch.allclose(outputs(trained, toy2d_tiny, frozen=True), role_output(toy2d_tiny, "student", adapter=a),
                          atol=1e-5)
    # ... and the gradient goes into B only: the optimizer's parameters are the fresh LoRA's, none is A's
    (step,) = steps
    check_gradients(step, trained)
    b = trained.adapter_state()
    assert b.keys() == a.keys() and not any(torch.equal(b[k], a[k]) for k in a if "lora_B" in k)
    assert load_file(str(folder / pso.ADAPTER_A)).keys() == a.keys()
    assert all(torch.equal(load_file(str(folder / pso.ADAPTER_A))[k], a[k]) for k in a)  # A itself untouched
    # delivered: the student with B, without A; A's cost reported apart
    check_delivered_on_student(draws, delivered, b, toy2d_tiny, tmp_path / "run")
    assert not torch.allclose(outputs(delivered, toy2d_tiny),
                              role_output(toy2d_tiny, "student", adapter=b, merged=a), atol=1e-4)
    assert metrics["adapter_updates"] == 3 and metrics["adapter_nfe_per_update"] == 8
    assert metrics["adapter_nfe"] == 3 * 8 * 8 and metrics["adapter_run"] == str(folder)
    assert metrics["nfe_per_update"] == 4 and metrics["trained_role"] == "student"


def test_dedistill_without_an_adapter_folder_trains_a_first_into_its_own_folder(tmp_path, toy2d_tiny):
    metrics, delivered = run(tmp_path, toy2d_tiny, variant="dedistill", adapter_steps=2, adapter_lr=3e-3)
    a_run = tmp_path / "run" / "dedistill-adapter"
    cfg = json.loads((a_run / "config.json").read_text())
    assert cfg["variant"] == "dedistill-adapter" and cfg["steps"] == 2 and cfg["lr"] == 3e-3
    a = load_file(str(a_run / pso.ADAPTER_A))
    delivered_file = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert delivered_file.keys() == delivered.adapter_state().keys()
    assert not any(torch.equal(delivered_file[k], a[k]) for k in a if "lora_B" in k)  # the delivered LoRA is B
    assert metrics["adapter_updates"] == 2 and metrics["adapter_run"] == str(a_run)


# ----------------------------------------------------------------------------------------------- runs and the table
@pytest.mark.parametrize("variant, nfe", [("base-transfer", 4), ("dedistill", 4), ("dedistill-adapter", 8)])
def test_counted_nfe_is_the_stated_one(variant, nfe, tmp_path, toy2d_tiny):
    metrics, _ = run(tmp_path, toy2d_tiny, variant=variant, adapter_steps=1)
    with open(tmp_path / "run" / "log.csv") as f:
        import csv

        assert {float(r["nfe"]) for r in csv.DictReader(f)} == {nfe} == {metrics["nfe_per_update"]}


def test_python_pso_with_baselines_all_prints_one_summary_with_every_model_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEWSTEP_TOY_BUDGET", "tiny")
    argv = ["--steps", "1", "--batch", "4", "--eval-samples", "12", "--eval-every", "1000", "--no-progress",
            "--adapter-steps", "1", "--out", str(tmp_path / "run")]
    metrics = pso.main(argv + ["--baselines", "all"])
    out = capsys.readouterr().out
    assert out.count("model ") == 2  # one summary table and one read-out table, not one per run
    table = out[out.index("model "):out.index("NFE per update")].splitlines()[1:]
    labels = [line.split()[0] for line in table]
    assert labels == ["base", "naive", "base-transfer", "dedistill", "pso", "base_1step", "naive_1step",
                      "base-transfer_1step", "dedistill_1step", "pso_1step"]
    assert "tuned" not in out
    for name in ("naive", "base-transfer", "dedistill"):
        sub = json.loads((tmp_path / "run" / name / "metrics.json").read_text())
        assert sub["variant"] == name and metrics[f"quality_{name}"] == sub["quality_tuned"]
        assert metrics[f"transfer_{name}_1step"] == sub["transfer_tuned_1step"]
    assert metrics["adapter_updates_dedistill"] == 1
    readouts = pso.readouts(metrics)
    assert [line.split()[0] for line in readouts.splitlines()[1:]] == ["base", "naive", "base-transfer",
                                                                        "dedistill", "pso"]
    capsys.readouterr()
    pso.main(argv[:-1] + [str(tmp_path / "plain")])  # the default: naive and pso only, one table
    out = capsys.readouterr().out
    assert out.count("model ") == 2 and "naive " in out and "tuned" not in out and "base-transfer" not in out


@pytest.mark.parametrize("bad, message", [
    (dict(variant="base-transfer", train_full=True), "--train-full: expected a LoRA"),
    (dict(baselines="naive,distill"), "--baselines: expected a comma list"),
    (dict(variant="pso", dedistill_adapter="x"), "--dedistill-adapter: expected a de-distill adapter for"),
    (dict(variant="dedistill", dedistill_adapter="missing"), "--dedistill-adapter: expected a finished"),
    (dict(variant="dedistill", adapter_steps=0), "--adapter-steps: expected a finite number >= 1"),
])
def test_bad_baseline_options_fail_before_anything_is_written(bad, message, tmp_path, toy2d_tiny):
    with pytest.raises(harness.ConfigError, match=message):
        run(tmp_path, toy2d_tiny, **bad)
    assert not (tmp_path / "run").exists()


def test_an_adapter_folder_of_another_variant_is_refused(tmp_path, toy2d_tiny):
    run(tmp_path, toy2d_tiny, variant="naive", steps=1)
    (tmp_path / "run" / pso.ADAPTER_A).write_bytes(b"")
    with pytest.raises(harness.ConfigError, match="a --variant dedistill-adapter run of --model toy2d"):
        pso.train(pso.Config(variant="dedistill", dedistill_adapter=str(tmp_path / "run"), steps=1, batch=4,
                             eval_samples=8, out=str(tmp_path / "b"), progress=False), toy2d_tiny)


def test_summary_labels_and_orders_the_models_it_is_given():
    m = {"reward_base": 0.1, "reward_tuned": 0.3, "reward_naive": 0.2, "reward_x-y": 0.4, "reward_tuned_1step": 0.5}
    lines = harness.summary(m, names={"base": "base", "x-y": "x-y", "tuned": "pso"}).splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["base", "x-y", "pso", "pso_1step", "naive"]  # unnamed ones last
    assert [line.split()[0] for line in harness.summary(m).splitlines()[1:]] == [
        "base", "naive", "tuned", "tuned_1step", "x-y"]


def test_a_merged_adapter_of_any_rank_is_folded_into_the_frozen_weights_and_a_misfit_is_named(toy2d_tiny):
    lora = toy2d_tiny.denoiser("student", lora_rank=4)
    for p in lora.trainable_parameters():
        torch.nn.init.normal_(p, std=0.1)
    a = lora.adapter_state()
    merged = toy2d_tiny.denoiser("student", lora_rank=16, merged_adapter=a)
    assert torch.allclose(outputs(merged, toy2d_tiny, frozen=True), outputs(lora, toy2d_tiny), atol=1e-5)
    assert not torch.allclose(outputs(merged, toy2d_tiny, frozen=True), outputs(lora, toy2d_tiny, frozen=True),
                              atol=1e-3)
    assert all(v.shape[0] == 16 for k, v in merged.adapter_state().items() if "lora_A" in k)  # its own LoRA
    bad = {k.replace("fc1", "fc9"): v for k, v in a.items()}
    with pytest.raises(ValueError, match="the adapter to merge does not fit this network: .*missing key"):
        toy2d_tiny.denoiser("student", merged_adapter=bad)
