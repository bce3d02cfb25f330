"""Diff-Instruct++ on the toy worlds: the reward-quality frontier over alpha_rew for the script's defaults and for
the paper's own pairing, EMA on/off, 3 seeds; Diff-Instruct pre-training (variant di); the time densities. On the
worlds' unbounded rewards (`MODELS`: toy2d height, MNIST bold logit), to show over-optimisation.

    OMP_NUM_THREADS=1 python benchmarks/diff_instruct_pp.py            # toy2d (about 15 min on a loaded 2-core machine)
    OMP_NUM_THREADS=1 python benchmarks/diff_instruct_pp.py --mnist    # + the MNIST pairing runs (one seed)

Settings compared (both with w = sigma^2 / alpha^2, weight 1 on the x0-prediction difference as the author's
Diff-Instruct code):
  defaults  pi uniform on [20, 980]                                 (python diff_instruct_pp.py)
  paper     pi log-normal ln sigma_VE ~ N(-2, 2^2) truncated to t in [0, 999]
            (--time-density lognormal --t-min 0 --t-max 999)
Every run has --ema (decay 0.95): the EMA is a read-out only (it changes nothing in training, tested), so each run
gives the raw generator (`*_tuned`, = EMA off) and its EMA (`*_ema`). One world is loaded once and every run is a
diff_instruct_pp.train call on it. Writes benchmarks/results/diff_instruct_pp.{json,md} and
benchmarks/results/diff_instruct_pp_toy2d.png; run folders go to runs/bench-dipp-*. A benchmark, not a test."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import harness  # noqa: E402
import diff_instruct_pp as dipp  # noqa: E402

SETTINGS = {"defaults": {}, "paper": dict(time_density="lognormal", t_min=0, t_max=999)}
# 200 updates of batch 128 (the script's defaults: 400 x 256) so that 3 seeds of both settings fit ~15 min on a shared
# 2-core machine
TOY2D = dict(alphas=[0.0, 0.1, 0.3], seeds=[0, 1, 2], overrides=dict(steps=200, batch=128), di_steps=400)
MNIST = dict(alphas=[0.0], seeds=[0], overrides=dict(batch=64, steps=100, eval_samples=500))
KEYS = ("reward", "quality", "distance")
# The worlds' unbounded rewards (toy2d: the height y; MNIST: the bold logit), not their in-distribution defaults: this
# frontier shows what a too-large alpha_rew does to a reward without an optimum (over-optimisation). The default
# rewards' DI++ frontier is in the side-by-side report (benchmarks/report.py, rows "alpha_rew = ...").
MODELS = {"toy2d": "toy2d:reward=height", "mnist": "mnist:reward=logit"}


def run_one(world, name: str, tag: str, **kw) -> dict:
    cfg = dipp.Config(model=MODELS[name], out=str(ROOT / "runs" / f"bench-dipp-{name}-{tag}"), progress=False,
                      overwrite=True, ema=True, **kw)
    print(f"=== {name} {tag}: {kw}", flush=True)
    t0 = time.perf_counter()
    metrics = dipp.train(cfg, world=world)
    return {"tag": tag, **kw, **metrics, "wall_seconds": time.perf_counter() - t0}


def pi_masses() -> dict:
    """Where the log-normal puts its mass on the discrete schedule: clamped onto the end bins (the old code) vs
    truncated by rejection (now)."""
    sched = common.Schedule("scaled_linear")
    ls = dipp.log_sigma_ve(sched)
    cdf = torch.distributions.Normal(-2.0, 2.0).cdf
    mid = (ls[1:] + ls[:-1]) / 2
    clamped = cdf(torch.cat([mid, ls[-1:] + 50])) - cdf(torch.cat([ls[:1] - 50, mid]))
    trunc = dipp.time_density(sched, "lognormal", 0, 999)
    return {"sigma_ve_t0": float(ls[0].exp()), "sigma_ve_t999": float(ls[-1].exp()),
            "clamped_mass_t0": float(clamped[0] / clamped.sum()), "truncated_mass_t0": float(trunc[0]),
            "truncated_mass_t_below_20": float(trunc[:20].sum()),
            "init_timestep_sigma_2.5": dipp.init_timestep(sched, 2.5)}


def mean_sd(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else (math.nan,) * 2


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (setting, alpha_rew): mean and sd over seeds of the raw and the EMA metrics."""
    out = []
    for setting in SETTINGS:
        for a in sorted({r["reward_scale"] for r in rows if r["setting"] == setting}):
            group = [r for r in rows if r["setting"] == setting and r["reward_scale"] == a]
            agg = {"setting": setting, "reward_scale": a, "seeds": len(group)}
            for k in KEYS:
                for which in ("base", "tuned", "ema"):
                    agg[f"{k}_{which}"] = mean_sd([r[f"{k}_{which}"] for r in group])
            agg["ikl_pull_last"] = mean_sd([r.get("ikl_pull_last") for r in group])
            out.append(agg)
    return out


def last_log_value(tag: str, world: str, key: str):
    import csv

    path = ROOT / "runs" / f"bench-dipp-{world}-{tag}" / "log.csv"
    rows = list(csv.DictReader(open(path)))
    tail = rows[-20:]
    return statistics.mean(float(r[key]) for r in tail)


def fmt(ms) -> str:
    m, s = ms
    return f"{m:.3f} ± {s:.3f}"


def markdown(results: dict) -> str:
    md = [f"Machine: {results['machine']}. Command: `{results['command']}` ({results['seconds']:.0f} s).", "",
          "Time density pi on the SDXL schedule (computed, not trained): the old clamped log-normal put "
          f"{results['pi']['clamped_mass_t0']:.3f} of its mass on t = 0; truncated by rejection "
          f"{results['pi']['truncated_mass_t0']:.3f} (sigma_VE(0) = {results['pi']['sigma_ve_t0']:.4f}, "
          f"sigma_VE(999) = {results['pi']['sigma_ve_t999']:.2f}); {results['pi']['truncated_mass_t_below_20']:.3f}"
          f" below t = 20. sigma_init = 2.5 is t = {results['pi']['init_timestep_sigma_2.5']}.", ""]
    for world in ("toy2d", "mnist"):
        if world not in results:
            continue
        r = results[world]
        c = r["config"]
        md += [f"### {world}: alpha_rew frontier, {c['steps']} updates of batch {c['batch']}, seeds {r['seeds']} "
               "(mean ± sd over seeds; raw = the generator, = EMA off; EMA = decay 0.95)", "",
               "| setting | alpha_rew | reward raw | reward EMA | quality raw | quality EMA | distance raw | "
               "distance EMA | IKL pull (last 20 updates) |", "|---|---|---|---|---|---|---|---|---|"]
        for a in r["aggregate"]:
            md.append(f"| {a['setting']} | {a['reward_scale']:g} | {fmt(a['reward_tuned'])} | {fmt(a['reward_ema'])} | "
                      f"{fmt(a['quality_tuned'])} | {fmt(a['quality_ema'])} | {fmt(a['distance_tuned'])} | "
                      f"{fmt(a['distance_ema'])} | {fmt(a['ikl_pull_last'])} |")
        b = r["aggregate"][0]
        md += ["", f"Base generator: reward {b['reward_base'][0]:.3f}, quality {b['quality_base'][0]:.3f}, distance "
               f"{b['distance_base'][0]:.3f} (the same for every seed up to the evaluation noise: sd "
               f"{b['quality_base'][1]:.3f} in quality).", ""]
        if r.get("di"):
            d = r["di"]
            md += [f"### {world}: Diff-Instruct pre-training (`--variant di`: the reference read at t = "
                   f"{d['generator_timestep']} (sigma_init 2.5), CFG {d['omega']:g} teacher, {d['steps']} updates, "
                   "seed 0)", "", "| model | reward | quality | distance |", "|---|---|---|---|"]
            for which in ("base", "tuned", "ema"):
                md.append(f"| {'initial (reference at sigma_init)' if which == 'base' else which} | "
                          + " | ".join(f"{d[f'{k}_{which}']:.3f}" for k in KEYS) + " |")
            md.append("")
    md += ["Figure: `benchmarks/results/diff_instruct_pp_toy2d.png` (reward against quality, mean ± sd over seeds; "
           "raw and EMA); samples of every run in `runs/bench-dipp-<world>-<tag>/samples.png`.", ""]
    return "\n".join(md)


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = results["toy2d"]["aggregate"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, setting in enumerate(SETTINGS):
        for which, ls in (("tuned", "-"), ("ema", ":")):
            rows = [a for a in agg if a["setting"] == setting]
            q = [a[f"quality_{which}"] for a in rows]
            r = [a[f"reward_{which}"] for a in rows]
            ax.errorbar([x[0] for x in q], [x[0] for x in r], xerr=[x[1] for x in q], yerr=[x[1] for x in r],
                        ls=ls, marker="o", color=f"C{i}", label=f"{setting} ({'raw' if which == 'tuned' else 'EMA'})")
            for a, qq, rr in zip(rows, q, r):
                ax.annotate(f"{a['reward_scale']:g}", (qq[0], rr[0]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    b = agg[0]
    ax.scatter([b["quality_base"][0]], [b["reward_base"][0]], c="k", marker="x", label="base generator")
    ax.set(xlabel="quality (share of samples on a mode)", ylabel="reward (height)",
           title="toy2d: DI++ frontier over alpha_rew (labels)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_di(world) -> dict:
    # variant di with the paper's defaults: sigma_init 2.5 and a CFG-4.5 teacher (a config built in code counts
    # every field as given, so the CFG scale is passed explicitly)
    return run_one(world, "toy2d", "di", variant="di", cfg_scale=dipp.DI_CFG_SCALE, steps=TOY2D["di_steps"], batch=128)


def sweep(world, name: str, spec: dict) -> dict:
    rows = []
    for setting, kw in SETTINGS.items():
        for a in spec["alphas"]:
            for seed in spec["seeds"]:
                tag = f"{setting}-a{a:g}-s{seed}"
                row = run_one(world, name, tag, reward_scale=a, seed=seed, **kw, **spec["overrides"])
                row["setting"], row["ikl_pull_last"] = setting, last_log_value(tag, name, "ikl_pull")
                rows.append(row)
    config = json.loads((ROOT / "runs" / f"bench-dipp-{name}-{rows[0]['tag']}" / "config.json").read_text())
    return {"runs": rows, "aggregate": aggregate(rows), "seeds": spec["seeds"], "config": config}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", action="store_true", help="also the MNIST runs (alpha_rew = 0, both settings, seed 0)")
    p.add_argument("--only-mnist", action="store_true", help="run only the MNIST runs, added to the results in --out")
    p.add_argument("--only-di", action="store_true", help="run only the variant-di run, added to the results in --out")
    p.add_argument("--replot", action="store_true", help="run nothing: redraw the figure and the markdown from --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diff_instruct_pp.json"))
    args = p.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.replot or args.only_mnist or args.only_di:
        results = json.loads(out.read_text())
        if args.only_di:
            results["toy2d"]["di"] = run_di(harness.load_world(MODELS["toy2d"]))
            results["command"] += "; the di row: --only-di"
            out.write_text(json.dumps(results, indent=2, default=str))
        if args.only_mnist:
            results["mnist"] = sweep(harness.load_world(MODELS["mnist"]), "mnist", MNIST)
            results["mnist_seconds"] = time.perf_counter() - t0
            results["command"] += " (the MNIST runs: --only-mnist)"
            out.write_text(json.dumps(results, indent=2, default=str))
        figure(results, out.with_name(f"{out.stem}_toy2d.png"))
        out.with_suffix(".md").write_text(markdown(results))
        print(markdown(results))
        return
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                          f"torch {torch.__version__}, load average at start {os.getloadavg()[0]:.1f}",
               "command": "OMP_NUM_THREADS=1 python benchmarks/diff_instruct_pp.py" + (" --mnist" if args.mnist else ""),
               "pi": pi_masses()}
    def write():
        results["seconds"] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))
        figure(results, out.with_name(f"{out.stem}_toy2d.png"))
        out.with_suffix(".md").write_text(markdown(results))

    world = harness.load_world(MODELS["toy2d"])
    results["toy2d"] = sweep(world, "toy2d", TOY2D)
    results["toy2d"]["di"] = run_di(world)
    write()  # the toy2d results are kept even if the MNIST runs are stopped
    if args.mnist:
        results["mnist"] = sweep(harness.load_world(MODELS["mnist"]), "mnist", MNIST)
        write()
    print(markdown(results))

if __name__ == "__main__":
    main()
