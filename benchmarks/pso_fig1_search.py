"""Search for a toy2d setting in which PSO's Fig. 1 contrast holds at a matched budget (issue 15).

    OMP_NUM_THREADS=1 python benchmarks/pso_fig1_search.py --only "half N8 b5" --seeds 0 1 2

Each candidate = a toy2d target (world keyword arguments), the shared budget (lr, steps, batch, LoRA rank) and the
Eq. 5 options (beta, training grid). For every candidate and seed it trains the naive baseline (t ~ U[0, T), the
paper's Fig. 1b) and Eq. 5 with the same budget, and records transfer / sharpness at 4 steps and 1 step plus two
probes: 'last step frozen' (the tuned model on the first 3 of the 4 steps, the frozen model on t_1 = 249 -> x_0)
and 'last step only' (the frozen model on the first 3 steps, the tuned model on the last). Every finished
candidate x seed is appended to benchmarks/results/pso_fig1_search.jsonl (one JSON object a line).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import pso  # noqa: E402
import toy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LOG = RESULTS / "pso_fig1_search.jsonl"
TARGETS = {
    "half": dict(target_rotation=0.0, target_keep=(0, 1, 2, 3)),
    "upper": dict(target_rotation=0.0, target_keep=(1, 2, 3)),
    "two": dict(target_rotation=0.0, target_keep=(1, 2)),
    "rotate": dict(target_rotation=3.141592653589793 / 8, target_keep=tuple(range(8))),
}


def cand(target, pso_kw, shared=None, naive_kw=None):
    return {"target": target, "pso": pso_kw, "shared": shared or {}, "naive": naive_kw or {}}


CANDIDATES = {
    "half N4 b5": cand("half", dict(beta=5.0)),
    "half N8 b5": cand("half", dict(beta=5.0, train_steps=8)),
    "half N8 b10": cand("half", dict(beta=10.0, train_steps=8)),
    "half N8 b3": cand("half", dict(beta=3.0, train_steps=8)),
    "half N3 b5": cand("half", dict(beta=5.0, train_steps=3)),
    "half N3 b2": cand("half", dict(beta=2.0, train_steps=3)),
    "half N2 b2": cand("half", dict(beta=2.0, train_steps=2)),
    "half N2 b5": cand("half", dict(beta=5.0, train_steps=2)),
    "half N16 b5": cand("half", dict(beta=5.0, train_steps=16)),
    "half N8 b5 r4": cand("half", dict(beta=5.0, train_steps=8), dict(lora_rank=4)),
    "half N8 b5 r1": cand("half", dict(beta=5.0, train_steps=8), dict(lora_rank=1)),
    "half N4 b2 r4": cand("half", dict(beta=2.0), dict(lora_rank=4)),
    "half N8 b5 lr3e-3": cand("half", dict(beta=5.0, train_steps=8), dict(lr=3e-3)),
    "half N8 b5 600": cand("half", dict(beta=5.0, train_steps=8), dict(steps=600)),
    "upper N8 b5": cand("upper", dict(beta=5.0, train_steps=8)),
    "two N8 b5": cand("two", dict(beta=5.0, train_steps=8)),
    "half N8 b50 sum": cand("half", dict(beta=50.0, train_steps=8, reduce="sum")),
    "half N16 b10": cand("half", dict(beta=10.0, train_steps=16)),
    "half N16 b7": cand("half", dict(beta=7.0, train_steps=16)),
    "half N32 b5": cand("half", dict(beta=5.0, train_steps=32)),
    "half N32 b10": cand("half", dict(beta=10.0, train_steps=32)),
    "half N16 b5 r4": cand("half", dict(beta=5.0, train_steps=16), dict(lora_rank=4)),
    "half N8 b7": cand("half", dict(beta=7.0, train_steps=8)),
}
# naive alone over lr and updates: its transfer-sharpness frontier (same seeds, same evaluation)
for _lr in (1e-5, 2e-5, 3e-5, 5e-5, 1e-4):
    CANDIDATES[f"half naive lr{_lr:g}"] = cand("half", None, dict(lr=_lr))
for _n in (10, 20, 40):
    CANDIDATES[f"half naive {_n} updates"] = cand("half", None, dict(steps=_n))


@torch.no_grad()
def mixed_sample(world, den, n, seed, tuned_steps):
    """4-step samples where step k (0 = t_4 = 999 ... 3 = t_1 = 249 -> x_0) uses the tuned model iff k in tuned_steps."""
    kernel = common.make_kernel(den.sampler, world.schedule)
    cond = world.eval_conditions(n)
    times = list(den.timesteps) + [-1]
    g = torch.Generator().manual_seed(seed)
    x = kernel.init(torch.randn(n, *world.shape, generator=g), times[0])
    for k, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        with contextlib.nullcontext() if k in tuned_steps else den.frozen():
            eps = den(kernel.net_input(x, t), t, cond)
        mean, std = kernel.step(x, eps, t, t_next)
        x = mean + std * torch.randn(x.shape, generator=g)
    return world.transfer(x), world.sharpness(x)


_NAIVE = {}


def one(world, name, c, seed, steps_override=None):
    out = {"candidate": name, "seed": seed, "config": c}
    for variant, kw in (("naive", c["naive"]), ("pso", c["pso"])):
        if kw is None:
            continue
        key = json.dumps([c["target"], c["shared"], c["naive"], seed])
        if variant == "naive" and key in _NAIVE:
            out[variant] = _NAIVE[key]
            continue
        cfg = pso.Config(model="toy2d", variant=variant, naive_baseline=False, seed=seed, overwrite=True,
                         out=str(ROOT / "runs" / "pso-fig1-search" / f"{name.replace(' ', '_')}-{variant}-{seed}"),
                         **{**c["shared"], **kw, **({"steps": steps_override} if steps_override else {})})
        start = time.perf_counter()
        m, den = pso.train(cfg, world)
        read = {k: m[k] for k in m if k.split("_")[0] in ("transfer", "sharpness", "quality")}
        read["last_frozen"] = mixed_sample(world, den, 1000, seed + 10_000, {0, 1, 2})
        read["last_only"] = mixed_sample(world, den, 1000, seed + 10_000, {3})
        read["seconds"] = time.perf_counter() - start
        out[variant] = read
        if variant == "naive":
            _NAIVE[key] = read
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args(argv)
    worlds = {}
    for name, c in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        if c["target"] not in worlds:
            worlds[c["target"]] = toy.load_world("toy2d", progress=False, **TARGETS[c["target"]])
        for seed in args.seeds:
            r = one(worlds[c["target"]], name, c, seed)
            with LOG.open("a") as f:
                f.write(json.dumps(r) + "\n")
            n = r["naive"]
            b = q = r.get("pso", n)  # naive-only candidates: print the naive run in every slot
            print(f"[fig1] {name} s{seed}: base T {b['transfer_base']:.3f} S {b['sharpness_base']:.3f} S1 "
                  f"{b['sharpness_base_1step']:.3f} | naive T {n['transfer_tuned']:.3f} S {n['sharpness_tuned']:.3f} "
                  f"S1 {n['sharpness_tuned_1step']:.3f} | pso T {q['transfer_tuned']:.3f} S {q['sharpness_tuned']:.3f}"
                  f" S1 {q['sharpness_tuned_1step']:.3f} | lastfrozen pso {q['last_frozen']} naive {n['last_frozen']}"
                  f" | lastonly pso {q['last_only']} naive {n['last_only']}", flush=True)


if __name__ == "__main__":
    main()
