"""The experiment harness (harness.Run and the config helpers): crash-safe checkpoints, one resume rule, clear errors,
accumulation, the summary table. A stub world and stub models keep these independent of any method."""
import dataclasses
import errno
import json
import os
import re
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


KILL_POINTS = ("safetensors save", "torch.save", "os.fsync", "os.replace", "os.rename", "shutil.rmtree")


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

    monkeypatch.setattr(safetensors.torch, "save", wrap(safetensors.torch.save))
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


# ----------------------------------------------------------------------------------------------- data loss
def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and not p.name.startswith(".")}


def test_an_existing_run_is_replaced_only_with_overwrite_and_only_its_own_files(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2))
    train_steps(run, model, opt, 6)
    run.finish({"reward_base": 0.0, "reward_tuned": 1.0}, curves=[("loss", "loss")])
    (tmp_path / "notes.txt").write_text("mine")
    before = _files(tmp_path)
    with pytest.raises(harness.ConfigError, match=r"already holds a pso run .*checkpoint-6.*--resume.*--overwrite"):
        start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2))
    assert _files(tmp_path) == before
    run, model, opt, start = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=4, overwrite=True))
    assert start == 0 and not run._checkpoints() and run.read_log() == []
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "curves.png").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # not a run file: never deleted
    with pytest.raises(harness.ConfigError, match="--overwrite: expected not with --resume"):
        harness.Run("pso", Cfg(out=str(tmp_path), overwrite=True, resume=True))


def test_a_folder_that_is_not_a_run_or_is_another_methods_run_is_never_written(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    (tmp_path / "model" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    before = _files(tmp_path)
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(harness.ConfigError, match=r"mine is not empty and not a run folder.*data.csv"):
            harness.Run("pso", Cfg(out=str(tmp_path / "mine"), resume=resume, overwrite=overwrite))
        with pytest.raises(harness.ConfigError, match=r"config.json is not a run's .*model is not a run folder"):
            harness.Run("pso", Cfg(out=str(tmp_path / "model"), resume=resume, overwrite=overwrite))
    run, model, opt, _ = start_run(tmp_path / "pso", Cfg(out=str(tmp_path / "pso"), save_every=2))
    train_steps(run, model, opt, 2)
    before = _files(tmp_path)
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(harness.ConfigError, match="is a run of 'pso', not of 'sharpening'"):
            start_run(tmp_path / "pso", Cfg(out=str(tmp_path / "pso"), resume=resume, overwrite=overwrite),
                      method="sharpening")
    assert _files(tmp_path) == before


def test_a_sub_run_folder_does_not_make_its_parent_a_foreign_folder(tmp_path):
    """pso.py's experiment writes <out>/naive first: the main run then starts in a folder holding only that run."""
    start_run(tmp_path / "naive", Cfg(out=str(tmp_path / "naive")))
    run, model, opt, start = start_run(tmp_path, Cfg(out=str(tmp_path)))
    assert start == 0 and (tmp_path / "naive" / "config.json").exists()
    start_run(tmp_path, Cfg(out=str(tmp_path), overwrite=True))
    assert (tmp_path / "naive" / "config.json").exists()  # a sub-run is its own run, never one of the parent's files


def test_only_the_main_process_holds_the_lock_and_checks_the_folder_early(tmp_path, monkeypatch):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path)))
    train_steps(run, model, opt, 2)
    monkeypatch.setenv("RANK", "1")  # another rank may see the main process's new files: no early check there
    harness.Run("pso", Cfg(out=str(tmp_path)))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(harness.ConfigError, match="already holds a pso run"):
        harness.Run("pso", Cfg(out=str(tmp_path)))
    other = harness.Run("pso", Cfg(out=str(tmp_path / "b")))

    class Rank1:
        is_main_process, gradient_accumulation_steps, step = False, 1, 0

        def wait_for_everyone(self):
            pass

    world = StubWorld()
    world.accelerator = Rank1()
    other.start(world, {"student": StubModel()}, {})
    assert not (tmp_path / "b" / ".lock").exists() and str((tmp_path / "b").resolve()) not in harness._HELD
    assert str(tmp_path.resolve()) in harness._HELD  # the main process's run holds its folder


def test_every_rank_restores_the_checkpoint_onto_its_own_device_and_writes_nothing(tmp_path):
    """What a data-parallel resume needs of each process (the 2-process torchrun resume of tests/test_full_runs.py
    is in the slow suite): a rank that is not the main one loads the same model and optimizer state, onto its own
    device (a gloo rank's CPU is "cpu:0", which torch.load does not take), and writes nothing."""
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2))
    train_steps(run, model, opt, 2)
    saved, saved_opt = model.adapter_state(), opt.state_dict()["state"]
    before = _files(tmp_path)

    class Rank1:
        is_main_process, gradient_accumulation_steps, step, device = False, 1, 0, torch.device("cpu", 0)

        def wait_for_everyone(self):
            pass

    world = StubWorld()
    world.accelerator = Rank1()
    run = harness.Run("pso", Cfg(out=str(tmp_path), save_every=2, resume=True))
    run.configure(world)
    fresh = StubModel()
    fresh_opt = torch.optim.Adam(list(fresh.w.values()), lr=0.1)
    assert run.start(world, {"student": fresh}, {"student": fresh_opt}) == 2
    assert all(torch.equal(fresh.adapter_state()[k], v) for k, v in saved.items())
    assert all(torch.equal(fresh_opt.state_dict()["state"][i]["exp_avg"], saved_opt[i]["exp_avg"]) for i in saved_opt)
    assert _files(tmp_path) == before


# ----------------------------------------------------------------------------------------------- silent wrong
def test_state_json_is_hashed_and_its_step_checked_against_the_folder_name(tmp_path, capsys):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2))
    train_steps(run, model, opt, 4)
    state = tmp_path / "checkpoint-4" / "state.json"
    good = state.read_text()
    state.write_text(good.replace('"step": 4', '"step": 5'))  # one changed digit: would skip an update
    run, model, opt, start = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2, resume=True))
    assert start == 2 and "checkpoint-4/state.json is damaged: its sha256 differs" in capsys.readouterr().err
    train_steps(run, model, opt, 4)
    shutil.copy(tmp_path / "checkpoint-2" / "state.json", state)  # intact, but another update's
    with pytest.raises(harness.CheckpointError, match=r"is of update 2 of 'pso'; expected update 4 \(its folder"):
        shutil.rmtree(tmp_path / "checkpoint-2")
        start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2, resume=True))


@pytest.mark.parametrize("damage, message", [
    ("delete", "log.csv: it is missing"),
    ("edit", "log.csv: its 4 rows up to update 4 differ from the checkpoint's"),
    ("bytes", "training log .*log.csv is not UTF-8 text"),
])
def test_a_damaged_log_is_named_and_restored_from_the_checkpoint(tmp_path, capsys, damage, message):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2))
    train_steps(run, model, opt, 5)
    log = tmp_path / "log.csv"
    rows = [r["loss"] for r in run.read_log()]
    if damage == "delete":
        log.unlink()
    elif damage == "edit":
        log.write_text(log.read_text().replace(rows[1], "0.5", 1))
    else:
        log.write_bytes(log.read_bytes()[:40] + b"\xff\xfe" + log.read_bytes()[40:])
    run, model, opt, start = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2, resume=True))
    err = capsys.readouterr().err
    assert start == 4 and re.search(message, err) and "restored the 4 rows of" in err and "checkpoint-4" in err
    assert [r["loss"] for r in run.read_log()] == rows[:4]
    train_steps(run, model, opt, 6)
    assert [r["step"] for r in run.read_log()] == ["1", "2", "3", "4", "5", "6"]


def test_a_damaged_log_copy_in_the_checkpoint_is_caught_by_its_hash(tmp_path, capsys):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2))
    train_steps(run, model, opt, 4)
    copy = tmp_path / "checkpoint-4" / "log.csv"
    copy.write_text(copy.read_text().replace("\n4,", "\n5,"))
    run, model, opt, start = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2, resume=True))
    assert start == 2 and "checkpoint-4/log.csv is damaged" in capsys.readouterr().err


def test_resume_without_config_json_is_refused_and_nothing_is_written(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2))
    train_steps(run, model, opt, 4)
    (tmp_path / "config.json").unlink()
    before = _files(tmp_path)
    with pytest.raises(harness.ConfigError, match=r"--resume: .* has no config.json .*cannot be checked"):
        harness.Run("pso", Cfg(out=str(tmp_path), resume=True, beta=50.0))
    assert _files(tmp_path) == before


def test_a_tensor_of_another_dtype_in_a_checkpoint_is_refused(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path)))
    run.save_checkpoint(3)

    class Float64(StubModel):
        def adapter_state(self):
            return {k: v.double() for k, v in super().adapter_state().items()}

    run = harness.Run("pso", Cfg(out=str(tmp_path), resume=True))
    world = StubWorld()
    run.configure(world)
    with pytest.raises(harness.CheckpointError, match=r"other dtypes \['a.lora_A \(torch.float32, expected "
                                                      r"torch.float64\)'"):
        model = Float64()
        run.start(world, {"student": model}, {"student": torch.optim.Adam(list(model.w.values()))})


def test_an_exploding_loss_or_metric_stops_the_run_and_keeps_the_checkpoints(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2))
    row = {"reward": "", "nfe": 1, "seconds": 0.0}
    run.log({"step": 1, "loss": 3.0, **row})
    run.log({"step": 2, "loss": 2.0e6, **row})  # within 1e6 x its first value
    with pytest.raises(harness.NonFiniteLoss, match=r"loss 3e\+30 at update 3 .*beyond its bound 3e\+06.*"
                                                     r"checkpoint-2\) is kept"):
        run.log({"step": 3, "loss": 3e30, **row})
    with pytest.raises(harness.NonFiniteLoss, match=r"non-finite reward \(nan\) at update 3"):
        run.log({"step": 3, "loss": 1.0, **{**row, "reward": float("nan")}})
    assert [r["step"] for r in run.read_log()] == ["1", "2"]
    assert [p.name for p in run._checkpoints()] == ["checkpoint-2"]
    # a resumed run takes the first value from the restored log: the same bound
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2, resume=True))
    with pytest.raises(harness.NonFiniteLoss, match=r"beyond its bound 3e\+06"):
        run.log({"step": 3, "loss": 4e6, **row})
    # a method may state its own bound
    run = harness.Run("pso", Cfg(out=str(tmp_path / "b")), bounds={"loss": 10.0})
    world = StubWorld()
    run.configure(world)
    run.start(world, {"student": StubModel()}, {})
    run.log({"step": 1, "loss": 9.0, **row})
    with pytest.raises(harness.NonFiniteLoss, match=r"loss 11 at update 2 is beyond its bound 10 \(the method's\)"):
        run.log({"step": 2, "loss": 11.0, **row})


def test_an_eval_metric_that_explodes_or_a_non_finite_final_metric_stops_the_run(tmp_path):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=1, steps=3))
    row = {"loss": 1.0, "reward": "", "nfe": 1, "seconds": 0.0}
    run.log({"step": 1, **row, "eval_reward": 0.2})
    with pytest.raises(harness.NonFiniteLoss, match=r"eval_reward 5e\+07 at update 2"):
        run.log({"step": 2, **row, "eval_reward": 5e7})
    with pytest.raises(harness.NonFiniteLoss, match=r"final metric reward_tuned = nan \(base model: 0.2\).*metrics."
                                                     r"json was not written.*checkpoint-1\) is kept"):
        run.finish({"reward_base": 0.2, "reward_tuned": float("nan"), "distance_base": float("nan"),
                    "distance_tuned": float("nan")})
    assert not (tmp_path / "metrics.json").exists()
    run.finish({"reward_base": 0.2, "reward_tuned": 0.3, "distance_base": float("nan"), "distance_tuned": 1.0})
    assert (tmp_path / "metrics.json").exists()  # a metric the base model has no finite value of is not checked


# ----------------------------------------------------------------------------------------------- unclear errors
class _FullDisk:
    """open() of a disk that is full: writing more than `room` bytes raises OSError(ENOSPC) without a file name."""

    def __init__(self, room=0):
        self.room = room

    def __call__(self, file, mode="r", *a, **kw):
        f = open(file, mode, *a, **kw)
        if "w" not in mode and "a" not in mode:
            return f
        disk, real = self, f.write

        def write(data):
            disk.room -= len(data)
            if disk.room < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(data)

        f.write = write
        return f


@pytest.mark.parametrize("room", [0, 100, 1000])  # in the model file, in torch.save
def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_file_and_the_old_checkpoint_stays(tmp_path, room,
                                                                                                  monkeypatch, capsys):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2))
    train_steps(run, model, opt, 2)
    monkeypatch.setattr(harness, "open", _FullDisk(room), raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        harness.run_cli(lambda: run.save_checkpoint(4))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "enforce fail" not in err
    assert re.fullmatch(r"error: \S+/\.tmp-checkpoint-4-\w+/(model-student.safetensors|optimizer-student.pt|log.csv):"
                        r" No space left on device \(free some space or write elsewhere; every file written before is"
                        r" intact\)", err), err
    monkeypatch.undo()
    assert [p.name for p in run._checkpoints()] == ["checkpoint-2"] and not list(tmp_path.glob(".*tmp*"))
    run, model, opt, start = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=2, resume=True))
    assert start == 2


def test_a_full_disk_or_a_read_only_file_while_logging_names_log_csv(tmp_path, monkeypatch, capsys):
    run, model, opt, _ = start_run(tmp_path, Cfg(out=str(tmp_path), save_every=10, progress=False))
    monkeypatch.setattr(harness, "open", _FullDisk(0), raising=False)
    with pytest.raises(SystemExit):
        harness.run_cli(lambda: train_steps(run, model, opt, 1))
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'log.csv'}: No space left on device")

    def read_only(file, *a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))

    monkeypatch.setattr(harness, "open", read_only, raising=False)
    with pytest.raises(SystemExit):
        harness.run_cli(lambda: train_steps(run, model, opt, 1))
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'log.csv'}: Read-only file system (a read-only "
                                                "file system; every file written before is intact)")


def test_seed_and_an_unwritable_toy_cache_are_user_errors(tmp_path, capsys):
    import toy

    with pytest.raises(harness.ConfigError, match=r"--seed: expected an integer in 0 .. 4294967295, got -1"):
        harness.Run("pso", Cfg(out=str(tmp_path), seed=-1))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        harness.run_cli(lambda: toy.load_world("toy2d", cache=tmp_path / "file" / "cache", budget="tiny"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: base-model cache folder") and "FEWSTEP_CACHE" in err
    assert len(err.splitlines()) == 1


def test_bounded_argparse_types_name_the_flag(capsys):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=harness.bounded(int, 0))
    assert p.parse_args(["--limit", "3"]).limit == 3
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(SystemExit):
            p.parse_args(["--limit", bad])
        assert capsys.readouterr().err.strip().endswith(f"argument --limit: expected an integer >= 0, got '{bad}'")


# ----------------------------------------------------------------------------------------------- figures
def test_curves_draw_the_base_models_value_as_a_labelled_reference_line(tmp_path, monkeypatch):
    import matplotlib.axes

    lines = []
    real = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y=0, *a, **kw: lines.append((self.get_title(), y, kw.get("label"))) or
                        real(self, y, *a, **kw))
    rows = [{"step": "1", "loss": "1.0", "eval_reward": "0.5", "reward": ""},
            {"step": "2", "loss": "0.5", "eval_reward": "0.4", "reward": "0.3"}]
    harness.plot_curves(rows, tmp_path / "c.png", [("loss", "loss"), ("eval_reward", "reward (eval)"),
                                                   ("reward", "reward")], {"reward_base": 0.45, "reward_tuned": 0.4})
    assert lines == [("reward (eval)", 0.45, "base model (0.45)"), ("reward", 0.45, "base model (0.45)")]
    assert (tmp_path / "c.png").stat().st_size > 0
