"""The run harness shared by pso.py, sharpening.py and diff_instruct_pp.py: one run's life (docs/design.md section 9,
docs/harness.md).

* configs: a dataclass per method parsed into a CLI (`arg`, `RunConfig`, `parse_config`), range checks that name
  the flag (`check`, `check_range`, `check_choice`), a backend's defaults for options not given;
* world backends: `register_world` / `load_world` (`--model` -> toy/ or full/, found through entry points);
* `Run`: the run folder (the resume / overwrite rule, a lock held for the run's life), crash-safe checkpoints that
  cover everything a resume reads, log.csv, a stop on a diverging loss or metric, metrics.json, figures, the summary;
* `run_cli`: the `__main__` of every entry point (a bad input, a resource error or Ctrl-C is one line, not a
  traceback);
* `python -m harness compare RUN [RUN ...]` and `python -m harness replot RUN`: commands over saved run folders.

The math the methods share (schedules, MDP kernels, log-probs, the backend interface) is in common.py.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import socket
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
    overwrite: bool = arg(False, "replace the run in --out (its checkpoints, log, metrics, figures); without it or "
                                 "--resume an existing run folder is an error")
    save_every: int = arg(100, "updates between checkpoints (the last update is always saved)")
    keep_checkpoints: int = arg(2, "complete checkpoints kept on disk (the newest ones; >= 1)")
    gradient_accumulation_steps: int = arg(1, "micro-batches of --batch per optimizer update (accelerate's "
                                           "accumulation): the global batch is batch x this x processes")
    report_to: str = arg("", "experiment tracking through accelerate's trackers: tensorboard | wandb | '' (off)")
    progress: bool = arg(True, "a progress bar over the updates")


# settings a resumed run may change: they do not change what the updates compute
RESUMABLE = {"steps", "resume", "overwrite", "out", "save_every", "keep_checkpoints", "report_to", "progress"}


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


def bounded(kind: type, lo: float | None = None, hi: float | None = None) -> Callable[[str], Any]:
    """An argparse `type` for the entry points without a config dataclass: a finite int / float in [lo, hi];
    argparse names the flag, this says what was expected and what was found."""
    parts = [f"{op} {v:g}" for op, v in ((">=", lo), ("<=", hi)) if v is not None]
    expected = ("an integer" if kind is int else "a finite number") + (" " + " and ".join(parts) if parts else "")

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    parse.__name__ = kind.__name__
    return parse


def check_choice(cfg, name: str, choices: Sequence) -> None:
    v = getattr(cfg, name)
    check(v in choices, name, f"one of {list(choices)}", v)


def check_seed(cfg) -> None:
    """--seed seeds numpy too, which takes 0 .. 2**32 - 1."""
    check(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32, "seed", "an integer in 0 .. 4294967295", cfg.seed)


def check_run_config(cfg) -> None:
    """The shared plumbing options (RunConfig)."""
    check_seed(cfg)
    check(not (cfg.resume and cfg.overwrite), "overwrite", "not with --resume (continue the run, or replace it)", True)
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
# Files: durable writes, and errors that name the file
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


@contextlib.contextmanager
def naming(path: str | Path):
    """Give an OSError raised without a file name (a write() that finds the disk full knows none) the path being
    written, so run_cli can say in one line which file could not be written and why."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from None
        raise


class _RecordingFile:
    """A file whose write errors are kept: torch.save turns an OSError of write() into a C++ assertion text."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def torch_save(obj, path: Path) -> None:
    """torch.save into `path`, fsynced; a failed write is an OSError naming the path."""
    with naming(path), open(path, "wb") as f:
        rec = _RecordingFile(f)
        try:
            torch.save(obj, rec)
        except RuntimeError:
            if rec.error is not None:
                raise rec.error from None
            raise
        f.flush()
        os.fsync(f.fileno())


def write_bytes_durable(path: str | Path, data: bytes) -> None:
    """Write a file so that a reader finds the old or the new content, never a partial one: a temp file in the same
    folder, fsync, os.replace, fsync of the folder. A failed write leaves the old file and no temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: data-parallel ranks may write at once
    try:
        with naming(path), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_durable(path, json.dumps(obj, indent=2, default=str).encode())


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file, or an error that names it (missing, not UTF-8)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); it is damaged") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """json.loads with an error that names the file and the problem (missing, empty, truncated, not UTF-8)."""
    path = Path(path)
    text = read_text(path, what)
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


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _csv_rows(text: str) -> list[dict]:
    """The complete rows of a log.csv text (a row cut short by a kill is left out)."""
    rows = csv.DictReader(io.StringIO(text))
    return [r for r in rows if None not in r.values() and None not in r and str(r.get("step", "")).isdigit()]


def read_log(path: str | Path) -> list[dict]:
    """The complete rows of a log.csv ([] if there is none); a damaged (non-UTF-8) file is an error naming it."""
    path = Path(path)
    return _csv_rows(read_text(path, "training log")) if path.exists() else []


# ---------------------------------------------------------------------------------------------------
# The run folder: what a run owns, the resume / overwrite rule, the lock
# ---------------------------------------------------------------------------------------------------
RUN_FILES = ("config.json", "log.csv", "metrics.json", "samples.png", "curves.png", "figures.safetensors",
             "adapter", "trackers")  # and checkpoint-<step>/: what --overwrite replaces, nothing else
LOCK = ".lock"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, or not of this run's models); the message names the file."""


class NonFiniteLoss(RuntimeError):
    """A NaN / inf loss or metric, or one that exploded past its bound: training stops and every checkpoint on
    disk stays as it was."""


def is_checkpoint(p: Path) -> bool:
    return p.name.startswith("checkpoint-") and p.name[len("checkpoint-"):].isdigit() and p.is_dir()


def run_config(path: Path) -> dict | None:
    """A folder's config.json if it is a run's ({"method": ..., **settings}); None if there is none."""
    f = Path(path) / "config.json"
    if not f.exists():
        return None
    saved = read_json(f, "run config")
    if not (isinstance(saved, dict) and isinstance(saved.get("method"), str)):
        raise ConfigError(f"{f} is not a run's config.json (it names no \"method\"): {path} is not a run folder, "
                          "and no run writes into it")
    return saved


def folder_entries(path: Path) -> tuple[list[Path], list[Path]]:
    """(the run's own entries, other entries) of a folder. Hidden entries (the lock, temp files) and sub-runs
    (folders with their own run config.json, e.g. pso.py's naive/) belong to neither."""
    own, other = [], []
    for p in sorted(path.iterdir()) if path.is_dir() else []:
        if p.name.startswith("."):
            continue
        if p.is_dir() and (p / "config.json").is_file():
            with contextlib.suppress(ValueError):
                if run_config(p) is not None:
                    continue
        (own if p.name in RUN_FILES or is_checkpoint(p) else other).append(p)
    return own, other


def check_folder(path: Path, method: str, cfg) -> list[Path]:
    """The resume / overwrite rule on what `path` holds (reads only; raises ConfigError naming the folder). A new or
    empty folder takes any run; a run folder of `method` is continued (--resume) or replaced (--overwrite; the
    returned entries, the run's own files, are what it deletes); a folder of another method's run or one that is
    not a run folder is never written into. A run that holds only its config.json (it stopped before its first
    update) has nothing to lose and is started again."""
    saved = run_config(path)
    own, other = folder_entries(path)
    names = ", ".join(p.name for p in (own + other)[:6]) + (", ..." if len(own + other) > 6 else "")
    if saved is None:
        if cfg.resume and own:
            raise ConfigError(f"--resume: {path} has no config.json (it holds {names}), so its settings cannot be "
                              "checked; nothing was changed. Start a new run in another --out")
        if own or other:
            raise ConfigError(f"--out {path} is not empty and not a run folder (no config.json; it holds {names}); "
                              "nothing in it was changed. Choose a new or empty --out")
        return []
    if saved["method"] != method:
        raise ConfigError(f"--out {path} is a run of {saved['method']!r}, not of {method!r}; it is never resumed or "
                          "overwritten by another method (nothing was written). Use another --out for this run")
    if cfg.resume or not [p for p in own if p.name != "config.json"]:  # a run that stopped before its first update
        return []
    if not cfg.overwrite:
        done = [p.name for p in own if is_checkpoint(p)]
        raise ConfigError(f"--out {path} already holds a {method} run ({names}{'; checkpoints ' if done else ''}"
                          f"{', '.join(done)}); add --resume to continue it or --overwrite to replace it, or choose "
                          "another --out (nothing was changed)")
    return own


try:
    import fcntl
except ImportError:  # Windows: no lock (docs/harness.md)
    fcntl = None
_HELD: dict[str, int] = {}  # run folder -> the open lock file this process holds


def lock_folder(path: Path, say: Callable[[str], None] = print) -> None:
    """Hold <path>/.lock for the run's life (fcntl.flock: the kernel releases it when the process dies). A second
    process gets a ConfigError naming the holder's pid and command; a lock file left by a killed run is taken over
    with a message. A process may lock a folder it holds again (an earlier Run in it that stopped early)."""
    key = str(path.resolve())
    if fcntl is None or key in _HELD:
        return
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _lock_holder(fd)
        os.close(fd)
        command = shlex.join(map(str, holder.get("command", [])))
        who = f"process {holder.get('pid')} on {holder.get('host')} ({command})" if holder else "another process"
        raise ConfigError(f"--out {path} is in use: {who} holds {path / LOCK} while it runs. Wait for it to end, or "
                          "choose another --out") from None
    previous = _lock_holder(fd)
    if previous.get("pid"):
        say(f"[harness] took over {path / LOCK}: process {previous['pid']} on {previous.get('host')} held it and ended "
            "without releasing it (killed?)")
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": sys.argv}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, me, 0)
    _HELD[key] = fd


def _lock_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (ValueError, OSError):
        return {}


def unlock_folder(path: Path | str) -> None:
    fd = _HELD.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)  # an empty lock file: released, not left by a killed run
        os.close(fd)


atexit.register(lambda: [unlock_folder(k) for k in list(_HELD)])


def _launch_main() -> bool:
    """Whether this is the main process of a launch, before the world's accelerator exists (torchrun and accelerate
    launch set RANK): only it checks the folder early, while the other ranks may already see its new files."""
    return os.environ.get("RANK", "0") in ("", "0")


# ---------------------------------------------------------------------------------------------------
# Checkpoints: checkpoint-<step>/ with state.json covering every file a resume reads
# ---------------------------------------------------------------------------------------------------
def save_checkpoint_files(folder: Path, step: int, method: str, models: dict, optimizers: dict, log: bytes,
                          extra: dict | None = None) -> None:
    """Fill checkpoint-<step> in a temp folder, fsync, rename into place: a reader finds it complete or not at all.
    state.json holds the step, the method, the sha256 of every file (each model's adapter_state, each optimizer,
    the log.csv of this update) and a sha256 of itself."""
    from safetensors.torch import save

    final = folder / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".tmp-checkpoint-{step}-"))
    try:
        files = {}
        for name, den in models.items():
            f = files[f"model-{name}.safetensors"] = tmp / f"model-{name}.safetensors"
            write_bytes_durable(f, save({k: v.detach().cpu().contiguous() for k, v in den.adapter_state().items()}))
        for name, opt in optimizers.items():
            torch_save(opt.state_dict(), files.setdefault(f"optimizer-{name}.pt", tmp / f"optimizer-{name}.pt"))
        write_bytes_durable(files.setdefault("log.csv", tmp / "log.csv"), log)
        state = {"step": step, "method": method, "sha256": {n: sha256_file(f) for n, f in files.items()},
                 **(extra or {})}
        write_json_atomic(tmp / "state.json", {**state, "state_sha256": _digest(state)})
        _fsync_dir(tmp)
        if final.exists():  # the same update saved again (cannot happen in a straight run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_checkpoint(ckpt: Path, method: str, expected: set[str]) -> dict:
    """state.json of a complete, undamaged checkpoint of `method` holding the files `expected`, or CheckpointError
    saying what is wrong: state.json's own hash, its step against the folder name, every file's hash."""
    try:
        state = read_json(ckpt / "state.json", "checkpoint state")
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(state, dict) or "state_sha256" not in state:
        raise CheckpointError(f"checkpoint state {ckpt / 'state.json'} has no integrity hash (written by an older "
                              "version or damaged)")
    if _digest({k: v for k, v in state.items() if k != "state_sha256"}) != state["state_sha256"]:
        raise CheckpointError(f"checkpoint state {ckpt / 'state.json'} is damaged: its sha256 differs from the one "
                              "it holds")
    if state.get("step") != int(ckpt.name.split("-", 1)[1]) or state.get("method") != method:
        raise CheckpointError(f"checkpoint state {ckpt / 'state.json'} is of update {state.get('step')} of "
                              f"{state.get('method')!r}; expected update {ckpt.name.split('-', 1)[1]} (its folder "
                              f"name) of {method!r}")
    hashes = state.get("sha256", {})
    if set(hashes) != expected:
        raise CheckpointError(f"checkpoint {ckpt} holds {sorted(hashes)}; expected the files {sorted(expected)} "
                              "of this run's models and optimizers and its log")
    for name, digest in hashes.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is damaged: its sha256 differs from the one in state.json")
    return state


def restored_log(path: Path, ckpt: Path) -> tuple[bytes, str]:
    """The checkpoint's log.csv, and '' or what was wrong with the run's `path`, which must match it up to the
    checkpoint's update (rows after it are dropped: a run killed between a log row and its checkpoint wrote more)."""
    saved = (ckpt / "log.csv").read_bytes()
    step, saved_rows = int(ckpt.name.split("-", 1)[1]), _csv_rows(saved.decode())
    try:
        rows = [r for r in read_log(path) if int(r["step"]) <= step]
        problem = ("" if rows == saved_rows else f"{path}: it is missing" if not path.exists() else
                   f"{path}: its {len(rows)} rows up to update {step} differ from the checkpoint's (damaged or edited)")
    except ValueError as e:  # not UTF-8
        problem = str(e)
    return saved, problem and f"{problem}; restored the {len(saved_rows)} rows of {ckpt / 'log.csv'}"


def check_fits(f: Path, name: str, tensors: dict, expected: dict) -> None:
    """A saved adapter state against the model's own: the same keys both ways, shapes and dtypes."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    both = sorted(set(expected) & set(tensors))
    shapes = [k for k in both if expected[k].shape != tensors[k].shape]
    dtypes = [f"{k} ({tensors[k].dtype}, expected {expected[k].dtype})" for k in both
              if expected[k].dtype != tensors[k].dtype]
    if missing or unexpected or shapes or dtypes:
        raise CheckpointError(f"{f} does not fit model {name!r}: missing keys {missing[:3]}, unexpected keys "
                              f"{unexpected[:3]}, other shapes {shapes[:3]}, other dtypes {dtypes[:3]} "
                              f"({len(missing)}, {len(unexpected)}, {len(shapes)}, {len(dtypes)} in all); a different "
                              "--lora-rank or model?")


# ---------------------------------------------------------------------------------------------------
# When a run stops: a value that is not finite or beyond its bound
# ---------------------------------------------------------------------------------------------------
GROWTH = 1e6  # default bound: |loss| or |eval_*| above GROWTH x max(1, |its first value|) stops a run (docs/harness.md)


def bounded_column(k: str) -> bool:
    return k == "loss" or k.startswith("eval_")


def diverged(row: dict, first: dict, bounds: dict) -> str:
    """'' or what is wrong with a log row: a number that is not finite, or the loss or an eval_* metric beyond its
    bound (`bounds`, the method's, else GROWTH x max(1, |its first value|); `first` is filled as values come)."""
    for k, v in row.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or k == "step":
            continue
        if not math.isfinite(v):
            return f"non-finite {k} ({v}) at update {row['step']}"
        if bounded_column(k):
            bound = bounds.get(k, GROWTH * max(1.0, abs(first.setdefault(k, v))))
            if abs(v) > bound:
                why = "the method's" if k in bounds else f"{GROWTH:g} x its first value {first[k]:.4g}"
                return f"{k} {v:.4g} at update {row['step']} is beyond its bound {bound:.4g} ({why}): the run diverged"
    return ""


def first_values(rows: list[dict]) -> dict:
    """The first logged value of each bounded column (a resumed run keeps its bounds)."""
    first = {}
    for r in rows:
        for k, v in r.items():
            if bounded_column(k) and k not in first and v not in ("", None):
                with contextlib.suppress(ValueError):
                    first[k] = float(v)
    return first


def final_metric_problem(metrics: dict) -> str:
    """'' or the first metric <q>_<model> that is not finite, or beyond GROWTH x max(1, |<q>_base|), where <q>_base
    is finite (a full world's distance is NaN by design when the spec has no data for the split)."""
    for k, v in metrics.items():
        base = metrics.get(k.split("_")[0] + "_base")
        if (isinstance(v, (int, float)) and isinstance(base, (int, float)) and math.isfinite(base)
                and not (math.isfinite(v) and abs(v) <= GROWTH * max(1.0, abs(base)))):
            return f"final metric {k} = {v} (base model: {base})"
    return ""


# ---------------------------------------------------------------------------------------------------
# The experiment harness: one run's life (folder, resume, checkpoints, log, summary, figures)
# ---------------------------------------------------------------------------------------------------
_RUNS: list["Run"] = []  # the runs this process started, for the Ctrl-C message


def open_trackers(cfg, path: Path) -> list:
    """accelerate's tracker for --report-to (tensorboard or wandb), writing under <run>/trackers."""
    if not cfg.report_to:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[cfg.report_to]
    try:
        tracker = cls(path.name, str(path / "trackers")) if cls.requires_logging_directory else cls(path.name)
        if hasattr(tracker, "start"):  # accelerate >= 1.x opens the writer lazily
            tracker.start()
    except ImportError as e:
        raise ConfigError(f"--report-to {cfg.report_to}: {e}; install it (pip install -e '.[track]' for "
                          "tensorboard, or pip install wandb)") from None
    tracker.store_init_configuration({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                      for k, v in dataclasses.asdict(cfg).items()})
    return [tracker]


class Run:
    """One training run's life, the same for every method (docs/design.md section 9, docs/harness.md):

        run = harness.Run("pso", cfg, out)                 # checks the folder and the resume rule; writes nothing
        world = harness.load_world(cfg.model)
        cfg = run.configure(world)                         # backend defaults for unset options; same-experiment check
        ...build the denoisers and optimizers...
        start = run.start(world, {"student": den}, {"student": opt})   # lock; restore or begin; writes config.json
        for step in run.updates():                         # tqdm over start+1 .. cfg.steps
            for micro in range(cfg.gradient_accumulation_steps):
                with run.accumulate():
                    loss = ...; run.check_finite(loss, step); run.optimizer_step(loss, opt, params, max_norm)
            run.log({"step": step, ...})                   # log.csv (+ trackers), and a checkpoint when due
        run.finish(metrics, panels, curves)                # metrics.json, figures, adapter/, summary; unlock

    Folder (RUN_FILES): config.json ({"method", **config}), log.csv, metrics.json, samples.png, curves.png,
    figures.safetensors, adapter/, checkpoint-<step>/ (the newest `keep_checkpoints`), .lock. Which folder a run may
    write into: check_folder (RESUMABLE and the method's `free` fields may change on --resume); the main process
    holds the lock (lock_folder) from start() to finish(). Checkpoints: save_checkpoint_files / verify_checkpoint /
    check_fits, and the log.csv they hold (restored_log); a restore falls back to the previous complete checkpoint
    when the newest is damaged, and is an error when none is usable, never a silent restart. accelerate's save_state
    is not used: it saves whole model state dicts (the frozen SDXL weights too) into a folder written in place, with
    no integrity check; what it would add (RNG state) the per-update generators make unnecessary. A value that is
    not finite or beyond its bound (diverged, final_metric_problem) stops the run with NonFiniteLoss before that
    row, checkpoint or metrics.json is written."""

    LOG_FIELDS = ("step", "loss", "reward", "nfe", "seconds")

    def __init__(self, method: str, cfg, out: str | Path | None = None, free: Sequence[str] = (),
                 bounds: dict[str, float] | None = None):
        self.method, self.cfg, self.free, self.bounds = method, cfg, RESUMABLE | set(free), dict(bounds or {})
        name = f"{method}-{getattr(cfg, 'variant', '')}-{Path(cfg.model).stem}".replace("--", "-")
        self.path = Path(out or cfg.out or Path("runs") / name)
        check_run_config(cfg)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file; expected a run folder (a new or an existing one)")
        parent = next((p for p in [self.path, *self.path.parents] if p.exists()), Path("."))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {self.path}: cannot write into {parent} (permission denied)")
        self.saved_config = run_config(self.path)
        if _launch_main():
            check_folder(self.path, method, cfg)
        self.world = self.acc = None
        self.models: dict[str, Any] = {}
        self.optimizers: dict[str, Any] = {}
        self.start_step, self.step, self._bar, self._trackers, self._header, self._first = 0, 0, None, [], None, {}
        self.finished = False

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
        """Lock the folder, restore the last complete checkpoint (--resume) or begin; every check comes before the
        first write. Returns the last finished update."""
        self.world, self.acc, self.models, self.optimizers = world, world.accelerator, models, optimizers
        self.acc.gradient_accumulation_steps = self.cfg.gradient_accumulation_steps
        self.acc.step = 0  # accelerate's micro-batch counter: a run starts (or resumes) at an update boundary
        replaced = []
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            lock_folder(self.path, self.print)
            replaced = check_folder(self.path, self.method, self.cfg)  # again under the lock: what is there now
        self.acc.wait_for_everyone()
        log = self._restore() if self.cfg.resume else None
        if self.start_step > self.cfg.steps:
            raise ConfigError(f"--steps {self.cfg.steps}: the checkpoint in {self.path} has already done "
                              f"{self.start_step} updates; expected --steps >= {self.start_step}")
        if self.main:  # the first writes
            for old in replaced + list(self.path.glob(".tmp-checkpoint-*")):  # --overwrite; a save killed half-way
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            if replaced:
                self.print(f"[{self.method}] --overwrite: replaced the run in {self.path} "
                           f"({', '.join(p.name for p in replaced)})")
            write_json_atomic(self.path / "config.json", {"method": self.method, **dataclasses.asdict(self.cfg)})
            if log:
                write_bytes_durable(self.path / "log.csv", log)
            else:
                (self.path / "log.csv").unlink(missing_ok=True)
            self._first = first_values(read_log(self.path / "log.csv"))
            self._trackers = open_trackers(self.cfg, self.path)
        self.acc.wait_for_everyone()
        _RUNS.append(self)
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
        if not torch.isfinite(loss.detach()).all():
            self._stop(f"non-finite loss ({float(loss.detach().float().mean())}) at update {step}")

    def _stop(self, what: str) -> None:
        last = self._checkpoints()
        kept = (f"the last checkpoint ({last[0].name}) is kept: --resume continues from it with the same settings"
                if last else "no checkpoint was written yet")
        raise NonFiniteLoss(f"{what} of {self.path}; {kept}. To change --lr or --beta, start a new run (another "
                            "--out). Also check the data and the reward for NaNs.")

    def log(self, row: dict) -> None:
        """One row of log.csv per update (every row the same columns), trackers, progress bar; a checkpoint when due.
        A value that is not finite or beyond its bound stops the run before the row is written."""
        step = self.step = int(row["step"])
        if self.main:
            if problem := diverged(row, self._first, self.bounds):
                self._stop(problem)
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
        found = [p for p in self.path.glob("checkpoint-*") if is_checkpoint(p)]
        return sorted(found, key=lambda p: -int(p.name.split("-", 1)[1]))

    def save_checkpoint(self, step: int, extra: dict | None = None) -> None:
        if self.main:
            log = self.path / "log.csv"
            save_checkpoint_files(self.path, step, self.method, self.models, self.optimizers,
                                  log.read_bytes() if log.exists() else b"", extra)
            for old in self._checkpoints()[self.cfg.keep_checkpoints:]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _restore(self) -> bytes | None:
        """Load the newest usable checkpoint into the models and optimizers; returns its log.csv (main process)."""
        from safetensors.torch import load_file

        expected = ({f"model-{n}.safetensors" for n in self.models} | {f"optimizer-{n}.pt" for n in self.optimizers}
                    | {"log.csv"})
        problems, chosen = [], None
        for ckpt in self._checkpoints():
            try:
                state = verify_checkpoint(ckpt, self.method, expected)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            chosen = ckpt
            break
        if chosen is None:
            if problems:
                raise CheckpointError(f"--resume: no usable checkpoint in {self.path}: " + "; ".join(problems)
                                      + ". Nothing was changed; start a new run (--overwrite) to begin again.")
            self.print(f"[{self.method}] --resume: no checkpoint in {self.path}; starting at update 0")
            return None
        if problems:
            self.print(f"[{self.method}] skipped damaged checkpoint(s): {'; '.join(problems)}; resuming from {chosen}")
        for name, den in self.models.items():
            f = chosen / f"model-{name}.safetensors"
            tensors = load_file(str(f))
            check_fits(f, name, tensors, den.adapter_state())
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
        self.start_step = self.step = state["step"]
        self.print(f"[{self.method}] resumed {self.path} from {chosen.name} (update {self.start_step})")
        if not self.main:
            return None
        log, problem = restored_log(self.path / "log.csv", chosen)
        if problem:
            self.print(f"[{self.method}] {problem}")
        return log

    # ------------------------------------------------------------------------------------------- log.csv
    def read_log(self) -> list[dict]:
        """The complete rows of log.csv (a row cut short by a kill is left out)."""
        return read_log(self.path / "log.csv")

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
        with naming(path), open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self._header)
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            f.flush()

    # ------------------------------------------------------------------------------------------- end
    def finish(self, metrics: dict, panels: dict | None = None, curves: Sequence[tuple[str, str]] = (),
               adapter: Any = None, names: dict[str, str] | None = None, quiet: bool = False,
               marks: str | None = None) -> dict:
        """metrics.json, samples.png (world.plot_samples of `panels`, marking `marks`: "target" or "reward", what the
        run aims at), curves.png (`curves`: (log column, title), with the base model's value as a reference line),
        figures.safetensors (what both are drawn from), the adapter export (world.save_adapter), trackers closed, the
        summary table printed (`names`: see `summary`; `quiet`: not printed, e.g. for a baseline run whose rows the
        main run's table shows), the folder unlocked. A tuned model's metric that is not finite (or beyond GROWTH x
        the base model's) stops first."""
        if self.main:
            if problem := final_metric_problem(metrics):
                self._stop(f"{problem} after update {self.cfg.steps}; metrics.json was not written")
            save_figure_data(self.path / "figures.safetensors", panels or {}, curves, marks)
            if panels:
                with naming(self.path / "samples.png"):
                    self.world.plot_samples(panels, self.path / "samples.png", marks=marks)
            if curves:
                plot_curves(self.read_log(), self.path / "curves.png", curves, metrics)
            if adapter is not None:
                self.world.save_adapter(adapter, self.path / "adapter")
            write_json_atomic(self.path / "metrics.json", metrics)
            for tracker in self._trackers:
                tracker.log({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=self.cfg.steps)
                tracker.finish()
            if not quiet:
                print(summary(metrics, self.path, names))
            unlock_folder(self.path)
        self.finished = True
        return metrics

    def print(self, message: str) -> None:
        if self.main:
            print(message, file=sys.stderr)

    def interrupted(self) -> str:
        """What Ctrl-C leaves: the last checkpoint and its update."""
        if self.finished:
            return f"{self.path} finished"
        last = self._checkpoints()
        if not last:
            return (f"{self.path} was at update {self.step} of {self.cfg.steps} and has no checkpoint yet (the first "
                    f"comes at update {min(self.cfg.save_every, self.cfg.steps)}): --resume starts it at update 0")
        saved = last[0].name.split("-", 1)[1]
        return f"{self.path} keeps {last[0].name} (update {saved} of {self.cfg.steps}; it was at update {self.step})"


def _jsonable(v):
    return json.loads(json.dumps(v, default=str))


SUMMARY_ORDER = ("base", "naive", "tuned")


def summary(metrics: dict, path: Path | str | None = None, names: dict[str, str] | None = None) -> str:
    """The one summary table of every method: one row per evaluated model (base, tuned, and whatever else the run
    scored, e.g. naive or the 1-step samples), reward / quality / distance, then NFEs, seconds, the files.
    `names`: {model in the metric keys: row label}, also the row order (default: base, naive, tuned as they are)."""
    cols = ("reward", "quality", "distance")
    order = list(names or SUMMARY_ORDER)
    stem = lambda n: n.split("_")[0]  # noqa: E731  "tuned_1step" -> "tuned"
    rows = []
    for k in metrics:
        for c in cols:
            if k.startswith(c + "_") and isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool):
                name = k[len(c) + 1:]
                if name not in rows and not name.endswith("_split") and "on_base" not in name:
                    rows.append(name)
    rows.sort(key=lambda n: (stem(n) not in order, "_" in n, order.index(stem(n)) if stem(n) in order else 0))
    label = {n: (names or {}).get(stem(n), stem(n)) + n[len(stem(n)):] for n in rows}
    width = max([16, *(len(v) + 2 for v in label.values())])
    lines = [f"{'model':{width}s}" + "".join(f"{c:>11s}" for c in cols)]
    for n in rows:
        cells = [metrics.get(f"{c}_{n}") for c in cols]
        lines.append(f"{label[n]:{width}s}" + "".join(f"{v:11.4f}" if isinstance(v, (int, float)) else f"{'-':>11s}"
                                                      for v in cells))
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


# ---------------------------------------------------------------------------------------------------
# Figures: curves with the base model's reference line, and the data they are drawn from
# ---------------------------------------------------------------------------------------------------
def base_value(key: str, metrics: dict | None) -> float | None:
    """The base model's value of a curve's quantity (eval_reward and reward -> metrics["reward_base"]), if any."""
    v = (metrics or {}).get(f"{key.removeprefix('eval_')}_base")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def plot_curves(rows: list[dict], path, keys: Sequence[tuple[str, str]], metrics: dict | None = None) -> None:
    """Training curves from log.csv: one panel per (column, title); empty cells (not measured that update) skipped.
    Where `metrics` holds the base model's value of a panel's quantity, a dashed line marks it: a curve is read
    against where training started."""
    _draw_curves([("", rows, metrics)], path, keys)


def _draw_curves(series: Sequence[tuple[str, list[dict], dict | None]], path, keys: Sequence[tuple[str, str]]):
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.5 * len(keys), 3.1), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        ax.set_title(textwrap.fill(title, 38), fontsize=9)
        ax.set_xlabel("update")
        for i, (label, rows, metrics) in enumerate(series):
            pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
            color = f"C{i}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.9, color=color, label=label or None,
                    marker="." if len(pts) < 30 else None)
            base = base_value(key, metrics)
            if base is not None:
                ax.axhline(base, color=color if label else "0.35", ls="--", lw=0.8,
                           label=f"{label + ': ' if label else ''}base model ({base:.3g})")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5)
    fig.tight_layout()
    with naming(path):
        fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURE_BYTES = 1 << 20  # rows of x0 kept per panel: at least 8, at most 1 MiB (toy2d's 1000 points, MNIST's 40
# digits, the full world's 6 images are what the figures show)


def save_figure_data(path: Path, panels: dict, curves: Sequence[tuple[str, str]], marks: str | None = None) -> None:
    """figures.safetensors: each panel's samples and conditions (the rows its figure shows), the curves' columns
    and titles and the samples' `marks`, so `python -m harness replot` draws the same figures again."""
    from safetensors.torch import save

    tensors, meta = {}, []
    for i, (title, (x, cond)) in enumerate(panels.items()):
        kind = "dict" if isinstance(cond, dict) else "tensor" if isinstance(cond, torch.Tensor) else "none"
        if not isinstance(x, torch.Tensor) or (kind == "dict" and not all(isinstance(v, torch.Tensor)
                                                                           for v in cond.values())):
            continue
        n = min(len(x), max(8, FIGURE_BYTES // max(1, x[:1].numel() * x.element_size())))
        parts = {"x": x} | ({"cond": cond} if kind == "tensor" else {f"cond.{k}": v for k, v in cond.items()}
                            if kind == "dict" else {})
        tensors |= {f"{i}.{k}": v[:n].detach().cpu().clone().contiguous() for k, v in parts.items()}
        meta.append([i, title, kind])
    write_bytes_durable(path, save(tensors, metadata={"panels": json.dumps(meta), "curves": json.dumps(list(curves)),
                                                  "marks": json.dumps(marks)}))


def load_figure_data(path: Path) -> tuple[dict, list[tuple[str, str]], str | None]:
    """(panels, curves, marks) as save_figure_data wrote them (marks None in a file saved before it had them)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        panels = {}
        for i, title, kind in json.loads(meta["panels"]):
            cond = (tensors[f"{i}.cond"] if kind == "tensor" else None if kind == "none" else
                    {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{i}.cond.")})
            panels[title] = (tensors[f"{i}.x"], cond)
        return panels, [tuple(c) for c in json.loads(meta["curves"])], json.loads(meta.get("marks", "null"))
    except Exception as e:
        raise ValueError(f"figure data {path} cannot be read ({type(e).__name__}: {e}); it is damaged") from None


# ---------------------------------------------------------------------------------------------------
# The command line: run_cli, and the commands over saved runs
# ---------------------------------------------------------------------------------------------------
USER_ERRORS = (ValueError, OSError, CheckpointError, NonFiniteLoss)


def user_message(e: BaseException) -> str:
    """One line: the exception's message, or for a resource error (disk full, permission, read-only) the path."""
    if isinstance(e, OSError) and e.filename is not None:
        hint = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "the disk quota is used up",
                errno.EACCES: "no permission", errno.EPERM: "no permission", errno.EROFS: "a read-only file system"}
        what = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return (f"{what}: {e.strerror}" + (f" ({hint[e.errno]}; every file written before is intact)"
                                           if e.errno in hint else ""))
    return str(e)


def resume_command(argv: Sequence[str] | None = None) -> str:
    """The command that continues this one: the same arguments with --resume (and without --overwrite)."""
    import __main__

    argv = list(sys.argv if argv is None else argv)
    spec = getattr(__main__, "__spec__", None)
    head = (["python", "-m", spec.name.removesuffix(".__main__")] if spec is not None and spec.name != "__main__"
            else ["python", argv[0]])
    args = [a for a in argv[1:] if a not in ("--overwrite", "--no-resume")]
    return shlex.join(head + args + ([] if "--resume" in args else ["--resume"]))


def run_cli(main: Callable[[], Any]) -> None:
    """`if __name__ == "__main__"` of every entry point: a bad input, a damaged checkpoint, a diverging run or a
    resource error ends with one line (exit status 2), Ctrl-C with what was saved and the --resume command (exit
    status 130), not a traceback; FEWSTEP_TRACEBACK=1 shows the traceback too. An int main() returns is the exit
    status."""
    try:
        code = main()
    except KeyboardInterrupt:
        if os.environ.get("FEWSTEP_TRACEBACK"):
            raise
        run = _RUNS[-1] if _RUNS else None
        if run is None:
            print("interrupted before a run started; nothing was written", file=sys.stderr)
        elif run.main:
            if run._bar is not None:
                run._bar.close()
            print(f"interrupted: {run.interrupted()}. Continue with: {resume_command()}", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as e:
        if os.environ.get("FEWSTEP_TRACEBACK"):
            raise
        print(f"error: {user_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    if isinstance(code, int) and not isinstance(code, bool):
        raise SystemExit(code)


def _saved_run(run: str | Path) -> tuple[dict, list[dict], dict, list[tuple[str, str]]]:
    """(config, log rows, metrics, curves) of a saved run folder; a folder that is not a run is named."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    if run_config(run) is None:
        raise ValueError(f"{run} is not a run folder (no config.json)")
    metrics = read_json(run / "metrics.json", "run metrics") if (run / "metrics.json").exists() else {}
    rows = read_log(run / "log.csv")
    curves = load_figure_data(run / "figures.safetensors")[1] if (run / "figures.safetensors").exists() else []
    if not curves and rows:  # a run saved before figures.safetensors: every measured column
        curves = [(k, k) for k in rows[0] if k not in ("step", "nfe", "seconds")
                  and any(r[k] not in ("", None) for r in rows)]
    return run_config(run), rows, metrics, curves


def compare(runs: Sequence[str], out: str | Path = "compare.png") -> str:
    """A table of the runs' metrics.json values (a row per metric, a column per run) and one figure (`out`) that
    overlays their log.csv curves, each with its base model's line. Returns the table."""
    names = [Path(r).name for r in runs]
    names = names if len(set(names)) == len(names) else [str(r) for r in runs]
    saved = {n: _saved_run(r) for n, r in zip(names, runs)}
    keys = list(dict.fromkeys(k for _, _, m, _ in saved.values() for k, v in m.items()
                              if isinstance(v, (int, float, str, bool)) or v is None))
    cell = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    width = max([len(k) for k in keys] + [6])
    cols = [max(len(n), *(len(cell(m.get(k))) for k in keys)) for n, (_, _, m, _) in saved.items()]
    lines = [f"{'metric':{width}s}  " + "  ".join(f"{n:>{w}s}" for n, w in zip(saved, cols))]
    lines += [f"{k:{width}s}  " + "  ".join(f"{cell(m.get(k)):>{w}s}" for (_, _, m, _), w in zip(saved.values(), cols))
              for k in keys]
    curves = list(dict.fromkeys(c for _, _, _, cs in saved.values() for c in cs))
    curves = [c for i, c in enumerate(curves) if c[0] not in [d[0] for d in curves[:i]]]  # one panel per column
    table = "\n".join(lines)
    print(table)
    if curves:
        _draw_curves([(n, rows, m) for n, (_, rows, m, _) in saved.items()], Path(out), curves)
        print(f"wrote {out}")
    return table


def replot(run: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw a saved run's curves.png (and samples.png when it saved figures.safetensors) again, into the run folder
    (holding its lock) or `out`."""
    run = Path(run)
    config, rows, metrics, curves = _saved_run(run)
    dest = Path(out) if out else run
    dest.mkdir(parents=True, exist_ok=True)
    panels, _, marks = (load_figure_data(run / "figures.safetensors") if (run / "figures.safetensors").exists()
                        else ({}, [], None))
    written = []
    if dest == run:
        lock_folder(run)
    try:
        if curves:
            plot_curves(rows, dest / "curves.png", curves, metrics)
            written.append(dest / "curves.png")
        if panels:
            with naming(dest / "samples.png"):
                load_world(config["model"]).plot_samples(panels, dest / "samples.png", marks=marks)
            written.append(dest / "samples.png")
    finally:
        if dest == run:
            unlock_folder(run)
    print(f"wrote {', '.join(map(str, written)) or 'nothing (the run has no log rows)'}"
          + ("" if panels else f"; no samples.png: {run} has no figures.safetensors (saved before it existed)"))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m harness compare RUN [RUN ...] [--out fig.png]` | `python -m harness replot RUN [--out DIR]`."""
    p = argparse.ArgumentParser(prog="python -m harness", description="Commands over saved run folders "
                                "(docs/harness.md).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="a table of the runs' metrics and one figure of their curves")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    c.add_argument("--out", default="compare.png", help="the figure")
    r = sub.add_parser("replot", help="draw a saved run's curves.png and samples.png again")
    r.add_argument("run", metavar="RUN", help="a run folder")
    r.add_argument("--out", default=None, help="folder for the figures (default: the run folder)")
    a = p.parse_args(argv)
    compare(a.runs, a.out) if a.command == "compare" else replot(a.run, a.out)


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


if __name__ == "__main__":
    import harness  # the module the world backends register with, not this __main__ copy of it

    harness.run_cli(harness.main)
