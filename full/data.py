"""Prompt lists, image-caption sets (style / concept / SFT data) and Pick-a-Pic-style preference pairs.

Sources (in a model spec's "prompts", "data" and "pairs"):

* prompts: a .txt file (one prompt a line), .json (a list of strings or of objects), .jsonl or .csv/.tsv (column
  "prompt", "caption" or "text"), or a list of strings in the spec itself.
* image-caption set: {"folder": DIR} with DIR/metadata.jsonl rows {"file_name": ..., "text"|"caption"|"prompt": ...}
  (the `datasets` imagefolder convention), or images with a same-named .txt caption beside each, or images only plus
  {"prompt": "a photo of sks dog"} (a DreamBooth concept folder); or {"dataset": HUB_ID, "split": "train",
  "image_column": "image", "caption_column": "text"} through the `datasets` package.
* preference pairs: {"folder": DIR} with DIR/pairs.jsonl rows {"caption", "jpg_0"|"image_0", "jpg_1"|"image_1",
  "label_0"} (image paths relative to DIR), or {"dataset": "yuvalkirstain/pickapic_v2", "split": "train"} (image
  bytes in jpg_0 / jpg_1). label_0 = 1: image 0 preferred, 0: image 1 preferred, 0.5: a tie — ties are dropped as in
  the PSO paper (App. B.1: about 12% of Pick-a-Pic v2).

A row whose image cannot be read or decoded raises DataError naming the row and the file.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_PROMPTS = [  # a small built-in list so a checkpoint runs with no prompt file
    "a photo of a red fox in a snowy forest", "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen on a wooden table, studio lighting", "a watercolor painting of a lighthouse at dawn",
    "a portrait of an old fisherman, dramatic light", "a futuristic city skyline at night, neon lights",
    "a cozy cabin in the mountains, autumn leaves", "a cute corgi wearing sunglasses on a beach",
    "a bouquet of sunflowers in a glass vase", "a steam locomotive crossing a stone bridge",
    "a close-up of a hummingbird drinking from a flower", "an oil painting of a sailing ship in a storm",
]


class DataError(ValueError):
    """A data row or file that cannot be read, with its location."""


def load_prompts(source) -> list[str]:
    if source is None:
        return list(DEFAULT_PROMPTS)
    if isinstance(source, (list, tuple)):
        prompts = [str(p) for p in source]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {source!r} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            prompts = [line.strip() for line in path.read_text().splitlines()]
        elif suffix == ".json":
            prompts = [_caption(r, f"{path} item {i}") for i, r in enumerate(json.loads(path.read_text()))]
        elif suffix == ".jsonl":
            prompts = [_caption(json.loads(line), f"{path} line {i + 1}")
                       for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
        elif suffix in (".csv", ".tsv"):
            import csv

            with open(path, newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
            columns = list(rows[0]) if rows else []
            col = next((c for c in ("prompt", "caption", "text") if c in columns), None)
            if col is None:
                raise DataError(f"{path} has no 'prompt', 'caption' or 'text' column (columns: {columns})")
            prompts = [str(r[col]) for r in rows]
        else:
            raise DataError(f"prompt file {path} must be .txt, .json, .jsonl, .csv or .tsv")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"prompt source {source!r} holds no prompts")
    return prompts


def _caption(row, where: str) -> str:
    if isinstance(row, str):
        return row
    for k in ("prompt", "caption", "text"):
        if isinstance(row, dict) and k in row:
            return str(row[k])
    raise DataError(f"{where}: no 'prompt', 'caption' or 'text' field in {row!r:.200}")


def to_tensor(image, resolution: int, where: str) -> torch.Tensor:
    """A path, bytes or PIL image -> [3, R, R] in [-1, 1]: RGB, bicubic resize of the short side, centre crop."""
    from PIL import Image

    try:
        if isinstance(image, (str, Path)):
            image = Image.open(image)
        elif isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, dict) and "bytes" in image:  # datasets' Image feature without decoding
            image = Image.open(io.BytesIO(image["bytes"])) if image["bytes"] else Image.open(image["path"])
        image.load()
        image = image.convert("RGB")
    except Exception as e:
        raise DataError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from e
    w, h = image.size
    s = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return x / 127.5 - 1


def _hub_dataset(source: dict):
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"the data source {source} needs the datasets package: pip install datasets") from e
    kw = {k: v for k, v in source.items() if k in ("name", "revision", "data_files", "streaming")}
    return datasets.load_dataset(source["dataset"], split=source.get("split", "train"), **kw)


class ImageCaptions:
    """An image-caption set (world.data): rows of (image, caption), images decoded on demand."""

    def __init__(self, source: dict):
        self.source = source
        if "folder" in source:
            folder = Path(source["folder"]).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"image folder {folder} does not exist")
            meta = folder / "metadata.jsonl"
            if meta.is_file():
                rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
                self.rows = [(folder / r["file_name"], _caption(r, f"{meta} line {i + 1}")) for i, r in enumerate(rows)]
            else:
                images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                default = source.get("prompt")
                self.rows = []
                for p in images:
                    txt = p.with_suffix(".txt")
                    if txt.is_file():
                        self.rows.append((p, txt.read_text().strip()))
                    elif default is not None:
                        self.rows.append((p, default))
                    else:
                        raise DataError(f"{p} has no caption: add {txt.name}, a metadata.jsonl, or a \"prompt\" "
                                        "for the whole folder in the spec")
            self.where = str(folder)
        elif "dataset" in source:
            ds = _hub_dataset(source)
            img, cap = source.get("image_column", "image"), source.get("caption_column", "text")
            self.rows = [(row[img], str(row[cap])) for row in ds]
            self.where = source["dataset"]
        else:
            raise DataError(f"an image-caption source needs 'folder' or 'dataset': {source}")
        if not self.rows:
            raise DataError(f"image-caption source {self.where} is empty")

    def __len__(self):
        return len(self.rows)

    def caption(self, i: int) -> str:
        return self.rows[i][1]

    def image(self, i: int, resolution: int) -> torch.Tensor:
        return to_tensor(self.rows[i][0], resolution, f"row {i} of {self.where}")


class PreferencePairs:
    """Pick-a-Pic-style (caption, image 0, image 1, label_0) rows with ties dropped; yields (winner, loser)."""

    def __init__(self, source: dict):
        self.source = source
        if "folder" in source:
            folder = Path(source["folder"]).expanduser()
            path = folder / source.get("file", "pairs.jsonl") if folder.is_dir() else folder
            if not path.is_file():
                raise FileNotFoundError(f"preference pairs file {path} does not exist")
            rows = []
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"line {i + 1} of {path} is not JSON: {e}") from e
            base = path.parent
            self.where = str(path)
            get = lambda r, k: base / r[k] if isinstance(r[k], str) else r[k]  # noqa: E731
        elif "dataset" in source:
            rows = _hub_dataset(source)
            self.where = source["dataset"]
            get = lambda r, k: r[k]  # noqa: E731
        else:
            raise DataError(f"a preference-pair source needs 'folder' or 'dataset': {source}")
        self.rows, self.ties = [], 0
        for i, r in enumerate(rows):
            k0 = "jpg_0" if "jpg_0" in r else "image_0"
            k1 = "jpg_1" if "jpg_1" in r else "image_1"
            if k0 not in r or k1 not in r or "label_0" not in r:
                raise DataError(f"row {i} of {self.where} lacks jpg_0/jpg_1 (or image_0/image_1) or label_0: "
                                f"{sorted(r)}")
            label = float(r["label_0"])
            if label == 0.5:  # a tie: no preference to learn from (PSO App. B.1)
                self.ties += 1
                continue
            if label not in (0.0, 1.0):
                raise DataError(f"row {i} of {self.where}: label_0={label} (expected 1, 0 or 0.5 for a tie)")
            win, lose = (k0, k1) if label == 1.0 else (k1, k0)
            self.rows.append((i, get(r, win), get(r, lose), _caption(r, f"row {i} of {self.where}")))
        if not self.rows:
            raise DataError(f"preference pairs {self.where} hold no untied pair ({self.ties} ties dropped)")

    def __len__(self):
        return len(self.rows)

    def caption(self, j: int) -> str:
        return self.rows[j][3]

    def images(self, j: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, win, lose, _ = self.rows[j]
        return (to_tensor(win, resolution, f"row {i} of {self.where} (preferred image)"),
                to_tensor(lose, resolution, f"row {i} of {self.where} (rejected image)"))
