"""Diffusion-Sharpening on toy2d: the paper's RLHF ablations (Tables 2-3) and the SFT choice controls, measured by
calling sharpening.train in-process, 3 seeds each (issue 15).

    OMP_NUM_THREADS=1 python benchmarks/sharpening.py            # everything below (toy2d)
    OMP_NUM_THREADS=1 python benchmarks/sharpening.py --sections sft --seeds 0

Sections:
  sft      SFT (Alg. 1) with the choice among the n candidates as the paper's argmax, a random candidate and the
           argmin, at m = 1 and m = 3, beside plain fine-tuning (n = m = 1). The paper has no SFT ablation: these
           are controls for the winner's curse (docs/sharpening.md).
  table2   RLHF (Alg. 2), n in {2, 3, 4} at m = 3, and Diffusion-DPO (n = 2, m = 1) as the paper's n = 1 row
           (Table 2's n = 1 row equals Table 1's Diffusion-DPO row). The paper's n = 8 row is left out for CPU
           time (it costs 8 x 25 sampling NFEs per condition and update).
  table3   RLHF, m in {1, 2, 3, 4, 8} at n = 3 (M averaged over the m states, --m-reduce mean: beta does not grow
           with m).
  readings RLHF n = m = 3 with Eq. 11's reward gap outside log sigma (--reward-gap outside-plus, the official code;
           outside-minus has the same gradient, tested) against the default inside reading.
  rlhf_controls  RLHF n = m = 3 at beta 100 (default) and 25 with the winner-loser pair as Alg. 2 has it, swapped
           (--choose worst: the preference reversed) and in a random order (--choose random: no preference); not
           in the paper, the check of what moves the reward.
Runs shared by sections (e.g. RLHF n = m = 3) are run once. Every run uses sharpening.py's defaults except the
overrides named in its row and --steps / --final-samples / --eval-every given here, and RLHF rows run with
--rlhf-batch conditions per update (default 16, a quarter of sharpening.py's 64: CPU time on a shared machine).

Writes benchmarks/results/sharpening.json (every run's metrics, the command, the machine) and sharpening.md (the
tables). Run folders: runs/bench-sharpening/."""
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

SFT = {
    "fine-tuning (n=1, m=1)": dict(n=1, m=1),
    "n=3 m=1, best (Alg. 1)": dict(n=3, m=1),
    "n=3 m=1, random": dict(n=3, m=1, choose="random"),
    "n=3 m=1, worst": dict(n=3, m=1, choose="worst"),
    "n=3 m=3, best (Alg. 1)": dict(n=3, m=3),
    "n=3 m=3, random": dict(n=3, m=3, choose="random"),
    "n=3 m=3, worst": dict(n=3, m=3, choose="worst"),
}
TABLE2 = {"1 (Diffusion-DPO: n=2, m=1)": dict(n=2, m=1), **{str(n): dict(n=n, m=3) for n in (2, 3, 4)}}
TABLE3 = {str(m): dict(n=3, m=m) for m in (1, 2, 3, 4, 8)}
READINGS = {"inside (default, the paper's text)": dict(n=3, m=3),
            "outside-plus (the official code)": dict(n=3, m=3, reward_gap="outside-plus")}
REWARDS = {"toy2d": "toy2d's default: soft membership of the upper modes, optimum 1",
           "toy2d:reward=height": "height, unbounded"}
RLHF_CONTROLS = {  # beta 100 is sharpening.py's default: its "best" row is the n = m = 3 run of the other sections
    f"beta {b}, {how}": dict(n=3, m=3, **({} if b == 100 else {"beta": float(b)}),
                             **({} if how.startswith("best") else {"choose": how.split()[0]}))
    for b in (100, 25) for how in ("best (Alg. 2)", "worst (pair swapped)", "random (pair order)")}
SECTIONS = {"sft": ("sft", SFT), "table2": ("rlhf", TABLE2), "table3": ("rlhf", TABLE3), "readings": ("rlhf", READINGS),
            "rlhf_controls": ("rlhf", RLHF_CONTROLS)}


def run_one(variant: str, over: dict, seed: int, args) -> dict:
    label = "-".join(f"{k}{v}" for k, v in over.items())
    world = args.model.replace(":", "-").replace("=", "-")
    out = ROOT / "runs" / "bench-sharpening" / f"{world}-{variant}-{label}-s{seed}"
    cfg = sharpening.Config(model=args.model, variant=variant, steps=args.steps, seed=seed, out=str(out),
                            eval_every=args.eval_every, final_samples=args.final_samples, save_every=args.steps,
                            progress=False, overwrite=True, **({"batch": args.rlhf_batch} if variant == "rlhf" else {}),
                            **over)
    cpu = time.process_time()
    metrics = sharpening.train(cfg)
    metrics["cpu_seconds"] = time.process_time() - cpu
    rows = list(csv.DictReader(open(out / "log.csv")))
    mean = lambda key, part: sum(float(r[key]) for r in part) / len(part)  # noqa: E731
    first, last = rows[:10], rows[-10:]
    metrics["loss_first10"], metrics["loss_last10"] = mean("loss", first), mean("loss", last)
    if variant == "rlhf":  # the scale of the reward gap against beta * D (the inside reading's margin)
        for key in ("reward_gap", "margin", "accuracy", "dpo_loss"):
            metrics[f"{key}_first10"], metrics[f"{key}_last10"] = mean(key, first), mean(key, last)
    print(f"[bench] {variant} {label} seed {seed}: reward {metrics['reward_base']:.3f} -> {metrics['reward_tuned']:.3f}"
          f", quality {metrics['quality_tuned']:.3f}, {metrics['cpu_seconds']:.1f} CPU s", flush=True)
    return metrics


def stats(runs: list[dict], key: str) -> tuple[float, float]:
    v = torch.tensor([r[key] for r in runs], dtype=torch.float64)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0


def markdown(results: dict) -> str:
    made = "".join(f"`{c}`, " for c in results.get("reused", []))
    lines = [f"Commands: {made}then `{results['command']}`. Machine: {results['machine']}. "
             f"{results.get('model', 'toy2d')}, "
             f"{results['steps']} updates, seeds {results['seeds']}, batch 64 (SFT) / {results['rlhf_batch']} (RLHF); "
             f"mean ± sd over seeds of the reward ({results.get('reward', 'height')}) and quality (share within 0.2 "
             f"of a mode of the class) of {results['final_samples']} fixed-seed 25-step DDIM samples; base model "
             f"reward {results['reward_base']:.3f}, quality {results['quality_base']:.3f}. Total "
             f"{results['cpu_seconds_total']:.0f} CPU s.", ""]
    titles = {"sft": "SFT choice controls (not in the paper)",
              "table2": "RLHF, n at m = 3 (paper Table 2)", "table3": "RLHF, m at n = 3 (paper Table 3)",
              "readings": "RLHF, Eq. 11's reward gap (n = m = 3)",
              "rlhf_controls": "RLHF controls: the winner-loser pair (n = m = 3; not in the paper)"}
    for name, section in results["sections"].items():
        variant = SECTIONS[name][0]
        extra = ("loss first 10 → last 10 updates" if variant == "sft" else
                 "reward gap / β·D / accuracy, first 10 → last 10 updates")
        lines += [f"**{titles[name]}**", "", f"| row | NFE / update | reward tuned | quality tuned | distance tuned | "
                  f"{extra} |", "|---|---|---|---|---|---|"]
        for row, key in section.items():
            runs = results["runs"][key]
            r, q, d = stats(runs, "reward_tuned"), stats(runs, "quality_tuned"), stats(runs, "distance_tuned")
            if variant == "sft":
                e = f"{stats(runs, 'loss_first10')[0]:.4f} → {stats(runs, 'loss_last10')[0]:.4f}"
            else:
                e = " → ".join(f"{stats(runs, 'reward_gap_' + p)[0]:.3f} / {stats(runs, 'margin_' + p)[0]:.3f} / "
                               f"{stats(runs, 'accuracy_' + p)[0]:.2f}" for p in ("first10", "last10"))
            lines.append(f"| {row} | {runs[0]['nfe_per_update']:.0f} | {r[0]:.3f} ± {r[1]:.3f} | "
                         f"{q[0]:.3f} ± {q[1]:.3f}"
                         f" | {d[0]:.3f} ± {d[1]:.3f} | {e} |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--model", default="toy2d", help="the toy world (toy2d:reward=height: the unbounded reward)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--rlhf-batch", type=int, default=16, help="conditions per update of the RLHF rows")
    p.add_argument("--final-samples", type=int, default=500)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sharpening.json"))
    p.add_argument("--part", default="1/1", metavar="I/K",
                   help="run only the I-th of K disjoint shares of the distinct runs (round robin), for K parallel "
                        "processes whose files --reuse then merges")
    p.add_argument("--reuse", nargs="*", default=[], metavar="JSON",
                   help="results files of earlier calls (same --steps, --seeds, --final-samples) whose runs are taken "
                        "instead of running them again: sections run in parallel processes, then merged")
    args = p.parse_args()
    torch.set_num_threads(1)
    results = dict(command="OMP_NUM_THREADS=1 python " + " ".join(
                       [str(Path(sys.argv[0]).resolve().relative_to(ROOT))] + sys.argv[1:]),
                   machine=f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, 1 torch thread, "
                           f"torch {torch.__version__}",
                   steps=args.steps, seeds=args.seeds, final_samples=args.final_samples, rlhf_batch=args.rlhf_batch,
                   model=args.model, reward=REWARDS.get(args.model, args.model), sections={}, runs={})
    for path in args.reuse:
        old = json.loads(Path(path).read_text())
        same = {k: old.get(k, "toy2d" if k == "model" else None)
                for k in ("model", "steps", "seeds", "final_samples", "rlhf_batch")}
        want = {"model": args.model, "steps": args.steps, "seeds": args.seeds, "final_samples": args.final_samples,
                "rlhf_batch": args.rlhf_batch}
        if not any(k.startswith("rlhf") for k in old["runs"]):  # SFT runs do not depend on --rlhf-batch
            same.pop("rlhf_batch"), want.pop("rlhf_batch")
        if same != want:
            raise SystemExit(f"--reuse {path}: measured with {same}, not with this call's settings")
        results["runs"].update(old["runs"])
        results.setdefault("reused", []).append(old["command"])
    part, parts = (int(x) for x in args.part.split("/"))
    distinct = list(dict.fromkeys(f"{SECTIONS[name][0]} {json.dumps(over, sort_keys=True)}"
                                  for name in args.sections for over in SECTIONS[name][1].values()))
    for name in args.sections:
        variant, rows = SECTIONS[name]
        results["sections"][name] = {}
        for row, over in rows.items():
            key = variant + " " + json.dumps(over, sort_keys=True)
            if key not in results["runs"] and distinct.index(key) % parts != part - 1:
                continue  # another part's run
            if key not in results["runs"]:
                results["runs"][key] = [run_one(variant, over, s, args) for s in args.seeds]
            results["sections"][name][row] = key
    first = next(iter(results["runs"].values()))[0]
    results.update(reward_base=first["reward_base"], quality_base=first["quality_base"],
                   cpu_seconds_total=sum(r["cpu_seconds"] for runs in results["runs"].values() for r in runs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
