"""docs/extending.md runs as written: every ```python block under its heading is executed (in a temporary folder,
the toys on their tiny build budget, a temporary base-model cache) and what it computed is checked."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import toy

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "extending.md"


def blocks() -> dict[str, str]:
    """heading -> the python code block under it."""
    out, heading = {}, None
    for part in re.split(r"^(## .*)$", PAGE.read_text(), flags=re.M):
        if part.startswith("## "):
            heading = part[3:].strip()
        elif heading:
            code = re.findall(r"```python\n(.*?)```", part, re.S)
            if code:
                out[heading] = "\n".join(code)
    return out


@pytest.fixture
def run_block(tmp_path, tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "extending-cache"  # shared by the examples: each world builds once
    monkeypatch.setenv("FEWSTEP_CACHE", str(cache))
    monkeypatch.setenv("FEWSTEP_TOY_BUDGET", "tiny")
    monkeypatch.chdir(tmp_path)
    worlds = dict(toy.WORLDS)

    def run(heading: str) -> dict:
        namespace = {"__name__": "__extending__"}
        exec(compile(blocks()[heading], f"docs/extending.md ({heading})", "exec"), namespace)
        return namespace

    yield run
    for name in set(toy.WORLDS) - set(worlds):  # a world the example added is not left behind
        for table in (toy.WORLDS, toy.BUDGETS, toy.MODEL_OPTIONS):
            table.pop(name, None)


def test_the_page_has_the_four_examples():
    assert set(blocks()) == {"Your own reward", "Your own 2-D data", "Your own image-caption folder (full backend)",
                             "Your own world"}


def test_own_reward(run_block, capsys):
    ns = run_block("Your own reward")
    m = ns["metrics"]
    assert m["reward_tuned"] > m["reward_base"], m  # DI++ climbed the example's reward
    assert "my reward: base" in capsys.readouterr().out
    assert (Path("runs/my-reward") / "samples.png").exists()


def test_own_2d_data(run_block):
    ns = run_block("Your own 2-D data")
    m = ns["metrics"]
    assert m["distance_naive"] < m["distance_base"] and m["distance_tuned"] < m["distance_base"], m


@pytest.mark.slow
def test_own_image_caption_folder(run_block, capsys):
    ns = run_block("Your own image-caption folder (full backend)")
    assert {"distance_base", "distance_tuned"} <= set(ns["metrics"])
    assert (Path("runs/my-style") / "metadata.jsonl").exists() and (Path("runs/my-style-pso") / "metrics.json").exists()


def test_own_world(run_block):
    ns = run_block("Your own world")
    assert ns["world"].radius == 2.0 and "quality_tuned" in ns["metrics"]
    assert list(Path(os_cache()).glob("widering-tiny-*.safetensors")), "the world's base models were not cached"


def os_cache() -> str:
    import os

    return os.environ["FEWSTEP_CACHE"]
