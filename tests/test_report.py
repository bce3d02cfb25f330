"""benchmarks/report.py: the determinism comparison, and one row end to end in child processes (tiny toy models)."""
import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402


def record(loss="0.5", reward=1.0, seconds="0.1", wall=3.0):
    return {"metrics": {"reward_tuned": reward, "seconds": wall, "seconds_per_update": wall / 10, "nfe_per_update": 4},
            "log": [{"step": "1", "loss": loss, "nfe": "4", "seconds": seconds}]}


def test_same_results_ignores_timings_and_names_every_difference():
    a = record()
    assert report.same_results(a, record(seconds="0.9", wall=7.0)) == []  # timings differ: still identical
    assert report.same_results(a, record(reward=1.0000001)) == ["reward_tuned"]
    assert report.same_results(a, record(loss="0.4")) == ["log.csv loss"]
    b = copy.deepcopy(a)
    b["log"].append(dict(b["log"][0]))
    assert report.same_results(a, b) == ["log.csv length"]


def test_a_row_runs_twice_in_child_processes_with_counted_nfes_and_identical_results(tmp_path, monkeypatch,
                                                                                     toy2d_tiny):
    monkeypatch.setenv("FEWSTEP_TOY_BUDGET", "tiny")  # the children load the tiny base models (cached by the fixture)
    result = report.main(["--world", "toy2d", "--smoke", "--only", "online", "--seeds", "0", "--jobs", "1",
                          "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    (row,) = result["rows"]
    assert row["label"] == "online, Eq. 7" and row["updates"] == 2
    assert row["nfe_counted"] == row["nfe_stated"] == [14.0] and row["nfe_ok"]  # Eq. 7: 4S - 2 with S = 4
    assert row["determinism"] == "identical"
    assert row["peak_rss_mib"] > 50  # a python process with torch, measured by getrusage of that child
    assert [r["repeat"] for r in result["runs"]] == [False, True]
    saved = json.loads((tmp_path / "results" / "report.json").read_text())["toy2d"]
    assert saved["rows"][0]["command"].startswith("python pso.py --model toy2d --variant online")
    for name in ("report.toy2d.md", "report.toy2d.curves.png", "report.toy2d.samples.png"):
        assert (tmp_path / "results" / name).is_file(), name
    assert "| PSO | online, Eq. 7 | 2 |" in (tmp_path / "results" / "report.toy2d.md").read_text()
    (tmp_path / "results" / "report.toy2d.md").unlink()  # --replot rebuilds the table from report.json and the runs
    again = report.main(["--world", "toy2d", "--replot", "--results", str(tmp_path / "results")])
    assert again["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "results" / "report.toy2d.md").is_file()


def test_a_failing_run_names_its_command(tmp_path):
    with pytest.raises(RuntimeError, match="pso.py --model nowhere.*failed"):
        report.run_one(["pso.py", "--model", "nowhere", "--out", str(tmp_path / "run")], tmp_path / "run", 1, {})
