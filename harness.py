"""The run harness shared by pso.py, sharpening.py and diff_instruct_pp.py: one run's life (docs/design.md section 9).

* configs: a dataclass per method parsed into a CLI (`arg`, `RunConfig`, `parse_config`), range checks that name
  the flag (`check`, `check_range`, `check_choice`), a backend's defaults for options not given;
* world backends: `register_world` / `load_world` (`--model` -> toy/ or full/, found through entry points);
* `Run`: the run folder, the resume rule, crash-safe checkpoints, log.csv, metrics.json, figures, the summary;
* `run_cli`: the `__main__` of every entry point (a bad input is one line naming the problem, not a traceback).

The math the methods share (schedules, MDP kernels, log-probs, the backend interface) is in common.py.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from common import World

# ---------------------------------------------------------------------------------------------------
# Configs: a dataclass per method, parsed into a CLI; range checks that name the flag
# ---------------------------------------------------------------------------------------------------
def arg(default, help: str, **kw):
    """A dataclass field with a --help line (cleanRL-style configs)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    """The run plumbing every method shares (the harness reads these; each method's Config inherits them)."""

    seed: int = arg(0, "random seed: update k draws from step_generator(seed, k, rank)")
    out: str = arg("", "run folder (default runs/<method>-<variant>-<model>)")
    resume: bool = arg(False, "continue from the run folder's last complete checkpoint (same method and settings)")
    save_every: int = arg(100, "updates between checkpoints (the last update is always saved)")
    keep_checkpoints: int = arg(2, "complete checkpoints kept on disk (the newest ones; >= 1)")
    gradient_accumulation_steps: int = arg(1, "micro-batches of --batch per optimizer update (accelerate's "
                                           "accumulation): the global batch is batch x this x processes")
    report_to: str = arg("", "experiment tracking through accelerate's trackers: tensorboard | wandb | '' (off)")
    progress: bool = arg(True, "a progress bar over the updates")


# settings a resumed run may change: they do not change what the updates compute
RESUMABLE = {"steps", "resume", "out", "save_every", "keep_checkpoints", "report_to", "progress"}


def _parser(cls, description: str | None, suppress: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS if suppress else None)
    base = {f.name for f in dataclasses.fields(RunConfig)}
    fields = dataclasses.fields(cls)  # the method's own options first, the shared plumbing last
    for f in [f for f in fields if f.name not in base] + [f for f in fields if f.name in base]:
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(help=f.metadata.get("help", ""))
        if not suppress:
            kw["default"] = default
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            parser.add_argument(name, nargs="+", type=type(default[0]) if default else str, **kw)
        else:
            parser.add_argument(name, type=type(default) if default is not None else str, **kw)
    return parser


def parse_config(cls, argv: Sequence[str] | None = None, description: str | None = None):
    """Build an argparse CLI from a config dataclass: field `reward_scale` -> `--reward-scale`. The names of the
    options given on the command line are remembered (`explicit_fields`), so a backend's defaults fill only the
    others (apply_world_defaults)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = cls(**vars(_parser(cls, description, suppress=False).parse_args(argv)))
    cfg._explicit_fields = set(vars(_parser(cls, description, suppress=True).parse_args(argv)))
    return cfg


def explicit_fields(cfg) -> set[str]:
    """The fields the user set: those given on the command line, or every field of a config built in code."""
    return getattr(cfg, "_explicit_fields", {f.name for f in dataclasses.fields(cfg)})


class ConfigError(ValueError):
    """A bad option: the message names the flag, what was expected and what was found."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(ok: bool, name: str, expected: str, found) -> None:
    """Raise ConfigError("--name: expected <expected>, got <found>") unless ok."""
    if not ok:
        raise ConfigError(f"{flag(name)}: expected {expected}, got {found!r}")


def check_range(cfg, name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False) -> None:
    """The one range check of every numeric option: finite, and in [lo, hi] (open ends where asked)."""
    v = getattr(cfg, name)
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    expected = "a finite number" + (" " + " and ".join(parts) if parts else "")
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    check(ok, name, expected, v)


def check_choice(cfg, name: str, choices: Sequence) -> None:
    v = getattr(cfg, name)
    check(v in choices, name, f"one of {list(choices)}", v)


def check_run_config(cfg) -> None:
    """The shared plumbing options (RunConfig)."""
    for name in ("save_every", "keep_checkpoints", "gradient_accumulation_steps"):
        check_range(cfg, name, 1)
    check(cfg.report_to in ("", "tensorboard", "wandb"), "report_to", "tensorboard, wandb or '' (off)", cfg.report_to)


def apply_world_defaults(cfg, world, method: str):
    """A backend may supply values for the options the user did not set (the full backend: the paper's learning
    rate, batch and evaluation sizes for a real checkpoint, never the toy defaults). Returns (cfg, {field: value})."""
    defaults = getattr(world, "method_defaults", None)
    if defaults is None:
        return cfg, {}
    given, names = explicit_fields(cfg), {f.name for f in dataclasses.fields(cfg)}
    proposed = defaults(method, getattr(cfg, "variant", ""))
    unknown = sorted(set(proposed) - names)
    if unknown:
        raise ValueError(f"{type(world).__name__}.method_defaults({method!r}) names options {method} does not have: "
                         f"{unknown}")
    used = {k: v for k, v in proposed.items() if k not in given and getattr(cfg, k) != v}
    new = dataclasses.replace(cfg, **used)
    new._explicit_fields = given
    return new, used


# ---------------------------------------------------------------------------------------------------
# World backends register themselves (the harness does not import toy/ or full/)
# ---------------------------------------------------------------------------------------------------
_BACKENDS: dict[str, tuple[int, Callable[[str], bool], Callable[..., Any]]] = {}
ENTRY_POINTS = "fewstep_finetune.worlds"  # pyproject.toml: toy = "toy:register", full = "full:register"


def register_world(name: str, accepts: Callable[[str], bool], load: Callable[..., Any], priority: int = 0) -> None:
    """A backend says which `--model` values it takes; load_world asks the highest priority first."""
    _BACKENDS[name] = (priority, accepts, load)


def _discover_backends() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        if ep.name not in _BACKENDS:
            ep.load()()


def load_world(model: str, **kw) -> World:
    """`--model` of every method script: a toy world (toy2d, flow2d, mnist) or a diffusers checkpoint / model spec for
    the full backend; the backends registered under the entry-point group `fewstep_finetune.worlds` decide."""
    _discover_backends()
    if not _BACKENDS:
        raise RuntimeError(f"no world backend is registered (entry-point group {ENTRY_POINTS}); install the project "
                           "first: pip install -e .")
    for name, (_, accepts, load) in sorted(_BACKENDS.items(), key=lambda kv: -kv[1][0]):
        if accepts(model):
            return load(model, **kw)
    raise ValueError(f"--model {model!r}: no registered backend ({sorted(_BACKENDS)}) accepts it")


# ---------------------------------------------------------------------------------------------------
# The experiment harness: one run's life (folder, resume, checkpoints, log, summary, figures)
# ---------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: str | Path, data: bytes) -> None:
    """Write a file so that a reader finds the old or the new content, never a partial one: a temp file in the same
    folder, fsync, os.replace, fsync of the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: data-parallel ranks may write at once
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_durable(path, json.dumps(obj, indent=2, default=str).encode())


def read_json(path: str | Path, what: str = "file") -> Any:
    """json.loads with an error that names the file and the problem (missing, empty, truncated, not UTF-8)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"{what} {path} is empty; expected a JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); it may be "
                         "truncated") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, or not of this run's models); the message names the file."""


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss: training stops and every checkpoint on disk stays as it was."""


class Run:
    """One training run's life, the same for every method (docs/design.md section 9):

        run = harness.Run("pso", cfg, out)                 # checks the folder and the resume rule; writes nothing
        world = harness.load_world(cfg.model)
        cfg = run.configure(world)                         # backend defaults for unset options; same-experiment check
        ...build the denoisers and optimizers...
        start = run.start(world, {"student": den}, {"student": opt})   # restore or begin; writes config.json
        for step in run.updates():                         # tqdm over start+1 .. cfg.steps
            for micro in range(cfg.gradient_accumulation_steps):
                with run.accumulate():
                    loss = ...; run.check_finite(loss, step); run.optimizer_step(loss, opt, params, max_norm)
            run.log({"step": step, ...})                   # log.csv (+ trackers), and a checkpoint when due
        run.finish(metrics, panels, curves)                # metrics.json, samples.png, curves.png, adapter/, summary

    Folder: config.json ({"method", **config}), log.csv, metrics.json, samples.png, curves.png, adapter/,
    checkpoint-<step>/ (the newest `keep_checkpoints`). Resume rule: a run folder is resumed only by the same method
    with the same settings (RESUMABLE and the method's `free` fields may change); otherwise a clear error is raised
    before anything is written.

    Checkpoints: one safetensors file per model (its adapter_state()), one torch file per optimizer, and state.json
    with the step and the sha256 of every file. A checkpoint is filled in a temp folder, fsynced, and renamed into
    place; only then are older ones deleted, so at every instant a reader finds a complete checkpoint, the previous
    or the new one. Restoring verifies the hashes (a damaged newest checkpoint falls back to the previous complete
    one with a message; if none is usable it is an error, never a silent restart), checks every model's keys and
    shapes both ways, and loads optimizer state onto this rank's device. accelerate's save_state is not used: it saves
    whole model state dicts (the frozen SDXL weights too) into a folder written in place, with no integrity check;
    what it would add (RNG state) the per-update generators make unnecessary."""

    LOG_FIELDS = ("step", "loss", "reward", "nfe", "seconds")

    def __init__(self, method: str, cfg, out: str | Path | None = None, free: Sequence[str] = ()):
        self.method, self.cfg, self.free = method, cfg, RESUMABLE | set(free)
        name = f"{method}-{getattr(cfg, 'variant', '')}-{Path(cfg.model).stem}".replace("--", "-")
        self.path = Path(out or cfg.out or Path("runs") / name)
        check_run_config(cfg)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file; expected a run folder (a new or an existing one)")
        parent = next((p for p in [self.path, *self.path.parents] if p.exists()), Path("."))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {self.path}: cannot write into {parent} (permission denied)")
        self.saved_config = None
        if (self.path / "config.json").exists():
            self.saved_config = read_json(self.path / "config.json", "run config")
            if not isinstance(self.saved_config, dict):
                raise ValueError(f"run config {self.path / 'config.json'} holds a {type(self.saved_config).__name__}, "
                                 "expected a JSON object")
        if cfg.resume and self.saved_config is not None and self.saved_config.get("method") != method:
            raise ConfigError(f"--resume: {self.path} is a run of {self.saved_config.get('method')!r}, not of "
                              f"{method!r}; use another --out for this run (nothing was written)")
        self.world = self.acc = None
        self.models: dict[str, Any] = {}
        self.optimizers: dict[str, Any] = {}
        self.start_step, self._bar, self._trackers, self._header = 0, None, [], None

    # ------------------------------------------------------------------------------------------- begin
    def configure(self, world):
        """Apply the backend's defaults for options the user did not set (printed), then the resume rule on the
        resolved settings. Returns the resolved config."""
        cfg, used = apply_world_defaults(self.cfg, world, self.method)
        if used:
            self.print(f"[{self.method}] {type(world).__name__} defaults for options not given: "
                       + ", ".join(f"{flag(k)} {v}" for k, v in used.items()))
        if cfg.resume and self.saved_config is not None:
            now = {"method": self.method, **dataclasses.asdict(cfg)}
            diff = {k: (self.saved_config.get(k, "<absent>"), v) for k, v in now.items()
                    if k not in self.free and self.saved_config.get(k, "<absent>") != _jsonable(v)}
            if diff:
                raise ConfigError(f"--resume with settings that differ from the saved run {self.path / 'config.json'}: "
                                  + ", ".join(f"{flag(k)} saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
                                  + ". Use the same settings, or another --out for a new run (nothing was written).")
        self.cfg = cfg
        return cfg

    @property
    def main(self) -> bool:
        return self.acc is None or self.acc.is_main_process

    @property
    def sharded(self) -> bool:
        """Whether the trained models are sharded over the processes (accelerate's FSDP, full/fsdp.py): then every
        forward is a collective of all ranks, so every process runs the evaluations (the main one writes them)."""
        return self.acc is not None and getattr(self.acc, "distributed_type", None) == "FSDP"

    def start(self, world, models: dict[str, Any], optimizers: dict[str, Any]) -> int:
        """Restore the last complete checkpoint (--resume) or begin a fresh run; returns the last finished update."""
        self.world, self.acc, self.models, self.optimizers = world, world.accelerator, models, optimizers
        self.acc.gradient_accumulation_steps = self.cfg.gradient_accumulation_steps
        self.acc.step = 0  # accelerate's micro-batch counter: a run starts (or resumes) at an update boundary
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.path.glob(".tmp-checkpoint-*"):  # a save killed half-way: never a checkpoint
                shutil.rmtree(stale, ignore_errors=True)
        self.acc.wait_for_everyone()
        if self.cfg.resume:
            found = self._restore()
            if found is None:
                self.print(f"[{self.method}] --resume: no checkpoint in {self.path}; starting at update 0")
        elif self.main:  # a fresh run must not append to or resume from an older one's files
            for name in ("log.csv", "metrics.json"):
                (self.path / name).unlink(missing_ok=True)
            for old in self._checkpoints():
                shutil.rmtree(old, ignore_errors=True)
        if self.start_step > self.cfg.steps:
            raise ConfigError(f"--steps {self.cfg.steps}: the checkpoint in {self.path} has already done "
                              f"{self.start_step} updates; expected --steps >= {self.start_step}")
        if self.main:
            write_json_atomic(self.path / "config.json", {"method": self.method, **dataclasses.asdict(self.cfg)})
            self._truncate_log(self.start_step)
            self._open_trackers()
        self.acc.wait_for_everyone()
        return self.start_step

    def updates(self):
        """start+1 .. cfg.steps, with a progress bar on the main process."""
        from tqdm.auto import tqdm

        steps = range(self.start_step + 1, self.cfg.steps + 1)
        self._bar = tqdm(steps, desc=f"{self.method} {getattr(self.cfg, 'variant', '')}".strip(),
                         disable=not (self.main and self.cfg.progress), initial=self.start_step,
                         total=self.cfg.steps, mininterval=1.0, dynamic_ncols=True)
        yield from self._bar
        self._bar.close()

    # ------------------------------------------------------------------------------------------- one update
    def accumulate(self):
        """accelerate's gradient accumulation over the run's trained modules (no DDP sync until the last micro-batch)."""
        modules = [m for m in (getattr(d, "module", None) for d in self.models.values()) if m is not None]
        return self.acc.accumulate(*modules)

    def optimizer_step(self, loss: torch.Tensor, optimizer, params, max_norm: float = 0.0):
        """backward; on the micro-batch that syncs: clip, step, zero_grad (accelerate skips the step otherwise).
        Returns the pre-clip gradient norm on a sync step (else None)."""
        self.acc.backward(loss)
        norm = None
        if self.acc.sync_gradients and max_norm > 0:
            norm = self.acc.clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return None if norm is None else float(norm)

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        """Stop on NaN/inf; the checkpoints on disk are left as they are, and the message says what exists."""
        if torch.isfinite(loss.detach()).all():
            return
        last = self._checkpoints()
        kept = (f"the last checkpoint ({last[0].name}) is kept: --resume continues from it with the same settings"
                if last else "no checkpoint was written yet")
        raise NonFiniteLoss(f"non-finite loss ({float(loss.detach().float().mean())}) at update {step} of {self.path}; "
                            f"{kept}. To change --lr or --beta, start a new run (another --out). Also check the data "
                            "and the reward for NaNs.")

    def log(self, row: dict) -> None:
        """One row of log.csv per update (every row the same columns), trackers, progress bar; a checkpoint when due."""
        step = int(row["step"])
        if self.main:
            self._write_row(row)
            for tracker in self._trackers:
                tracker.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
            if self._bar is not None:
                self._bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "reward") if isinstance(row.get(k), float)},
                                      refresh=False)
        if step % self.cfg.save_every == 0 or step == self.cfg.steps:
            self.save_checkpoint(step)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _checkpoints(self) -> list[Path]:
        """checkpoint-<step> folders, newest first."""
        found = []
        for p in self.path.glob("checkpoint-*"):
            suffix = p.name.split("-", 1)[1]
            if p.is_dir() and suffix.isdigit():
                found.append((int(suffix), p))
        return [p for _, p in sorted(found, reverse=True)]

    def save_checkpoint(self, step: int, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        if self.main:
            final = self.path / f"checkpoint-{step}"
            tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=f".tmp-checkpoint-{step}-"))
            try:
                files = {}
                for name, den in self.models.items():
                    f = tmp / f"model-{name}.safetensors"
                    save_file({k: v.detach().cpu().contiguous() for k, v in den.adapter_state().items()}, str(f))
                    files[f.name] = f
                for name, opt in self.optimizers.items():
                    f = tmp / f"optimizer-{name}.pt"
                    torch.save(opt.state_dict(), f)
                    files[f.name] = f
                for f in files.values():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                state = {"step": step, "method": self.method, "sha256": {n: sha256_file(f) for n, f in files.items()},
                         **(extra or {})}
                write_json_atomic(tmp / "state.json", state)
                _fsync_dir(tmp)
                if final.exists():  # the same update saved again (cannot happen in a straight run): replace it
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _fsync_dir(self.path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            for old in self._checkpoints()[self.cfg.keep_checkpoints:]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _verify(self, ckpt: Path) -> dict:
        """state.json of a complete, undamaged checkpoint, or CheckpointError saying what is wrong with it."""
        try:
            state = read_json(ckpt / "state.json", "checkpoint state")
        except (OSError, ValueError) as e:
            raise CheckpointError(str(e)) from None
        expected = {f"model-{n}.safetensors" for n in self.models} | {f"optimizer-{n}.pt" for n in self.optimizers}
        hashes = state.get("sha256", {}) if isinstance(state, dict) else {}
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or set(hashes) != expected:
            raise CheckpointError(f"checkpoint {ckpt} holds {sorted(hashes)}; expected the files {sorted(expected)} "
                                  f"of this run's models and optimizers")
        for name, digest in hashes.items():
            f = ckpt / name
            if not f.is_file():
                raise CheckpointError(f"checkpoint file {f} is missing")
            if sha256_file(f) != digest:
                raise CheckpointError(f"checkpoint file {f} is damaged: its sha256 differs from the one in state.json")
        return state

    def _restore(self) -> Path | None:
        from safetensors.torch import load_file

        problems, chosen = [], None
        for ckpt in self._checkpoints():
            try:
                state = self._verify(ckpt)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            chosen = ckpt
            break
        if chosen is None:
            if problems:
                raise CheckpointError(f"--resume: no usable checkpoint in {self.path}: " + "; ".join(problems)
                                      + ". Nothing was changed; start a new run (without --resume) to begin again.")
            return None
        if problems:
            self.print(f"[{self.method}] skipped damaged checkpoint(s): {'; '.join(problems)}; resuming from {chosen}")
        for name, den in self.models.items():
            f = chosen / f"model-{name}.safetensors"
            tensors = load_file(str(f))
            expected = den.adapter_state()
            missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            shapes = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
            if missing or unexpected or shapes:
                raise CheckpointError(f"{f} does not fit model {name!r}: missing keys {missing[:3]}, unexpected keys "
                                      f"{unexpected[:3]}, other shapes {shapes[:3]} ({len(missing)}, {len(unexpected)},"
                                      f" {len(shapes)} in all); a different --lora-rank or model?")
            den.load_adapter_state(tensors)
        for name, opt in self.optimizers.items():
            f = chosen / f"optimizer-{name}.pt"
            try:
                # onto this rank's device, whichever saved it (torch names a CPU of a gloo rank "cpu:0", which
                # torch.load does not take as a location: plain "cpu" then)
                dev = self.acc.device
                opt.load_state_dict(torch.load(f, map_location="cpu" if dev.type == "cpu" else dev, weights_only=True))
            except (ValueError, RuntimeError, KeyError) as e:
                raise CheckpointError(f"optimizer state {f} does not fit optimizer {name!r}: {e}") from None
        self.start_step, self.restored = state["step"], state
        self.print(f"[{self.method}] resumed {self.path} from {chosen.name} (update {self.start_step})")
        return chosen

    # ------------------------------------------------------------------------------------------- log.csv
    def read_log(self) -> list[dict]:
        """The complete rows of log.csv (a row cut short by a kill is left out)."""
        path = self.path / "log.csv"
        if not path.exists():
            return []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if None not in r.values() and None not in r and str(r.get("step", "")).isdigit()]
        return rows

    def _truncate_log(self, last_step: int) -> None:
        """Keep the rows up to the restored update (a run killed between a log row and its checkpoint wrote more)."""
        path = self.path / "log.csv"
        rows = [r for r in self.read_log() if int(r["step"]) <= last_step]
        if not rows:
            path.unlink(missing_ok=True)
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        write_bytes_durable(path, buf.getvalue().encode())

    def _write_row(self, row: dict) -> None:
        path = self.path / "log.csv"
        if self._header is None:
            existing = self.read_log()
            self._header = list(existing[0]) if existing else (list(self.LOG_FIELDS) +
                                                               [k for k in row if k not in self.LOG_FIELDS])
        extra = sorted(set(row) - set(self._header))
        if extra:
            raise ValueError(f"log row of update {row['step']} has columns {extra} that log.csv's header lacks: every "
                             "row must have the same columns (use '' for a value not measured in this update)")
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._header)
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            f.flush()

    def _open_trackers(self) -> None:
        """accelerate's tracker for --report-to (tensorboard or wandb), writing under <run>/trackers."""
        if not self.cfg.report_to:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[self.cfg.report_to]
        name = self.path.name
        try:
            tracker = cls(name, str(self.path / "trackers")) if cls.requires_logging_directory else cls(name)
            if hasattr(tracker, "start"):  # accelerate >= 1.x opens the writer lazily
                tracker.start()
        except ImportError as e:
            raise ConfigError(f"--report-to {self.cfg.report_to}: {e}; install it (pip install -e '.[track]' for "
                              "tensorboard, or pip install wandb)") from None
        tracker.store_init_configuration({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                          for k, v in dataclasses.asdict(self.cfg).items()})
        self._trackers = [tracker]

    # ------------------------------------------------------------------------------------------- end
    def finish(self, metrics: dict, panels: dict | None = None, curves: Sequence[tuple[str, str]] = (),
               adapter: Any = None, marks: str | None = None) -> dict:
        """metrics.json, samples.png (world.plot_samples of `panels`, marking `marks`: "target" or "reward", what the
        run aims at), curves.png (`curves`: (log column, title)), the adapter export (world.save_adapter), trackers
        closed, and the summary table printed."""
        if self.main:
            if panels:
                self.world.plot_samples(panels, self.path / "samples.png", marks=marks)
            if curves:
                plot_curves(self.read_log(), self.path / "curves.png", curves)
            if adapter is not None:
                self.world.save_adapter(adapter, self.path / "adapter")
            write_json_atomic(self.path / "metrics.json", metrics)
            for tracker in self._trackers:
                tracker.log({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=self.cfg.steps)
                tracker.finish()
            print(summary(metrics, self.path))
        return metrics

    def print(self, message: str) -> None:
        if self.main:
            print(message, file=sys.stderr)


def _jsonable(v):
    return json.loads(json.dumps(v, default=str))


SUMMARY_ORDER = ("base", "naive", "tuned")


def summary(metrics: dict, path: Path | str | None = None) -> str:
    """The one summary table of every method: one row per evaluated model (base, tuned, and whatever else the run
    scored, e.g. naive or the 1-step samples), reward / quality / distance, then NFEs, seconds, the files."""
    cols = ("reward", "quality", "distance")
    names = []
    for k in metrics:
        for c in cols:
            if k.startswith(c + "_") and isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool):
                name = k[len(c) + 1:]
                if name not in names and not name.endswith("_split") and "on_base" not in name:
                    names.append(name)
    names.sort(key=lambda n: (n.split("_")[0] not in SUMMARY_ORDER, "_" in n,
                              SUMMARY_ORDER.index(n.split("_")[0]) if n.split("_")[0] in SUMMARY_ORDER else 0))
    lines = [f"{'model':16s}" + "".join(f"{c:>11s}" for c in cols)]
    for n in names:
        cells = [metrics.get(f"{c}_{n}") for c in cols]
        lines.append(f"{n:16s}" + "".join(f"{v:11.4f}" if isinstance(v, (int, float)) else f"{'-':>11s}" for v in cells))
    foot = []
    if "nfe_per_update" in metrics:
        foot.append(f"NFE per update {metrics['nfe_per_update']:g}")
    if "seconds" in metrics:
        per = metrics.get("seconds_per_update")
        foot.append(f"{metrics['seconds']:.1f} s" + (f" ({per:.3f} s/update)" if isinstance(per, (int, float)) else ""))
    if path is not None:
        path = Path(path)
        files = [p.name for p in (path / "samples.png", path / "curves.png", path / "adapter") if p.exists()]
        foot.append(f"wrote {path}" + (f" ({', '.join(files)})" if files else ""))
    return "\n".join(lines + ["; ".join(foot)])


def plot_curves(rows: list[dict], path, keys: Sequence[tuple[str, str]]) -> None:
    """Training curves from log.csv: one panel per (column, title); empty cells (not measured that update) skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.5 * len(keys), 2.9), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.9, marker="." if len(pts) < 30 else None)
        ax.set(title=title, xlabel="update")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, CheckpointError, NonFiniteLoss)


def run_cli(main: Callable[[], Any]) -> None:
    """`if __name__ == "__main__"` of every method script: a bad input, a damaged checkpoint or a non-finite loss ends
    with its message (exit status 2), not a traceback; FEWSTEP_TRACEBACK=1 shows the traceback too."""
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("FEWSTEP_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
