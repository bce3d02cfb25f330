"""Build the toy base models from scratch into a temporary cache, time it, and measure their samples.

    python benchmarks/base_models.py --world toy2d mnist

Prints (and writes to benchmarks/results/base_models.json) the build seconds and, for the teacher with 1000
ancestral steps and with 25 DDIM steps, the 4-step student (x0-renoise and Euler-ancestral samplers) and the
one-step generator: reward, quality and distance to the data, on fixed seeds. Real data is scored too, as the
ceiling. This is a benchmark, not a test: it takes about a minute (toy2d) to ten (mnist) on two cores."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import toy  # noqa: E402


@torch.no_grad()
def evaluate(world, n: int, teacher_1000_n: int) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    cond = world.eval_conditions(n)
    noise = torch.randn(n, *world.shape, generator=gen)
    rows = {"data": world.metrics(world.data_for(cond, torch.Generator().manual_seed(7)), cond)}
    teacher = world.denoiser("teacher")
    flow = world.schedule.prediction == "flow"  # flow2d: the teacher's flow SDE (eta 1 / 0), its x0-renoise student
    ancestral = common.make_kernel(teacher.sampler, world.schedule, eta=1.0)
    k = teacher_1000_n
    rows[f"teacher, 1000 {'SDE (eta 1)' if flow else 'ancestral'} steps"] = world.metrics(
        common.sample(teacher, ancestral, noise[:k], cond[:k], list(range(999, -1, -1)), gen), cond[:k])
    rows[f"teacher, 25 {'Euler (eta 0)' if flow else 'DDIM'} steps"] = world.metrics(
        common.sample(teacher, common.make_kernel(teacher.sampler, world.schedule, eta=0.0), noise, cond,
                      teacher.timesteps, gen), cond)
    for sampler in (world.denoiser("student").sampler,) if flow else ("x0_renoise", "euler_ancestral"):
        student = world.denoiser("student", sampler=sampler)
        kernel = common.make_kernel(sampler, world.schedule)
        rows[f"student, 4 steps {sampler}"] = world.metrics(
            common.sample(student, kernel, noise, cond, student.timesteps, gen), cond)
    generator = world.denoiser("generator")
    rows["generator, 1 step"] = world.metrics(
        common.sample(generator, common.make_kernel(generator.sampler, world.schedule), noise, cond,
                      generator.timesteps, gen), cond)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", nargs="+", default=["toy2d"], choices=sorted(toy.WORLDS))
    p.add_argument("--samples", type=int, default=None, help="evaluation samples (default 4000 toy2d, 500 mnist)")
    p.add_argument("--cache", default=None, help="reuse this cache folder instead of building from scratch")
    p.add_argument("--out", default="benchmarks/results/base_models.json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    out = Path(args.out)
    # one world at a time may be re-measured: keep the other worlds' rows
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.world:
        load_at_start = round(os.getloadavg()[0], 2)  # other processes on the machine slow the build
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            world = toy.load_world(name, cache=args.cache or tmp, progress=False)
            build = time.perf_counter() - start
            n = args.samples or (4000 if name == "toy2d" else 500)
            rows = evaluate(world, n, teacher_1000_n=n if name == "toy2d" else 100)
        results[name] = {"build_seconds": round(build, 1), "samples": n, "rows": rows, "machine": machine,
                         "load_average_at_start": load_at_start, "date": time.strftime("%Y-%m-%d")}
        print(f"\n{name}: base models built in {build:.1f} s ({'cached' if args.cache else 'from scratch'})")
        print(f"{'model':36s} {'reward':>8s} {'quality':>8s} {'distance':>9s}")
        for label, m in rows.items():
            print(f"{label:36s} {m['reward']:8.3f} {m['quality']:8.3f} {m['distance']:9.4f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))


def markdown(results: dict) -> str:
    """The README table: one block per world."""
    lines = []
    for name, r in results.items():
        if not isinstance(r, dict) or "rows" not in r:
            continue
        when = ", ".join(f"{k.replace('_', ' ')} {r[k]}" for k in ("machine", "date", "load_average_at_start")
                         if k in r)
        lines += [f"**{name}** — base models built from scratch in {r['build_seconds']} s"
                  + (f" ({when})" if when else "") + f"; {r['samples']} samples "
                  "(the 1000-step teacher row uses " + ("all" if name == "toy2d" else "100") + ")", "",
                  "| model | reward | quality | distance to data |", "|---|---|---|---|"]
        lines += [f"| {label} | {m['reward']:.3f} | {m['quality']:.3f} | {m['distance']:.4f} |"
                  for label, m in r["rows"].items()]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
