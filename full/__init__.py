"""The full backend (docs/design.md section 8): the methods on SD1.5 / SDXL and flow-matching SD3 / SD3.5 / FLUX-class
checkpoints through diffusers, peft and accelerate, behind the same World / Denoiser interface as toy/.

    world = full.load_world("stabilityai/sdxl-turbo")          # a pipeline folder or hub id: every role from it
    world = full.load_world("full/specs/sdxl_dmd2.json")       # a model spec: roles, reward, prompts, data, dtype

Modules: spec (the model-spec format), models (loading and validation), world (FullDenoiser, FullWorld,
FullAccelerator), rewards (PickScore, CLIP score, LAION aesthetic, ImageReward), data (prompt lists, image-caption
sets, preference pairs, through `datasets`), prepare_data (writes the data files a spec names), defaults (the
paper's settings and per-GPU batches), tiny (random tiny pipelines for tests), evaluate (paper metrics table),
bench (CUDA s/update and peak memory), launch (paper settings -> accelerate launch).
"""
from __future__ import annotations

from .models import ModelError
from .spec import ModelSpec, load_spec


def load_world(model: str, **overrides):
    """`--model` -> FullWorld. `overrides` replace spec keys (e.g. dtype="bf16")."""
    from .world import FullWorld

    return FullWorld(load_spec(model, **overrides))


def register() -> None:
    """Entry point (pyproject.toml, group fewstep_finetune.worlds): every `--model` no other backend takes (a
    checkpoint folder, a hub id or a model spec) comes here; load_spec says what is wrong with it."""
    import harness

    harness.register_world("full", lambda model: True, load_world, priority=0)


__all__ = ["load_world", "load_spec", "ModelSpec", "ModelError", "register"]
