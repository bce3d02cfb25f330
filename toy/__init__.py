"""CPU toy worlds (DESIGN.md section 7): `load_world("toy2d")` or `load_world("mnist")`.

Base models (teacher, 4-step student, one-step generator, and MNIST's classifier) are built on first use with
a progress bar and cached as safetensors in $FEWSTEP_CACHE (default ~/.cache/fewstep-finetune). A missing or
unreadable cache file is rebuilt with a message. FEWSTEP_TOY_BUDGET=tiny builds throw-away models in seconds
(for tests of the plumbing; their samples are poor)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .mnist import MNIST
from .pretrain import Budget, build_base_models
from .toy2d import Toy2D

WORLDS = {"toy2d": Toy2D, "mnist": MNIST}
BUDGETS = {
    "toy2d": {
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


def cache_dir() -> Path:
    return Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep-finetune")).expanduser()


def load_world(name: str, cache: str | Path | None = None, budget: str | None = None, progress: bool = True,
               **kw):
    """Build the world `name`, loading its base models from the cache or training them once."""
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
    weights = _read(path)
    if weights is None:
        print(f"[toy] building the {name} base models ({budget} budget) -> {path}", file=sys.stderr)
        weights = build_base_models(world, BUDGETS[name][budget], progress=progress)
        _write(path, weights, spec)
    return WORLDS[name](weights, **kw)


def _read(path: Path):
    if not path.exists():
        return None
    try:
        flat = load_file(str(path))
    except Exception as e:  # truncated or foreign file
        print(f"[toy] cache file {path} is unreadable ({type(e).__name__}: {e}); rebuilding it", file=sys.stderr)
        return None
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        role, _, name = k.partition("/")
        weights.setdefault(role, {})[name] = v
    if not {"teacher", "student", "generator"} <= weights.keys():
        print(f"[toy] cache file {path} lacks some base models ({sorted(weights)}); rebuilding it", file=sys.stderr)
        return None
    return weights


def _write(path: Path, weights, spec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{role}/{k}": v for role, sd in weights.items() for k, v in sd.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(flat, tmp, metadata={"spec": json.dumps(spec)})
    os.replace(tmp, path)  # atomic: a killed build never leaves a half-written cache file


def register() -> None:
    """Entry point (pyproject.toml, group fewstep_finetune.worlds): `--model toy2d | mnist` goes to this backend."""
    import common

    common.register_world("toy", lambda model: model in WORLDS, load_world, priority=10)
