"""PSO Table 1 (online beats offline) on toy2d, with offline pairs that do not come from the tuned model's distribution.

    OMP_NUM_THREADS=1 python benchmarks/pso_offline_pairs.py            # 4 pair sources x 3 beta + online, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/pso_offline_pairs.py --seeds 0 --sources data

On toy2d, offline PSO (Eq. 6) trained on the world's preference pairs — two samples *of the data* for one condition,
ranked by the reward — lies above online PSO (Eq. 7) on the reward-quality frontier (benchmarks/results/
report.toy2d.md). Those pairs are on the distribution the 4-step student already samples. The paper's offline pairs
are Pick-a-Pic's, images of other models (SDXL-beta, Dreamlike), and Eq. 6 stands the forward-diffused trajectory of
such an image in for the model's own reverse trajectory, a stand-in the paper motivates only for references from a
model near p_theta. This benchmark trains Eq. 6 on pairs drawn from other models of the same world and ranked by the
same reward, then places them beside online PSO:

  data       two data samples per condition (world.preference_pairs: the default offline pairs)
  teacher    the 1000-step teacher sampled with 25 deterministic DDIM steps (another model, good samples)
  generator  the one-step generator (another model, blurrier samples)
  blurred    data + N(0, 0.15^2) per coordinate (a model that puts mass between modes)
  flipped    data pairs whose order is swapped for 30% of them: a labeler that agrees with the evaluation reward on
             70% of pairs (the paper's offline labels are people's, its evaluation and online labels PickScore's)

Each source is written once as a pairs file (runs/bench-pso-offline-pairs/pairs-<source>.pt, 16384 rows, winner =
the higher reward) and used through `pso.py --variant offline --pairs FILE`; its own quality (share within 0.2 of a
mode of the class), reward and distance to the data are in the table. Every run: 300 updates of batch 64, lr 1e-3
(pso.py's defaults); offline at beta 10, 50, 250 (the side-by-side report's frontier), online at beta 1, 5, 25.
Reward and quality of 1000 fixed-seed samples of the tuned model at 4 steps and at 1 step.

Writes benchmarks/results/pso_offline_pairs.{json,md}."""
from __future__ import annotations

import argparse
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
import common  # noqa: E402
import harness  # noqa: E402
import pso  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "bench-pso-offline-pairs"
SOURCES = ("data", "teacher", "generator", "blurred", "flipped")
FLIP = 0.3  # "flipped": the share of data pairs whose order disagrees with the evaluation reward
OFFLINE_BETAS = (10.0, 50.0, 250.0)
ONLINE_BETAS = (1.0, 5.0, 25.0)
PAIRS = 16384


@torch.no_grad()
def source_samples(world, source: str, cond: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if source in ("data", "flipped"):
        return world.data_for(cond, gen)
    if source == "blurred":
        return world.data_for(cond, gen) + 0.15 * torch.randn(len(cond), *world.shape, generator=gen)
    role, eta = {"teacher": ("teacher", 0.0), "generator": ("generator", 1.0)}[source]
    den = world.denoiser(role)
    kernel = common.make_kernel(den.sampler, world.schedule, eta)
    noise = torch.randn(len(cond), *world.shape, generator=gen)
    return common.sample(den, kernel, noise, cond, den.timesteps, gen)


@torch.no_grad()
def write_pairs(world, source: str, path: Path) -> dict:
    """PAIRS rows (win, lose, cond): two samples of the source per condition, the higher reward first."""
    gen = torch.Generator().manual_seed(2024)
    cond = world.conditions(PAIRS, gen)
    a, b = source_samples(world, source, cond, gen), source_samples(world, source, cond, gen)
    a_wins = (world.reward(a, cond) >= world.reward(b, cond))[:, None]
    if source == "flipped":
        a_wins = a_wins ^ (torch.rand(len(cond), 1, generator=gen) < FLIP)
    win, lose = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"win": win, "lose": lose, "cond": cond}, path)
    both, c2 = torch.cat([a, b]), torch.cat([cond, cond])
    m = world.metrics(both, c2)
    return {"quality": m["quality"], "reward": m["reward"], "distance": m["distance"],
            "reward_win": float(world.reward(win, cond).mean()), "reward_lose": float(world.reward(lose, cond).mean())}


def run_one(label: str, over: dict, seed: int, world) -> dict:
    out = RUNS / f"{label.replace(' ', '-').replace(',', '')}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a rerun replaces its folder
    cfg = pso.Config(seed=seed, out=str(out), progress=False, save_every=300, **over)
    cpu = time.process_time()
    metrics, _ = pso.train(cfg, world=world)
    keep = {k: metrics[k] for k in metrics if k.split("_")[0] in ("reward", "quality", "sharpness", "distance")
            and ("_tuned" in k or "_base" in k)}
    print(f"[bench] {label} seed {seed}: reward {keep['reward_tuned']:.3f} quality {keep['quality_tuned']:.3f} "
          f"1 step {keep['reward_tuned_1step']:.3f} / {keep['quality_tuned_1step']:.3f} "
          f"({time.process_time() - cpu:.0f} CPU s)", flush=True)
    return keep


def ms(runs: list[dict], key: str) -> str:
    v = torch.tensor([r[key] for r in runs], dtype=torch.float64)
    return f"{float(v.mean()):.3f} ± {float(v.std()) if len(v) > 1 else 0.0:.3f}"


def markdown(res: dict) -> str:
    lines = ["Commands: " + ", then ".join(f"`{c}`" for c in res["commands"]) + f" ({res['date']}). Machine: "
             f"{res['machine']}. Total {res['cpu_seconds']:.0f} "
             f"CPU s. toy2d, default reward (soft membership of the upper modes, optimum 1); 300 updates of batch 64, "
             f"lr 1e-3; mean ± sd over seeds {res['seeds']} of 1000 fixed-seed samples of the tuned model.", "",
             "**The pair sources** (16384 pairs each, winner = the higher reward; both samples of every pair "
             "scored)", "",
             "| source | quality | reward | distance to the data | reward of winners / losers |",
             "|---|---|---|---|---|"]
    for source, s in res["sources"].items():
        lines.append(f"| {source} | {s['quality']:.3f} | {s['reward']:.3f} | {s['distance']:.3f} | "
                     f"{s['reward_win']:.3f} / {s['reward_lose']:.3f} |")
    base = next(iter(res["runs"].values()))[0]
    lines += ["", f"**Offline PSO (Eq. 6) on each source, online PSO (Eq. 7) beside it** (base model: reward "
              f"{base['reward_base']:.3f}, quality {base['quality_base']:.3f} at 4 steps; "
              f"{base['reward_base_1step']:.3f}, {base['quality_base_1step']:.3f} at 1 step)", "",
              "| run | reward, 4 steps | quality, 4 steps | reward, 1 step | quality, 1 step |",
              "|---|---|---|---|---|"]
    for label, runs in res["runs"].items():
        lines.append(f"| {label} | {ms(runs, 'reward_tuned')} | {ms(runs, 'quality_tuned')} | "
                     f"{ms(runs, 'reward_tuned_1step')} | {ms(runs, 'quality_tuned_1step')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--no-online", action="store_true", help="skip the online rows")
    p.add_argument("--reuse", help="a results JSON whose rows are kept (only the named sources / online are rerun)")
    p.add_argument("--out", default=str(RESULTS / "pso_offline_pairs.json"))
    args = p.parse_args(argv)
    cpu = time.process_time()
    world = harness.load_world("toy2d")
    old = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    command = "OMP_NUM_THREADS=1 python benchmarks/pso_offline_pairs.py " + " ".join(argv or sys.argv[1:])
    res = {"commands": old.get("commands", [old["command"]] if "command" in old else []) + [command],
           "date": time.strftime("%Y-%m-%d"), "seeds": args.seeds, "sources": old.get("sources", {}),
           "runs": old.get("runs", {}),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
                      f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, load average "
                      f"{os.getloadavg()[0]:.1f} at the start"}
    for source in args.sources:
        path = RUNS / f"pairs-{source}.pt"
        res["sources"][source] = write_pairs(world, source, path)
        for beta in OFFLINE_BETAS:
            label = f"offline, {source} pairs, beta {beta:g}"
            res["runs"][label] = [run_one(label, dict(variant="offline", beta=beta, pairs=str(path)), s, world)
                                  for s in args.seeds]
    if not args.no_online:
        for beta in ONLINE_BETAS:
            label = f"online, beta {beta:g}"
            res["runs"][label] = [run_one(label, dict(variant="online", beta=beta), s, world) for s in args.seeds]
    res["cpu_seconds"] = old.get("cpu_seconds", 0.0) + time.process_time() - cpu
    online = {k: v for k, v in res["runs"].items() if k.startswith("online")}  # the online rows last
    res["runs"] = {**{k: v for k, v in res["runs"].items() if k not in online}, **online}
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
