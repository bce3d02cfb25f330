"""The measurements behind the toy worlds' command-line defaults (`Toy2D.cli_defaults`, `Flow2D.cli_defaults`).

    OMP_NUM_THREADS=1 python benchmarks/world_defaults.py                      # both sections, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/world_defaults.py --sections dipp --worlds toy2d

A default run should show its method's effect on its world without saturating. Two were off:
  dipp  DI++ at diff_instruct_pp.py's alpha_rew 0.1 moves toy2d's reward 0.351 -> 0.370 (report.toy2d.md): no
        visible change. Sweep alpha_rew between the side-by-side report's frontier points (0.1, 1) on toy2d, and
        below 0.1 on flow2d (where 0.1 already costs a third of the quality); 400 updates of batch 256 (the
        script's defaults), reward (toy2d's default, soft membership of the upper modes), quality, distance and
        sharpness of 2000 fixed-seed samples of the tuned generator.
  pso   flow2d ran toy2d's Eq. 5 defaults (beta 7 on a 16-step training grid), whose loss falls to ~1e-12 within 80
        updates there. Sweep beta on the same grid with `python pso.py --model flow2d --beta B` (the naive
        baseline trained first, as the default command does): transfer and sharpness at 4 steps and at 1 step,
        the Eq. 5 loss over the last 50 updates and the share of updates with loss < 1e-6 (saturated: the
        sigmoid has no gradient left).

Writes benchmarks/results/world_defaults.{json,md}; run folders under runs/bench-world-defaults/."""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import diff_instruct_pp as dipp  # noqa: E402
import harness  # noqa: E402
import pso  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "bench-world-defaults"
DIPP_ALPHAS = {"toy2d": [0.2, 0.3, 0.5], "flow2d": [0.02, 0.05]}
PSO_BETAS = {"flow2d": [1.0, 2.0, 3.0, 7.0, 20.0, 50.0]}
KEYS = ("reward", "quality", "distance", "sharpness", "transfer")


def dipp_run(world_name: str, world, alpha: float, seed: int) -> dict:
    out = RUNS / f"dipp-{world_name}-a{alpha:g}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = dipp.Config(model=world_name, reward_scale=alpha, seed=seed, out=str(out), progress=False, save_every=400)
    m = dipp.train(cfg, world=world)
    print(f"[dipp] {world_name} alpha {alpha:g} seed {seed}: reward {m['reward_base']:.3f} -> {m['reward_tuned']:.3f}, "
          f"quality {m['quality_base']:.3f} -> {m['quality_tuned']:.3f}", flush=True)
    return {k: m[k] for k in m if k.split("_")[0] in KEYS}


def pso_run(world_name: str, world, beta: float, seed: int) -> dict:
    out = RUNS / f"pso-{world_name}-b{beta:g}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    # the command line, so the world's defaults apply to what is not given (here: --train-steps)
    cfg = harness.parse_config(pso.Config, ["--model", world_name, "--beta", str(beta), "--train-steps", "16",
                                            "--seed", str(seed), "--out", str(out), "--no-progress"])
    m = pso.experiment(cfg, world)
    losses = [float(r["loss"]) for r in csv.DictReader(open(out / "log.csv"))]
    keep = {k: m[k] for k in m if k.split("_")[0] in KEYS}
    keep.update(loss_last50=sum(losses[-50:]) / 50, saturated=sum(v < 1e-6 for v in losses) / len(losses))
    print(f"[pso] {world_name} beta {beta:g} seed {seed}: transfer {m['transfer_tuned']:.3f} sharpness "
          f"{m['sharpness_tuned']:.3f} (naive {m['transfer_naive']:.3f} / {m['sharpness_naive']:.3f}), saturated "
          f"{keep['saturated']:.2f}", flush=True)
    return keep


def ms(runs: list[dict], key: str, digits: int = 3) -> str:
    v = torch.tensor([r[key] for r in runs], dtype=torch.float64)
    return f"{float(v.mean()):.{digits}f} ± {float(v.std()) if len(v) > 1 else 0.0:.{digits}f}"


def markdown(res: dict) -> str:
    lines = ["Commands: " + ", then ".join(f"`{c}`" for c in res["commands"]) + f" ({res['date']}). Machine: "
             f"{res['machine']}. Total {res['cpu_seconds']:.0f} "
             f"CPU s. Mean ± sd over seeds {res['seeds']}.", ""]
    for world_name, rows in res.get("dipp", {}).items():
        first = next(iter(rows.values()))[0]
        lines += [f"**DI++ on {world_name}** (`python diff_instruct_pp.py --model {world_name} --reward-scale A`, 400 "
                  f"updates of batch 256; base generator: reward {first['reward_base']:.3f}, quality "
                  f"{first['quality_base']:.3f}, sharpness {first['sharpness_base']:.3f})", "",
                  "| alpha_rew | reward | quality | distance | sharpness |", "|---|---|---|---|---|"]
        for alpha, runs in rows.items():
            lines.append(f"| {alpha} | {ms(runs, 'reward_tuned')} | {ms(runs, 'quality_tuned')} | "
                         f"{ms(runs, 'distance_tuned')} | {ms(runs, 'sharpness_tuned')} |")
        lines.append("")
    for world_name, rows in res.get("pso", {}).items():
        first = next(iter(rows.values()))[0]
        lines += [f"**PSO Eq. 5 on {world_name}** (`python pso.py --model {world_name} --beta B --train-steps 16`, 300 "
                  f"updates of batch 64, the naive baseline with the same budget; base model: transfer "
                  f"{first['transfer_base']:.3f}, sharpness {first['sharpness_base']:.3f} at 4 steps, "
                  f"{first['sharpness_base_1step']:.3f} at 1 step)", "",
                  "| beta | transfer | sharpness | sharpness, 1 step | Eq. 5 loss, last 50 updates | share of updates "
                  "with loss < 1e-6 | naive: transfer / sharpness |", "|---|---|---|---|---|---|---|"]
        for beta, runs in rows.items():
            lines.append(f"| {beta} | {ms(runs, 'transfer_tuned')} | {ms(runs, 'sharpness_tuned')} | "
                         f"{ms(runs, 'sharpness_tuned_1step')} | {ms(runs, 'loss_last50', 4)} | "
                         f"{ms(runs, 'saturated', 2)} | "
                         f"{ms(runs, 'transfer_naive')} / {ms(runs, 'sharpness_naive')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["dipp", "pso"], choices=["dipp", "pso"])
    p.add_argument("--worlds", nargs="+", default=["toy2d", "flow2d"], choices=["toy2d", "flow2d"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--betas", type=float, nargs="+", default=None, help="pso: only these beta (default: all); with "
                   "--reuse the other rows are kept")
    p.add_argument("--reuse", help="a results JSON whose sections are kept (only the named ones are rerun)")
    p.add_argument("--out", default=str(RESULTS / "world_defaults.json"))
    args = p.parse_args(argv)
    cpu = time.process_time()
    res = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    command = "OMP_NUM_THREADS=1 python benchmarks/world_defaults.py " + " ".join(argv or sys.argv[1:])
    earlier = res.pop("command", None)
    res.update(commands=res.get("commands", [earlier] if earlier else []) + [command],
               date=time.strftime("%Y-%m-%d"), seeds=args.seeds,
               machine=f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
                       f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, load average "
                       f"{os.getloadavg()[0]:.1f} at the start")
    worlds = {name: harness.load_world(name) for name in args.worlds}
    if "dipp" in args.sections:
        for name in args.worlds:
            res.setdefault("dipp", {})[name] = {f"{a:g}": [dipp_run(name, worlds[name], a, s) for s in args.seeds]
                                                 for a in DIPP_ALPHAS[name]}
    if "pso" in args.sections:
        for name in [w for w in args.worlds if w in PSO_BETAS]:
            kept = res.setdefault("pso", {}).get(name, {})
            rows = {f"{b:g}": [pso_run(name, worlds[name], b, s) for s in args.seeds]
                    for b in args.betas or PSO_BETAS[name]}
            res["pso"][name] = dict(sorted({**kept, **rows}.items(), key=lambda kv: float(kv[0])))
    res["cpu_seconds"] = res.get("cpu_seconds", 0.0) * bool(args.reuse) + time.process_time() - cpu
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
