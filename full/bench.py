"""Seconds per update and peak GPU memory of a launcher setting, measured by running its method for a few updates.

    python -m full.bench pso-online-dmd2 pso-offline-dmd2 --steps 6 --set gradient_checkpointing=true adam_8bit=true
    python -m full.bench dipp-sd-turbo --model my_spec.json --batch 4 --set resolution=512
    python -m full.bench --all --random-weights --batch 1 --checkpointing both   # every setting, real size, offline

`--random-weights` builds the settings' real architectures with random weights from full/configs (no download;
the same shapes, memory and speed as the checkpoints; a GPU machine without hub access can run it).
Peak memory is split at the optimizer steps (torch.optim's global step hooks): `train_peak_gib` is the largest
torch.cuda.max_memory_allocated between two optimizer steps (start-up included: DI++'s reward probe),
`eval_peak_gib` the peak after the last step (the final evaluation, in chunks of the spec's decode_batch).
`unet_fwd_bwd_s` is one forward + backward of the trained UNet on the per-process batch at the run's resolution
(median of 3 after a warm-up), and `bound_ratio` = s/update / (NFEs per update x unet_fwd_bwd_s): how far the
update is from the cost of its network evaluations alone (< 1 where many NFEs run without grad).

Each setting runs in-process through its method's `main` (the launcher's argv, per-process --batch, --steps, and
small evaluation sizes so the timing is the training loop's), with the spec's keys replaced by --set key=value
(JSON values). s/update is the median of the `seconds` column of log.csv without the first update (warm-up); peak
memory is torch.cuda.max_memory_allocated over the whole run (weights, activations, optimizer states, the reward
model), or "n/a" without CUDA. Results go to --out/bench.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import harness

from . import launch

SMALL_EVAL = {"pso.py": ["--eval-samples", "2", "--eval-every", "100000", "--reference-images", "4"],
              "sharpening.py": ["--eval-samples", "2", "--final-samples", "2", "--eval-every", "100000"],
              "diff_instruct_pp.py": ["--eval-samples", "2"]}


def spec_with(model: str, overrides: dict) -> tuple[str, Path | None]:
    """A copy of the spec with `overrides`, written beside it (so its relative paths still resolve); removed after."""
    if not overrides:
        return model, None
    from .spec import load_spec

    load_spec(model, **overrides)  # validates the keys before anything runs
    path = Path(model)
    if path.suffix == ".json":
        d, folder = json.loads(path.read_text()), path.parent
    else:
        d, folder = {"base": str(Path(model).resolve()) if Path(model).exists() else model}, Path(tempfile.gettempdir())
    d.update(overrides)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-bench-", suffix=".json", dir=folder)
    with open(fd, "w") as f:
        json.dump(d, f)
    return tmp, Path(tmp)


def _cuda() -> bool:
    return torch.cuda.is_available()


class PeakSplit:
    """max_memory_allocated read and reset at every optimizer step: the training peak, then the evaluation's."""

    def __init__(self):
        self.train = 0

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        if _cuda():
            torch.cuda.reset_peak_memory_stats()
        self.handle = register_optimizer_step_post_hook(self._step)
        return self

    def _step(self, *_):
        if _cuda():
            self.train = max(self.train, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def __exit__(self, *exc):
        self.handle.remove()
        self.eval = torch.cuda.max_memory_allocated() if _cuda() else None


def unet_fwd_bwd_seconds(world, batch: int, repeats: int = 3) -> float:
    """One forward + backward of the world's first (trained) denoiser on `batch` rows: the NFE bound's unit."""
    den = world.denoisers[0]
    cond = world.encode([world.prompts[0]] * batch)
    x = torch.randn(batch, *world.shape, device=world.device)
    times = []
    for k in range(repeats + 1):
        if _cuda():
            torch.cuda.synchronize()
        tick = time.perf_counter()
        with world.accelerator.autocast():
            den(x, 500, cond).float().square().mean().backward()
        if _cuda():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    for p in den.trainable_parameters():
        p.grad = None
    return statistics.median(times[1:])


def bench(name: str, model: str | None, steps: int, batch: int | None, overrides: dict, out: Path) -> dict:
    s = launch.SETTINGS[name]
    model, tmp_spec = spec_with(model or str(launch.SPECS / s.spec), overrides)
    tag = "-".join(f"{k}={v}" for k, v in sorted(overrides.items()) if k in ("gradient_checkpointing",))
    run = out / (name + (f"-{tag}" if tag else ""))
    extra = ["--steps", str(steps), "--out", str(run), "--overwrite", "--save-every", str(10**9), *SMALL_EVAL[s.script]]
    if batch:
        extra += ["--batch", str(batch)]
    script, argv = launch.method_argv(name, model, 1, extra)
    sys.path.insert(0, str(script.parent))
    method = importlib.import_module(script.stem)
    worlds = []
    load = harness.load_world

    def keep(*a, **kw):  # the method's world, for the UNet timing afterwards
        worlds.append(load(*a, **kw))
        return worlds[-1]

    harness.load_world = keep  # the methods call harness.load_world(cfg.model) at run time
    try:
        with PeakSplit() as peaks:
            method.main(argv)
    finally:
        harness.load_world = load
        if tmp_spec is not None:
            tmp_spec.unlink(missing_ok=True)
    with open(run / "log.csv") as f:
        log = list(csv.DictReader(f))
    seconds = [float(r["seconds"]) for r in log]
    per_update = statistics.median(seconds[1:] or seconds)
    nfe = statistics.median(float(r["nfe"]) for r in log)
    b = int(argv[argv.index("--batch") + 1])
    unit = unet_fwd_bwd_seconds(worlds[-1], b) if worlds else float("nan")
    gib = lambda v: None if v is None else v / 2**30  # noqa: E731
    device = torch.cuda.get_device_name() if _cuda() else "cpu"
    return {"setting": name, "device": device, "batch_per_process": b, "s_per_update": per_update,
            "train_peak_gib": gib(peaks.train if _cuda() else None), "eval_peak_gib": gib(peaks.eval),
            "nfe_per_update": nfe, "unet_fwd_bwd_s": unit, "bound_ratio": per_update / (nfe * unit),
            "overrides": overrides, "updates": len(seconds)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="*", choices=sorted(launch.SETTINGS), metavar="SETTING",
                   help=f"launcher settings: {', '.join(launch.SETTINGS)}")
    p.add_argument("--all", action="store_true", help="every launcher setting")
    p.add_argument("--random-weights", action="store_true",
                   help="the real architectures with random weights (full/configs; nothing downloaded)")
    p.add_argument("--checkpointing", choices=["spec", "on", "off", "both"], default="spec",
                   help="gradient checkpointing: the spec's, on, off, or one run with each")
    p.add_argument("--model", help="replace the settings' model spec")
    p.add_argument("--steps", type=harness.bounded(int, 1), default=6, help="updates to run (the first is not timed)")
    p.add_argument("--batch", type=harness.bounded(int, 1),
                   help="per-process batch (default: the paper's global batch on one GPU)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model-spec overrides (JSON values)")
    p.add_argument("--out", default="", help="folder for the runs and bench.json (default: a temporary folder)")
    a = p.parse_args(argv)
    overrides = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    names = list(launch.SETTINGS) if a.all else a.settings
    if not names:
        p.error("name one or more settings, or --all")
    if a.random_weights:
        overrides["random_weights"] = True
    ckpts = {"spec": [None], "on": [True], "off": [False], "both": [True, False]}[a.checkpointing]
    out = Path(a.out or tempfile.mkdtemp(prefix="fewstep-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        for ckpt in ckpts:
            o = {**overrides, **({} if ckpt is None else {"gradient_checkpointing": ckpt})}
            rows.append(bench(name, a.model, a.steps, a.batch, o, out))
            (out / "bench.json").write_text(json.dumps(rows, indent=2))  # what finished survives a crash
    print("| setting | device | batch/process | s/update | train peak (GiB) | eval peak (GiB) | NFE | "
          "UNet fwd+bwd (s) | s/update / (NFE x fwd+bwd) | spec overrides |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    na = "n/a (no CUDA)"
    for r in rows:
        tp = f"{r['train_peak_gib']:.1f}" if r["train_peak_gib"] is not None else na
        ep = f"{r['eval_peak_gib']:.1f}" if r["eval_peak_gib"] is not None else na
        print(f"| {r['setting']} | {r['device']} | {r['batch_per_process']} | {r['s_per_update']:.3f} | {tp} | {ep} | "
              f"{r['nfe_per_update']:g} | {r['unet_fwd_bwd_s']:.3f} | {r['bound_ratio']:.2f} | "
              f"{json.dumps(r['overrides'])} |")
    return rows


if __name__ == "__main__":
    harness.run_cli(main)
