"""Diff-Instruct++ on the toy worlds: the reward-scale sweep (alpha_rew), the CFG-scale sweep (omega) and the
timing of the default run, all by calling diff_instruct_pp.train in-process.

    python benchmarks/diff_instruct_pp.py --world toy2d mnist

For each world: one run per alpha_rew in --reward-scales (omega = 1) and one per omega in --cfg-scales
(alpha_rew = 0), from the same base generator and seed, with the script's defaults (w = sigma^2/alpha^2, pi
uniform on [20, 980]); the same alpha_rew sweep with the other reading of the paper (w = 1, the log-normal pi of
App. C; --no-alt skips it); on toy2d also a Diff-Instruct pre-training run from the reference (--variant di).
Writes benchmarks/results/diff_instruct_pp.json, the
markdown tables benchmarks/results/diff_instruct_pp.md and, per world, the figure
benchmarks/results/diff_instruct_pp_<world>.png (reward vs distance from the reference data as the paper's
Fig. 3 compares its settings, and quality vs alpha_rew / omega). Run folders go to runs/bench-dipp-<world>-*.
This is a benchmark, not a test: minutes on two cores."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import diff_instruct_pp as dipp  # noqa: E402

# per-world settings: the IKL term is summed over dimensions (2 for toy2d, 784 for mnist) and the rewards differ,
# so the reward scales that balance it differ by world (the paper's differ by model too: 1-10 vs 100-1000)
WORLD_DEFAULTS = {
    "toy2d": dict(reward_scales=[0.0, 0.03, 0.1, 0.3, 1.0], cfg_scales=[2.0, 4.0], di_steps=1500,
                  alt_reward_scales=[0.0, 1.0, 3.0, 10.0], overrides={}),
    "mnist": dict(reward_scales=[0.0, 0.1, 0.3, 1.0, 3.0, 10.0], cfg_scales=[2.0, 4.0], di_steps=0,
                  alt_reward_scales=[0.0], overrides=dict(batch=64, steps=150, eval_samples=500)),
}
# the other reading of the paper's generator weighting, with its log-normal time density (App. C)
ALT = dict(weighting="unit", time_density="lognormal", t_min=0, t_max=999)
ALT_NAME = "w = 1, log-normal pi on [0, 999]"
KEYS = ("reward", "quality", "distance")


def run_one(world: str, tag: str, steps: int | None, **kw) -> dict:
    over = dict(WORLD_DEFAULTS[world]["overrides"])
    if steps:
        over["steps"] = steps
    cfg = dipp.Config(model=world, out=str(ROOT / "runs" / f"bench-dipp-{world}-{tag}"), **{**over, **kw})
    if world == "toy2d" and cfg == dataclasses.replace(dipp.Config(), out=cfg.out):
        return default_command(cfg.out)  # the default command is this row: run it as a user would, and time it
    print(f"=== {world} {tag}: " + " ".join(f"{k}={v}" for k, v in {**over, **kw}.items()), flush=True)
    metrics = dipp.train(cfg)
    config = json.loads((Path(cfg.out) / "config.json").read_text())  # as resolved by train (variant di: no reward)
    return {"tag": tag, "config": config, **metrics}


def default_command(out: str) -> dict:
    """`python diff_instruct_pp.py` in a fresh process (imports, base-model loading and plots included), timed."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "diff_instruct_pp.py"), "--out", out], cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    config = json.loads((Path(out) / "config.json").read_text())
    return {"tag": "default", "config": config, **metrics, "seconds_wall_command": wall}


def table(rows: list[dict], varied: str) -> str:
    head = f"| {varied} | reward base → tuned | quality base → tuned | distance base → tuned | seconds |"
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[f'{k}_base']:.3f} → {r[f'{k}_tuned']:.3f}" for k in KEYS]
        lines.append(f"| {r['config'][varied]:g} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines)


def figure(world: str, reward_rows: list[dict], cfg_rows: list[dict], alt_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    base = reward_rows[0]
    ax.scatter([base["distance_base"]], [base["reward_base"]], c="k", marker="x", label="base generator")
    series = [(reward_rows, "o", "reward_scale", "alpha_rew"), (cfg_rows, "s", "cfg_scale", "omega"),
              (alt_rows, "^", "reward_scale", f"alpha_rew, {ALT_NAME}")]
    for rows, marker, key, name in (s for s in series if s[0]):
        d = [r["distance_tuned"] for r in rows]
        ax.plot(d, [r["reward_tuned"] for r in rows], marker=marker, lw=0.8, label=f"sweep over {name}")
        for r in rows:
            ax.annotate(f"{r['config'][key]:g}", (r["distance_tuned"], r["reward_tuned"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="distance to the reference data (lower = closer)", ylabel="reward",
           title=f"{world}: reward vs divergence")
    ax.legend(fontsize=7)
    for ax, rows, key, name in ((axes[1], reward_rows, "reward_scale", "alpha_rew (omega = 1)"),
                                (axes[2], cfg_rows, "cfg_scale", "omega (alpha_rew = 0)")):
        xs = [max(r["config"][key], 1e-3) if key == "reward_scale" else r["config"][key] for r in rows]
        ax.plot(xs, [r["quality_tuned"] for r in rows], "o-", color="C0", label="quality (left)")
        ax.axhline(rows[0]["quality_base"], color="C0", ls=":", lw=0.8, label="base quality")
        right = ax.twinx()  # the reward has its own scale (MNIST: a logit)
        right.plot(xs, [r["reward_tuned"] for r in rows], "s-", color="C1", label="reward (right)")
        right.axhline(rows[0]["reward_base"], color="C1", ls=":", lw=0.8, label="base reward")
        if key == "reward_scale":
            ax.set_xscale("log")
        ax.set(xlabel=name + (" (0 drawn at 1e-3)" if key == "reward_scale" else ""), ylabel="quality",
               title=f"{world}: sweep over {name.split(' ')[0]}")
        right.set_ylabel("reward")
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", nargs="+", default=["toy2d"], choices=sorted(WORLD_DEFAULTS))
    p.add_argument("--reward-scales", nargs="+", type=float, default=None, help="alpha_rew values (default per world)")
    p.add_argument("--cfg-scales", nargs="+", type=float, default=None, help="omega values (default per world)")
    p.add_argument("--steps", type=int, default=None, help="updates per run (default: the script's / per world)")
    p.add_argument("--alt", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also sweep alpha_rew with {ALT_NAME} (the paper's App. C reading)")
    p.add_argument("--di-steps", type=int, default=None,
                   help="updates of the Diff-Instruct pre-training run from the reference (0: skip; default per "
                        "world)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diff_instruct_pp.json"))
    p.add_argument("--replot", action="store_true", help="run nothing: redraw the figures and the markdown from --out")
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if not args.replot:
        results["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
                              f"load average at start {os.getloadavg()[0]:.1f}")
    for world in [] if args.replot else args.world:
        spec = WORLD_DEFAULTS[world]
        t0, load = time.perf_counter(), os.getloadavg()[0]
        reward_rows = [run_one(world, f"rew{a:g}", args.steps, reward_scale=a, cfg_scale=1.0)
                       for a in args.reward_scales or spec["reward_scales"]]
        # omega = 1 with alpha_rew = 0 is the first row of the reward sweep
        cfg_rows = [r for r in reward_rows if r["config"]["reward_scale"] == 0][:1]
        cfg_rows += [run_one(world, f"cfg{w:g}", args.steps, reward_scale=0.0, cfg_scale=w)
                     for w in args.cfg_scales or spec["cfg_scales"] if w != 1.0]
        alt_rows = [run_one(world, f"alt-rew{a:g}", args.steps, reward_scale=a, cfg_scale=1.0, **ALT)
                    for a in (spec["alt_reward_scales"] if args.alt else [])]
        di_steps = spec["di_steps"] if args.di_steps is None else args.di_steps
        di_rows = [run_one(world, "di", di_steps, variant="di")] if di_steps else []
        default = [r for r in reward_rows if "seconds_wall_command" in r]
        if default:
            results["toy2d_default_run"] = {k: default[0][k] for k in ("seconds_wall_command", "seconds")}
        results[world] = {"reward_sweep": reward_rows, "cfg_sweep": cfg_rows, "di_pretraining": di_rows,
                          "alt_reward_sweep": alt_rows, "seconds": time.perf_counter() - t0,
                          "load_average_at_start": load}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))
    for world in WORLD_DEFAULTS:
        if world in results:
            r = results[world]
            figure(world, r["reward_sweep"], r["cfg_sweep"], r.get("alt_reward_sweep", []),
                   out.with_name(f"{out.stem}_{world}.png"))

    md = [f"Machine: {results['machine']}. Command: `python benchmarks/diff_instruct_pp.py --world "
          f"{' '.join(w for w in WORLD_DEFAULTS if w in results)}`.", ""]
    if "toy2d_default_run" in results:
        d = results["toy2d_default_run"]
        md += [f"The default command `python diff_instruct_pp.py` is the toy2d alpha_rew = "
               f"{dipp.Config().reward_scale:g} row: {d['seconds_wall_command']:.1f} s wall clock in a fresh process "
               f"({d['seconds']:.1f} s inside train()).", ""]
    for world in WORLD_DEFAULTS:
        if world not in results:
            continue
        r = results[world]
        c = r["reward_sweep"][0]["config"]
        if "load_average_at_start" in r:
            md += [f"{world}: load average {r['load_average_at_start']:.1f} at the start of its runs.", ""]
        md += [f"### {world}: sweep over alpha_rew (omega = 1), {c['steps']} updates of batch {c['batch']}", "",
               table(r["reward_sweep"], "reward_scale"), "",
               f"### {world}: sweep over omega (alpha_rew = 0)", "", table(r["cfg_sweep"], "cfg_scale"), ""]
        if r.get("alt_reward_sweep"):
            md += [f"### {world}: sweep over alpha_rew with {ALT_NAME} (`--weighting unit --time-density lognormal "
                   f"--t-min 0 --t-max 999`)", "", table(r["alt_reward_sweep"], "reward_scale"), ""]
        if r.get("di_pretraining"):
            c = r["di_pretraining"][0]["config"]
            md += [f"### {world}: Diff-Instruct pre-training (`--variant di`), the generator initialised from the "
                   f"reference read at t = 999, {c['steps']} updates; base = that initial generator", "",
                   table(r["di_pretraining"], "cfg_scale"), ""]
        md += [f"Figure: `benchmarks/results/{out.stem}_{world}.png`; samples of every run in "
               f"`runs/bench-dipp-{world}-*/samples.png`", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
