"""Issue 24's fault categories end to end, in child processes where the fault is a process's (Ctrl-C, a second
writer, a killed holder of the lock, a bad input at an entry point): each ends with a clear message naming the
problem, nothing saved is lost. The harness-level cases (folder rule, integrity, bounds, disk full) are in
tests/test_harness.py. Also the commands over saved runs: `python -m harness compare` and `replot`."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import harness
import pso

ROOT = Path(__file__).resolve().parents[1]
STUB = str(ROOT / "tests" / "stub_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FEWSTEP_TOY_BUDGET": "tiny"}


def _default_sigint() -> None:
    """In the child before exec: SIGINT at its default and unblocked, whatever the test process inherited (a child
    started with SIGINT ignored or blocked never sees the Ctrl-C the test sends)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def _interrupted(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """Ctrl-C to `proc`; its stderr once it has exited (killed, with what it printed, if it does not)."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"no exit {timeout:g} s after Ctrl-C; stderr: {proc.communicate()[1][-3000:]}") from None


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.05)


def test_ctrl_c_says_what_was_saved_and_the_resume_command_continues_the_run(tmp_path):
    out = tmp_path / "run"
    cmd = [STUB, "--out", str(out), "--save-every", "3", "--no-progress"]
    p = subprocess.Popen([sys.executable, *cmd], stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
                         preexec_fn=_default_sigint)
    _wait_for(out / "checkpoint-3", p)
    err = _interrupted(p)
    assert p.returncode == 130 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    m = re.fullmatch(rf"interrupted: {re.escape(str(out))} keeps checkpoint-(\d+) \(update (\d+) of 1000; it was at "
                     rf"update (\d+)\)\. Continue with: (.*)", line)
    assert m and m[1] == m[2] and int(m[3]) >= int(m[2]) >= 3, line
    assert m[4] == shlex.join(["python", *cmd, "--resume"])
    # the printed command continues from that checkpoint
    again = subprocess.Popen([sys.executable, *shlex.split(m[4])[1:]], stderr=subprocess.PIPE, text=True, env=ENV,
                             cwd=tmp_path, preexec_fn=_default_sigint)
    _wait_for(out / f"checkpoint-{int(m[1]) + 3}", again)
    err = _interrupted(again)
    assert again.returncode == 130 and f"resumed {out} from checkpoint-{m[1]} (update {m[1]})" in err, err


@pytest.mark.slow
def test_ctrl_c_in_pso_py_names_the_naive_runs_checkpoint_and_the_command_resumes_the_experiment(tmp_path):
    """The same through a method script (the stub test above covers the wiring fast): pso.py trains the naive
    baseline first, into <out>/naive."""
    out = tmp_path / "run"
    cmd = [str(ROOT / "pso.py"), "--out", str(out), "--steps", "100000", "--save-every", "2", "--eval-every", "1000",
           "--no-progress"]
    p = subprocess.Popen([sys.executable, *cmd], stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
                         preexec_fn=_default_sigint)
    _wait_for(out / "naive" / "checkpoint-4", p, timeout=300)
    err = _interrupted(p)
    line = err.strip().splitlines()[-1]
    assert p.returncode == 130 and "Traceback" not in err, err
    assert re.fullmatch(rf"interrupted: {re.escape(str(out / 'naive'))} keeps checkpoint-\d+ \(update \d+ of 100000; it "
                        rf"was at update \d+\)\. Continue with: python {re.escape(shlex.join(cmd))} --resume", line), line


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork for a second process")
def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    """The holder is a forked process running the stub run of tests/stub_run.py in it (no new interpreter)."""
    import stub_run

    out = tmp_path / "run"
    argv = ["--out", str(out), "--save-every", "2", "--no-progress"]
    ready, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: starts the run (taking the lock), says so, then waits to be killed
        try:
            real = harness.Run.updates

            def hold(self):
                os.write(ready[1], b"x")
                os.read(go[0], 1)
                yield from real(self)

            harness.Run.updates = hold
            stub_run.main(argv)
        finally:
            os._exit(0)
    try:
        os.close(ready[1])
        assert os.read(ready[0], 1) == b"x"
        for flags in (["--overwrite"], ["--resume"], []):
            with pytest.raises(harness.ConfigError, match=rf"--out {re.escape(str(out))} is in use: process {pid} on "
                                                          rf".* \(.*\) holds {re.escape(str(out / '.lock'))}"):
                stub_run.main(argv + flags + ["--steps", "1", "--sleep", "0"])
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    capsys.readouterr()
    stub_run.main(argv + ["--resume", "--steps", "2", "--sleep", "0"])
    assert f"took over {out / '.lock'}: process {pid}" in capsys.readouterr().err
    assert [r["step"] for r in harness.read_log(out / "log.csv")] == ["1", "2"]


def _main(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """`python -m module argv...` in this process: the module's __main__ block; its exit status, stdout, stderr."""
    import runpy
    import warnings

    sys.argv, code = [module, *argv], 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    return code, *capsys.readouterr()


def test_every_entry_point_ends_a_bad_input_with_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """Each entry point's __main__ block, run as `python -m` runs it (the method scripts:
    tests/test_harness.py::test_the_command_line_ends_a_bad_input_with_its_message_not_a_traceback)."""
    monkeypatch.setattr(sys, "argv", sys.argv)  # restored afterwards
    monkeypatch.setenv("PATH", str(tmp_path))  # the launcher finds no torchrun there
    missing = str(tmp_path / "missing.json")
    cases = {
        ("full.evaluate", "--model", missing): f"error: model spec file '{missing}' does not exist",
        ("full.prepare_data", "check", missing): f"error: model spec file '{missing}' does not exist",
        ("full.bench", "pso-online-dmd2", "--model", missing): f"error: model spec file '{missing}' does not exist",
        ("full.launch", "pso-online-dmd2", "--launcher", "torchrun"): "error: torchrun: No such file or directory",
        ("toy", "--seed", "-1"): "error: --seed: expected an integer in 0 .. 4294967295, got -1",
        ("harness", "compare", str(tmp_path / "nothing")): f"error: run folder {tmp_path / 'nothing'} does not exist",
        ("full.prepare_data", "prompts", str(tmp_path / "p.txt"), "--dataset", "x", "--limit", "-1"):
            "error: argument --limit: expected an integer >= 0, got '-1'",
    }
    for (module, *argv), expected in cases.items():
        code, _, err = _main(module, argv, capsys)
        assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].endswith(expected), (module, err)
    assert not (tmp_path / "p.txt").exists()  # nothing written


def test_an_exploding_finite_loss_stops_a_method_and_keeps_its_checkpoints(tmp_path, toy2d_tiny, monkeypatch):
    real, calls = pso.pso_loss, []

    def explode_on_third(*a, **k):
        loss, margin = real(*a, **k)
        calls.append(1)
        return (loss * 1e30 if len(calls) >= 3 else loss), margin

    monkeypatch.setattr(pso, "pso_loss", explode_on_third)
    cfg = pso.Config(steps=5, batch=8, eval_samples=32, eval_every=1000, save_every=2, naive_baseline=False,
                     out=str(tmp_path / "run"), progress=False)
    with pytest.raises(harness.NonFiniteLoss, match=r"loss \S+e\+\d\d at update 3 .*beyond its bound .*diverged.*"
                                                     r"checkpoint-2\) is kept"):
        pso.train(cfg, toy2d_tiny)
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert [r["step"] for r in harness.read_log(tmp_path / "run" / "log.csv")] == ["1", "2"]


def test_prepare_data_leaves_no_partial_file_when_its_source_fails_midway(tmp_path, monkeypatch):
    from full import prepare_data

    class Broken:
        column_names = ["caption"]

        def select_columns(self, columns):
            return self

        def iter(self, batch_size):
            yield {"caption": ["a red cube", "a blue sphere"]}
            raise ConnectionError("the stream broke")

    monkeypatch.setattr(prepare_data, "_load", lambda a: Broken())
    with pytest.raises(ConnectionError):
        prepare_data.main(["prompts", str(tmp_path / "p.txt"), "--dataset", "x"])
    assert list(tmp_path.iterdir()) == []


def test_the_benchmarks_replace_the_runs_they_measure_again(tmp_path, monkeypatch):
    """report.py and full.bench run the methods into their own run folders, which a second measurement replaces:
    they pass --overwrite (the harness then replaces only a run's own files)."""
    from full import bench, launch

    sys.path.append(str(ROOT / "benchmarks"))
    import report

    seen = []

    class Stop(Exception):
        pass

    def stop(*args, **kw):
        seen.append(next((a for a in reversed(args) if isinstance(a, list)), args[0]))  # the argument list
        raise Stop

    monkeypatch.setattr(report.subprocess, "Popen", stop)
    with pytest.raises(Stop):
        report.run_one(["pso.py", "--out", str(tmp_path / "run")], tmp_path / "run", 1, {})
    monkeypatch.setattr(launch, "method_argv", stop)
    with pytest.raises(Stop):
        bench.bench("pso-online-dmd2", None, 2, None, {}, tmp_path)
    assert len(seen) == 2 and all("--overwrite" in argv for argv in seen), seen


# ----------------------------------------------------------------------------------------------- compare, replot
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, toy2d_tiny):
    root = tmp_path_factory.mktemp("runs")
    for name, variant in (("pso", "pso"), ("online", "online")):
        pso.train(pso.Config(variant=variant, steps=3, batch=8, eval_samples=32, eval_every=1, naive_baseline=False,
                             out=str(root / name), progress=False), toy2d_tiny)
    return root / "pso", root / "online"


def test_replot_draws_the_same_figures_from_the_saved_run(two_runs, toy2d_tiny, monkeypatch, tmp_path):
    run = two_runs[0]
    before = {f: (run / f).read_bytes() for f in ("samples.png", "curves.png")}
    monkeypatch.setattr(harness, "load_world", lambda model: toy2d_tiny)
    harness.main(["replot", str(run), "--out", str(tmp_path / "again")])  # python -m harness replot RUN --out DIR
    assert {f: (tmp_path / "again" / f).read_bytes() for f in before} == before
    (run / "samples.png").unlink()
    harness.replot(run)  # into the run folder itself, under its lock
    assert (run / "samples.png").read_bytes() == before["samples.png"] and str(run.resolve()) not in harness._HELD


def test_replot_of_a_run_without_figure_data_draws_its_curves_and_says_why_no_samples(two_runs, tmp_path, capsys):
    run = tmp_path / "old"
    run.mkdir()
    for f in ("config.json", "log.csv", "metrics.json"):
        (run / f).write_bytes((two_runs[0] / f).read_bytes())
    assert [p.name for p in harness.replot(run)] == ["curves.png"]
    assert "no samples.png: " in capsys.readouterr().out


def test_compare_tables_the_metrics_and_overlays_the_curves(two_runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp.png"
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, stdout, _ = _main("harness", ["compare", *map(str, two_runs), "--out", str(out)], capsys)  # python -m
    lines = stdout.splitlines()
    assert code == 0
    assert lines[0].split() == ["metric", "pso", "online"] and lines[-1] == f"wrote {out}"
    metrics = [json.loads((r / "metrics.json").read_text()) for r in two_runs]
    row = next(ln for ln in lines if ln.startswith("reward_tuned ")).split()
    assert row[1:] == [f"{m['reward_tuned']:.4g}" for m in metrics]
    assert next(ln for ln in lines if ln.startswith("variant ")).split()[1:] == ["pso", "online"]
    assert out.stat().st_size > 0


def test_figure_data_keeps_the_rows_a_figure_shows(tmp_path):
    panels = {"a": (torch.randn(1000, 2), torch.randint(0, 3, (1000,))),
              "b": (torch.randn(50, 4, 128, 128), {"ids": torch.arange(50), "emb": torch.randn(50, 77, 8)}),
              "c": (torch.randn(5, 4), None)}
    harness.save_figure_data(tmp_path / "f.safetensors", panels, [("loss", "the loss")], "target")
    loaded, curves, marks = harness.load_figure_data(tmp_path / "f.safetensors")
    assert curves == [("loss", "the loss")] and list(loaded) == ["a", "b", "c"] and marks == "target"
    assert torch.equal(loaded["a"][0], panels["a"][0]) and torch.equal(loaded["a"][1], panels["a"][1])
    assert len(loaded["b"][0]) == 8 and torch.equal(loaded["b"][1]["emb"], panels["b"][1]["emb"][:8])  # 256 KiB a row
    assert loaded["c"][1] is None and torch.equal(loaded["c"][0], panels["c"][0])
