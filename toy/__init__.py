"""CPU toy worlds (docs/design.md section 7): `load_world("toy2d")` or `load_world("mnist")`.

Base models (teacher, 4-step student, one-step generator, and MNIST's classifier) are built on first use with
a progress bar and cached as safetensors in $FEWSTEP_CACHE (default ~/.cache/fewstep-finetune). A cache file
carries a sha256 hash of its tensors in its metadata, checked on every read together with the presence and
shapes of every base model; a missing, unreadable, damaged or incomplete file is rebuilt with a one-line message
(files written before the hash existed count as stale and are rebuilt once). The cache folder is checked for
writability before a build starts. FEWSTEP_TOY_BUDGET=tiny builds throw-away models in seconds (for tests of the
plumbing; their samples are poor)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from .backend import state_mismatch
from .mnist import MNIST
from .pretrain import Budget, build_base_models
from .flow2d import Flow2D
from .toy2d import Toy2D

WORLDS = {"toy2d": Toy2D, "mnist": MNIST, "flow2d": Flow2D}
BUDGETS = {
    "toy2d": {
        "full": Budget(teacher_steps=3000, batch=512, lr=2e-3, pairs=8000, ode_steps=25, distill_steps=2000,
                       generator_steps=500),
        "tiny": Budget(teacher_steps=60, batch=128, lr=2e-3, pairs=256, ode_steps=4, distill_steps=30,
                       generator_steps=10),
    },
    "flow2d": {  # toy2d's budget (the same data and nets, a flow parametrisation)
        "full": Budget(teacher_steps=3000, batch=512, lr=2e-3, pairs=8000, ode_steps=25, distill_steps=2000,
                       generator_steps=500),
        "tiny": Budget(teacher_steps=60, batch=128, lr=2e-3, pairs=256, ode_steps=4, distill_steps=30,
                       generator_steps=10),
    },
    "mnist": {
        "full": Budget(teacher_steps=4000, batch=64, lr=2e-3, pairs=1500, ode_steps=10, distill_steps=1500,
                       generator_steps=500, classifier_steps=800),
        "tiny": Budget(teacher_steps=20, batch=32, lr=2e-3, pairs=64, ode_steps=2, distill_steps=10,
                       generator_steps=5, classifier_steps=20),
    },
}
VERSION = 1  # bump when a net or the training recipe changes: old cache files are then ignored


def add_world(cls, budgets: dict | None = None, options: dict | None = None) -> None:
    """Make a world class of your own loadable like the shipped ones (docs/extending.md): `load_world(cls.name)` then
    builds its base models on first use with `budgets` (default: toy2d's, {"full": ..., "tiny": ...}) and caches them
    under its own name; `options` are its `--model name:key=value` choices (default: its parent world's)."""
    parent = next((n for n, c in WORLDS.items() if issubclass(cls, c)), None)
    if not getattr(cls, "name", None) or cls.name in WORLDS and WORLDS[cls.name] is not cls:
        raise ValueError(f"add_world: {cls.__name__} needs a class attribute `name` not taken by another world "
                         f"(taken: {sorted(WORLDS)})")
    WORLDS[cls.name] = cls
    BUDGETS[cls.name] = budgets or BUDGETS["toy2d"]
    MODEL_OPTIONS[cls.name] = options if options is not None else MODEL_OPTIONS.get(parent, {})


def cache_dir() -> Path:
    return Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep-finetune")).expanduser()


# world options a `--model` value may carry after a colon: `--model toy2d:reward=height` (the unbounded reward; the
# first choice of each option is the world's default, an in-distribution reward)
MODEL_OPTIONS = {"toy2d": {"reward": ("modes", "height")}, "flow2d": {"reward": ("modes", "height")},
                 "mnist": {"reward": ("logprob", "prob", "logit")}}


def parse_model(model: str) -> tuple[str, dict]:
    """'toy2d:reward=height' -> ('toy2d', {'reward': 'height'}); a bad option is an error naming it and the choices."""
    name, _, rest = model.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        allowed = MODEL_OPTIONS.get(name, {})
        if not eq or key not in allowed:
            expected = ", ".join(f"{k}=<{'|'.join(v)}>" for k, v in allowed.items()) or "no options"
            raise ValueError(f"--model {model!r}: unknown world option {item!r} for {name!r}; expected {expected}")
        if value not in allowed[key]:
            raise ValueError(f"--model {model!r}: {key}={value!r}, expected one of {list(allowed[key])}")
        options[key] = value
    return name, options


def load_world(name: str, cache: str | Path | None = None, budget: str | None = None, progress: bool = True,
               **kw):
    """Build the world `name` (optionally with options, 'toy2d:reward=height'), loading its base models from the
    cache or training them once."""
    name, options = parse_model(name)
    kw = {**options, **kw}
    if name not in WORLDS:
        raise ValueError(f"unknown toy world {name!r}; choose one of {sorted(WORLDS)} "
                         "(or give a diffusers checkpoint path / hub id for the full backend)")
    budget = budget or os.environ.get("FEWSTEP_TOY_BUDGET", "full")
    if budget not in BUDGETS[name]:
        raise ValueError(f"unknown toy build budget {budget!r}; choose one of {sorted(BUDGETS[name])}")
    world = WORLDS[name](None, **kw)
    spec = {"world": name, "version": VERSION, "budget": dataclasses.asdict(BUDGETS[name][budget]),
            "data": getattr(world, "source", "")}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(cache or cache_dir()) / f"{name}-{budget}-{key}.safetensors"
    weights = _read(path, spec, world.base_model_shapes())
    if weights is None:
        _check_writable(path.parent, name)  # before the build, not after minutes of it
        print(f"[toy] first use of {name}: building its base models once ({budget} budget; "
              f"{build_estimate(name, budget)}), then cached in {path}", file=sys.stderr)
        weights = build_base_models(world, BUDGETS[name][budget], progress=progress)
        _write(path, weights, spec)
    return WORLDS[name](weights, **kw)


BASE_MODEL_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "base_models.json"


def build_estimate(name: str, budget: str, results: Path = BASE_MODEL_RESULTS) -> str:
    """How long the first build takes, as measured by benchmarks/base_models.py (its results file), for the message
    printed before a build; without a measurement for this world and budget, a plain hint."""
    if budget == "tiny":
        return "seconds"
    try:
        record = json.loads(Path(results).read_text())[name]
        minutes = record["build_seconds"] / 60
    except (OSError, ValueError, KeyError, TypeError):
        return "a few minutes on a laptop CPU"
    load = record.get("load_average_at_start")
    return (f"{minutes:.1f} min when measured on {record.get('machine', 'a 2-core CPU')}"
            + (f" at load {load}" if load is not None else "") + ", benchmarks/results/base_models.md")


def content_hash(flat: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(flat):
        v = flat[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{list(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read(path: Path, spec: dict, expected: dict[str, dict[str, tuple[int, ...]]]):
    """The cached base models {role: state_dict}, or None (with a one-line message why) if the file must be built."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
        reason = _problem(flat, meta, spec, expected)
    except Exception as e:  # truncated or foreign file
        reason = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if reason:
        print(f"[toy] cache file {path}: {reason}; rebuilding it", file=sys.stderr)
        return None
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        role, _, name = k.partition("/")
        weights.setdefault(role, {})[name] = v
    return weights


def _problem(flat, meta, spec, expected) -> str:
    """'' when the cache file's tensors are intact and complete, else the reason it is not."""
    if "sha256" not in meta:
        return "no content hash in its metadata (written by an older version), so it cannot be verified"
    found = content_hash(flat)
    if found != meta["sha256"]:
        return f"content hash mismatch (stored {meta['sha256'][:12]}..., computed {found[:12]}...): the file is damaged"
    if meta.get("spec") != json.dumps(spec):
        return f"built for another recipe (metadata spec {meta.get('spec')!r}, expected {json.dumps(spec)!r})"
    roles = {k.partition("/")[0] for k in flat}
    if missing := sorted(expected.keys() - roles):
        return f"the base model(s) {', '.join(missing)} are missing (found {', '.join(sorted(roles)) or 'none'})"
    for role, shapes in expected.items():
        state = {k.partition("/")[2]: v for k, v in flat.items() if k.partition("/")[0] == role}
        if problem := state_mismatch(state, shapes):
            return f"the {role} weights do not fit its net ({problem})"
    return ""


def _check_writable(folder: Path, name: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OSError(f"base-model cache folder {folder} is not writable ({type(e).__name__}: {e.strerror or e}); "
                      f"the {name} base models are built and stored there. Set FEWSTEP_CACHE to a writable "
                      "folder.") from None


def _write(path: Path, weights, spec) -> None:
    """Atomic and durable: the bytes are fsynced to a temporary file that os.replace then swaps in, so a killed
    build never leaves a half-written cache file."""
    flat = {f"{role}/{k}": v.contiguous() for role, sd in weights.items() for k, v in sd.items()}
    data = save(flat, metadata={"spec": json.dumps(spec), "sha256": content_hash(flat)})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def register() -> None:
    """Entry point (pyproject.toml, group fewstep_finetune.worlds): `--model toy2d | mnist | flow2d` (with options,
    e.g. `toy2d:reward=height`) goes to this backend."""
    import harness

    harness.register_world("toy", lambda model: model.partition(":")[0] in WORLDS, load_world, priority=10)
