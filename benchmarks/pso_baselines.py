"""PSO against what practitioners do to fine-tune a distilled model (issue 23): one comparison per toy world.

    OMP_NUM_THREADS=1 python benchmarks/pso_baselines.py --world toy2d     # then flow2d, mnist; --resume continues
    python benchmarks/pso_baselines.py --world toy2d --replot              # tables and figure again, nothing is run

Five methods, each along its own knob (three values), same target data, updates, batch and evaluation, 3 seeds:
  naive          the ordinary loss on the distilled model (PSO's Fig. 1b)                          knob: lr
  base-transfer  the ordinary loss on the base (teacher role), the LoRA used on the student        knob: lr
  dedistill      the ordinary loss over a merged de-distill adapter A, used without A              knob: lr (of B)
  pso            Eq. 5 (`--variant pso`)                                                            knob: beta
  offline        Eq. 6, target data vs. frozen-model samples (`--variant offline --offline-pairs target`)   knob: beta
The de-distill adapter A is trained once per world and seed (`--variant dedistill-adapter`, A's run folder
runs/pso-baselines/<world>/dedistill-adapter/seed<k>) and merged by the three dedistill runs of that seed
(`--dedistill-adapter`): its cost is reported apart, as the one-off cost a user pays once per base model.

Every run is `python pso.py ...` in a fresh process (report.run_one: `--jobs` at a time, one torch thread each, its
peak memory, and a record that lets `--resume` skip a finished run). Per world, transfer and sharpness of the
tuned student at its own grid and at one step (what each world measures: WORLDS), mean ± sd over seeds, and the
cost: NFE per update (counted in every update / stated in the docstring), median s/update, A's updates, NFE and
seconds. Writes benchmarks/results/pso_baselines.json (every run's metrics and command), pso_baselines.md (the tables
of all worlds run so far) and pso_baselines.<world>.png (the transfer-sharpness frontier, 4 steps and 1 step).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402  the side-by-side report's run machinery: run_one, read_run, summarize, machine

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "pso-baselines"


@dataclass(frozen=True)
class World:
    args: list[str]  # shared by every run of the world (budget and evaluation size)
    pso_args: list[str]  # Eq. 5 / Eq. 6's training grid
    betas: list[str]
    lrs: list[str]
    transfer: str  # the metric key stem (metrics.json: <stem>_base, <stem>_tuned[_1step]) read as transfer
    sharpness: str  # ... as sharpness
    meaning: str  # what the two read-outs measure in this world


TOY2D_MEANING = ("transfer = share of samples nearer a target mode than any other base mode; sharpness = share "
                 "within 0.2 of any mode of either split (blur is mass between modes)")
WORLDS = {
    # toy2d / flow2d: the scripts' defaults (300 updates of batch 64, lr 1e-3, 1000 evaluation samples); Eq. 5 and 6
    # on the 16-step training grid of toy2d's Eq. 5 default (Toy2D.cli_defaults), given to both explicitly
    "toy2d": World([], ["--train-steps", "16"], ["2", "7", "20"], ["1e-5", "1e-4", "1e-3"], "transfer", "sharpness",
                   TOY2D_MEANING),
    "flow2d": World([], ["--train-steps", "16"], ["2", "7", "20"], ["1e-5", "1e-4", "1e-3"], "transfer",
                    "sharpness", TOY2D_MEANING),
    # MNIST: the side-by-side report's shorter budget (benchmarks/report.py WORLD_SCRIPT_ARGS), Eq. 5 and 6 on the
    # model's own 4-step grid at and below the paper's beta 50
    "mnist": World(["--steps", "100", "--batch", "32", "--eval-samples", "500"], [], ["5", "20", "50"],
                   ["1e-5", "1e-4", "1e-3"], "bold_share", "quality",
                   "transfer = bold_share, the share of samples the classifier calls bold (the target style); "
                   "sharpness = quality, the classifier's probability of the conditioned digit (blurred or broken "
                   "digits score low)"),
}
METHODS = [  # (name, label, pso.py arguments, knob flag); the knob's values are the world's lrs or betas
    ("naive", "naive (ordinary loss on the student)", ["--variant", "naive"], "--lr"),
    ("base-transfer", "base transfer (ordinary loss on the teacher, used on the student)",
     ["--variant", "base-transfer"], "--lr"),
    ("dedistill", "de-distill adapter (B over merged A, used without A)", ["--variant", "dedistill"], "--lr"),
    ("pso", "PSO Eq. 5", ["--variant", "pso", "--no-naive-baseline"], "--beta"),
    ("offline", "PSO Eq. 6, target vs frozen", ["--variant", "offline", "--offline-pairs", "target",
                                                "--no-naive-baseline"], "--beta"),
]


def adapter_folder(world: str, seed: int) -> Path:
    return RUNS / world / "dedistill-adapter" / f"seed{seed}"


def plan(world: str, seeds: list[int]) -> tuple[list[tuple], list[tuple]]:
    """(A runs, method runs): each (method, knob value, seed, command, out folder)."""
    w = WORLDS[world]
    base = ["pso.py", "--model", world, *w.args]
    adapters = [("dedistill-adapter", "", s, [*base, "--variant", "dedistill-adapter", "--seed", str(s), "--out",
                                             str(adapter_folder(world, s))], adapter_folder(world, s))
                for s in seeds]
    jobs = []
    for name, _, args, knob in METHODS:
        values = w.betas if knob == "--beta" else w.lrs
        extra = w.pso_args if knob == "--beta" else []
        for value in values:
            for s in seeds:
                out = RUNS / world / name / f"{knob[2:]}{value}" / f"seed{s}"
                a = ["--dedistill-adapter", str(adapter_folder(world, s))] if name == "dedistill" else []
                jobs.append((name, value, s, [*base, *args, *extra, knob, value, *a, "--seed", str(s), "--out",
                                              str(out)], out))
    cost = {"pso": 3, "offline": 3, "dedistill": 1, "base-transfer": 1, "naive": 1}
    return adapters, sorted(jobs, key=lambda j: -cost[j[0]])  # the long runs first


def run_jobs(jobs, n_jobs: int, resume: bool) -> list[dict]:
    def work(job):
        name, value, seed, cmd, out = job
        rec = report.run_one(cmd, out, 1, {}, resume)
        print(f"[pso_baselines] {name} {value} seed {seed}: {rec['wall_seconds']:.0f} s", flush=True)
        return {"method": name, "label": f"{name} {value}", "value": value, "seed": seed, "repeat": False,
                "setting": "", "frontier": name, "knob": "", "main": True, **rec}

    with concurrent.futures.ThreadPoolExecutor(n_jobs) as pool:
        return list(pool.map(work, jobs))


# ---------------------------------------------------------------------------------------------------
# Tables and figure
# ---------------------------------------------------------------------------------------------------
def stat(values) -> dict | None:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def fmt(v: dict | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v['mean']:.{digits}f}" + (f" ± {v['sd']:.{digits}f}" if v["n"] > 1 else "")


def points(world: str, records: list[dict]) -> dict:
    """{method: [{value, transfer, sharpness, transfer_1step, sharpness_1step (mean/sd), nfe, s/update}]} and the
    base model's point, from the runs' metrics.json and log.csv (report.summarize does the NFE and timing)."""
    w = WORLDS[world]
    keys = {"transfer": w.transfer + "_{}", "sharpness": w.sharpness + "_{}",
            "transfer_1step": w.transfer + "_{}_1step", "sharpness_1step": w.sharpness + "_{}_1step"}
    out = {}
    for name, *_ in METHODS:
        rows = []
        for summary in report.summarize([r for r in records if r["method"] == name]):
            runs = [r for r in records if r["label"] == summary["label"]]
            row = {"value": runs[0]["value"], "seeds": summary["seeds"], "nfe_counted": summary["nfe_counted"],
                   "nfe_stated": summary["nfe_stated"], "s_per_update": summary["s_per_update"],
                   "command": runs[0]["command"]}
            row.update({k: stat(r["metrics"].get(t.format("tuned")) for r in runs) for k, t in keys.items()})
            if name == "dedistill":
                row["adapter"] = {k: stat(r["metrics"][f"adapter_{k}"] for r in runs)
                                  for k in ("updates", "nfe_per_update", "nfe", "seconds")}
            rows.append(row)
        out[name] = sorted(rows, key=lambda r: float(r["value"]))
    runs = [r for r in records if r["method"] == "naive"]
    out["base"] = {k: stat(r["metrics"].get(t.format("base")) for r in runs) for k, t in keys.items()}
    return out


def markdown(world: str, doc: dict) -> str:
    w, pts, meta = WORLDS[world], doc["points"], doc["meta"]
    lines = [f"## {world}", "",
             f"Command: `{meta['command']}` ({meta['date']}; {meta['machine']}; {meta['jobs']} runs at a time, one "
             f"torch thread each; {meta['load']}; the runs' wall times add up to {doc['run_minutes']:.0f} min). "
             "Every run: "
             f"`python pso.py --model {world}{' ' + ' '.join(w.args) if w.args else ''}` + the method's arguments "
             "(the exact commands are in pso_baselines.json). Mean ± sd over seeds "
             f"{pts['naive'][0]['seeds']}.", "", f"Read-outs ({world}): {w.meaning}.", "",
             "| method | knob | transfer (4 steps) | sharpness (4 steps) | transfer (1 step) | sharpness (1 step) | "
             "NFE / update counted / stated | s / update |", "|---|---|---|---|---|---|---|---|",
             f"| base model | - | {fmt(pts['base']['transfer'])} | {fmt(pts['base']['sharpness'])} | "
             f"{fmt(pts['base']['transfer_1step'])} | {fmt(pts['base']['sharpness_1step'])} | - | - |"]
    for name, label, _, knob in METHODS:
        for r in pts[name]:
            nfe = "/".join(f"{x:g}" for x in r["nfe_counted"]) + " / " + "/".join(f"{x:g}" for x in r["nfe_stated"])
            lines.append(f"| {label} | {knob[2:]} {r['value']} | {fmt(r['transfer'])} | {fmt(r['sharpness'])} | "
                         f"{fmt(r['transfer_1step'])} | {fmt(r['sharpness_1step'])} | {nfe} | "
                         f"{r['s_per_update']:.4f} |")
    a = doc["adapter"]
    lines += ["", f"The de-distill adapter A's one-off cost (`--variant dedistill-adapter`, once per seed, reused by "
              f"the three dedistill runs): {fmt(a['updates'], 0)} updates of batch {a['batch']} at "
              f"{fmt(a['nfe_per_update'], 0)} NFE per sample ({a['nfe_note']}), {fmt(a['nfe'], 0)} network "
              f"evaluations in all (one sample at one timestep = 1), {fmt(a['seconds'], 1)} s of training "
              f"({fmt(a['wall_seconds'], 1)} s wall with its evaluation); lr {a['lr']}. The student + A sampled "
              f"on the student's grid (base split): quality {fmt(a['quality_base'])} → {fmt(a['quality_tuned'])} at "
              f"4 steps, {fmt(a['quality_base_1step'])} → {fmt(a['quality_tuned_1step'])} at 1 step.", "",
              f"Figure: `benchmarks/results/pso_baselines.{world}.png` (sharpness vs transfer, each method's three "
              "knob values joined, mean ± sd; left the model's grid, right one step).", ""]
    return "\n".join(lines)


def plot(world: str, pts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = WORLDS[world]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, suffix, title in ((axes[0], "", "model's grid (4 steps)"), (axes[1], "_1step", "1 step")):
        for i, (name, label, _, knob) in enumerate(METHODS):
            rows = [r for r in pts[name] if r["transfer" + suffix] and r["sharpness" + suffix]]
            if not rows:
                continue
            t = [r["transfer" + suffix] for r in rows]
            s = [r["sharpness" + suffix] for r in rows]
            ax.errorbar([v["mean"] for v in t], [v["mean"] for v in s], xerr=[v["sd"] for v in t],
                        yerr=[v["sd"] for v in s], color=f"C{i}", marker="osD^v"[i], ms=5, lw=1.2, capsize=2,
                        label=f"{name} ({knob[2:]})")
            for r, tv, sv in zip(rows, t, s):
                ax.annotate(r["value"], (tv["mean"], sv["mean"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=f"C{i}")
        b = pts["base"]
        ax.plot([b["transfer" + suffix]["mean"]], [b["sharpness" + suffix]["mean"]], "k*", ms=11, label="base model")
        ax.set(title=f"{world}: {title}", xlabel=f"transfer ({w.transfer})", ylabel=f"sharpness ({w.sharpness})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def adapter_summary(adapters: list[dict]) -> dict:
    m = [r["metrics"] for r in adapters]
    cfg = json.loads((Path(adapters[0]["out"]) / "config.json").read_text())
    rows = cfg["batch"] * cfg["gradient_accumulation_steps"]
    out = {"batch": cfg["batch"], "lr": cfg["lr"], "updates": stat(x["updates"] for x in m),
           "nfe_per_update": stat(x["nfe_per_update"] for x in m),
           "nfe": stat(x["updates"] * x["nfe_per_update"] * rows for x in m),
           "seconds": stat(x["seconds_train"] for x in m), "wall_seconds": stat(r["wall_seconds"] for r in adapters),
           "nfe_note": "S grad + M frozen sampling steps"}
    for k in ("quality_base", "quality_tuned", "quality_base_1step", "quality_tuned_1step"):
        out[k] = stat(x[k] for x in m)
    return out


def write(results: dict) -> None:
    """pso_baselines.json, pso_baselines.md (every world run so far) and each world's figure."""
    (RESULTS / "pso_baselines.json").write_text(json.dumps(results, indent=1, default=str))
    head = ["# PSO against the practitioners' baselines (issue 23)", "",
            "How to fine-tune a step-distilled model: naive (the ordinary loss on the distilled model), base transfer "
            "(the ordinary loss on the base it was distilled from, the LoRA used on the distilled model), a de-distill "
            "training adapter (the ordinary loss over a merged adapter trained on the distilled model's own samples, "
            "dropped at inference), PSO Eq. 5 and offline Eq. 6 with target vs frozen-model pairs. Each along its own "
            "knob (lr for the ordinary loss, beta for PSO), same target data, updates, batch, LoRA rank 16 and "
            "evaluation samples (the same noise for every model). Produced by `benchmarks/pso_baselines.py`; the "
            "reading is in docs/pso.md, \"Which method when\".", ""]
    body = [markdown(world, doc) for world, doc in results.items()]
    (RESULTS / "pso_baselines.md").write_text("\n".join(head + body))
    for world, doc in results.items():
        plot(world, doc["points"], RESULTS / f"pso_baselines.{world}.png")


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True, choices=list(WORLDS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("--resume", action="store_true", help="skip runs that finished the same command (a killed batch "
                   "continues where it stopped)")
    p.add_argument("--replot", action="store_true", help="only rewrite the tables and figures from the run folders")
    a = p.parse_args(argv)
    path = RESULTS / "pso_baselines.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    adapters, jobs = plan(a.world, a.seeds)
    start, load = time.perf_counter(), os.getloadavg()[0]
    if a.replot:
        meta = results[a.world]["meta"]
        read = lambda job: {"method": job[0], "label": f"{job[0]} {job[1]}", "value": job[1], "seed": job[2],  # noqa
                            "repeat": False, "out": str(job[4]), "command": "python " + shlex.join(job[3]),
                            "peak_rss_mib": 0.0, **json.loads((job[4] / "report_run.json").read_text()),
                            **report.read_run(job[4])}
        done_a, done = [read(j) for j in adapters], [read(j) for j in jobs]
    else:
        done_a = run_jobs(adapters, a.jobs, a.resume)  # A first: the dedistill runs merge it
        done = run_jobs(jobs, a.jobs, a.resume)
        meta = {"command": "OMP_NUM_THREADS=1 python benchmarks/pso_baselines.py " + shlex.join(argv),
                "date": datetime.date.today().isoformat(), "machine": report.machine(), "jobs": a.jobs,
                "load": f"load average {load:.1f} at the start", "wall_seconds": time.perf_counter() - start}
    results[a.world] = {"meta": meta, "points": points(a.world, done), "adapter": adapter_summary(done_a),
                        "run_minutes": sum(r["wall_seconds"] for r in done_a + done) / 60,
                        "runs": [{k: v for k, v in r.items() if k != "log"} for r in done_a + done]}
    write(results)
    print((RESULTS / "pso_baselines.md").read_text())
    return results


if __name__ == "__main__":
    main()
