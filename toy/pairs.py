"""Stored preference-pair files for the toy worlds (offline PSO, `pso.py --variant offline --pairs FILE`).

A pairs file holds rows (win, lose, cond): the preferred and the rejected sample of one condition, in model space.
Three formats:

* `.jsonl`: one JSON object per line, `{"win": [...], "lose": [...], "cond": 2}`; images are nested lists of the
  world's sample shape (toy2d: `[x, y]`; mnist: 1x28x28 in [-1, 1]); cond is the integer label.
* `.safetensors` or `.pt` (loaded with `weights_only=True`): tensors `win` [M, *shape], `lose` [M, *shape] and
  `cond` [M] (integer labels).

Every row is checked on load; a missing or malformed image or label raises ValueError naming the file and row.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

KEYS = {"win": "the preferred image", "lose": "the rejected image", "cond": "the label"}


def load_pairs(path: str | Path, shape: tuple[int, ...], num_classes: int):
    """-> (win [M, *shape], lose [M, *shape], cond [M]) float32 / long tensors, validated row by row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pairs file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix in (".safetensors", ".pt"):
        rows = _tensor_rows(path)
    else:
        raise ValueError(f"pairs file {path}: unknown format {path.suffix!r}; use .jsonl, .safetensors or .pt")
    if not rows:
        raise ValueError(f"pairs file {path} has no rows")
    win, lose, cond = [], [], []
    for i, row in enumerate(rows):
        where = f"pairs file {path}, row {i}"
        for key in ("win", "lose"):
            value = row.get(key)
            if value is None:
                raise ValueError(f"{where}: missing {key!r} ({KEYS[key]})")
            try:
                x = torch.as_tensor(value, dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {key!r} is not a numeric array ({e})") from None
            if tuple(x.shape) != tuple(shape):
                raise ValueError(f"{where}: {key!r} has shape {tuple(x.shape)}, the world's samples have {tuple(shape)}")
            if not torch.isfinite(x).all():
                raise ValueError(f"{where}: {key!r} contains NaN or inf")
            (win if key == "win" else lose).append(x)
        label = row.get("cond")
        if label is None:
            raise ValueError(f"{where}: missing 'cond' ({KEYS['cond']})")
        label = torch.as_tensor(label)
        if label.numel() != 1 or label.is_floating_point() and label != label.round():
            raise ValueError(f"{where}: 'cond' must be one integer label, got {row.get('cond')!r}")
        label = int(label)
        if not 0 <= label < num_classes:
            raise ValueError(f"{where}: label {label} is not a condition of this world (0..{num_classes - 1})")
        cond.append(label)
    return torch.stack(win), torch.stack(lose), torch.tensor(cond, dtype=torch.long)


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"pairs file {path}, row {len(rows)} (line {i + 1}): not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"pairs file {path}, row {len(rows)} (line {i + 1}): expected an object with win, lose, "
                             "cond")
        rows.append(row)
    return rows


def _tensor_rows(path: Path) -> list[dict]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        tensors = torch.load(path, weights_only=True)
        if not isinstance(tensors, dict):
            raise ValueError(f"pairs file {path}: expected a dict of tensors win, lose, cond")
    n = max((len(v) for v in tensors.values() if isinstance(v, torch.Tensor) and v.ndim), default=0)
    for key in KEYS:
        if key not in tensors:
            raise ValueError(f"pairs file {path}: no {key!r} tensor ({KEYS[key]}); row 0 has no {key!r}")
    return [{k: (tensors[k][i] if i < len(tensors[k]) else None) for k in KEYS} for i in range(n)]
