"""Seconds per update, peak memory and the distance to the NFE bound of launcher settings, measured by running them.

    python -m full.bench pso-online-dmd2 pso-offline-dmd2 --steps 6 --set gradient_checkpointing=true adam_8bit=true
    python -m full.bench dipp-sd-turbo --model my_spec.json --batch 4 --set resolution=512
    python -m full.bench --all --random-weights --batch 1 --checkpointing both   # every setting, real size, offline
    python -m full.bench pso-online-flux-schnell --random-weights --num-processes 8  # FSDP2 over 8 GPUs
    python -m full.bench --cpu-overhead                 # no GPU: real SDXL / SD3.5-medium networks at 128^2 on the CPU

Each setting runs as the launcher runs it (full/launch.py's command: `python`, `accelerate launch` or `torchrun`,
`--num-processes` processes, FSDP2 for the FSDP settings with several), the method script replaced by this module's
worker (`-m full.bench --worker`), which runs the method's own `main` for `--steps` updates with small evaluation
sizes (launch.small_run) and records, per process:

* memory: torch.cuda.max_memory_allocated AND max_memory_reserved (what the caching allocator holds: fragmentation
  makes it larger, and it is what runs out), split at the optimizer steps (torch.optim's global step hooks) into
  the training peak (start-up included: DI++'s reward probe) and the evaluation peak after the last step; without
  CUDA the process's peak RSS (getrusage);
* the network calls of each update: every call of a FullDenoiser between two steps of the first optimizer, split
  into calls with autograd into the trained weights (a forward and, later, a backward) and the others (no-grad
  sampling, frozen reference calls), in rows / per-process batch = NFEs;
* with one process: the time of one network forward and of one forward + backward on the per-process batch at the
  run's resolution (median of 3 after a warm-up).

s/update is the median of log.csv's `seconds` without the first update (warm-up). The NFE bound is what the update's
network calls alone cost: grad NFEs x (forward + backward) + other NFEs x forward; `bound_ratio` = s/update / bound.
Above 1, the rest is overhead (VAE decodes, rewards, the optimizer, data, Python); the CPU table in docs/full.md says
where it goes. A setting that cannot run (the memory plan refuses it, a reward without random weights, an error)
is recorded with its reason and the loop goes on; the table lists it at the end. Results: --out/bench.json and a
markdown table on stdout.

`--cpu-overhead` (no GPU needed): CPU_ROWS, one setting per method with the real SDXL UNet (DI++: the SD 2.1 UNets,
two SDXL UNets do not fit a 24 GB machine) and the real SD3.5-medium transformer, random weights, fp32, at
`--resolution` 128 (16x16 latents), one process, text encoders and reward towers at depth 1
(architectures.depth(1, denoisers=False)), synthetic data in the real layouts (full/rehearse.py).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import launch

# --cpu-overhead: (setting, method flags, spec overrides): one setting per method, LoRAs (the full fine-tuning
# settings' fp32 copies do not fit next to the references in 24 GB), the SD3.5-medium teacher on a 4-step grid
CPU_ROWS = [
    ("pso-online-dmd2", [], {}),
    ("sharpening-sft-sdxl", ["--no-full-finetune"], {}),
    ("dipp-sd-turbo", ["--no-train-full"], {}),
    ("sharpening-rlhf-sd35-medium", ["--no-full-finetune", "--n", "2", "--m", "2"],
     {"roles": {"teacher": {"steps": 4}}}),
]


def spec_with(model: str, overrides: dict, folder: Path | None = None) -> tuple[str, Path | None]:
    """A copy of the spec with `overrides`, written beside it (so its relative paths still resolve) or into
    `folder`; removed after."""
    if not overrides:
        return model, None
    from .spec import load_spec

    load_spec(model, **overrides)  # validates the keys before anything runs
    path = Path(model)
    if path.suffix == ".json":
        d, here = json.loads(path.read_text()), path.parent
    else:
        d, here = {"base": str(Path(model).resolve()) if Path(model).exists() else model}, Path(tempfile.gettempdir())
    d.update(overrides)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-bench-", suffix=".json", dir=folder or here)
    with open(fd, "w") as f:
        json.dump(d, f)
    return tmp, Path(tmp)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ the worker
class PeakSplit:
    """max_memory_allocated / max_memory_reserved read and reset at every optimizer step: the training peak, then
    the evaluation's (after the last step)."""

    def __init__(self):
        self.train = {"allocated": 0, "reserved": 0}
        self.eval = {"allocated": None, "reserved": None}

    def _read(self) -> dict:
        import torch

        return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}

    def __enter__(self):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        if _cuda():
            torch.cuda.reset_peak_memory_stats()
        self.handle = register_optimizer_step_post_hook(self._step)
        return self

    def _step(self, *_):
        import torch

        if _cuda():
            self.train = {k: max(v, self._read()[k]) for k, v in self.train.items()}
            torch.cuda.reset_peak_memory_stats()

    def __exit__(self, *exc):
        self.handle.remove()
        if _cuda():
            self.eval = self._read()


PARTS = ("forward", "backward", "vae", "reward", "optimizer")  # where an update's time goes (UpdateCounter)


class UpdateCounter:
    """Per update (windows closed by the steps of the first optimizer that steps; the first window also holds the
    start-up, the last unclosed one the final evaluation): the rows of every FullDenoiser call, split into calls
    with autograd into the trained weights and the others, and the seconds spent in the parts of an update:
    network forward (FullDenoiser calls), backward (accelerator.backward: the network's, with checkpoint
    recomputation, and the VAE's / reward's where a reward gradient flows through them), VAE decode / encode,
    reward models, optimizer step (clipping is in "other")."""

    def __init__(self):
        self.windows: list[dict] = [self._new()]
        self.first = None

    @staticmethod
    def _new() -> dict:
        return {"grad": 0, "other": 0, **{p: 0.0 for p in PARTS}}

    def _timed(self, part: str, fn):
        counter = self

        def run(*a, **kw):
            if _cuda():
                import torch

                torch.cuda.synchronize()
            tick = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if _cuda():
                    torch.cuda.synchronize()
                counter.windows[-1][part] += time.perf_counter() - tick
        return run

    def __enter__(self):
        import torch
        from accelerate import Accelerator
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        from .rewards import Reward
        from .world import FullDenoiser, FullWorld

        counter = self
        self.saved = [(FullDenoiser, "__call__"), (Accelerator, "backward"), (FullWorld, "decode"),
                      (FullWorld, "encode_images"), (Reward, "__call__")]
        self.saved = [(cls, name, cls.__dict__.get(name)) for cls, name in self.saved]  # None: inherited
        call = FullDenoiser.__call__

        def counted(den, x_t, t, cond):
            counter.windows[-1]["grad" if torch.is_grad_enabled() and not den._frozen else "other"] += x_t.shape[0]
            return call(den, x_t, t, cond)

        FullDenoiser.__call__ = self._timed("forward", counted)
        Accelerator.backward = self._timed("backward", Accelerator.backward)
        FullWorld.decode = self._timed("vae", FullWorld.decode)
        FullWorld.encode_images = self._timed("vae", FullWorld.encode_images)
        Reward.__call__ = self._timed("reward", Reward.__call__)
        self.handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._step)]
        return self

    def _pre(self, optimizer, *_):
        self._tick = time.perf_counter()

    def _step(self, optimizer, *_):
        self.windows[-1]["optimizer"] += time.perf_counter() - self._tick
        self.first = self.first or id(optimizer)
        if id(optimizer) == self.first:
            self.windows.append(self._new())

    def __exit__(self, *exc):
        for cls, name, own in self.saved:
            if own is None:
                delattr(cls, name)
            else:
                setattr(cls, name, own)
        for h in self.handles:
            h.remove()


def unit_seconds(world, batch: int, repeats: int = 3) -> dict:
    """One forward (no grad) and one forward + backward of the world's first (trained) denoiser on `batch` rows at
    t = 500: the NFE bound's units (median of `repeats` after a warm-up)."""
    import torch

    den = world.denoisers[0]
    cond = world.encode([world.prompts[0]] * batch)
    x = torch.randn(batch, *world.shape, device=world.device)
    out = {}
    for key, grad in (("fwd_s", False), ("fwd_bwd_s", True)):
        times = []
        for _ in range(repeats + 1):
            if _cuda():
                torch.cuda.synchronize()
            tick = time.perf_counter()
            with torch.set_grad_enabled(grad), world.accelerator.autocast():
                y = den(x, 500, cond).float().square().mean()
            if grad:
                y.backward()
            if _cuda():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - tick)
        out[key] = statistics.median(times[1:])
    for p in den.trainable_parameters():
        p.grad = None
    return out


def worker(argv: list[str]) -> None:
    """`python -m full.bench --worker PREFIX [--unit] [--shallow-parts] -- SCRIPT ARGS...`: the method's main under
    the peak and call counters; writes PREFIX.rank<r>.json."""
    p = argparse.ArgumentParser()
    p.add_argument("prefix")
    p.add_argument("--unit", action="store_true", help="time one forward and one forward + backward afterwards")
    p.add_argument("--shallow-parts", action="store_true", help="text encoders and reward towers at depth 1")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    import contextlib

    import harness

    from . import architectures

    sys.path.insert(0, str(launch.ROOT))
    method = importlib.import_module(Path(a.script).stem)
    worlds, load = [], harness.load_world

    def keep(*args, **kw):  # the method's world, for the unit timing afterwards
        worlds.append(load(*args, **kw))
        return worlds[-1]

    harness.load_world = keep  # the methods call harness.load_world(cfg.model) at run time
    depth = architectures.depth(1, denoisers=False) if a.shallow_parts else contextlib.nullcontext()
    try:
        with depth, PeakSplit() as peaks, UpdateCounter() as calls:
            method.main(a.args)
    finally:
        harness.load_world = load
    world = worlds[-1]
    rank = world.accelerator.process_index
    batch = int(a.args[len(a.args) - 1 - a.args[::-1].index("--batch") + 1])
    record = {"rank": rank, "processes": world.accelerator.num_processes, "batch": batch,
              "device": __import__("torch").cuda.get_device_name() if _cuda() else "cpu",
              "train_peak": peaks.train if _cuda() else None, "eval_peak": peaks.eval if _cuda() else None,
              "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "calls": calls.windows[:-1]}  # the windows closed by a step (the last one holds the final evaluation)
    if a.unit and world.accelerator.num_processes == 1:
        record.update(unit_seconds(world, batch))
    Path(f"{a.prefix}.rank{rank}.json").write_text(json.dumps(record))


# ------------------------------------------------------------------------------------------------ one row
def bench(name: str, model: str | None, steps: int, batch: int | None, overrides: dict, out: Path,
          processes: int = 1, launcher: str = "python", gpu_memory: float | None = None, extra: list[str] = (),
          shallow_parts: bool = False, timeout: float | None = None) -> dict:
    """Run a setting as its launcher does, with the worker in place of the method script; one row (an `error`
    row, with the reason, when it cannot run)."""
    from . import defaults

    s = launch.SETTINGS[name]
    tag = "-".join([f"{k}={v}" for k, v in sorted(overrides.items()) if k == "gradient_checkpointing"]
                   + ([f"{processes}procs"] if processes > 1 else []))
    run = out / (name + (f"-{tag}" if tag else ""))
    row = {"setting": name, "processes": processes, "launcher": launcher, "overrides": overrides,
           "extra": list(extra), "out": str(run)}
    gpu = gpu_memory or defaults.gpu_memory_gb() or 80
    try:
        b = batch or launch.planned(name, processes, gpu, None, list(extra))[0]
    except launch.DoesNotFit as e:
        return {**row, "error": f"the memory plan refuses it on {processes} x {gpu:g} GB: {str(e).splitlines()[0]}"}
    spec, tmp = spec_with(model or str(launch.SPECS / s.spec), overrides)
    try:
        # --overwrite: a second measurement replaces the run (the harness refuses a run folder otherwise)
        small = ["--steps", str(steps), "--out", str(run), "--overwrite", "--save-every", str(10**9),
                 "--batch", str(b), *launch.small_run(name), *extra]
        try:
            cmd = launch.command(name, processes, launcher, spec, small, gpu_memory=gpu)
        except ValueError as e:
            return {**row, "error": str(e)}
        script = str(launch.ROOT / s.script)
        at = cmd.index(script)
        aux = out / f"{run.name}.bench"  # the bench's own files, beside the run folder (which holds the run's only)
        prefix = aux / "bench-worker"
        cmd = [*cmd[:at], "-m", "full.bench", "--worker", str(prefix), *(["--unit"] if processes == 1 else []),
               *(["--shallow-parts"] if shallow_parts else []), script, *cmd[at + 1:]]
        aux.mkdir(parents=True, exist_ok=True)
        for old in aux.glob("bench-worker.rank*.json"):  # a previous measurement's
            old.unlink()
        env = {**os.environ, launch.PROCESSES_ENV: str(processes), "PYTHONPATH": os.pathsep.join(
            [str(launch.ROOT), os.environ.get("PYTHONPATH", "")])}
        if launcher == "torchrun" and not _cuda():
            env["ACCELERATE_USE_CPU"] = "1"
        tick = time.perf_counter()
        with open(aux / "output.txt", "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=launch.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout after {timeout:g} s"
        row.update(command=cmd, wall_s=time.perf_counter() - tick)
        if rc != 0:
            tail = [line for line in (aux / "output.txt").read_text().splitlines() if line.strip()][-3:]
            return {**row, "error": f"exit {rc}: " + " | ".join(tail)[-600:]}
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    ranks = [json.loads(f.read_text()) for f in sorted(aux.glob("bench-worker.rank*.json"))]
    with open(run / "log.csv") as f:
        log = list(csv.DictReader(f))
    seconds = [float(r["seconds"]) for r in log]
    per_update = statistics.median(seconds[1:] or seconds)
    r0 = next(r for r in ranks if r["rank"] == 0)
    timed = list(zip(r0["calls"], seconds))[1:] or list(zip(r0["calls"], seconds))  # without the start-up window
    grad = statistics.median(w["grad"] for w, _ in timed) / r0["batch"]
    other = statistics.median(w["other"] for w, _ in timed) / r0["batch"]
    parts = {p: statistics.median(w[p] for w, _ in timed) for p in PARTS}
    parts["rest"] = statistics.median(sec - sum(w[p] for p in PARTS) for w, sec in timed)
    row.update(device=r0["device"], batch_per_process=r0["batch"], s_per_update=per_update, updates=len(seconds),
               nfe_logged=statistics.median(float(r["nfe"]) for r in log), nfe_grad=grad, nfe_other=other,
               parts_s=parts, rss_peak_mib=max(r["rss_peak_mib"] for r in ranks))
    gib = lambda v: None if v is None else v / 2**30  # noqa: E731
    for phase in ("train", "eval"):
        for kind in ("allocated", "reserved"):
            vals = [r[f"{phase}_peak"][kind] for r in ranks if r[f"{phase}_peak"]]
            row[f"{phase}_{kind}_gib"] = gib(max(vals)) if vals else None
    if "fwd_s" in r0:
        bound = grad * r0["fwd_bwd_s"] + other * r0["fwd_s"]
        row.update(fwd_s=r0["fwd_s"], fwd_bwd_s=r0["fwd_bwd_s"], bound_s=bound, bound_ratio=per_update / bound)
    return row


def table(rows: list[dict]) -> str:
    """The markdown table: measured rows first, then the settings that could not run with the reason."""
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| setting | processes | device | batch/process | s/update | NFE grad + other | forward (s) | "
             "forward+backward (s) | NFE bound (s) | s/update / bound | update split (s): network forward / "
             "backward / VAE / rewards / optimizer / rest | train peak GiB alloc / reserved | "
             "eval peak GiB alloc / reserved | peak RSS MiB | flags / spec overrides |",
             "|" + "---|" * 15]
    for r in [r for r in rows if "error" not in r]:
        lines.append(
            f"| {r['setting']} | {r['processes']} | {r['device']} | {r['batch_per_process']} | {r['s_per_update']:.2f} |"
            f" {r['nfe_grad']:g} + {r['nfe_other']:g} | {f(r.get('fwd_s'))} | {f(r.get('fwd_bwd_s'))} | "
            f"{f(r.get('bound_s'))} | {f(r.get('bound_ratio'))} | "
            f"{' / '.join(f(r['parts_s'][p], '{:.1f}') for p in (*PARTS, 'rest'))} | "
            f"{f(r['train_allocated_gib'], '{:.1f}')} / "
            f"{f(r['train_reserved_gib'], '{:.1f}')} | {f(r['eval_allocated_gib'], '{:.1f}')} / "
            f"{f(r['eval_reserved_gib'], '{:.1f}')} | {r['rss_peak_mib']:.0f} | "
            f"{' '.join(r['extra'])} {json.dumps(r['overrides']) if r['overrides'] else ''} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Could not run:", ""] + [f"* {r['setting']} ({r['processes']} process"
                                              f"{'es' if r['processes'] > 1 else ''}): {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    import harness

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # no `choices` here: argparse checks an empty list against them (python < 3.12), so --cpu-overhead alone failed
    p.add_argument("settings", nargs="*", metavar="SETTING", help=f"launcher settings: {', '.join(launch.SETTINGS)}")
    p.add_argument("--all", action="store_true", help="every launcher setting")
    p.add_argument("--cpu-overhead", action="store_true", help="CPU_ROWS on the CPU (see the module docstring)")
    p.add_argument("--random-weights", action="store_true",
                   help="the real architectures with random weights (full/configs; nothing downloaded)")
    p.add_argument("--checkpointing", choices=["spec", "on", "off", "both"], default="spec",
                   help="gradient checkpointing: the spec's, on, off, or one run with each")
    p.add_argument("--model", help="replace the settings' model spec")
    p.add_argument("--steps", type=harness.bounded(int, 1), default=6, help="updates to run (the first is not timed)")
    p.add_argument("--batch", type=harness.bounded(int, 1),
                   help="per-process batch (default: the memory plan's for --gpu-memory)")
    p.add_argument("--num-processes", type=harness.bounded(int, 1), default=1,
                   help="processes (GPUs), as the launcher starts them")
    p.add_argument("--launcher", choices=["python", "accelerate", "torchrun"],
                   help="default: python with one process, accelerate with several")
    p.add_argument("--gpu-memory", type=harness.bounded(float, 1),
                   help="GB per GPU for the plan's batch (default: this GPU's, or 80)")
    p.add_argument("--resolution", type=harness.bounded(int, 8), default=128, help="--cpu-overhead: the image side")
    p.add_argument("--timeout", type=harness.bounded(float, 1),
                   help="seconds per setting before it is stopped and reported")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model-spec overrides (JSON values)")
    p.add_argument("--out", default="", help="folder for the runs and bench.json (default: a temporary folder)")
    a = p.parse_args(argv)
    unknown = [n for n in a.settings if n not in launch.SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {unknown}; choose from {sorted(launch.SETTINGS)}")
    overrides = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    launcher = a.launcher or ("python" if a.num_processes == 1 else "accelerate")
    if a.model:  # the user's input: an error now, not a failed row per setting
        from .spec import load_spec

        load_spec(a.model)
    out = Path(a.out or tempfile.mkdtemp(prefix="fewstep-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if a.cpu_overhead:
        from . import rehearse

        for name, flags, more in CPU_ROWS:
            if a.settings and name not in a.settings:
                continue
            folder = out / f"{name}-data"
            folder.mkdir(parents=True, exist_ok=True)
            spec, _ = rehearse.rehearsal_spec(str(launch.SPECS / launch.SETTINGS[name].spec), folder, rows=100,
                                              resolution=a.resolution)
            rows.append(bench(name, str(spec), a.steps, a.batch or 1,
                              {"precompute_embeddings": False, **more, **overrides}, out, 1, "python",
                              extra=[*flags, *extra], shallow_parts=True, timeout=a.timeout))
            (out / "bench.json").write_text(json.dumps(rows, indent=2))
            print(table(rows[-1:]), flush=True)
    else:
        names = list(launch.SETTINGS) if a.all else a.settings
        if not names:
            p.error("name one or more settings, --all or --cpu-overhead")
        if a.random_weights:
            overrides["random_weights"] = True
        ckpts = {"spec": [None], "on": [True], "off": [False], "both": [True, False]}[a.checkpointing]
        for name in names:
            for ckpt in ckpts:
                o = {**overrides, **({} if ckpt is None else {"gradient_checkpointing": ckpt})}
                rows.append(bench(name, a.model, a.steps, a.batch, o, out, a.num_processes, launcher, a.gpu_memory,
                                  extra, timeout=a.timeout))
                (out / "bench.json").write_text(json.dumps(rows, indent=2))  # what finished survives a crash
                if "error" in rows[-1]:
                    print(f"{name}: could not run: {rows[-1]['error']}", file=sys.stderr, flush=True)
    print(table(rows), flush=True)
    return rows


if __name__ == "__main__":
    import harness

    harness.run_cli(main)
