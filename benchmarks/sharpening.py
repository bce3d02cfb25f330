"""Diffusion-Sharpening on the toy worlds: the claims of issue 4, measured by calling sharpening.train in-process.

    python benchmarks/sharpening.py                          # toy2d: main comparison + n / m ablation
    python benchmarks/sharpening.py --world mnist --steps 100 --seeds 0 --no-ablation

1. Main comparison (Fig. 4 / Fig. 6 of the paper, on the toy): for each variant, sharpening (n = m = 3) against
   its baseline at the same number of updates: SFT against standard fine-tuning (n = m = 1), RLHF against
   Diffusion-DPO (n = 2, m = 1). Reward, quality and distance of fixed-seed samples, base vs tuned; NFEs and CPU
   seconds per update; the reward of fixed-seed samples every --eval-every updates (the reward curve).
2. Ablation (Tables 2 and 3 of the paper, toy2d): n in {2, 3, 4, 8} at m = 3 (n = 1 is the baseline row for
   SFT) and m in {1, 2, 3, 4, 8} at n = 3, final reward and quality.
3. Extras (--extras, toy2d): the options docs/sharpening.md discusses (--target x0, --no-same-noise, and the two
   halves of SFT sharpening: the choice among n noises alone, the m states alone).
Sections run by separate calls are merged into the same JSON.

Writes benchmarks/results/sharpening.json, sharpening.md (the tables) and sharpening.curves-<world>.png (reward
and loss curves, mean over seeds, shaded min-max). Every run keeps its folder under runs/bench-sharpening/."""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sharpening  # noqa: E402

BASELINE = {"sft": dict(n=1, m=1), "rlhf": dict(n=2, m=1)}
BASELINE_NAME = {"sft": "standard fine-tuning (n=1, m=1)", "rlhf": "Diffusion-DPO (n=2, m=1)"}
ABLATION_N = [1, 2, 3, 4, 8]
ABLATION_M = [1, 2, 3, 4, 8]
EXTRAS = {  # name -> (variant, overrides): the options the docs discuss, measured
    "sft sharpening, --target x0": ("sft", dict(n=3, m=3, target="x0")),
    "sft n=1 m=3 (states only)": ("sft", dict(n=1, m=3)),
    "sft n=1 m=3 (states only), --target x0": ("sft", dict(n=1, m=3, target="x0")),
    "sft n=3 m=1 (choice only)": ("sft", dict(n=3, m=1)),
    "rlhf sharpening, --no-same-noise": ("rlhf", dict(n=3, m=3, same_noise=False)),
    "rlhf Diffusion-DPO, --no-same-noise": ("rlhf", dict(n=2, m=1, same_noise=False)),
    "rlhf sharpening, --target x0": ("rlhf", dict(n=3, m=3, target="x0")),
}


def run_one(world: str, variant: str, label: str, seed: int, steps: int, overrides: dict, args) -> dict:
    out = ROOT / "runs" / "bench-sharpening" / f"{world}-{variant}-{label}-s{seed}"
    cfg = sharpening.Config(model=world, variant=variant, steps=steps, seed=seed, out=str(out),
                            eval_every=args.eval_every, final_samples=args.final_samples, save_every=steps,
                            **{**args.common, **overrides})
    cpu = time.process_time()
    metrics = sharpening.train(cfg)
    metrics["cpu_seconds"] = time.process_time() - cpu
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    metrics["curve"] = {"step": [0] + [int(r["step"]) for r in rows if r["eval_reward"]],
                        "eval_reward": [metrics["reward_base"]] + [float(r["eval_reward"]) for r in rows
                                                                    if r["eval_reward"]]}
    # the paper's Fig. 4 compares losses: per state (Eq. 9 sums m states) and, for RLHF, without the reward gap
    metrics["loss"] = [float(r["dpo_loss"]) if variant == "rlhf" else float(r["loss"]) / cfg.m for r in rows]
    metrics["config"] = {k: v for k, v in vars(cfg).items() if k not in ("out",)}
    print(f"[bench] {world} {variant} {label} seed {seed}: reward {metrics['reward_base']:.3f} -> "
          f"{metrics['reward_tuned']:.3f}, quality {metrics['quality_base']:.3f} -> {metrics['quality_tuned']:.3f}, "
          f"{metrics['cpu_seconds']:.1f} CPU s", flush=True)
    return metrics


def summarize(runs: list[dict]) -> dict:
    keys = ("reward_base", "reward_tuned", "quality_base", "quality_tuned", "distance_base", "distance_tuned",
            "nfe_per_update", "seconds_per_update", "seconds", "cpu_seconds")
    out = {}
    for k in keys:
        v = torch.tensor([r[k] for r in runs], dtype=torch.float64)
        out[k] = float(v.mean())
        out[k + "_std"] = float(v.std()) if len(v) > 1 else 0.0
    return out


def plot_curves(world: str, main: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    for col, variant in enumerate(("sft", "rlhf")):
        for label, color in (("sharpening", "C0"), ("baseline", "C1")):
            runs = main[variant][label]["runs"]
            name = "sharpening (n=3, m=3)" if label == "sharpening" else BASELINE_NAME[variant]
            steps = runs[0]["curve"]["step"]
            rew = torch.tensor([r["curve"]["eval_reward"] for r in runs])
            ax = axes[0, col]
            ax.plot(steps, rew.mean(0), color=color, label=name)
            ax.fill_between(steps, rew.min(0).values, rew.max(0).values, color=color, alpha=0.2)
            loss = torch.tensor([r["loss"] for r in runs])
            k = max(1, loss.shape[1] // 30)  # moving average over k updates
            smooth = torch.nn.functional.avg_pool1d(loss[:, None], k, stride=1)[:, 0]
            axes[1, col].plot(range(k, loss.shape[1] + 1), smooth.mean(0), color=color, label=name)
        axes[0, col].set(title=f"{world} {variant}: reward of fixed-seed samples", xlabel="update")
        what = "-log sigma(logit) of Eq. 11" if variant == "rlhf" else "Eq. 9 loss per state"
        axes[1, col].set(title=f"{world} {variant}: {what}"
                          + " (moving average)", xlabel="update")
        axes[0, col].legend(fontsize=8)
        axes[1, col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}. Commands: " + ", ".join(f"`{c}`" for c in results["commands"]) + ".",
             ""]
    for world, r in results["worlds"].items():
        lines += [f"**{world}**: {r['steps']} updates, seeds {r['seeds']}, mean ± std over seeds; rewards and "
                  f"quality of {r['final_samples']} fixed-seed 25-step DDIM samples, base model vs tuned"
                  + (f"; options {r['common']}" if r.get("common") else "")
                  + (f"; load average {r['load_average_at_start']} when the last call on this world started (2 "
                     "cores shared by several engineers: CPU seconds are the comparable cost)"
                     if "load_average_at_start" in r else "") + ".", "",
                  "| variant | method | NFE / update | reward base | reward tuned | quality tuned | distance tuned "
                  "| CPU s / run |", "|---|---|---|---|---|---|---|---|"]
        for variant, by in r.get("main", {}).items():
            for label in ("baseline", "sharpening"):
                s = by[label]["summary"]
                name = "sharpening (n=3, m=3)" if label == "sharpening" else BASELINE_NAME[variant]
                lines.append(f"| {variant} | {name} | {s['nfe_per_update']:.0f} | {s['reward_base']:.3f} | "
                             f"{s['reward_tuned']:.3f} ± {s['reward_tuned_std']:.3f} | "
                             f"{s['quality_tuned']:.3f} ± {s['quality_tuned_std']:.3f} | "
                             f"{s['distance_tuned']:.3f} | {s['cpu_seconds']:.1f} |")
        lines.append("")
        if r.get("extras"):
            lines += [f"{world}, options (same updates and seeds):", "",
                      "| run | NFE / update | reward tuned | quality tuned | distance tuned |", "|---|---|---|---|---|"]
            for name, e in r["extras"].items():
                s = e["summary"]
                lines.append(f"| {name} | {s['nfe_per_update']:.0f} | {s['reward_tuned']:.3f} ± "
                             f"{s['reward_tuned_std']:.3f} | {s['quality_tuned']:.3f} ± {s['quality_tuned_std']:.3f} "
                             f"| {s['distance_tuned']:.3f} |")
            lines.append("")
        for variant, abl in r.get("ablation", {}).items():
            for what in ("n", "m"):
                rows = abl[what]
                fixed = "m = 3" if what == "n" else "n = 3"
                lines += [f"{world} {variant}, ablation over {what} ({fixed}; Table {2 if what == 'n' else 3} of "
                          "the paper):", "", f"| {what} | NFE / update | reward tuned | quality tuned |",
                          "|---|---|---|---|"]
                for value, s in rows.items():
                    lines.append(f"| {value} | {s['nfe_per_update']:.0f} | {s['reward_tuned']:.3f} ± "
                                 f"{s['reward_tuned_std']:.3f} | {s['quality_tuned']:.3f} ± "
                                 f"{s['quality_tuned_std']:.3f} |")
                lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", nargs="+", default=["toy2d"], choices=["toy2d", "mnist"])
    p.add_argument("--steps", type=int, default=None, help="updates per run (default: sharpening.py's default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["sft", "rlhf"], choices=["sft", "rlhf"])
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                   help="the n / m ablation (toy2d only)")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--main", action=argparse.BooleanOptionalAction, default=True,
                   help="the main comparison (sharpening vs baseline, reward curves)")
    p.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                   help="the option rows of EXTRAS (toy2d only), with --seeds")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--final-samples", type=int, default=1000)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra sharpening.Config fields for every run, e.g. lr=3e-3")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sharpening.json"))
    args = p.parse_args()
    args.common = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        default = getattr(sharpening.Config(), k)
        args.common[k] = (v.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)(v)
    steps = args.steps or sharpening.Config().steps
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update(machine=f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                           f"torch {torch.__version__}",
                   )
    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT))] + sys.argv[1:])
    earlier = results.pop("commands", [results.pop("command")] if "command" in results else [])
    results["commands"] = [c for c in earlier if c != command] + [command]
    results.setdefault("worlds", {})
    out.parent.mkdir(parents=True, exist_ok=True)
    for world in args.world:
        r = results["worlds"].get(world, {})
        if r.get("steps", steps) != steps:
            r = {}  # sections measured at another number of updates are not comparable: start this world again
        r.update(steps=steps, seeds=args.seeds, final_samples=args.final_samples, common=args.common,
                 load_average_at_start=round(os.getloadavg()[0], 1))
        if args.main:
            r["main"] = {}
            for variant in args.variants:
                r["main"][variant] = {}
                for label, over in (("sharpening", dict(n=3, m=3)), ("baseline", BASELINE[variant])):
                    runs = [run_one(world, variant, label, s, steps, over, args) for s in args.seeds]
                    r["main"][variant][label] = {"overrides": over, "summary": summarize(runs), "runs": runs}
        if args.ablation and world == "toy2d":
            r["ablation"] = {}
            for variant in args.variants:
                abl = {"n": {}, "m": {}}
                for what, values in (("n", ABLATION_N), ("m", ABLATION_M)):
                    for v in values:
                        over = dict(n=v, m=3) if what == "n" else dict(n=3, m=v)
                        if variant == "rlhf" and over["n"] < 2:
                            continue
                        runs = [run_one(world, variant, f"{what}{v}", s, steps, over, args)
                                for s in args.ablation_seeds]
                        abl[what][v] = summarize(runs)
                r["ablation"][variant] = abl
        if args.extras and world == "toy2d":
            r["extras"] = {}
            for name, (variant, over) in EXTRAS.items():
                if variant in args.variants:
                    label = "x-" + "-".join(f"{k}{v}" for k, v in over.items())
                    runs = [run_one(world, variant, label, s, steps, over, args) for s in args.seeds]
                    r["extras"][name] = {"variant": variant, "overrides": over, "summary": summarize(runs)}
        if out.exists():  # another call may have written other worlds meanwhile: keep them
            latest = json.loads(out.read_text())
            results["worlds"] = {**results["worlds"], **latest.get("worlds", {})}
            results["commands"] = [c for c in latest.get("commands", []) if c not in results["commands"]] + \
                results["commands"]
        results["worlds"][world] = r
        if args.main and set(args.variants) == {"sft", "rlhf"}:
            plot_curves(world, r["main"], out.with_name(f"sharpening.curves-{world}.png"))
        out.write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
