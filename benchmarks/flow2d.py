"""Every method on the flow-matching toy (flow2d): the same scripts, `--model flow2d`, short runs, one process each.

    OMP_NUM_THREADS=1 python benchmarks/flow2d.py [--seeds 0 1 2] [--steps 100]

Writes benchmarks/results/flow2d.{json,md}: per run reward / quality base -> tuned (same seeds), NFE counted per
update vs stated, and seconds. flow2d is toy2d's data and reward under flow-matching base models (toy/flow2d.py);
the runs are shorter than the toy2d defaults, so they show that the methods run and which way they move, not
tuned results."""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = [  # (label, script, arguments)
    ("PSO Eq. 5 (toward the target split)", "pso.py", ["--variant", "pso", "--no-naive-baseline"]),
    ("PSO naive baseline (t ~ U[0, T))", "pso.py", ["--variant", "naive"]),
    ("PSO online Eq. 7", "pso.py", ["--variant", "online"]),
    ("PSO offline Eq. 6", "pso.py", ["--variant", "offline"]),
    ("Sharpening SFT", "sharpening.py", ["--variant", "sft"]),
    ("Sharpening RLHF", "sharpening.py", ["--variant", "rlhf", "--batch", "16"]),
    ("DI++ alpha_rew 0.1", "diff_instruct_pp.py", ["--batch", "128"]),
]


def run(script, args, steps, seed, out):
    cmd = [sys.executable, str(ROOT / script), "--model", "flow2d", "--steps", str(steps), "--seed", str(seed),
           "--out", str(out), "--overwrite", "--no-progress", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader(open(out / "log.csv")))
    return {"command": " ".join(["python", script] + cmd[2:]), "wall": time.perf_counter() - t0, "metrics": metrics,
            "nfe_counted": sorted({float(r["nfe"]) for r in rows})}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="runs/bench-flow2d")
    a = p.parse_args(argv)
    results = {}
    for label, script, args in RUNS:
        results[label] = [run(script, args, a.steps, s, Path(a.out) / f"{script[:-3]}-{args[1]}-s{s}") for s in a.seeds]
        print(label, "done", file=sys.stderr)
    (RESULTS / "flow2d.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=1))

    def ms(vals):
        return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"

    lines = [f"Command: `OMP_NUM_THREADS=1 python benchmarks/flow2d.py --seeds {' '.join(map(str, a.seeds))} --steps "
             f"{a.steps}` ({time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, 1 torch thread). "
             f"Mean ± sd over seeds {a.seeds}; {a.steps} updates each; quality and distance against the split the run "
             "is scored on (the target split for Eq. 5 / naive, the base data otherwise); NFE = network evaluations "
             "per condition per update, counted in every update / stated.", "",
             "| run | reward: base → tuned | quality: base → tuned | distance: base → tuned | NFE counted / stated | "
             "s per run |", "|---|---|---|---|---|---|"]
    for label, rs in results.items():
        m = [r["metrics"] for r in rs]
        cell = lambda k: f"{ms([x[f'{k}_base'] for x in m])} → {ms([x[f'{k}_tuned'] for x in m])}"  # noqa: E731
        counted = sorted({v for r in rs for v in r["nfe_counted"]})
        lines.append(f"| {label} | {cell('reward')} | {cell('quality')} | {cell('distance')} | "
                     f"{'/'.join(f'{v:g}' for v in counted)} / {m[0]['nfe_per_update']:g} | "
                     f"{statistics.mean(r['wall'] for r in rs):.0f} |")
    (RESULTS / "flow2d.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
