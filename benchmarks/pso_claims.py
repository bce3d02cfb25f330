"""PSO's central claims on toy2d, read out by measures that close or overlapping mode sets cannot fool (issue 15).

    OMP_NUM_THREADS=1 python benchmarks/pso_claims.py                 # 3 seeds, ~25 min of one CPU core
    OMP_NUM_THREADS=1 python benchmarks/pso_claims.py --seeds 0 --only "half:"

Writes benchmarks/results/pso_claims.json (every metric of every run, per seed), pso_claims.md (the tables of
docs/pso.md), pso_claims.frontier.png and the sample figures pso_claims.<target>.<run>.png. Runs go to
runs/bench-pso-claims/.

1. Transfer (Fig. 1): naive eps-MSE fine-tuning (t ~ U[0, T) as Ho et al., or the grid times) against Eq. 5
   (`--variant pso`: forward-diffused target, on-policy reference trajectory), on three targets that share the
   cached base models: "half" (the default: each class keeps its modes at 0-135 degrees, unmoved), "rotate" (the
   earlier target: the ring rotated 22.5 degrees) and "scale" (the ring scaled by 1.4). Read-outs at 4 steps and
   1 step: `transfer` = share of samples nearer a target mode than any other base mode, `sharpness` = share
   within 0.2 of any mode of either split. Naive at three learning rates and Eq. 5 at several beta trace each
   method's transfer-sharpness frontier.
   Mechanism probe ("last step frozen"): the tuned model samples the first three of its 4 steps and the frozen
   model the last one (t_1 = 249 -> x_0, the transition Eq. 5 drops): where the blur comes from.
2. Reward (Tables 1-2): online (Eq. 7) and offline (Eq. 6, reward-ranked pairs of real samples) PSO over beta, on
   the in-distribution reward (soft membership of the upper modes, optimum 1) and on the unbounded height.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import pso  # noqa: E402
import toy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {  # world keyword arguments (toy2d.Toy2D.__init__); none changes the base data or the cache key
    "half": dict(target_rotation=0.0, target_keep=(0, 1, 2, 3), reward="modes"),
    "rotate": dict(target_rotation=math.pi / 8, target_keep=tuple(range(8)), reward="modes"),
    "scale": dict(target_rotation=0.0, target_scale=1.4, target_keep=tuple(range(8)), reward="modes"),
    "height": dict(target_rotation=0.0, target_keep=(0, 1, 2, 3), reward="height"),
}
TRANSFER = {
    "naive (t ~ U[0, T), lr 1e-3)": dict(variant="naive"),
    "naive (t ~ U[0, T), lr 3e-5)": dict(variant="naive", lr=3e-5),
    "naive (t ~ U[0, T), lr 1e-5)": dict(variant="naive", lr=1e-5),
    "naive (grid times, lr 1e-3)": dict(variant="naive", naive_t="grid"),
    "pso (paper: beta 50, N 4)": dict(variant="pso"),
    "pso (beta 5, N 4)": dict(variant="pso", beta=5.0),
    "pso (beta 1, N 4)": dict(variant="pso", beta=1.0),
    "pso (beta 5, 8-step train grid)": dict(variant="pso", beta=5.0, train_steps=8),
    "pso (beta 2, 8-step train grid)": dict(variant="pso", beta=2.0, train_steps=8),
}
OTHER_TARGETS = ["naive (t ~ U[0, T), lr 1e-3)", "pso (paper: beta 50, N 4)", "pso (beta 5, 8-step train grid)"]
REWARD = {f"online (beta {b:g})": dict(variant="online", beta=b) for b in (2.0, 5.0, 20.0, 50.0)}
REWARD.update({f"offline (preference pairs, beta {b:g})": dict(variant="offline", beta=b) for b in (5.0, 20.0, 50.0)})
HEIGHT = ["online (beta 5)", "offline (preference pairs, beta 50)"]


def experiments() -> list[tuple[str, str, str, dict]]:
    """(claim, target, label, Config overrides) in run order."""
    out = [("transfer", "half", k, v) for k, v in TRANSFER.items()]
    out += [("transfer", t, k, TRANSFER[k]) for t in ("rotate", "scale") for k in OTHER_TARGETS]
    out += [("reward", "half", k, v) for k, v in REWARD.items()]
    out += [("reward", "height", k, REWARD[k]) for k in HEIGHT]
    return out


def last_step_frozen(world, den, n: int, seed: int) -> dict:
    """Sample with the tuned model on every step but the last (t_1 -> x_0), which the frozen model takes."""
    from pso_fig1_search import mixed_sample  # the one mixed tuned/frozen sampler of the PSO probes

    transfer, sharpness = mixed_sample(world, den, n, seed, set(range(len(den.timesteps) - 1)))
    return {"transfer_tuned_last_frozen": transfer, "sharpness_tuned_last_frozen": sharpness}


def run(only: list[str] | None, seeds: list[int], steps: int | None, write=None) -> dict:
    worlds, out = {}, {}
    for claim, target, label, overrides in experiments():
        key = f"{target}: {label}"
        if only and not any(o in key for o in only):
            continue
        if target not in worlds:
            worlds[target] = toy.load_world("toy2d", **TARGETS[target])
        world, per_seed = worlds[target], []
        for seed in seeds:
            slug = _slug(key)
            cfg = pso.Config(model="toy2d", naive_baseline=False, seed=seed, overwrite=True,
                             out=str(ROOT / "runs" / "bench-pso-claims" / f"{slug}-seed{seed}"),
                             **{**({"steps": steps} if steps else {}), **overrides})
            start = time.perf_counter()
            m, den = _reuse(cfg, world) or pso.train(cfg, world)
            if claim == "transfer":
                m.update(last_step_frozen(world, den, cfg.eval_samples, seed + 10_000))
            m["wall_seconds"] = time.perf_counter() - start
            per_seed.append(m)
            if seed == seeds[0]:
                shutil.copyfile(Path(cfg.out) / "samples.png", RESULTS / f"pso_claims.{slug}.png")
            read = ("transfer", "sharpness") if claim == "transfer" else ("reward", "quality")
            print(f"[pso_claims] {key} seed {seed}: " + ", ".join(
                f"{r} {m[f'{r}_base']:.3f} -> {m[f'{r}_tuned']:.3f} (1 step {m[f'{r}_tuned_1step']:.3f})"
                for r in read) + f" ({m['wall_seconds']:.0f} s)", flush=True)
        out[key] = {"claim": claim, "target": target, "world": TARGETS[target], "config": overrides, "seeds": seeds,
                    "per_seed": per_seed, "metrics": _mean(per_seed)}
        if write is not None:
            write(out)  # after every row: an interrupted benchmark keeps what it measured
    return out


def _reuse(cfg, world):
    """A finished run folder with the same settings (config.json, metrics.json, adapter): its metrics and its
    tuned model, so an interrupted benchmark continues where it stopped."""
    out = Path(cfg.out)
    try:
        same = json.loads((out / "config.json").read_text()) == json.loads(json.dumps(dataclasses.asdict(cfg)))
        m = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not same:
        return None
    den = world.denoiser("student", lora_rank=cfg.lora_rank, train_full=cfg.train_full, sampler=cfg.sampler or None)
    den.load_adapter_state(load_file(str(out / "adapter" / "adapter.safetensors")))
    print(f"[pso_claims] reusing the finished run {out}", flush=True)
    return m, den


def _mean(rows: list[dict]) -> dict:
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {}
    for k in keys:
        t = torch.tensor([float(r[k]) for r in rows], dtype=torch.float64)
        out[k] = {"mean": float(t.mean()), "sd": float(t.std()) if len(t) > 1 else 0.0}
    return out


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-").replace("--", "-")


def _fmt(m: dict, key: str) -> str:
    if key not in m:
        return "-"
    v = m[key]
    return f"{v['mean']:.3f}" + (f" ± {v['sd']:.3f}" if v["sd"] else "")


def markdown(runs: dict, seeds: list[int], command: str) -> str:
    lines = [f"# PSO claims on toy2d (issue 15)", "", f"Command: `{command}`", "",
             f"Mean ± sd over seeds {seeds}; 300 updates, batch 64, lr 1e-3 unless stated; 1000 evaluation "
             "samples from the same noise for every model. transfer = share of samples nearer a target mode than "
             "any other base mode; sharpness = share within 0.2 of any mode of either split; 'last step frozen' = "
             "the tuned model on the first 3 of its 4 steps, the frozen model on t_1 = 249 -> x_0.", ""]
    for target in ("half", "rotate", "scale"):
        rows = {k: v for k, v in runs.items() if v["claim"] == "transfer" and v["target"] == target}
        if not rows:
            continue
        lines += [f"## Transfer, target `{target}` ({TARGETS[target] or 'the default'})", "",
                  "| model | transfer (4 steps) | sharpness (4 steps) | transfer (1 step) | sharpness (1 step) | "
                  "last step frozen: transfer | last step frozen: sharpness | reward |", "|---|---|---|---|---|---|---|---|"]
        first = next(iter(rows.values()))["metrics"]
        lines.append("| base model | " + " | ".join(_fmt(first, k) for k in (
            "transfer_base", "sharpness_base", "transfer_base_1step", "sharpness_base_1step")) + " | - | - | "
            + _fmt(first, "reward_base") + " |")
        for key, r in rows.items():
            m = r["metrics"]
            lines.append(f"| {key.split(': ', 1)[1]} | " + " | ".join(_fmt(m, k) for k in (
                "transfer_tuned", "sharpness_tuned", "transfer_tuned_1step", "sharpness_tuned_1step",
                "transfer_tuned_last_frozen", "sharpness_tuned_last_frozen", "reward_tuned")) + " |")
        lines.append("")
    for target, title in (("half", "in-distribution reward (soft membership of the upper modes, optimum 1)"),
                          ("height", "unbounded reward (height y)")):
        rows = {k: v for k, v in runs.items() if v["claim"] == "reward" and v["target"] == target}
        if not rows:
            continue
        lines += [f"## Reward: online (Eq. 7) vs offline (Eq. 6) PSO over beta, {title}", "",
                  "| model | reward (4 steps) | quality (4 steps) | reward (1 step) | quality (1 step) |",
                  "|---|---|---|---|---|"]
        first = next(iter(rows.values()))["metrics"]
        lines.append("| base model | " + " | ".join(_fmt(first, k) for k in (
            "reward_base", "quality_base", "reward_base_1step", "quality_base_1step")) + " |")
        for key, r in rows.items():
            m = r["metrics"]
            lines.append(f"| {key.split(': ', 1)[1]} | " + " | ".join(_fmt(m, k) for k in (
                "reward_tuned", "quality_tuned", "reward_tuned_1step", "quality_tuned_1step")) + " |")
        lines.append("")
    lines += [f"Machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s); "
              "shared CPU.", ""]
    return "\n".join(lines)


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, suffix, title in ((axes[0], "", "4 steps"), (axes[1], "_1step", "1 step")):
        base = None
        for key, r in runs.items():
            if r["claim"] != "transfer" or r["target"] != "half":
                continue
            m = r["metrics"]
            base = m
            x, y = m[f"transfer_tuned{suffix}"]["mean"], m[f"sharpness_tuned{suffix}"]["mean"]
            naive = r["config"]["variant"] == "naive"
            ax.scatter(x, y, marker="o" if naive else "^", c="tab:red" if naive else "tab:blue")
            ax.annotate(key.split(": ", 1)[1].replace("t ~ U[0, T), ", ""), (x, y), fontsize=6)
        if base:
            ax.scatter(base[f"transfer_base{suffix}"]["mean"], base[f"sharpness_base{suffix}"]["mean"], c="k",
                       marker="s")
        ax.set(title=f"target 'half', {title} (red: naive, blue: Eq. 5, black: base)", xlabel="transfer",
               ylabel="sharpness")
        ax.title.set_fontsize(8)
    ax = axes[2]
    for key, r in runs.items():
        if r["claim"] != "reward" or r["target"] != "half":
            continue
        m = r["metrics"]
        online = r["config"]["variant"] == "online"
        x, y = m["quality_tuned"]["mean"], m["reward_tuned"]["mean"]
        ax.scatter(x, y, c="tab:green" if online else "tab:purple", marker="o" if online else "^")
        ax.annotate(key.split(": ", 1)[1], (x, y), fontsize=6)
    ax.set(title="reward-quality, 4 steps (green: online, purple: offline)", xlabel="quality (base data)",
           ylabel="reward (soft membership)")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="updates per run (default: pso.Config's 300)")
    p.add_argument("--only", nargs="*", default=None, help="run only the rows whose 'target: label' contains one")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/pso_claims.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    start = time.perf_counter()

    def write(runs):
        doc = {"command": command, "seeds": args.seeds, "wall_seconds": time.perf_counter() - start, "runs": runs}
        (RESULTS / "pso_claims.json").write_text(json.dumps(doc, indent=1))
        (RESULTS / "pso_claims.md").write_text(markdown(runs, args.seeds, command))
        plot(runs, RESULTS / "pso_claims.frontier.png")

    run(args.only, args.seeds, args.steps, write)
    print(f"wrote {RESULTS / 'pso_claims.md'} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
