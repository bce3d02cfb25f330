"""The experiment harness (harness.Run and the config helpers): crash-safe checkpoints, one resume rule, clear errors,
accumulation, the summary table. A stub world and stub models keep these independent of any method."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

import harness


@dataclasses.dataclass
class Cfg(harness.RunConfig):
    model: str = harness.arg("toy2d", "world")
    variant: str = harness.arg("pso", "variant", choices=["pso", "online"])
    steps: int = harness.arg(6, "updates")
    beta: float = harness.arg(5.0, "DPO beta")
    lr: float = harness.arg(1e-3, "learning rate")


class StubModel:
    """A Denoiser's checkpoint side: a dict of tensors."""

    def __init__(self, value=0.0, keys=("a.lora_A", "a.lora_B")):
        self.w = {k: torch.nn.Parameter(torch.full((2, 3), float(value))) for k in keys}
        self.module = None

    def adapter_state(self):
        return {k: v.detach().clone() for k, v in self.w.items()}

    def load_adapter_state(self, state):
        with torch.no_grad():
            for k, v in state.items():
                self.w[k].copy_(v)


class StubWorld:
    def __init__(self, defaults=None):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=True)
        self._defaults = defaults
        self.plotted = []

    def plot_samples(self, panels, path, marks=None):
        self.plotted.append(path)
        open(path, "wb").write(b"png")

    def save_adapter(self, den, path):
        os.makedirs(path, exist_ok=True)


def start_run(out, cfg=None, value=0.0, method="pso", keys=("a.lora_A", "a.lora_B")):
    cfg = cfg or Cfg(out=str(out))
    run = harness.Run(method, cfg)
    world = StubWorld()
    cfg = run.configure(world)
    model = StubModel(value, keys)
    opt = torch.optim.Adam(list(model.w.values()), lr=0.1)
    start = run.start(world, {"student": model}, {"student": opt})
    return run, model, opt, start


def train_steps(run, model, opt, upto):
    for step in run.updates():
        if step > upto:
            break
        loss = sum((p - step) .pow(2).sum() for p in model.w.values())
        run.optimizer_step(loss, opt, list(model.w.values()))
        run.log({"step": step, "loss": float(loss), "reward": "", "nfe": 1, "seconds": 0.0})


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    run, model, opt, _ = start_run(tmp_path / "a", Cfg(out=str(tmp_path / "a"), save_every=2))
    train_steps(run, model, opt, 6)
    straight = model.adapter_state()
    run, model, opt, _ = start_run(tmp_path / "b", Cfg(out=str(tmp_path / "b"), save_every=2))
    train_steps(run, model, opt, 3)  # killed after update 3: the checkpoint is at 2, log.csv has 3 rows
    run, model, opt, start = start_run(tmp_path / "b", Cfg(out=str(tmp_path / "b"), save_every=2, resume=True))
    assert start == 2
    train_steps(run, model, opt, 6)
    assert all(torch.equal(straight[k], v) for k, v in model.adapter_state().items())
    assert [r["step"] for r in run.read_log()] == ["1", "2", "3", "4", "5", "6"]  # no duplicated rows
    assert [p.name for p in run._checkpoints()] == ["checkpoint-6", "checkpoint-4"]  # keep_checkpoints = 2


def test_resume_without_a_checkpoint_starts_clean_without_duplicate_rows(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=100))
    train_steps(run, model, opt, 2)  # killed before any checkpoint
    run, model, opt, start = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=100, resume=True))
    assert start == 0 and run.read_log() == []
    train_steps(run, model, opt, 3)
    assert [r["step"] for r in run.read_log()] == ["1", "2", "3"]


KILL_POINTS = ("save_file", "torch.save", "os.fsync", "os.replace", "os.rename", "shutil.rmtree")


def _kill_at(monkeypatch, n):
    """Make the n-th call of any file-system operation a checkpoint write makes end the process at once (kill -9)."""
    calls = [0]

    def wrap(fn):
        def killer(*a, **k):
            calls[0] += 1
            if calls[0] == n:
                os._exit(9)
            return fn(*a, **k)
        return killer

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", wrap(safetensors.torch.save_file))
    monkeypatch.setattr(harness.torch, "save", wrap(torch.save))
    for name in ("fsync", "replace", "rename"):
        monkeypatch.setattr(harness.os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(harness.shutil, "rmtree", wrap(shutil.rmtree))
    return calls


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer mid-save")
def test_a_kill_at_any_instant_of_a_checkpoint_write_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    """Save update 2 (value 1), then kill the process at the n-th file operation of saving update 4 (value 2), for
    every n: a resumed run always finds a complete checkpoint, the old or the new one, never a partial one."""
    outcomes = set()
    for n in range(1, 40):
        out = tmp_path / f"k{n}"
        run, model, opt, _ = start_run(out, Cfg(out=str(out), keep_checkpoints=1))
        run.save_checkpoint(2)
        pid = os.fork()
        if pid == 0:  # the writer, killed mid-save
            model.load_adapter_state({k: torch.full((2, 3), 2.0) for k in model.w})
            _kill_at(monkeypatch, n)
            run.save_checkpoint(4)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        run, model, opt, start = start_run(out, Cfg(out=str(out), resume=True, keep_checkpoints=1))
        value = float(model.w["a.lora_A"][0, 0])
        assert (start, value) in {(2, 0.0), (4, 2.0)}, (n, start, value)
        assert not list(out.glob(".tmp-checkpoint-*"))  # stale temp folders are removed
        outcomes.add((start, os.WEXITSTATUS(status)))
        if os.WEXITSTATUS(status) == 0:  # n is past the last file operation: every instant was covered
            break
    assert {s for s, _ in outcomes} == {2, 4} and (4, 0) in outcomes  # killed before and after the swap


def test_a_flipped_byte_falls_back_to_the_previous_checkpoint_or_is_an_error(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2))
    train_steps(run, model, opt, 4)
    f = tmp_path / "checkpoint-4" / "model-student.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))
    run, model, opt, start = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2, resume=True))
    assert start == 2  # the damaged newest checkpoint is skipped, with a message
    shutil.rmtree(tmp_path / "checkpoint-2")
    with pytest.raises(harness.CheckpointError, match="model-student.safetensors is damaged"):
        start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2, resume=True))


def test_checkpoint_keys_are_checked_both_ways(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path)))
    run.save_checkpoint(3)
    with pytest.raises(harness.CheckpointError, match=r"missing keys \['b.lora_A'\]"):
        start_run(tmp_path, Cfg(out=str(tmp_path), resume=True), keys=("a.lora_A", "a.lora_B", "b.lora_A"))
    with pytest.raises(harness.CheckpointError, match=r"unexpected keys \['a.lora_B'\]"):
        start_run(tmp_path, Cfg(out=str(tmp_path), resume=True), keys=("a.lora_A",))


def test_resume_of_another_method_or_changed_settings_is_refused_before_anything_is_written(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path)))
    train_steps(run, model, opt, 6)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*") if p.is_file()}
    with pytest.raises(harness.ConfigError, match="is a run of 'pso', not of 'sharpening'"):
        harness.Run("sharpening", Cfg(out=str(tmp_path), resume=True))
    run = harness.Run("pso", Cfg(out=str(tmp_path), resume=True, beta=50.0))
    with pytest.raises(harness.ConfigError, match="--beta saved 5.0, now 50.0"):
        run.configure(StubWorld())
    with pytest.raises(harness.ConfigError, match="expected --steps >= 6"):
        start_run(tmp_path, Cfg(out=str(tmp_path), resume=True, steps=4))
    after = {p.name: p.read_bytes() for p in tmp_path.glob("*") if p.is_file()}
    assert after == before
    # a changed --steps is a longer run of the same experiment
    run, model, opt, start = start_run(tmp_path, Cfg(out=str(tmp_path), resume=True, steps=8))
    assert start == 6


def test_bad_run_folders_and_configs_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(harness.ConfigError, match="is a file"):
        harness.Run("pso", Cfg(out=str(tmp_path / "file")))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text('{"method": "pso", "be')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON.*truncated"):
        harness.Run("pso", Cfg(out=str(tmp_path / "r"), resume=True))
    (tmp_path / "r" / "config.json").write_text("")
    with pytest.raises(ValueError, match="config.json is empty"):
        harness.Run("pso", Cfg(out=str(tmp_path / "r"), resume=True))
    with pytest.raises(harness.ConfigError, match="--keep-checkpoints: expected a finite number >= 1, got 0"):
        harness.Run("pso", Cfg(out=str(tmp_path / "s"), keep_checkpoints=0))


def test_check_range_names_the_flag_and_rejects_non_finite_values():
    harness.check_range(Cfg(lr=1e-3), "lr", 0, 1, lo_open=True)
    for bad in (0.0, 1e39, float("nan"), float("inf")):
        with pytest.raises(harness.ConfigError, match=r"--lr: expected a finite number > 0 and <= 1, got"):
            harness.check_range(Cfg(lr=bad), "lr", 0, 1, lo_open=True)


def test_non_finite_loss_message_says_what_is_kept(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path)))
    with pytest.raises(harness.NonFiniteLoss, match="no checkpoint was written yet"):
        run.check_finite(torch.tensor(float("nan")), 1)
    run.save_checkpoint(1)
    with pytest.raises(harness.NonFiniteLoss, match=r"checkpoint-1\) is kept.*another --out"):
        run.check_finite(torch.tensor(float("inf")), 2)
    run.check_finite(torch.tensor(0.5), 2)


def test_log_drops_a_row_cut_short_by_a_kill(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2))
    train_steps(run, model, opt, 2)
    with open(tmp_path / "log.csv", "a") as f:
        f.write("3,0.12")  # the kill came mid-row
    run, model, opt, start = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2, resume=True))
    assert [r["step"] for r in run.read_log()] == ["1", "2"]
    train_steps(run, model, opt, 3)
    assert [r["step"] for r in run.read_log()] == ["1", "2", "3"]


def test_gradient_accumulation_of_k_micro_batches_equals_one_step_on_k_times_the_batch(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8)

    def fit(k):
        w = torch.nn.Parameter(torch.zeros(3))
        cfg = Cfg(out=str(tmp_path / f"acc{k}"), gradient_accumulation_steps=k, steps=3)
        run = harness.Run("pso", cfg)
        world = StubWorld()
        world.accelerator.gradient_state._set_sync_gradients(True)
        model = StubModel()
        opt = world.accelerator.prepare(torch.optim.SGD([w], lr=0.1))
        run.start(world, {"m": model}, {"m": opt})
        for _ in run.updates():
            for rows in torch.arange(8).chunk(k):
                with run.accumulate():
                    loss = ((x[rows] @ w - y[rows]) ** 2).mean()
                    run.optimizer_step(loss, opt, [w], max_norm=10.0)
        return w.detach()

    one = fit(1)
    assert torch.allclose(fit(4), one, atol=1e-6) and torch.allclose(fit(2), one, atol=1e-6)
    assert not torch.allclose(one, torch.zeros(3))


def test_backend_defaults_fill_only_the_options_the_user_did_not_set():
    class World:
        def method_defaults(self, method, variant):
            return {"lr": 1e-5, "beta": 50.0}

    cfg = harness.parse_config(Cfg, ["--beta", "2"])
    assert harness.explicit_fields(cfg) == {"beta"}
    new, used = harness.apply_world_defaults(cfg, World(), "pso")
    assert used == {"lr": 1e-5} and new.beta == 2.0 and new.lr == 1e-5
    assert harness.apply_world_defaults(Cfg(), World(), "pso")[1] == {}  # a config built in code: all explicit


def test_summary_table_lists_every_scored_model_and_the_run_files(tmp_path):
    (tmp_path / "samples.png").write_bytes(b"x")
    text = harness.summary({"reward_base": 0.1, "quality_base": 0.9, "distance_base": 0.2, "reward_tuned": 0.5,
                           "quality_tuned": 0.8, "distance_tuned": 0.1, "quality_tuned_1step": 0.7,
                           "quality_tuned_on_base_split": 0.3, "nfe_per_update": 12, "seconds": 3.5,
                           "seconds_per_update": 0.01}, tmp_path)
    lines = text.splitlines()
    assert lines[0].split() == ["model", "reward", "quality", "distance"]
    assert [ln.split()[0] for ln in lines[1:-1]] == ["base", "tuned", "tuned_1step"]
    assert "NFE per update 12" in lines[-1] and "samples.png" in lines[-1] and str(tmp_path) in lines[-1]


def test_run_finish_writes_metrics_figures_and_closes(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), steps=2))
    train_steps(run, model, opt, 2)
    m = run.finish({"reward_base": 0.0, "reward_tuned": 1.0}, {"p": (None, None)}, [("loss", "loss")], model)
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    assert (tmp_path / "curves.png").exists() and (tmp_path / "samples.png").exists()
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "pso"


def test_tensorboard_tracker_gets_the_rows(tmp_path):
    pytest.importorskip("tensorboard")
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), steps=2, report_to="tensorboard"))
    train_steps(run, model, opt, 2)
    run.finish({"reward_tuned": 1.0})
    assert list((tmp_path / "trackers").rglob("events.out.tfevents.*"))


def test_the_command_line_ends_a_bad_input_with_its_message_not_a_traceback(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script in ("pso.py", "sharpening.py", "diff_instruct_pp.py"):
        p = subprocess.run([sys.executable, os.path.join(root, script), "--lr", "1e39", "--out", str(tmp_path / "r")],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 2 and "Traceback" not in p.stderr, (script, p.stderr)
        assert p.stderr.strip().splitlines()[-1] == "error: --lr: expected a finite number > 0 and <= 1, got 1e+39"
