"""Stored preference-pair files for the toy worlds (offline PSO, `pso.py --variant offline --pairs FILE`).

A pairs file holds rows (win, lose, cond): the preferred and the rejected sample of one condition, in model space.
Three formats:

* `.jsonl`: one JSON object per line, `{"win": [...], "lose": [...], "cond": 2}`; images are nested lists of the
  world's sample shape (toy2d: `[x, y]`; mnist: 1x28x28 in [-1, 1]); cond is the integer label.
* `.safetensors` or `.pt` (loaded with `weights_only=True`): tensors `win` [M, *shape], `lose` [M, *shape] and
  `cond` [M] (integer labels).

Every row is checked on load; an unreadable file or a missing or malformed image or label raises ValueError naming
the file, the row (or key), what was expected and what was found.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

KEYS = {"win": "the preferred image", "lose": "the rejected image", "cond": "the label"}


def load_pairs(path: str | Path, shape: tuple[int, ...], num_classes: int):
    """-> (win [M, *shape], lose [M, *shape], cond [M]) float32 / long tensors, validated row by row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pairs file {path} does not exist (or is not a file)")
    if path.suffix not in (".jsonl", ".safetensors", ".pt"):
        raise ValueError(f"pairs file {path}: unknown format {path.suffix!r}; use .jsonl, .safetensors or .pt")
    if path.stat().st_size == 0:
        raise ValueError(f"pairs file {path} is empty; expected rows (win, lose, cond)")
    rows = _jsonl_rows(path) if path.suffix == ".jsonl" else _tensor_rows(path)
    if not rows:
        raise ValueError(f"pairs file {path} has no rows; expected rows (win, lose, cond)")
    win, lose, cond = [], [], []
    for i, row in enumerate(rows):
        where = f"pairs file {path}, row {i}"
        win.append(_image(row.get("win"), "win", where, shape))
        lose.append(_image(row.get("lose"), "lose", where, shape))
        cond.append(_label(row.get("cond"), where, num_classes))
    return torch.stack(win), torch.stack(lose), torch.tensor(cond, dtype=torch.long)


def _found(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _image(value, key: str, where: str, shape: tuple[int, ...]) -> torch.Tensor:
    expected = f"a numeric array of shape {tuple(shape)} ({KEYS[key]})"
    if value is None:
        raise ValueError(f"{where}: missing {key!r}; expected {expected}")
    try:
        x = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: {key!r} is not {expected}; found {_found(value)} ({e})") from None
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{where}: {key!r} has shape {tuple(x.shape)}; expected the world's sample shape "
                         f"{tuple(shape)}")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{where}: {key!r} has {bad} NaN or inf value(s); expected finite numbers")
    return x


def _label(value, where: str, num_classes: int) -> int:
    expected = f"one integer label in 0..{num_classes - 1} ({KEYS['cond']})"
    if value is None:
        raise ValueError(f"{where}: missing 'cond'; expected {expected}")
    found = value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}: 'cond' has {value.numel()} values; expected {expected}")
        value = value.item()
    integral = isinstance(value, int) or isinstance(value, float) and math.isfinite(value) and value.is_integer()
    if isinstance(value, bool) or not integral:
        raise ValueError(f"{where}: 'cond' is not an integer label; expected {expected}, found {_found(found)}")
    if not 0 <= int(value) < num_classes:
        raise ValueError(f"{where}: label {int(value)} is not a condition of this world (out of range); expected "
                         f"{expected}")
    return int(value)


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for i, raw in enumerate(path.read_bytes().splitlines()):
        where = f"pairs file {path}, row {len(rows)} (line {i + 1})"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); expected "
                             "one JSON object per line") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e}); expected an object with win, lose, cond") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with win, lose, cond; found {_found(row)}")
        rows.append(row)
    return rows


def _tensor_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, or (.pt) a pickle of more than tensors
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"pairs file {path}: not a readable {path.suffix} file of tensors ({type(e).__name__}: "
                         f"{reason}); expected tensors win, lose, cond") from None
    if not isinstance(tensors, dict):
        raise ValueError(f"pairs file {path}: expected a dict of tensors win, lose, cond; found {_found(tensors)}")
    for key in KEYS:
        if key not in tensors:
            raise ValueError(f"pairs file {path}: no {key!r} tensor ({KEYS[key]}); found keys "
                             f"{sorted(map(str, tensors))}")
        value = tensors[key]
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            raise ValueError(f"pairs file {path}, key {key!r}: expected a tensor with one row per pair; found "
                             f"{_found(value) if not isinstance(value, torch.Tensor) else 'a 0-dim tensor'}")
    lengths = {key: len(tensors[key]) for key in KEYS}
    if len(set(lengths.values())) > 1:
        short = min(lengths, key=lengths.get)
        raise ValueError(f"pairs file {path}: the tensors have different numbers of rows "
                         f"({', '.join(f'{k} {n}' for k, n in lengths.items())}), so from row {lengths[short]}: "
                         f"missing {short!r}; expected one row per pair in each")
    return [{key: tensors[key][i] for key in KEYS} for i in range(lengths["win"])]
