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
* a subset of any `datasets` source: split slicing ("split": "train[:10000]", `datasets`' own syntax; the whole
  split is still downloaded and converted first), or {"streaming": true, "rows": 10000, "shuffle_buffer": 1000,
  "seed": 0}: the first `rows` rows of the split streamed through a shuffle buffer (IterableDataset.shuffle / take)
  are written once to an Arrow file (Dataset.from_generator, cached) and read from there: only the shards those
  rows come from are downloaded. The rows and bytes a source holds are said on stderr when it is opened.

A row whose image cannot be read or decoded raises DataError naming the row and the file.

`EmbeddingCache`: prompt embeddings on disk (one safetensors file per prompt in a folder keyed by the model) behind a
bounded in-RAM LRU, so a T5-XXL-sized embedding per prompt never grows RAM with the number of prompts.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .spec import looks_like_hub_id

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_PROMPTS = [  # a small built-in list so a checkpoint runs with no prompt file
    "a photo of a red fox in a snowy forest", "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen on a wooden table, studio lighting", "a watercolor painting of a lighthouse at dawn",
    "a portrait of an old fisherman, dramatic light", "a futuristic city skyline at night, neon lights",
    "a cozy cabin in the mountains, autumn leaves", "a cute corgi wearing sunglasses on a beach",
    "a bouquet of sunflowers in a glass vase", "a steam locomotive crossing a stone bridge",
    "a close-up of a hummingbird drinking from a flower", "an oil painting of a sailing ship in a storm",
]


# Hub data sets that are gone: a spec naming one fails at its first download, after the models were loaded; checked
# with the spec's paths instead (check_paths), naming the replacement.
REMOVED_DATASETS = {
    "lambdalabs/pokemon-blip-captions": "taken down from the Hugging Face Hub in 2024 (diffusers issue #7879); "
                                        "lambdalabs/naruto-blip-captions has the same columns (image, text), 1,221 rows",
}


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

    if isinstance(image, (str, Path)):
        where = f"{where} ({image})"
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


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data sets and preference pairs are read with the datasets package: pip install datasets "
                          "(it is in the [full] extra)") from e
    return datasets


SOURCE_KEYS = ("name", "revision", "data_files", "data_dir", "cache_dir")
STREAM_KEYS = ("streaming", "rows", "shuffle_buffer", "seed")


def _hub_dataset(source: dict):
    """A map-style `datasets` split: memory-mapped Arrow files on disk, so rows cost no RAM until they are read.
    With "streaming": the subset `_streamed_rows` wrote (rows are drawn at random, which needs a map-style set)."""
    datasets = _datasets()
    kw = {k: v for k, v in source.items() if k in SOURCE_KEYS}
    split = source.get("split", "train")
    try:
        if source.get("streaming"):
            return _streamed_rows(source, kw)
        return datasets.load_dataset(source["dataset"], split=split, **kw)
    except DataError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise DataError(f"cannot load the data set {source['dataset']!r} (split {split!r}): "
                        f"{type(e).__name__}: {e}") from e


def _stream_generator(dataset, split, rows, shuffle_buffer, seed, load_kw):
    """The rows of a streamed subset (Dataset.from_generator's generator: its arguments are the cache key)."""
    datasets = _datasets()
    stream = datasets.load_dataset(dataset, split=split, streaming=True, **load_kw)
    for name, feature in (stream.features or {}).items():  # images stay encoded bytes, as the map-style path keeps them
        if isinstance(feature, datasets.Image):
            stream = stream.cast_column(name, datasets.Image(decode=False))
    yield from stream.shuffle(seed=seed, buffer_size=shuffle_buffer).take(rows)


def _streamed_rows(source: dict, kw: dict):
    """`rows` rows of a streamed split through a shuffle buffer, written once to an Arrow file (cached by the source
    description) and opened map-style: only the shards those rows come from are downloaded."""
    datasets = _datasets()
    rows, buffer, seed = source.get("rows"), source.get("shuffle_buffer", 1000), source.get("seed", 0)
    for key, value in (("rows", rows), ("shuffle_buffer", buffer), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise DataError(f"data source {source['dataset']!r}: \"streaming\" takes a subset and needs \"{key}\" "
                            f"as an integer >= {0 if key == 'seed' else 1} (e.g. \"rows\": 10000, \"shuffle_buffer\": "
                            f"1000, \"seed\": 0), found {value!r}")
    load_kw = {k: v for k, v in kw.items() if k != "cache_dir"}
    gen_kw = dict(dataset=source["dataset"], split=source.get("split", "train"), rows=rows, shuffle_buffer=buffer,
                  seed=seed, load_kw=load_kw)
    ds = datasets.Dataset.from_generator(_stream_generator, gen_kwargs=gen_kw, cache_dir=kw.get("cache_dir"))
    if len(ds) < rows:
        raise DataError(f"data source {source['dataset']!r} (split {gen_kw['split']!r}) streamed {len(ds)} rows, fewer "
                        f"than \"rows\": {rows}")
    return ds


def size_line(what: str, ds, where: str, extra: str = "") -> str:
    """'<what> <where>: N rows<extra>, X GiB in its Arrow files[, download Y GiB]' (said before the rows are used)."""
    files = {f["filename"] for f in getattr(ds, "cache_files", [])}
    size = sum(os.path.getsize(f) for f in files if os.path.exists(f))
    download = getattr(getattr(ds, "info", None), "download_size", None)
    return (f"{what} {where}: {len(ds):,} rows{extra}, {_bytes(size)} in its Arrow files"
            + (f" (download {_bytes(download)})" if download else ""))


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _json_rows(path: Path, cache_dir=None, split: str = "train"):
    """A .jsonl file as a map-style `datasets` table (Arrow cache on disk, not a list in RAM); `split` may slice it
    ("train[:1000]")."""
    datasets = _datasets()
    try:
        return datasets.load_dataset("json", data_files=str(path), split=split, cache_dir=cache_dir)
    except Exception as e:  # datasets wraps the JSON parser's error in its own; name the file
        raise DataError(f"{path} is not a JSON-lines file of objects (one {{...}} per line): "
                        f"{type(e).__name__}: {e}") from e


def _lazy_images(ds, column: str):
    """The column's images as stored (bytes / path dicts), not decoded to PIL for every row access."""
    datasets = _datasets()
    if isinstance(ds.features.get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _first(columns, names, where, what):
    col = next((c for c in names if c in columns), None)
    if col is None:
        raise DataError(f"{where} has no {what} column: expected one of {list(names)}, found {sorted(columns)}")
    return col


class ImageCaptions:
    """An image-caption set (world.data): rows of (image, caption), images decoded on demand. A `datasets` source
    (a hub id, or a folder with metadata.jsonl) stays on disk: memory does not grow with the number of rows."""

    def __init__(self, source: dict):
        self.source = source
        self.ds, self.rows = None, None
        if "folder" in source:
            folder = Path(source["folder"]).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"image folder {folder} does not exist")
            meta = folder / "metadata.jsonl"
            self.where = str(folder)
            if meta.is_file():
                ds = _json_rows(meta, source.get("cache_dir"))
                if "file_name" not in ds.column_names:
                    raise DataError(f"{meta} rows need a 'file_name' field, found {sorted(ds.column_names)}")
                self._image_col, self._root = "file_name", folder
                self._caption_col = _first(ds.column_names, ("text", "caption", "prompt"), str(meta), "caption")
                self.ds, self.where = ds, str(meta)
            else:
                images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                default = source.get("prompt")
                self.rows = []
                for p in images:  # a DreamBooth / style folder: a handful of files
                    txt = p.with_suffix(".txt")
                    if txt.is_file():
                        self.rows.append((p, txt.read_text().strip()))
                    elif default is not None:
                        self.rows.append((p, default))
                    else:
                        raise DataError(f"{p} has no caption: add {txt.name}, a metadata.jsonl, or a \"prompt\" "
                                        "for the whole folder in the spec")
        elif "dataset" in source:
            ds = _hub_dataset(source)
            self.where = source["dataset"]
            self._image_col = _first(ds.column_names, (source.get("image_column", "image"),), self.where, "image")
            self._caption_col = _first(ds.column_names, (source.get("caption_column", "text"),), self.where, "caption")
            self._root = None
            self.ds = _lazy_images(ds.select_columns([self._image_col, self._caption_col]), self._image_col)
        else:
            raise DataError(f"an image-caption source needs 'folder' or 'dataset': {source}")
        if self.ds is not None:
            self._cap_ds = self.ds.select_columns([self._caption_col])
            self._img_ds = self.ds.select_columns([self._image_col])
        if len(self) == 0:
            raise DataError(f"image-caption source {self.where} is empty")

    def __len__(self):
        return len(self.rows) if self.rows is not None else len(self.ds)

    def caption(self, i: int) -> str:
        if self.rows is not None:
            return self.rows[i][1]
        return str(self._cap_ds[i][self._caption_col])

    def captions(self) -> list[str]:
        if self.rows is not None:
            return [r[1] for r in self.rows]
        return [str(c) for c in self._cap_ds[self._caption_col]]

    def image(self, i: int, resolution: int) -> torch.Tensor:
        if self.rows is not None:
            return to_tensor(self.rows[i][0], resolution, f"row {i} of {self.where}")
        img = self._img_ds[i][self._image_col]
        if self._root is not None:
            img = self._root / img
        return to_tensor(img, resolution, f"row {i} of {self.where}")


class PreferencePairs:
    """Pick-a-Pic-style (caption, image 0, image 1, label_0) rows with ties dropped (`Dataset.filter`); yields
    (winner, loser). The rows stay in the data set's Arrow files (memory-mapped): only drawn rows are read, so
    memory does not grow with the number of pairs (Pick-a-Pic v2 train is ~1M pairs)."""

    def __init__(self, source: dict, log=say):
        self.source = source
        if "folder" in source:
            folder = Path(source["folder"]).expanduser()
            path = folder / source.get("file", "pairs.jsonl") if folder.is_dir() else folder
            if not path.is_file():
                raise FileNotFoundError(f"preference pairs file {path} does not exist")
            ds, self.where = _json_rows(path, source.get("cache_dir"), source.get("split", "train")), str(path)
            self._root = path.parent
        elif "dataset" in source:
            ds, self.where, self._root = _hub_dataset(source), source["dataset"], None
        else:
            raise DataError(f"a preference-pair source needs 'folder' or 'dataset': {source}")
        cols = ds.column_names
        k0 = "jpg_0" if "jpg_0" in cols else "image_0"
        k1 = "jpg_1" if "jpg_1" in cols else "image_1"
        if k0 not in cols or k1 not in cols or "label_0" not in cols:
            raise DataError(f"the rows of {self.where} lack jpg_0/jpg_1 (or image_0/image_1) or label_0: "
                            f"found {sorted(cols)}")
        self._cap = _first(cols, ("caption", "prompt", "text"), self.where, "caption")
        where, total = self.where, len(ds)

        def untied(labels, indices):
            keep = []
            for raw, i in zip(labels, indices):
                try:
                    label = float(raw)
                except (TypeError, ValueError):
                    label = None
                if label not in (0.0, 0.5, 1.0):
                    raise DataError(f"row {i} of {where}: label_0={raw!r} (expected 1, 0 or 0.5 for a tie)")
                keep.append(label != 0.5)  # a tie: no preference to learn from (PSO App. B.1)
            return keep

        ds = ds.select_columns([self._cap, k0, k1, "label_0"])
        subset = source.get("split", "train") + (f", streamed subset of {source['rows']:,} rows" if
                                                 source.get("streaming") else "")
        ds = ds.filter(untied, input_columns=["label_0"], with_indices=True, batched=True, desc="dropping ties")
        self.ties = total - len(ds)
        log(size_line("preference pairs", ds, f"{self.where} ({subset})",
                      f" without ties ({total:,} read, {self.ties:,} ties dropped)"))
        if len(ds) == 0:
            raise DataError(f"preference pairs {self.where} hold no untied pair ({self.ties} ties dropped)")
        self._captions = ds.select_columns([self._cap])
        root, cap = self._root, self._cap

        def winner_first(batch):  # rows -> (caption, preferred image, rejected image), nothing decoded yet
            def at(x):
                return root / x if root is not None and isinstance(x, str) else x

            first = [float(label) == 1.0 for label in batch["label_0"]]
            return {"caption": [str(c) for c in batch[cap]],
                    "win": [at(a if f else b) for a, b, f in zip(batch[k0], batch[k1], first)],
                    "lose": [at(b if f else a) for a, b, f in zip(batch[k0], batch[k1], first)]}

        self.ds = ds.with_transform(winner_first)

    def __len__(self):
        return len(self.ds)

    def caption(self, j: int) -> str:
        return str(self._captions[j][self._cap])

    def captions(self) -> list[str]:
        return [str(c) for c in self._captions[self._cap]]

    def images(self, j: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.ds[j]
        where = f"pair {j} ({row['caption']!r:.60}) of {self.where}"
        return (to_tensor(row["win"], resolution, f"{where} (preferred image)"),
                to_tensor(row["lose"], resolution, f"{where} (rejected image)"))


class EmbeddingCache:
    """Prompt -> embedding tensors, on disk and in a bounded RAM cache.

    Disk: `folder`/<hash of `key`>/<hash of the prompt>.safetensors (the tensors in order, the prompt in the file's
    metadata so a hash collision is caught), written atomically (a temporary file renamed), so several processes and
    later runs share it; `key` names everything an embedding depends on (the model, its dtype, the prompt length) and
    is written beside the files (key.json). RAM: the most recently used embeddings up to `ram_bytes`; the rest are
    read back from disk when drawn again."""

    def __init__(self, folder: str | Path, key: dict, ram_bytes: int):
        self.key = json.dumps(key, sort_keys=True, default=str)
        self.dir = Path(folder).expanduser() / hashlib.sha256(self.key.encode()).hexdigest()[:20]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create the prompt-embedding cache {self.dir}: {e}; set \"embedding_cache\" in the "
                            "model spec (or FEWSTEP_EMBEDDING_CACHE) to a writable folder") from e
        meta = self.dir / "key.json"
        if not meta.exists():
            _atomic_write(meta, lambda p: Path(p).write_text(self.key))
        self.ram_bytes, self.bytes = ram_bytes, 0
        self.ram: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    def _path(self, text: str) -> Path:
        return self.dir / f"{hashlib.sha256(text.encode()).hexdigest()[:40]}.safetensors"

    def __contains__(self, text: str) -> bool:
        return text in self.ram or self._path(text).is_file()

    def get(self, text: str) -> tuple | None:
        if text in self.ram:
            self.ram.move_to_end(text)
            return self.ram[text]
        if not self._path(text).is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self._path(text)), framework="pt") as f:
            if (f.metadata() or {}).get("prompt") != text:
                raise DataError(f"{self._path(text)} holds the embedding of another prompt (a hash collision or a "
                                "foreign file): delete it")
            rows = tuple(f.get_tensor(str(i)) for i in range(len(f.keys())))
        self._keep(text, rows)
        return rows

    def put(self, text: str, rows: tuple) -> None:
        from safetensors.torch import save_file

        rows = tuple(r.detach().to("cpu").contiguous() for r in rows)
        _atomic_write(self._path(text), lambda p: save_file({str(i): r for i, r in enumerate(rows)}, p,
                                                            metadata={"prompt": text}))
        self._keep(text, rows)

    def _keep(self, text: str, rows: tuple) -> None:
        if text in self.ram:
            self.bytes -= sum(r.numel() * r.element_size() for r in self.ram.pop(text))
        self.ram[text] = rows
        self.bytes += sum(r.numel() * r.element_size() for r in rows)
        while self.bytes > self.ram_bytes and len(self.ram) > 1:
            _, old = self.ram.popitem(last=False)
            self.bytes -= sum(r.numel() * r.element_size() for r in old)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def check_paths(spec) -> None:
    """Every local file or folder a model spec names must exist: checked before any model is loaded or
    downloaded, with the spec key and (for the shipped specs' data/ files) the command that writes it."""
    missing = []

    def need(key, value, kind="file"):
        if not isinstance(value, (str, Path)):
            return
        p = Path(value).expanduser()
        if not p.is_absolute() and looks_like_hub_id(str(value)):
            return
        ok = p.is_file() if kind == "file" else p.is_dir() if kind == "folder" else p.exists()
        if not ok:
            missing.append(f"{key}: {value} ({'no such ' + kind if not p.exists() else 'not a ' + kind})")

    need("prompts", spec.prompts)
    need("eval_prompts", spec.eval_prompts)
    for split, src in (spec.data or {}).items():
        if isinstance(src, dict) and "folder" in src:
            need(f"data.{split}.folder", src["folder"], "folder")
    if isinstance(spec.pairs, dict) and "folder" in spec.pairs:
        need("pairs.folder", spec.pairs["folder"], "path")
    for key, r in [("reward", spec.reward), ("quality", spec.quality)] + [
            (f"eval_rewards[{i}]", r) for i, r in enumerate(spec.eval_rewards)]:
        if isinstance(r, dict):
            for k in ("model", "processor", "head"):
                if isinstance(r.get(k), str) and Path(r[k]).is_absolute():
                    need(f"{key}.{k}", r[k], "path")
    if isinstance(spec.vae, str) and Path(spec.vae).is_absolute():  # (a missing `base` is models.ModelError)
        need("vae", spec.vae, "path")
    for role, r in spec.roles.items():
        for k in ("unet", "lora"):
            v = getattr(r, k)
            if isinstance(v, str) and Path(v).is_absolute():
                need(f"roles.{role}.{k}", v, "path")
    for key, src in [(f"data.{split}", src) for split, src in (spec.data or {}).items()] + [("pairs", spec.pairs)]:
        if isinstance(src, dict) and src.get("dataset") in REMOVED_DATASETS:
            raise DataError(f"the model spec {spec.name or spec.base}: {key}.dataset {src['dataset']!r} was "
                            f"{REMOVED_DATASETS[src['dataset']]}; name another data set there (nothing was loaded)")
    if missing:
        raise FileNotFoundError(f"the model spec {spec.name or spec.base} names paths that do not exist:\n  "
                                + "\n  ".join(missing)
                                + "\n(nothing was loaded). `python -m full.prepare_data check SPEC` lists the files a "
                                "spec needs and the command that writes each shipped one.")
