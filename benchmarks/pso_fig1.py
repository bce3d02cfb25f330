"""PSO's Fig. 1 contrast on toy2d, as the default `python pso.py` shows it (issue 15).

    OMP_NUM_THREADS=1 python benchmarks/pso_fig1.py            # 3 seeds of the default command, ~8 min of CPU

Runs the default command `python pso.py --seed S` (toy2d, `--variant pso` with the naive baseline first; the toy's
command-line defaults: target "half", beta 7, 16-step training grid) for seeds 0, 1, 2 into runs/pso-fig1/seedS,
and reads each run's metrics.json. Read-outs: `transfer` (share of samples nearer a target mode than any other
base mode) and `sharpness` (share within 0.2 of any mode of either split), at the model's 4 steps and at 1 step.
Probes on the trained adapters: 'last step frozen' (the tuned model on the first 3 of the 4 sampling steps, the
frozen model on t_1 = 249 -> x_0) and 'last step only' (the frozen model on the first 3, the tuned one on the last).

Also summarises the setting search (benchmarks/pso_fig1_search.py, its log pso_fig1_search.jsonl: every candidate
x seed, naive and Eq. 5 with the same budget, plus naive alone over learning rate and updates).
Writes benchmarks/results/pso_fig1.json, pso_fig1.md and pso_fig1.samples.png (seed 0's samples figure).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import harness  # noqa: E402
from pso_fig1_search import CANDIDATES, LOG, mixed_sample  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
READ = [("transfer_{}", "transfer (4 steps)"), ("sharpness_{}", "sharpness (4 steps)"),
        ("transfer_{}_1step", "transfer (1 step)"), ("sharpness_{}_1step", "sharpness (1 step)")]


def default_runs(seeds, out_root: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        out = out_root / f"seed{seed}"
        cmd = [sys.executable, str(ROOT / "pso.py"), "--seed", str(seed), "--out", str(out), "--overwrite",
               "--no-progress"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        m = json.loads((out / "metrics.json").read_text())
        m["wall_seconds"] = time.perf_counter() - start
        m["stdout"] = proc.stdout
        m["config"] = json.loads((out / "config.json").read_text())
        m.update(probes(m["config"], out, seed))
        rows.append(m)
        print(f"[pso_fig1] seed {seed}: " + ", ".join(f"{k.format(w)} {m[k.format(w)]:.3f}" for w in
              ("base", "naive", "tuned") for k, _ in READ[:2]) + f" ({m['wall_seconds']:.0f} s)", flush=True)
    return rows


def probes(cfg: dict, out: Path, seed: int) -> dict:
    world = harness.load_world(cfg["model"])
    res = {}
    for name, folder in (("tuned", out), ("naive", out / "naive")):
        den = world.denoiser("student", lora_rank=cfg["lora_rank"], train_full=cfg["train_full"],
                            sampler=cfg["sampler"] or None)
        den.load_adapter_state(load_file(str(folder / "adapter" / "adapter.safetensors")))
        for probe, steps in (("last_frozen", {0, 1, 2}), ("last_only", {3})):
            t, s = mixed_sample(world, den, cfg["eval_samples"], seed + 10_000, steps)
            res[f"transfer_{name}_{probe}"], res[f"sharpness_{name}_{probe}"] = t, s
    return res


def mean_sd(values) -> dict:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return {"mean": float(t.mean()), "sd": float(t.std()) if len(t) > 1 else 0.0, "n": len(t)}


def fmt(v: dict | None) -> str:
    """mean ± sd; a bare mean for one seed (the seeds column says which)."""
    if v is None:
        return "-"
    return f"{v['mean']:.3f}" + (f" ± {v['sd']:.3f}" if v["n"] > 1 else "")


def search_table() -> dict:
    """pso_fig1_search.jsonl -> {candidate: {'config', 'seeds', 'naive': {key: mean_sd}, 'pso': {...}}} (the last
    record of each candidate x seed counts)."""
    last = {}
    for line in LOG.read_text().splitlines() if LOG.exists() else []:
        r = json.loads(line)
        last[(r["candidate"], r["seed"])] = r
    out = {}
    for (name, seed), r in last.items():
        out.setdefault(name, {"config": r.get("config", CANDIDATES.get(name)), "records": []})["records"].append(r)
    for name, d in out.items():
        recs = d.pop("records")
        d["seeds"] = sorted(r["seed"] for r in recs)
        for side in ("naive", "pso"):
            if all(side in r for r in recs):
                keys = [k for k, v in recs[0][side].items() if isinstance(v, (int, float))]
                d[side] = {k: mean_sd([r[side][k] for r in recs]) for k in keys}
                for probe in ("last_frozen", "last_only"):
                    d[side][f"transfer_{probe}"] = mean_sd([r[side][probe][0] for r in recs])
                    d[side][f"sharpness_{probe}"] = mean_sd([r[side][probe][1] for r in recs])
    return out


def describe(c: dict) -> str:
    if c is None:
        return "?"
    parts = [f"target {c['target']}"]
    parts += [f"{k} {v}" for k, v in c["shared"].items()]
    if c["pso"] is not None:
        parts += [f"{k} {v}" for k, v in c["pso"].items()]
    return ", ".join(parts)


def markdown(doc: dict) -> str:
    runs, seeds = doc["default"], doc["seeds"]
    agg = doc["default_mean"]
    lines = ["# PSO Fig. 1 on toy2d: the default `python pso.py` (issue 15)", "",
             f"Command: `{doc['command']}` (runs `python pso.py --seed S` for seeds {seeds}).", "",
             f"Resolved settings of the default command: {doc['settings']}.", "",
             "transfer = share of samples nearer a target mode than any other base mode; sharpness = share within 0.2 "
             "of any mode of either split (neither is fooled by overlapping discs). 1000 evaluation samples from the "
             "same noise for every model. Probes: 'last frozen' = the model on the first 3 of its 4 sampling "
             "steps, the frozen model on t_1 = 249 -> x_0; 'last only' = the frozen model on the first 3, the "
             "model on the last.", "",
             "## The default command, mean ± sd over 3 seeds", "",
             "| model | " + " | ".join(h for _, h in READ) + " | last frozen: transfer / sharpness | "
             "last only: transfer / sharpness |", "|---" * (len(READ) + 3) + "|"]
    for w, label in (("base", "base model"), ("naive", "naive (eps-MSE, t ~ U[0, T), same updates / batch / lr)"),
                     ("tuned", "pso (Eq. 5)")):
        cells = [fmt(agg.get(k.format(w))) for k, _ in READ]
        probe = ["-", "-"] if w == "base" else [
            f"{fmt(agg.get(f'transfer_{w}_{p}'))} / {fmt(agg.get(f'sharpness_{w}_{p}'))}" for p in
            ("last_frozen", "last_only")]
        lines.append(f"| {label} | " + " | ".join(cells + probe) + " |")
    lines += ["", f"Wall time per seed (both runs, shared 2-core machine): "
              + ", ".join(f"{r['wall_seconds']:.0f} s" for r in runs) + ".", ""]
    search = doc["search"]
    if search:
        lines += ["## Setting search (`benchmarks/pso_fig1_search.py`, log `pso_fig1_search.jsonl`)", "",
                  "Same budget for naive and Eq. 5 in each row: 300 updates, batch 64, lr 1e-3, LoRA rank 16 unless "
                  "the row says otherwise ('steps N' = N updates); naive = t ~ U[0, T) with 4 noised copies per sample; "
                  "T = transfer, S = sharpness; mean ± sd over the seeds listed, a bare number = one seed.", "",
                  "| setting | seeds | naive T / S (4 steps) | naive S (1 step) | Eq. 5 T / S (4 steps) | "
                  "Eq. 5 S (1 step) | Eq. 5 last frozen T / S | Eq. 5 last only T / S |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, d in search.items():
            n, q = d.get("naive", {}), d.get("pso")
            row = [describe(d["config"]), ",".join(map(str, d["seeds"])),
                   f"{fmt(n.get('transfer_tuned'))} / {fmt(n.get('sharpness_tuned'))}",
                   fmt(n.get("sharpness_tuned_1step"))]
            if q:
                row += [f"{fmt(q.get('transfer_tuned'))} / {fmt(q.get('sharpness_tuned'))}",
                        fmt(q.get("sharpness_tuned_1step")),
                        f"{fmt(q.get('transfer_last_frozen'))} / {fmt(q.get('sharpness_last_frozen'))}",
                        f"{fmt(q.get('transfer_last_only'))} / {fmt(q.get('sharpness_last_only'))}"]
            else:
                row += ["(naive only)", "-", "-", "-"]
            lines.append("| " + " | ".join(row) + " |")
        base = next(iter(search.values())).get("naive", {})
        lines += ["", f"Base model (seed 0): transfer {fmt(base.get('transfer_base'))}, sharpness "
                  f"{fmt(base.get('sharpness_base'))} (4 steps), {fmt(base.get('sharpness_base_1step'))} (1 step).",
                  ""]
    lines += [f"Machine: {platform.machine()}, torch {torch.__version__}, 1 torch thread per run; shared CPU.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--search-only", action="store_true", help="only re-summarise pso_fig1_search.jsonl")
    args = p.parse_args(argv)
    command = "OMP_NUM_THREADS=1 python benchmarks/pso_fig1.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    out_root = ROOT / "runs" / "pso-fig1"
    old = RESULTS / "pso_fig1.json"
    if args.search_only:
        if not old.exists():
            raise SystemExit(f"--search-only needs {old} from a full run")
        doc = json.loads(old.read_text())
    else:
        runs = default_runs(args.seeds, out_root)
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        cfg = runs[0]["config"]
        doc = {"command": command, "seeds": args.seeds, "default": [{k: v for k, v in r.items()} for r in runs],
               "default_mean": {k: mean_sd([r[k] for r in runs]) for k in keys},
               "settings": ", ".join(f"{k} {cfg[k]}" for k in ("model", "variant", "beta", "train_steps", "steps",
                                                                 "batch", "lr", "lora_rank", "naive_t", "reduce"))
               + f", world target: {runs[0].get('world_target', 'toy2d default (half)')}"}
        shutil.copyfile(out_root / f"seed{args.seeds[0]}" / "samples.png", RESULTS / "pso_fig1.samples.png")
    doc["search"] = search_table()
    (RESULTS / "pso_fig1.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / "pso_fig1.md").write_text(markdown(doc))
    print(f"wrote {RESULTS / 'pso_fig1.md'}")


if __name__ == "__main__":
    main()
