"""Why RLHF sharpening (n = m = 3) lands below Diffusion-DPO (n = 2, m = 1) on toy2d: measured, not guessed.

    OMP_NUM_THREADS=1 python benchmarks/sharpening_rlhf_vs_dpo.py                    # both sections (~20 min)
    OMP_NUM_THREADS=1 python benchmarks/sharpening_rlhf_vs_dpo.py --sections labels  # the probe alone (~1 min)

benchmarks/sharpening.py found RLHF sharpening below Diffusion-DPO at 100 updates of batch 16 (3 seeds) and the
side-by-side report the other order at 300 updates of batch 64 (3 seeds). Alg. 2 with n = m = 3 differs from
Diffusion-DPO in three ways at once: n (the best and worst of 3 samples instead of a pair of 2), m (the loss on 3
states of a roll-out instead of 1) and therefore the start times (a start needs m - 1 grid times below it). Sections:

  seeds   the 2 x 2 factorial n in {2, 3} x m in {1, 3} (n = 2, m = 1 is Diffusion-DPO; n = m = 3 is Alg. 2), plus
          n = m = 3 regressing each state on the noise that maps it back to its own x_0 (`--target x0`), and
          Diffusion-DPO and Alg. 2 with Eq. 11's reward gap outside log sigma (`--reward-gap outside-plus`, the
          official code's reading: the gap then has no gradient, so both are plain DPO on their pairs), over 10
          seeds at benchmarks/sharpening.py's budget (100 updates of batch 16), and Diffusion-DPO vs Alg. 2 over 6
          seeds at sharpening.py's defaults (300 updates of batch 64). Mean, sd and the standard error of each mean,
          and Welch's t for each row against Diffusion-DPO: |t| < 2 reads "not separated".
  labels  the preference labels Alg. 2 trains on, at the base model (no training): for each (n, m) and 4096
          conditions (start times drawn as in training), how often the chosen winner's sample x_0 has the higher
          true reward R(x_0) than the loser's, the true reward gap R(x_0^w) - R(x_0^l), and that gap as a share of
          the largest gap among the n samples (what an exact ranking would pick), overall and by start time.

Writes benchmarks/results/sharpening_rlhf_vs_dpo.{json,md}; run folders under runs/bench-sharpening-rlhf-vs-dpo/."""
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
import common  # noqa: E402
import harness  # noqa: E402
import sharpening  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DPO = "Diffusion-DPO (n=2, m=1)"
ALG2 = "Alg. 2 (n=3, m=3)"
FACTORIAL = {DPO: dict(n=2, m=1), "n=3, m=1": dict(n=3, m=1), "n=2, m=3": dict(n=2, m=3), ALG2: dict(n=3, m=3),
             "n=3, m=3, target x0": dict(n=3, m=3, target="x0"),
             "Diffusion-DPO, gap outside": dict(n=2, m=1, reward_gap="outside-plus"),
             "Alg. 2, gap outside": dict(n=3, m=3, reward_gap="outside-plus")}
BUDGETS = {"100 x 16": dict(steps=100, batch=16, seeds=list(range(10)), rows=list(FACTORIAL)),
           "300 x 64": dict(steps=300, batch=64, seeds=list(range(6)), rows=[DPO, ALG2])}
LABELS = {"n=2, m=1": (2, 1), "n=3, m=1": (3, 1), "n=2, m=3": (2, 3), "n=3, m=3": (3, 3)}


def run_one(budget: str, row: str, seed: int, final_samples: int) -> dict:
    b = BUDGETS[budget]
    over = FACTORIAL[row]
    name = f"{budget.replace(' ', '')}-" + "-".join(f"{k}{v}" for k, v in over.items()) + f"-s{seed}"
    out = ROOT / "runs" / "bench-sharpening-rlhf-vs-dpo" / name
    shutil.rmtree(out, ignore_errors=True)  # a rerun replaces its folder
    cfg = sharpening.Config(variant="rlhf", steps=b["steps"], batch=b["batch"], seed=seed, out=str(out),
                            final_samples=final_samples, eval_every=b["steps"], save_every=b["steps"],
                            progress=False, **over)
    cpu = time.process_time()
    m = sharpening.train(cfg)
    print(f"[bench] {budget} {row} seed {seed}: reward {m['reward_tuned']:.3f}, quality {m['quality_tuned']:.3f} "
          f"({time.process_time() - cpu:.0f} CPU s)", flush=True)
    return {k: m[k] for k in ("reward_base", "reward_tuned", "quality_base", "quality_tuned", "transfer_tuned")}


def mean_sd_se(v: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(v, dtype=torch.float64)
    sd = float(t.std()) if len(t) > 1 else 0.0
    return float(t.mean()), sd, sd / math.sqrt(len(t))


def welch_t(a: list[float], b: list[float]) -> float:
    (ma, sa, _), (mb, sb, _) = mean_sd_se(a), mean_sd_se(b)
    return (ma - mb) / math.sqrt(sa**2 / len(a) + sb**2 / len(b))


@torch.no_grad()
def label_probe(n_cond: int = 4096, batch: int = 256, seed: int = 0) -> dict:
    """Alg. 2's winner / loser at the base model, against the true reward of the samples they came from."""
    world = harness.load_world("toy2d")
    den = world.denoiser("teacher")
    grid = list(den.timesteps)
    kernel = common.make_kernel(den.sampler, world.schedule, 0.0)
    out = {}
    for label, (n, m) in LABELS.items():
        cfg = sharpening.Config(variant="rlhf", n=n, m=m, batch=batch)
        starts = sharpening.rollout_times(grid, m, -1)
        rec = {"agree": [], "gap": [], "best_gap": [], "t": []}
        for i in range(n_cond // batch):
            gen = torch.Generator().manual_seed(10_000 * seed + i)
            t_start = starts[int(torch.randint(len(starts), (1,), generator=gen))]
            times = grid[grid.index(t_start): grid.index(t_start) + m]
            x0, cond, eps = sharpening.candidates(world, den, kernel, cfg, grid, gen, "cpu")
            x_t = common.add_noise(world.schedule, x0, eps, t_start)
            _, _, rewards = sharpening.sharpening_rollout(den, kernel, x_t, cond, times, world.reward, gen, grad=False)
            w, l = sharpening.choose_best_worst(sharpening.trajectory_scores(rewards), n)
            r_true = world.reward(x0, cond).view(-1, n)  # [B, n] the samples' own rewards
            rw, rl = world.reward(x0[w], common.cond_index(cond, w)), world.reward(x0[l], common.cond_index(cond, l))
            rec["agree"] += ((rw > rl).double() + 0.5 * (rw == rl).double()).tolist()
            rec["gap"] += (rw - rl).tolist()
            rec["best_gap"] += (r_true.max(1).values - r_true.min(1).values).tolist()
            rec["t"] += [t_start] * batch
        t = torch.tensor(rec["t"])
        agree, gap, best = (torch.tensor(rec[k], dtype=torch.float64) for k in ("agree", "gap", "best_gap"))
        tie = gap.abs() < 0.05  # pairs whose two samples the reward hardly tells apart
        row = {"conditions": len(t), "agree": float(agree.mean()), "true_gap": float(gap.mean()),
               "oracle_gap": float(best.mean()), "share_of_oracle": float(gap.mean() / best.mean()),
               "near_ties": float(tie.double().mean()), "agree_without_near_ties": float(agree[~tie].mean())}
        for name, mask in (("t >= 500", t >= 500), ("t < 500", t < 500)):
            row[name] = {"conditions": int(mask.sum()), "agree": float(agree[mask].mean()),
                         "true_gap": float(gap[mask].mean())}
        out[label] = row
        print(f"[labels] {label}: agree {row['agree']:.3f}, true gap {row['true_gap']:.4f} of "
              f"{row['oracle_gap']:.4f}", flush=True)
    return out


def markdown(res: dict) -> str:
    lines = ["Commands: " + ", then ".join(f"`{c}`" for c in res["commands"]) + f" ({res['date']}). Machine: "
             f"{res['machine']}. Total {res['cpu_seconds']:.0f} "
             "CPU s. toy2d, its default reward (soft membership of the upper modes, optimum 1); RLHF sharpening "
             "(`sharpening.py --variant rlhf`) at its defaults but for the columns named; reward and quality of "
             f"{res['final_samples']} fixed-seed 25-step DDIM samples of the tuned model; base reward "
             f"{res['reward_base']:.3f}.", ""]
    for budget, rows in res.get("seeds", {}).items():
        b = BUDGETS[budget]
        lines += [f"**Seeds: {b['steps']} updates of batch {b['batch']}, seeds {b['seeds']}** "
                  "(mean ± sd; se = sd/√seeds; "
                  "Welch's t of the reward against Diffusion-DPO, |t| < 2: not separated)", "",
                  "| row | reward | se | quality | t vs DPO |", "|---|---|---|---|---|"]
        dpo = [r["reward_tuned"] for r in rows[DPO]]
        for row, runs in rows.items():
            r = [x["reward_tuned"] for x in runs]
            mr, sr, se = mean_sd_se(r)
            mq, sq, _ = mean_sd_se([x["quality_tuned"] for x in runs])
            t = "-" if row == DPO else f"{welch_t(r, dpo):+.2f}"
            lines.append(f"| {row} | {mr:.3f} ± {sr:.3f} | {se:.3f} | {mq:.3f} ± {sq:.3f} | {t} |")
        lines.append("")
    if "labels" in res:
        lines += ["**Labels at the base model** (4096 conditions; winner / loser chosen as Alg. 2 does, by the "
                  "trajectory score of Tweedie estimates; 'agree' = share of pairs whose winner sample has the higher "
                  "true reward R(x_0), ties 1/2; 'true gap' = mean R(x_0^w) - R(x_0^l); 'share' = true gap / mean "
                  "largest gap among the n samples; 'near ties' = share of pairs with |true gap| < 0.05)", "",
                  "| n, m | agree | true gap | share of the largest gap | near ties | agree without near ties | "
                  "agree, start t ≥ 500 | agree, start t < 500 |", "|---|---|---|---|---|---|---|---|"]
        for label, r in res["labels"].items():
            lines.append(f"| {label} | {r['agree']:.3f} | {r['true_gap']:.4f} | {r['share_of_oracle']:.2f} | "
                         f"{r['near_ties']:.3f} | {r['agree_without_near_ties']:.3f} | "
                         f"{r['t >= 500']['agree']:.3f} ({r['t >= 500']['conditions']}) | "
                         f"{r['t < 500']['agree']:.3f} ({r['t < 500']['conditions']}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["seeds", "labels"], choices=["seeds", "labels"])
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    p.add_argument("--rows", nargs="+", default=None, choices=list(FACTORIAL),
                   help="rerun only these rows (with --reuse: the other rows are kept from the reused JSON)")
    p.add_argument("--final-samples", type=int, default=500)
    p.add_argument("--reuse", help="a results JSON whose sections are kept (only the named ones are rerun)")
    p.add_argument("--out", default=str(RESULTS / "sharpening_rlhf_vs_dpo.json"))
    args = p.parse_args(argv)
    cpu = time.process_time()
    res = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    command = "OMP_NUM_THREADS=1 python benchmarks/sharpening_rlhf_vs_dpo.py " + " ".join(
        f"'{a}'" if " " in a else a for a in (argv or sys.argv[1:]))
    earlier = res.pop("command", None)  # a results file written before commands were kept as a list
    res.update(commands=res.get("commands", [earlier] if earlier else []) + [command],
               date=time.strftime("%Y-%m-%d"), final_samples=args.final_samples,
               machine=f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
                       f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, load average "
                       f"{os.getloadavg()[0]:.1f} at the start")
    if "seeds" in args.sections:
        res.setdefault("seeds", {})
        for budget in args.budgets:
            b = BUDGETS[budget]
            kept = res["seeds"].get(budget, {})
            res["seeds"][budget] = {row: kept[row] if args.rows and row not in args.rows and row in kept else
                                    [run_one(budget, row, s, args.final_samples) for s in b["seeds"]]
                                    for row in b["rows"] if row in kept or not args.rows or row in args.rows}
    if "labels" in args.sections:
        res["labels"] = label_probe()
    first = next(iter(next(iter(res.get("seeds", {"": {"": [{"reward_base": math.nan}]}}).values())).values()))
    res["reward_base"] = first[0]["reward_base"]
    res["cpu_seconds"] = res.get("cpu_seconds", 0.0) * bool(args.reuse) + time.process_time() - cpu
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
