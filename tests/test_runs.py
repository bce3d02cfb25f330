"""Run-directory plumbing of DESIGN.md section 9: config parsing, atomic checkpoints, NaN stop."""
import dataclasses
import json

import pytest
import torch

import common


@dataclasses.dataclass
class Cfg:
    model: str = common.arg("toy2d", "world")
    steps: int = common.arg(10, "updates")
    beta: float = common.arg(5.0, "DPO beta")
    resume: bool = common.arg(False, "resume")
    variant: str = common.arg("pso", "variant", choices=["pso", "online"])


def test_parse_config_from_dataclass():
    cfg = common.parse_config(Cfg, ["--steps", "3", "--beta", "50", "--resume", "--variant", "online"])
    assert cfg == Cfg(steps=3, beta=50.0, resume=True, variant="online")
    assert common.parse_config(Cfg, []) == Cfg()
    with pytest.raises(SystemExit):
        common.parse_config(Cfg, ["--variant", "offline-ish"])


def test_checkpoint_round_trip_and_fresh_runs_start_clean(tmp_path):
    run = common.RunDir(tmp_path / "r", Cfg())
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([w], lr=0.1)
    w.sum().backward()
    opt.step()
    run.save_checkpoint(7, {"w": w}, opt, {"note": "x"})
    run.log({"step": 7, "loss": 0.5, "reward": 1.0, "nfe": 4, "seconds": 0.1})
    run.log({"step": 8, "loss": 0.4, "reward": 1.1, "nfe": 4, "seconds": 0.2})
    opt2 = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    step, tensors, extra = common.RunDir(tmp_path / "r", Cfg(), resume=True).load_checkpoint(opt2)
    assert step == 7 and torch.equal(tensors["w"], w.detach()) and extra == {"note": "x"}
    assert opt2.state_dict()["state"][0]["step"] == 1
    run.truncate_log(7)
    assert [r["step"] for r in run.read_log()] == ["7"]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["steps"] == 10
    fresh = common.RunDir(tmp_path / "r", Cfg())  # not resuming: old checkpoint and log are gone
    assert fresh.load_checkpoint() == (0, None, {}) and fresh.read_log() == []


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = common.RunDir(tmp_path, Cfg())
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    run.save_checkpoint(1, {"w": w}, opt)
    monkeypatch.setattr(common.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        run.save_checkpoint(2, {"w": w * 2}, opt)
    step, tensors, _ = run.load_checkpoint()
    assert step == 1 and torch.equal(tensors["w"], torch.ones(2))


def test_non_finite_loss_stops_with_a_message(tmp_path):
    run = common.RunDir(tmp_path, Cfg())
    common.check_finite(torch.tensor(0.3), 5, run)
    with pytest.raises(common.NonFiniteLoss, match="update 5.*last good checkpoint"):
        common.check_finite(torch.tensor(float("nan")), 5, run)


def test_main_job_writes_samples_and_metrics(tmp_path, monkeypatch, toy2d_tiny):
    import toy
    from toy.__main__ import Config, main

    monkeypatch.setattr(toy, "load_world", lambda name: toy2d_tiny)
    metrics = main(Config(samples=200, out=str(tmp_path)))
    assert (tmp_path / "samples.png").exists() and (tmp_path / "metrics.json").exists()
    assert metrics["data"]["quality"] > 0.95
