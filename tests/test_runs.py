"""Config parsing and the base-model sample job (the run folder itself: tests/test_harness.py)."""
import dataclasses

import pytest

import harness


@dataclasses.dataclass
class Cfg:
    model: str = harness.arg("toy2d", "world")
    steps: int = harness.arg(10, "updates")
    beta: float = harness.arg(5.0, "DPO beta")
    resume: bool = harness.arg(False, "resume")
    variant: str = harness.arg("pso", "variant", choices=["pso", "online"])


def test_parse_config_from_dataclass():
    cfg = harness.parse_config(Cfg, ["--steps", "3", "--beta", "50", "--resume", "--variant", "online"])
    assert cfg == Cfg(steps=3, beta=50.0, resume=True, variant="online")
    assert harness.parse_config(Cfg, []) == Cfg()
    with pytest.raises(SystemExit):
        harness.parse_config(Cfg, ["--variant", "offline-ish"])


def test_main_job_writes_samples_and_metrics(tmp_path, monkeypatch, toy2d_tiny):
    import toy
    from toy.__main__ import Config, main

    monkeypatch.setattr(toy, "load_world", lambda name: toy2d_tiny)
    metrics = main(Config(samples=200, out=str(tmp_path)))
    assert (tmp_path / "samples.png").exists() and (tmp_path / "metrics.json").exists()
    assert metrics["data"]["quality"] > 0.95
