"""Seconds per update and peak GPU memory of a launcher setting, measured by running its method for a few updates.

    python -m full.bench pso-online-dmd2 pso-offline-dmd2 --steps 6 --set gradient_checkpointing=true adam_8bit=true
    python -m full.bench dipp-sd-turbo --model my_spec.json --batch 4 --set resolution=512

Each setting runs in-process through its method's `main` (the launcher's argv, per-process --batch, --steps, and
small evaluation sizes so the timing is the training loop's), with the spec's keys replaced by --set key=value
(JSON values). s/update is the median of the `seconds` column of log.csv without the first update (warm-up); peak
memory is torch.cuda.max_memory_allocated over the whole run (weights, activations, optimizer states, the reward
model), or "n/a" without CUDA. Results go to --out/bench.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from . import launch

SMALL_EVAL = {"pso.py": ["--eval-samples", "2", "--eval-every", "100000", "--reference-images", "4"],
              "sharpening.py": ["--eval-samples", "2", "--final-samples", "2", "--eval-every", "100000"],
              "diff_instruct_pp.py": ["--eval-samples", "2"]}


def spec_with(model: str, overrides: dict) -> tuple[str, Path | None]:
    """A copy of the spec with `overrides`, written beside it (so its relative paths still resolve); removed after."""
    if not overrides:
        return model, None
    from .spec import load_spec

    load_spec(model, **overrides)  # validates the keys before anything runs
    path = Path(model)
    if path.suffix == ".json":
        d, folder = json.loads(path.read_text()), path.parent
    else:
        d, folder = {"base": str(Path(model).resolve()) if Path(model).exists() else model}, Path(tempfile.gettempdir())
    d.update(overrides)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-bench-", suffix=".json", dir=folder)
    with open(fd, "w") as f:
        json.dump(d, f)
    return tmp, Path(tmp)


def bench(name: str, model: str | None, steps: int, batch: int | None, overrides: dict, out: Path) -> dict:
    s = launch.SETTINGS[name]
    model, tmp_spec = spec_with(model or str(launch.SPECS / s.spec), overrides)
    run = out / name
    extra = ["--steps", str(steps), "--out", str(run), "--save-every", str(10**9), *SMALL_EVAL[s.script]]
    if batch:
        extra += ["--batch", str(batch)]
    script, argv = launch.method_argv(name, model, 1, extra)
    sys.path.insert(0, str(script.parent))
    method = importlib.import_module(script.stem)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        method.main(argv)
    finally:
        if tmp_spec is not None:
            tmp_spec.unlink(missing_ok=True)
    with open(run / "log.csv") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    per_update = statistics.median(seconds[1:] or seconds)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"setting": name, "device": device, "batch_per_process": int(argv[argv.index("--batch") + 1]),
            "s_per_update": per_update, "peak_gib": peak, "overrides": overrides, "updates": len(seconds)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="+", choices=sorted(launch.SETTINGS))
    p.add_argument("--model", help="replace the settings' model spec")
    p.add_argument("--steps", type=int, default=6, help="updates to run (the first is not timed)")
    p.add_argument("--batch", type=int, help="per-process batch (default: the paper's global batch on one GPU)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model-spec overrides (JSON values)")
    p.add_argument("--out", default="", help="folder for the runs and bench.json (default: a temporary folder)")
    a = p.parse_args(argv)
    overrides = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    out = Path(a.out or tempfile.mkdtemp(prefix="fewstep-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = [bench(name, a.model, a.steps, a.batch, overrides, out) for name in a.settings]
    (out / "bench.json").write_text(json.dumps(rows, indent=2))
    print("| setting | device | batch/process | s/update | peak memory (GiB) | spec overrides |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a (no CUDA)"
        print(f"| {r['setting']} | {r['device']} | {r['batch_per_process']} | {r['s_per_update']:.3f} | {peak} | "
              f"{json.dumps(r['overrides'])} |")
    return rows


if __name__ == "__main__":
    main()
