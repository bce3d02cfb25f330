"""benchmarks/report.py: the determinism comparison, and one row end to end in child processes (tiny toy models)."""
import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # after the root: benchmarks/pso.py must not shadow pso.py
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
                          "--no-frontier", "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
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
    assert json.loads(json.dumps(again["rows"])) == json.loads(json.dumps(result["rows"]))  # re-summarized: same
    assert (tmp_path / "results" / "report.toy2d.md").is_file()


def test_a_failing_run_names_its_command(tmp_path):
    with pytest.raises(RuntimeError, match="pso.py --model nowhere.*failed"):
        report.run_one(["pso.py", "--model", "nowhere", "--out", str(tmp_path / "run")], tmp_path / "run", 1, {})


# ---------------------------------------------------------------------------------------------------
# flow2d, the frontiers, and the world's read-outs read generically
# ---------------------------------------------------------------------------------------------------
def test_flow2d_runs_every_toy_row_with_its_own_model_and_dipp_rows():
    toy2d, flow2d = report.toy_rows("toy2d"), report.toy_rows("flow2d")
    assert [(r.method, r.label, r.args) for r in flow2d] == [(r.method, r.label, r.args) for r in toy2d]
    assert {r.method for r in flow2d} == {"PSO", "Sharpening", "DI++"}
    dipp = [r for r in flow2d if r.method == "DI++"]
    assert len(dipp) == 3 and all("di" not in r.args for r in dipp)  # --variant di refuses flow worlds
    jobs = report.plan("flow2d", [0, 1], True, None, None, None, None, True, None, Path("runs"))
    assert len({j[0].label for j in jobs}) == len(flow2d)
    for row, seed, again, cmd, out in jobs:
        assert cmd[:3] == [row.script, "--model", "flow2d"] and cmd[-4:] == ["--seed", str(seed), "--out", str(out)]
        assert not again or (row.main and seed == 0)  # the determinism re-run: main rows, first seed
    assert sum(j[2] for j in jobs) == sum(r.main for r in flow2d)


def test_frontiers_sweep_three_settings_of_each_reward_method():
    rows = report.toy_rows("toy2d")
    groups = {}
    for r in rows:
        if r.frontier:
            groups.setdefault(r.frontier, []).append(r)
    assert set(groups) == {"PSO online, Eq. 7", "PSO offline, Eq. 6", "Sharpening RLHF, n=3 m=3", "DI++"}
    for name, g in groups.items():
        assert len(g) == 3 and len({r.value for r in g}) == 3, name
        for r in g:  # each point passes its own value of the knob
            assert r.args[-2:] == (["--reward-scale", r.value] if r.knob == "alpha_rew" else ["--beta", r.value])
    assert [r.label for r in report.toy_rows("toy2d", frontier=False)] == [r.label for r in rows if r.main]
    assert len({r.label for r in rows}) == len(rows)  # labels key the summary


def test_world_metrics_are_read_generically():
    metrics = {"reward_base": 0.1, "reward_tuned": 0.2, "transfer_base": 0.0, "transfer_tuned": 0.9,
               "sharpness_base_1step": 1.0, "sharpness_tuned_1step": 0.5, "bold_share_base": 0.3,
               "bold_share_tuned": 0.4, "seconds_base": 1.0, "seconds_tuned": 2.0, "only_base": 1.0,
               "eval_split": "base", "flag_base": True, "flag_tuned": False}
    assert report.world_metrics(metrics) == [("reward", "reward{}"), ("transfer", "transfer{}"),
                                             ("sharpness (1 step)", "sharpness{}_1step"),
                                             ("bold_share", "bold_share{}")]


def fake_run(label, seed, quality, reward, frontier="", knob="", value="", main=True, method="PSO", extra=None):
    metrics = {"reward_base": 0.0, "reward_tuned": reward, "quality_base": 0.9, "quality_tuned": quality,
               "distance_base": 0.1, "distance_tuned": 0.2, "nfe_per_update": 4, "seconds": 1.0, **(extra or {})}
    return {"method": method, "label": label, "setting": "", "seed": seed, "repeat": False, "frontier": frontier,
            "knob": knob, "value": value, "main": main, "command": f"python x.py {label}", "out": "nowhere",
            "peak_rss_mib": 100.0, "wall_seconds": 1.0, "metrics": metrics,
            "log": [{"step": str(k), "nfe": "4", "seconds": "0.1", "reward": "0"} for k in (1, 2)]}


def test_frontier_table_and_figure_group_points_by_frontier_and_order_them_by_knob(tmp_path):
    records = [fake_run("main row", s, 0.5, 1.0, extra={"transfer_base": 0.0, "transfer_tuned": 0.5}) for s in (0, 1)]
    for value, q, w in (("25", 0.9, 0.1), ("1", 0.3, 0.9), ("5", 0.6, 0.5)):  # out of order on purpose
        records += [fake_run(f"online, beta = {value}", s, q + 0.1 * s, w, "PSO online", "beta", value, False)
                    for s in (0, 1)]
    records += [fake_run(f"alpha = {a}", s, 0.8, float(a), "DI++", "alpha_rew", a, True, "DI++") for a in ("0", "1")
                for s in (0, 1)]
    rows = report.summarize(records)
    groups = report.frontiers(rows)
    assert list(groups) == ["PSO online", "DI++"]
    assert [r["value"] for r in groups["PSO online"]] == ["1", "5", "25"]
    assert groups["PSO online"][0]["quality_tuned"] == pytest.approx((0.35, 0.05))  # mean ± sd over the 2 seeds
    assert rows[0]["extras"] == {"transfer": [(0.0, 0.0), (0.5, 0.0)]}
    md = report.markdown("toy2d", {"meta": {"command": "c", "date": "d", "machine": "m", "jobs": 1, "threads": 1,
                                            "load": "l", "wall_seconds": 60}, "rows": rows})
    main_table = md.split("Reward–quality frontiers")[0]
    assert "| PSO | main row |" in main_table and "beta = " not in main_table  # frontier-only rows: own table
    assert "| DI++ | alpha = 1 |" in main_table  # DI++'s frontier is its main rows
    assert "| method | run | transfer |" in main_table and "| 0.000 → 0.500 |" in main_table
    frontier = md.split("Reward–quality frontiers")[1].split("\n\n")[1].splitlines()
    assert [line.split(" | ")[:2] for line in frontier[2:6]] == [
        ["| PSO online", "base"], ["| PSO online", "beta = 1"], ["| PSO online", "beta = 5"],
        ["| PSO online", "beta = 25"]]
    assert frontier[3].split(" | ")[2:4] == ["0.900", "0.350 ± 0.050"]
    assert frontier[6].split(" | ")[:2] == ["| DI++", "base"] and len(frontier) == 9
    assert report.plot_frontier("toy2d", rows, tmp_path / "f.png") and (tmp_path / "f.png").stat().st_size > 1000
    assert not report.plot_frontier("toy2d", rows[:1], tmp_path / "none.png") and not (tmp_path / "none.png").exists()


@pytest.mark.slow
def test_flow2d_rows_run_in_child_processes_with_counted_nfes_and_a_frontier(tmp_path, monkeypatch):
    """Slow (four child runs); the fast suite covers its parts: the flow2d rows' commands
    (test_flow2d_runs_every_toy_row_with_its_own_model_and_dipp_rows), rows run in child processes with counted NFEs
    and a determinism check (test_a_row_runs_twice_...), every method's NFEs on the flow toy (tests/test_flow.py), the
    frontier table and figure (test_frontier_table_and_figure_group_points_by_frontier_and_order_them_by_knob)."""
    import toy

    toy.load_world("flow2d", budget="tiny", progress=False)  # built once into the cache, before the children
    monkeypatch.setenv("FEWSTEP_TOY_BUDGET", "tiny")
    result = report.main(["--world", "flow2d", "--smoke", "--only", "alpha_rew = 0.1", "online, Eq. 7, beta = 1",
                          "--seeds", "0", "--jobs", "1", "--results", str(tmp_path / "results"),
                          "--runs", str(tmp_path / "runs")])
    dipp, online = result["rows"]
    assert dipp["label"] == "alpha_rew = 0.1" and dipp["command"].startswith("python diff_instruct_pp.py --model "
                                                                              "flow2d --reward-scale 0.1")
    assert dipp["nfe_counted"] == dipp["nfe_stated"] == [6.0] and dipp["determinism"] == "identical"
    assert online["frontier"] == "PSO online, Eq. 7" and online["value"] == "1" and online["determinism"] is None
    assert online["nfe_counted"] == online["nfe_stated"] == [14.0]
    assert "--beta 1" in online["command"] and "--model flow2d" in online["command"]
    md = (tmp_path / "results" / "report.flow2d.md").read_text()
    assert "| PSO online, Eq. 7 | beta = 1 |" in md and "| DI++ | alpha_rew = 0.1 |" in md
    assert (tmp_path / "results" / "report.flow2d.frontier.png").is_file()


def test_the_report_page_has_a_generated_block_for_every_toy_world():
    """update_readme.py fills these blocks of docs/report.md from benchmarks/results/report.<world>.md."""
    sys.path.append(str(ROOT / "benchmarks"))
    import update_readme

    blocks = {m["src"] for m in update_readme.BLOCK.finditer((ROOT / "docs" / "report.md").read_text())}
    for world in report.TOY_WORLDS:
        assert f"benchmarks/results/report.{world}.md" in blocks, world
    text, missing = update_readme.fill("<!-- generated: benchmarks/results/report.flow2d.md -->\nold\n"
                                       "<!-- end generated -->")
    assert ("old" in text) == bool(missing)  # filled from the file once the report has run, kept until then


def test_cuda_world_goes_on_past_a_run_that_fails_and_lists_it(monkeypatch):
    """--world cuda (keep_going): a failing run is a record with its reason, the others still run; markdown lists it."""
    row = report.FULL_ROWS[0]
    calls = []

    def fake_run_one(cmd, out, threads, env, resume):
        calls.append(cmd)
        if "boom" in cmd:
            raise RuntimeError("python pso.py ... failed with exit code 1:\nValueError: no random weights for it")
        return {"wall_seconds": 1.0, "peak_rss_mib": 1.0}

    monkeypatch.setattr(report, "run_one", fake_run_one)
    jobs = [(row, 0, False, ["boom"], Path("a")), (row, 1, False, ["fine"], Path("b"))]
    with pytest.raises(RuntimeError):
        report.run_all(jobs, 1, 1, False)
    records = report.run_all(jobs, 1, 1, False, keep_going=True)
    assert "no random weights" in records[0]["error"] and "error" not in records[1] and ["fine"] in calls
    text = report.markdown("cuda", {"rows": [], "meta": {"command": "c", "date": "d", "machine": "m", "jobs": 1,
                                                         "threads": 1, "load": "l", "wall_seconds": 1.0},
                                    "failed": [records[0]]})
    assert "Could not run" in text and "no random weights" in text
