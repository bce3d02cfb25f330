"""Why Eq. 5 on toy2d loses the 1-step quality the paper keeps (its Table 2): which transitions cause it.

    OMP_NUM_THREADS=1 python benchmarks/pso_one_step.py            # 4 rows x 3 seeds, ~10 min of CPU
    python benchmarks/pso_one_step.py --replot                     # rewrite the markdown from the json

The 1-step sampler reads one prediction only: x0_hat(x_999), from pure noise. Two readings of its blur: (a) the
data side (Eq. 11) at t = 999 regresses the prediction on target data forward-diffused with fresh noise, nearly
independent of x_999, so it pulls x0_hat toward the posterior mean (the class mean of the target data, between
the modes); (b) nothing holds x0_hat(x_999) in place: an eps-error at t = 999 moves x0_hat by sigma/alpha (large),
while it weighs little in the transition log-ratios (Eq. 12: SNR of the next time) and the 4-step sampler passes
it on at the next time's small alpha, so a LoRA update made anywhere (shared across t) moves it freely.
Probe: the default `python pso.py` setting (toy2d target "half", beta 7, 16-step training grid, 300 updates, batch
64, lr 1e-3) with transitions masked out of the loss (both sides): the t = 999 one, every one from t > 750, or all
but the t = 999 one. Reading (a) predicts sharp 1-step samples when the high-noise transitions are masked; (b)
predicts blur in every row. The markdown also lists the schedule's weights behind (b): SNR of each transition's
next time, and sigma_t / alpha_t.

Read-outs (1000 evaluation samples from fixed noise, as pso.train): transfer and sharpness at 4 and 1 step, and
`to class mean (1 step)`: the mean distance of the 1-step samples to the mean of their class's target data
(posterior-mean blur: near 0).
The mask is applied by wrapping `pso.dpo` (the one function every Eq. 5 update sends its [B, S'] log-ratios to)
in this process: a probe, not an option of pso.py. Writes benchmarks/results/pso_one_step.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import harness  # noqa: E402
import pso  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETTING = dict(variant="pso", beta=7.0, train_steps=16)  # toy2d's command-line defaults (Toy2D.cli_defaults)
ROWS = {  # label -> which transitions (by their start time t_n) enter the loss; None = all (S' = 15, from t 999)
    "Eq. 5 (default python pso.py)": None,
    "Eq. 5 without the t = 999 transition": lambda t: t < 999,
    "Eq. 5 without the transitions from t > 750": lambda t: t <= 750,
    "Eq. 5 with only the t = 999 transition": lambda t: t == 999,
}
READ = [("transfer_{}", "transfer (4 steps)"), ("sharpness_{}", "sharpness (4 steps)"),
        ("transfer_{}_1step", "transfer (1 step)"), ("sharpness_{}_1step", "sharpness (1 step)"),
        ("to_class_mean_{}_1step", "to class mean (1 step)")]


def class_mean_distance(world, x0: torch.Tensor, cond: torch.Tensor) -> float:
    """Mean distance of samples to the mean of their class's target data (the posterior mean given no information)."""
    modes = world.modes("target")
    means = torch.stack([modes[m].mean(0) for m in world.class_modes("target").values()])
    return float((x0.double() - means[cond].double()).norm(dim=1).mean())


def run(label: str, keep, seed: int, world, steps: int) -> dict:
    original = pso.dpo

    def masked(s, lr_target, lr_reference, *rest):
        columns = [k for k, t in enumerate(s.grid[:-1]) if keep(t)]  # column k: the transition from grid[k]
        return original(s, lr_target[:, columns], lr_reference[:, columns], *rest)

    cfg = pso.Config(model="toy2d", naive_baseline=False, seed=seed, progress=False, steps=steps, overwrite=True,
                     out=str(ROOT / "runs" / "bench-pso-one-step" / f"row{list(ROWS).index(label)}-seed{seed}"),
                     **SETTING)
    pso.dpo = original if keep is None else masked
    try:
        start = time.perf_counter()
        m, den = pso.train(cfg, world)
    finally:
        pso.dpo = original
    m["wall_seconds"] = time.perf_counter() - start
    # the 1-step samples again, from the same evaluation conditions and seed as pso.train, for the class-mean distance
    kernel = common.make_kernel(den.sampler, world.schedule)
    cond = world.eval_conditions(cfg.eval_samples)
    for name, frozen in (("base", True), ("tuned", False)):
        x1 = pso.draw(den, kernel, world, cond, common.few_step_timesteps(1), cfg.seed + 10_000, frozen=frozen)
        m[f"to_class_mean_{name}_1step"] = class_mean_distance(world, x1, cond)
    return m


def mean_sd(xs) -> str:
    t = torch.tensor(xs, dtype=torch.float64)
    return f"{float(t.mean()):.3f} ± {float(t.std()):.3f}" if len(t) > 1 else f"{float(t.mean()):.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="updates per run (300: the default python pso.py)")
    p.add_argument("--out", default=str(RESULTS / "pso_one_step.json"))
    p.add_argument("--replot", action="store_true", help="run nothing: rewrite the markdown from --out")
    args = p.parse_args(argv)
    world = harness.load_world("toy2d")
    if args.replot:
        saved = json.loads(Path(args.out).read_text())
        write_markdown(args, world, saved["runs"], saved["command"], saved["machine"], saved["wall_seconds"])
        return
    start, results = time.perf_counter(), {}
    for label, keep in ROWS.items():
        results[label] = [run(label, keep, seed, world, args.steps) for seed in args.seeds]
        r = results[label]
        print(f"[pso_one_step] {label}: " + ", ".join(f"{name} {mean_sd([m[k.format('tuned')] for m in r])}"
                                                      for k, name in READ), flush=True)
    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/pso_one_step.py",
                        *(argv if argv is not None else sys.argv[1:])])
    machine = f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"
    wall = time.perf_counter() - start
    Path(args.out).write_text(json.dumps({"command": command, "machine": machine, "setting": SETTING,
                                          "seeds": args.seeds, "wall_seconds": wall, "runs": results},
                                         indent=1, default=str))
    write_markdown(args, world, results, command, machine, wall)


def snr_line(world, grid) -> str:
    """How much an x0-prediction error at t_n weighs in the transition t_n -> t_{n-1} of the x0-renoise MDP: its
    mean is alpha_{t_{n-1}} x0_hat with std sigma_{t_{n-1}}, so an error d enters the log-ratio (Eq. 12) as
    SNR(t_{n-1}) ||d||^2 / 2, and enters the next sampling state scaled by alpha_{t_{n-1}} under unit noise."""
    a = world.schedule.alphas_cumprod
    return ", ".join(f"{t} → {u}: {float(a[u] / (1 - a[u])):.4f}" for t, u in zip(grid[:-1], grid[1:]))


def amplification_line(world, grid) -> str:
    """sigma_t / alpha_t: how much an error of the eps-prediction at t moves x0_hat = (x_t - sigma_t eps) / alpha_t
    (the 1-step sample is x0_hat at t = 999)."""
    a = world.schedule.alphas_cumprod
    return ", ".join(f"{t}: {float(((1 - a[t]) / a[t]) ** 0.5):.2f}" for t in grid)


def write_markdown(args, world, results, command, machine, wall):
    first = next(iter(results.values()))
    lines = ["# Eq. 5 at one step on toy2d: the t = 999 transition (PSO Table 2 probe)", "",
             f"Command: `{command}`. Setting: the default `python pso.py` (target half, beta 7, 16-step training "
             f"grid, {args.steps} updates, batch 64, lr 1e-3); mean ± sd over seeds {args.seeds}; 1000 evaluation samples "
             "from fixed noise. Masked: the named transitions' columns of both sides' per-transition log-ratios "
             "left out of the loss (16-step grid: 999, 937, 874, 811, 749, ...).", "",
             "| model | " + " | ".join(name for _, name in READ) + " |", "|---|" + "---|" * len(READ),
             "| base model | " + " | ".join(mean_sd([m[k.format("base")] for m in first]) for k, _ in READ) + " |"]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(mean_sd([m[k.format("tuned")] for m in r]) for k, _ in READ) + " |")
    lines += ["", "SNR(t_{n-1}) = the weight of an x0-prediction error at t_n in the transition's log-ratio (Eq. 12, "
              "x0-renoise kernel: mean alpha_{t_{n-1}} x0_hat, std sigma_{t_{n-1}}), on the 16-step training grid: "
              + snr_line(world, common.few_step_timesteps(16)) + "; on the model's 4-step sampling grid: "
              + snr_line(world, common.few_step_timesteps(4)) + ".", "",
              "sigma_t / alpha_t = how far an error of the eps-prediction at t moves x0_hat (the 1-step sample is "
              "x0_hat at t = 999): " + amplification_line(world, common.few_step_timesteps(16)) + ".",
              "", f"Machine: {machine}. Wall {wall:.0f} s."]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
