"""How far healthy runs move their loss and evaluation metrics from their first value: the evidence for the
harness's default bound (harness.GROWTH, docs/harness.md "When a run stops").

    python benchmarks/report.py --world toy2d --no-frontier --no-repeat --seeds 0 --runs R --results R/results
    python benchmarks/growth.py R/toy2d

For every run folder below R (a log.csv with a run config.json) and every column the bound applies to (loss,
eval_*), the largest |value| / max(1, |first value|) over the run's updates. Writes benchmarks/results/growth.json
and growth.md (--out)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402


def growth(run: Path) -> dict[str, float]:
    rows = harness.read_log(run / "log.csv")
    out = {}
    for col in [c for c in (rows[0] if rows else {}) if harness.bounded_column(c)]:
        values = [float(r[col]) for r in rows if r[col] not in ("", None)]
        if values:
            out[col] = max(abs(v) for v in values) / max(1.0, abs(values[0]))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="a folder holding run folders")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "growth.json"))
    p.add_argument("--made-by", default="", help="the command that made the runs (recorded with the result)")
    a = p.parse_args(argv)
    rows = []
    for log in sorted(Path(a.runs).rglob("log.csv")):
        config = harness.run_config(log.parent)
        if config is not None:
            rows.append({"run": str(log.parent.relative_to(a.runs)), "method": config["method"],
                         "variant": config.get("variant", ""), "updates": len(harness.read_log(log)),
                         "growth": growth(log.parent)})
    worst = {}
    for r in rows:
        for col, g in r["growth"].items():
            if g > worst.get(col, (0, ""))[0]:
                worst[col] = (g, r["run"])
    result = {"command": "python benchmarks/growth.py " + shlex.join(argv or sys.argv[1:]), "runs_made_by": a.made_by,
              "bound": harness.GROWTH,
              "runs": rows, "largest": {c: {"growth": g, "run": run} for c, (g, run) in worst.items()}}
    Path(a.out).write_text(json.dumps(result, indent=2))
    lines = [f"Largest |value| / max(1, |first value|) over {len(rows)} runs ({result['command']}"
             + (f"; the runs: {a.made_by}" if a.made_by else "") + f"); the harness stops a run at {harness.GROWTH:g}.",
             "", "| column | largest growth | run |", "|---|---|---|"]
    lines += [f"| {c} | {g:.3g} | {run} |" for c, (g, run) in sorted(worst.items())]
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    harness.run_cli(main)
