"""The README's figure: PSO's Fig. 1 contrast on toy2d, from the default `python pso.py` (seed 0).

    OMP_NUM_THREADS=1 python benchmarks/readme_figure.py            # train (as `python pso.py`) and draw
    OMP_NUM_THREADS=1 python benchmarks/readme_figure.py --replot   # draw again from runs/readme-figure/

Runs what `python pso.py` runs (the naive baseline, then Eq. 5 with toy2d's command-line defaults beta 7 on a
16-step training grid; 300 updates of batch 64 each) into runs/readme-figure/, then draws the target data and the
base, naive and Eq. 5 models at their own 4 steps from the same noise, each panel titled with its transfer (share
of samples nearer a target mode than any other base mode) and sharpness (share within 0.2 of any mode) on these
samples. Writes benchmarks/results/readme_figure.png and readme_figure.json (the numbers in the titles). The
3-seed means of the same command are in benchmarks/results/pso_fig1.md."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import harness  # noqa: E402
import pso  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "runs" / "readme-figure"


def main(argv=None) -> dict:
    replot = "--replot" in (sys.argv[1:] if argv is None else argv)  # redraw from runs/readme-figure, no training
    world = harness.load_world("toy2d")
    # exactly `python pso.py`: the command line's Toy2D defaults (beta 7, 16-step training grid) are applied
    cfg = harness.parse_config(pso.Config, ["--out", str(OUT), "--no-progress"])
    if not replot:
        shutil.rmtree(OUT, ignore_errors=True)
        pso.experiment(cfg, world)
    seed = cfg.seed + 10_000  # pso.train's evaluation seed: the run's own samples
    cond = world.eval_conditions(1000)
    panels, numbers = {}, {}
    x, c = world.data(1000, torch.Generator().manual_seed(seed), split="target")
    panels["target data\n(the target split)"] = (x, c)
    for name, folder, frozen in (("base model", OUT, True), ("naive ε-MSE fine-tuning", OUT / "naive", False),
                                 ("PSO (Eq. 5)", OUT, False)):
        den = world.denoiser("student")
        den.load_adapter_state(load_file(str(folder / "adapter" / "adapter.safetensors")))
        kernel = common.make_kernel(den.sampler, world.schedule)
        x0 = pso.draw(den, kernel, world, cond, den.timesteps, seed, frozen=frozen)
        numbers[name] = {"transfer": world.transfer(x0), "sharpness": world.sharpness(x0)}
        n = numbers[name]
        title = f"{name}, 4 steps\ntransfer {n['transfer']:.2f} · sharpness {n['sharpness']:.2f}"
        panels[title] = (x0, cond)
    world.plot_samples(panels, RESULTS / "readme_figure.png", marks="target")
    record = {"command": "OMP_NUM_THREADS=1 python benchmarks/readme_figure.py", "date": time.strftime("%Y-%m-%d"),
              "seed": cfg.seed, "samples": 1000, "numbers": numbers}
    (RESULTS / "readme_figure.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
