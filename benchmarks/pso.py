"""The PSO paper's claims on the toy worlds, measured by running pso.train in-process.

    python benchmarks/pso.py --world toy2d            # ~5 min of CPU on two idle cores
    python benchmarks/pso.py --world mnist --steps 200

Writes benchmarks/results/pso.json (every metric of every run), benchmarks/results/pso.md (the tables of
docs/pso.md) and the sample figures benchmarks/results/pso.<world>.<run>.png. Runs go to runs/bench-pso/<world>/.

Claims (issue 3):
 1. transfer: naive eps-MSE fine-tuning of the 4-step student toward the target split degrades its few-step
    quality; PSO moves it toward the target while keeping quality near the base model's.
 2. reward: online PSO (Eq. 7) raises the reward more than offline PSO (Eq. 6, reward-ranked preference pairs)
    with the same updates and batch.
 3. steps: a model tuned on the 4-step grid keeps its gain when sampled in one step (Table 2 of the paper).
Plus the Euler-ancestral (SDXL-Turbo) MDP for online PSO, and the wall time of the default `python pso.py`.
The worlds are the ones these tables were measured on (MODELS, WORLD_KW): toy2d's earlier rotated-ring target and
both toys' unbounded rewards (height, bold logit); the current defaults are measured by pso_claims.py and pso_fig1.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402
import pso  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# name -> (claim, Config overrides). Every run of one world uses the same seed, batch and updates unless stated.
EXPERIMENTS = {
    "naive": ("transfer", dict(variant="naive")),
    "naive, 50 updates": ("transfer", dict(variant="naive", steps=50)),
    "pso (paper: beta 50, N 4)": ("transfer", dict(variant="pso")),
    "pso (beta 5, 8-step train grid)": ("transfer", dict(variant="pso", beta=5.0, train_steps=8)),
    "pso (beta 1, 8-step train grid)": ("transfer", dict(variant="pso", beta=1.0, train_steps=8)),
    "offline, target vs frozen-model pairs (beta 50)": ("transfer", dict(variant="offline", offline_pairs="target")),
    "offline, target vs frozen-model pairs (beta 5, 8-step grid)": ("transfer", dict(
        variant="offline", offline_pairs="target", beta=5.0, train_steps=8)),
    "offline (preference pairs, beta 50)": ("reward", dict(variant="offline")),
    "offline (preference pairs, beta 5)": ("reward", dict(variant="offline", beta=5.0)),
    "online (paper: beta 5)": ("reward", dict(variant="online")),
    "online (beta 20)": ("reward", dict(variant="online", beta=20.0)),
    # the official DMD2 online run: beta 50, per-step loss, clamp 0.1, 8 sampling steps of which 7 are trained
    "online, official form (beta 50, per step, clamp 0.1, 8-step train grid)": ("reward", dict(
        variant="online", beta=50.0, per_step_loss=True, clamp_ratio=0.1, train_steps=8)),
    "online, euler ancestral MDP (beta 5)": ("reward", dict(variant="online", sampler="euler_ancestral")),
}


# The worlds these tables were measured on (before issue 15 changed the toys' defaults): toy2d's rotated-ring target
# and both toys' unbounded rewards. benchmarks/pso_claims.py and pso_fig1.py measure the current defaults.
MODELS = {"toy2d": "toy2d:reward=height", "mnist": "mnist:reward=logit"}
WORLD_KW = {"toy2d": dict(target_rotation=math.pi / 8, target_keep=tuple(range(8)))}


def run_world(name: str, steps: int | None, only: list[str] | None, seeds: list[int]) -> dict:
    world = harness.load_world(MODELS[name], **WORLD_KW.get(name, {}))
    out = {"runs": {}}
    for label, (claim, overrides) in EXPERIMENTS.items():
        if only and not any(o in label for o in only):
            continue
        per_seed = []
        for seed in seeds:
            cfg = pso.Config(model=MODELS[name], naive_baseline=False, seed=seed, progress=False, overwrite=True,
                             out=str(ROOT / "runs" / "bench-pso" / name / f"{_slug(label)}-seed{seed}"),
                             **{**({"steps": steps} if steps else {}), **overrides})
            start = time.perf_counter()
            m, _ = pso.train(cfg, world)
            m["wall_seconds"] = time.perf_counter() - start
            per_seed.append(m)
            if seed == seeds[0]:
                shutil.copyfile(Path(cfg.out) / "samples.png", RESULTS / f"pso.{name}.{_slug(label)}.png")
            print(f"[{name}] {label} seed {seed}: reward {m['reward_base']:.3f} -> {m['reward_tuned']:.3f}, quality "
                  f"{m['quality_base']:.3f} -> {m['quality_tuned']:.3f} ({m['wall_seconds']:.0f} s)", flush=True)
        out["runs"][label] = {"claim": claim, "config": overrides, "seeds": seeds, "per_seed": per_seed,
                              "metrics": _mean(per_seed)}
    return out


def _mean(runs: list[dict]) -> dict:
    """Mean over seeds of every numeric metric, plus <key>_sd (population sd); other entries from the first run."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs = torch.tensor([float(r[k]) for r in runs], dtype=torch.float64)
            out[k], out[k + "_sd"] = float(xs.mean()), float(xs.std(unbiased=False))
    return out


def _f(m: dict, key: str) -> str:
    """mean ± sd over seeds."""
    if key not in m:
        return "-"
    sd = m.get(key + "_sd", 0.0)
    return f"{m[key]:.3f} ± {sd:.3f}" if sd else f"{m[key]:.3f}"


def default_run_seconds() -> dict:
    """Wall time of `python pso.py` with no argument (cached toy2d base models), in-process."""
    start = time.perf_counter()
    m = pso.experiment(pso.Config(out=str(ROOT / "runs" / "bench-pso" / "default"), progress=False, overwrite=True))
    return {"wall_seconds": time.perf_counter() - start, "metrics": m}


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}. {results['load']}", ""]
    for name, r in results.items():
        if not isinstance(r, dict) or "runs" not in r:
            continue
        runs = r["runs"]
        any_run = next(iter(runs.values()))["metrics"]
        seeds = r.get("seeds", [0])
        lines += [f"### {name}: claim 1, transfer to the target split ({int(any_run['updates'])} updates unless "
                  f"stated, batch 64, {int(any_run['eval_samples'])} evaluation samples; mean ± sd over seeds "
                  f"{seeds})", "",
                  "| model | NFE/update | quality vs target | quality vs base data | distance to target | reward "
                  "| 1 step: quality vs target |", "|---|---|---|---|---|---|---|"]
        first = True
        for label, run in runs.items():
            m = run["metrics"]
            if run["claim"] != "transfer":
                continue
            if first:
                lines.append(f"| base model (4 steps) | - | {m['quality_base']:.3f} | "
                             f"{m.get('quality_base_on_base_split', float('nan')):.3f} | {m['distance_base']:.3f} | "
                             f"{m['reward_base']:.3f} | {m['quality_base_1step']:.3f} |")
                first = False
            lines.append(f"| {label} | {m['nfe_per_update']:g} | {_f(m, 'quality_tuned')} | "
                         f"{_f(m, 'quality_tuned_on_base_split')} | {_f(m, 'distance_tuned')} | "
                         f"{_f(m, 'reward_tuned')} | {_f(m, 'quality_tuned_1step')} |")
        lines += ["", f"### {name}: claims 2 and 3, reward (online vs offline) and one-step sampling", "",
                  "| model | NFE/update | s/update | reward (4 steps) | quality (4 steps) | reward (1 step) "
                  "| quality (1 step) |", "|---|---|---|---|---|---|---|"]
        first = True
        for label, run in runs.items():
            m = run["metrics"]
            if run["claim"] != "reward":
                continue
            if first:
                lines.append(f"| base model | - | - | {m['reward_base']:.3f} | {m['quality_base']:.3f} | "
                             f"{m['reward_base_1step']:.3f} | {m['quality_base_1step']:.3f} |")
                first = False
            lines.append(f"| {label} | {m['nfe_per_update']:g} | {m['seconds_per_update']:.3f} | "
                         f"{_f(m, 'reward_tuned')} | {_f(m, 'quality_tuned')} | {_f(m, 'reward_tuned_1step')} | "
                         f"{_f(m, 'quality_tuned_1step')} |")
        lines.append("")
    if "default_run" in results:
        d = results["default_run"]
        m = d["metrics"]
        lines += [f"Default `python pso.py` (toy2d, variant pso, {m['updates']} updates, with the naive baseline): "
                  f"{d['wall_seconds']:.1f} s wall, of which {m['seconds_train']:.1f} s PSO updates "
                  f"({m['seconds_per_update'] * 1000:.0f} ms each) and {m.get('seconds_naive', 0):.1f} s the naive "
                  "run.", ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", nargs="+", default=["toy2d"], choices=["toy2d", "mnist"])
    p.add_argument("--steps", type=int, default=None, help="updates per run (default: pso.Config's 300)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per run (mean ± sd in tables)")
    p.add_argument("--only", nargs="*", default=None, help="run only experiments whose label contains one of these")
    p.add_argument("--no-default-run", action="store_true", help="skip timing `python pso.py`")
    p.add_argument("--load", default="", help="a note on the machine's load while measuring (goes in the table)")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "pso.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    results["load"] = args.load or f"load average {os.getloadavg()[0]:.1f} when the run started"
    for name in args.world:
        previous = results.get(name, {}).get("runs", {}) if args.only else {}  # --only re-runs a few, keeps the rest
        results[name] = {"runs": {**previous, **run_world(name, args.steps, args.only, args.seeds)["runs"]},
                         "steps": args.steps or pso.Config.steps, "seeds": args.seeds}
        path.write_text(json.dumps(results, indent=2, default=str))
    if not args.no_default_run:
        results["default_run"] = default_run_seconds()
    path.write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / "pso.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
