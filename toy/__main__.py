"""python -m toy [--model toy2d|flow2d|mnist] [--out DIR]: build (or load) a world's base models and draw their samples.

Writes DIR/samples.png (data, teacher 25 DDIM steps, 4-step student, one-step generator, same seeds) and
DIR/metrics.json. The method scripts (pso.py, sharpening.py, diff_instruct_pp.py) start from these models."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import common
import harness
import toy


@dataclasses.dataclass
class Config:
    model: str = harness.arg("toy2d", "toy world", choices=sorted(toy.WORLDS))
    samples: int = harness.arg(2000, "samples per panel for the metrics (the MNIST figure shows 40)")
    seed: int = harness.arg(0, "sampling seed")
    out: str = harness.arg("", "output folder (default runs/base-<model>)")


def main(cfg: Config) -> dict:
    harness.check_seed(cfg)
    harness.check_range(cfg, "samples", 1)
    timer = harness.Timer()
    world = toy.load_world(cfg.model)  # outside no_grad: a missing cache trains the base models here
    with torch.no_grad():
        return _draw(cfg, world, timer)


def _draw(cfg: Config, world, timer) -> dict:
    out = Path(cfg.out or f"runs/base-{cfg.model}")
    out.mkdir(parents=True, exist_ok=True)
    harness.write_json_atomic(out / "config.json", dataclasses.asdict(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    cond = world.eval_conditions(cfg.samples)
    noise = torch.randn(cfg.samples, *world.shape, generator=gen)
    panels = {"data": (world.data_for(cond, gen), cond)}
    for label, role, eta in (("teacher, 25 steps", "teacher", 0.0), ("student, 4 steps", "student", 1.0),
                             ("generator, 1 step", "generator", 1.0)):
        den = world.denoiser(role)
        kernel = common.make_kernel(den.sampler, world.schedule, eta)  # the teacher deterministic (DDIM / Euler)
        panels[label] = (common.sample(den, kernel, noise, cond, den.timesteps, gen), cond)
    metrics = {label: world.metrics(x0, c) for label, (x0, c) in panels.items()}
    world.plot_samples(panels, out / "samples.png")
    harness.write_json_atomic(out / "metrics.json", {**metrics, "seconds": timer()})
    for label, m in metrics.items():
        print(f"{label:24s} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
    print(f"wrote {out / 'samples.png'}")
    return metrics


if __name__ == "__main__":
    harness.run_cli(lambda: main(harness.parse_config(Config, description=__doc__)))
