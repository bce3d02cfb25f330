"""Write the data files a model spec names (prompt lists, image-caption folders, preference-pair folders) from a
`datasets` id or a local data set, and list what a spec still lacks.

    python -m full.prepare_data check full/specs/sdxl_dmd2.json          # every path the spec names; exit 1 if missing
    python -m full.prepare_data prompts data/pickapic_train_prompts.txt --dataset yuvalkirstain/pickapic_v2 \
        --split train --column caption --unique
    python -m full.prepare_data images data/dreambooth/dog --dataset diffusers/dog-example --caption "a photo of sks dog"
    python -m full.prepare_data pairs data/pickapic_small --dataset yuvalkirstain/pickapic_v2 --split train --limit 10000
    python -m full.prepare_data embed full/specs/sdxl_dmd2.json pairs     # fill the prompt-embedding cache ahead

`--dataset` is anything `datasets.load_dataset` takes: a hub id, a local folder, or a builder name ("parquet",
"json", "imagefolder") with `--data-files`. Rows are streamed through in batches, so a large split is never held
in memory. Outputs: prompts -> one prompt a line (.txt); images -> N.png + metadata.jsonl (the imagefolder layout
full.data.ImageCaptions reads); pairs -> N_0.png, N_1.png + pairs.jsonl (full.data.PreferencePairs; ties are kept
in the file and dropped by the loader). SHIPPED lists the recipe for each data/ file the shipped specs name; the ids
there are the usual public sources, not checked from this machine.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

# data/ file of the shipped specs -> the prepare_data arguments that write it (None: no public source we know of)
SHIPPED = {
    "pickapic_train_prompts.txt": "prompts {out} --dataset yuvalkirstain/pickapic_v2 --split train --column caption "
                                  "--unique",
    "pickapic_test_prompts.txt": "prompts {out} --dataset yuvalkirstain/pickapic_v2 --split test_unique "
                                 "--column caption --unique --limit 500",
    "coco2017_val_1k_prompts.txt": "prompts {out} --dataset <a COCO-2017 captions set> --split validation "
                                   "--column caption --unique --limit 1000",
    "laion_aesthetic_625_prompts.txt": None,  # DI++'s training prompts: supply your own list
    "sharpening_prompts.txt": None,
    "dog": "images {out} --dataset diffusers/dog-example --caption \"a photo of sks dog\"",
}


def _load(a):
    from .data import _hub_dataset

    source = {"dataset": a.dataset, "split": a.split}
    if a.data_files:
        source["data_files"] = a.data_files
    return _hub_dataset(source)


def _rows(ds, columns, limit, batch_size=256):
    """Rows of `columns`, batch by batch (Dataset.iter reads the Arrow files in slices)."""
    n = 0
    for batch in ds.select_columns(columns).iter(batch_size=batch_size):
        for i in range(len(batch[columns[0]])):
            if limit and n >= limit:
                return
            yield {c: batch[c][i] for c in columns}
            n += 1


def _column(ds, name, options, what):
    from .data import DataError

    col = name or next((c for c in options if c in ds.column_names), None)
    if col not in ds.column_names:
        raise DataError(f"the data set has no {what} column {col or options!r}; columns: {ds.column_names}")
    return col


def _save_image(value, path: Path) -> None:
    from PIL import Image

    if isinstance(value, dict):  # datasets' Image(decode=False)
        value = value.get("bytes") or Path(value["path"]).read_bytes()
    image = Image.open(io.BytesIO(value)) if isinstance(value, (bytes, bytearray)) else value
    image.convert("RGB").save(path)


def prompts(a) -> int:
    ds = _load(a)
    col = _column(ds, a.column, ("caption", "prompt", "text"), "prompt")
    seen, out = set(), Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "w") as f:
        for row in _rows(ds, [col], None):
            text = " ".join(str(row[col]).split())
            if not text or (a.unique and text in seen):
                continue
            if a.unique:
                seen.add(text)
            f.write(text + "\n")
            n += 1
            if a.limit and n >= a.limit:
                break
    print(f"wrote {n} prompts to {out}")
    return n


def images(a) -> int:
    from .data import _lazy_images

    ds = _load(a)
    img = _column(ds, a.image_column, ("image", "img", "jpg"), "image")
    cap = None if a.caption else _column(ds, a.caption_column, ("text", "caption", "prompt"), "caption")
    ds = _lazy_images(ds, img)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out / "metadata.jsonl", "w") as meta:
        for row in _rows(ds, [img] + ([cap] if cap else []), a.limit):
            _save_image(row[img], out / f"{n}.png")
            meta.write(json.dumps({"file_name": f"{n}.png", "text": a.caption or str(row[cap])}) + "\n")
            n += 1
    print(f"wrote {n} images and metadata.jsonl to {out}")
    return n


def pairs(a) -> int:
    ds = _load(a)
    k0 = "jpg_0" if "jpg_0" in ds.column_names else "image_0"
    k1 = "jpg_1" if "jpg_1" in ds.column_names else "image_1"
    cap = _column(ds, a.column, ("caption", "prompt", "text"), "caption")
    for k in (k0, k1, "label_0"):
        _column(ds, k, (k,), k)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out / "pairs.jsonl", "w") as f:
        for row in _rows(ds, [cap, k0, k1, "label_0"], a.limit):
            _save_image(row[k0], out / f"{n}_0.png")
            _save_image(row[k1], out / f"{n}_1.png")
            f.write(json.dumps({"caption": str(row[cap]), "jpg_0": f"{n}_0.png", "jpg_1": f"{n}_1.png",
                                "label_0": float(row["label_0"])}) + "\n")
            n += 1
    print(f"wrote {n} pairs and pairs.jsonl to {out}")
    return n


def spec_paths(spec) -> list[tuple[str, str, str]]:
    """(spec key, path, kind) of every local path the spec names."""
    out = [(k, getattr(spec, k), "file") for k in ("prompts", "eval_prompts") if isinstance(getattr(spec, k), str)]
    for split, src in spec.data.items():
        if "folder" in src:
            out.append((f"data.{split}.folder", src["folder"], "folder"))
    if isinstance(spec.pairs, dict) and "folder" in spec.pairs:
        out.append(("pairs.folder", spec.pairs["folder"], "folder"))
    return out


def check(a) -> int:
    from .spec import load_spec

    spec = load_spec(a.spec)
    missing = 0
    for key, path, kind in spec_paths(spec):
        ok = Path(path).exists()
        missing += not ok
        print(f"{'ok     ' if ok else 'MISSING'} {key:22s} {path}")
        if not ok:
            recipe = SHIPPED.get(Path(path).name, "")
            if recipe:
                print(f"        write it with: python -m full.prepare_data {recipe.format(out=path)}")
            elif recipe is None:
                print(f"        no public source is known for {Path(path).name}: provide your own {kind}")
            else:
                print(f"        provide a {kind} there (python -m full.prepare_data {'prompts' if kind == 'file' else 'images'} ...)")
    for key, src in [(f"data.{s}", v) for s, v in spec.data.items()] + [("pairs", spec.pairs)]:
        if isinstance(src, dict) and "dataset" in src:
            print(f"dataset {key:22s} {src['dataset']} (read through datasets when the run starts)")
    return 1 if missing else 0


def embed(a) -> int:
    """Encode the prompts and the named sources' captions into the on-disk embedding cache ahead of a run (what
    precompute_embeddings would encode when the run opens them, here without any denoiser loaded)."""
    import full

    world = full.load_world(a.spec, precompute_embeddings=True)
    for source in a.sources:
        if source == "pairs":
            world._pairs(None)
        elif source.startswith("data."):
            world._dataset(source[len("data."):])
        else:
            raise SystemExit(f"embed: unknown source {source!r}; name pairs or data.<split> "
                             f"(this spec has data splits {sorted(world.spec.data)})")
    print(f"prompt embeddings in {world.embeddings.dir}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="list the paths a model spec names and what is missing")
    c.add_argument("spec")
    e = sub.add_parser("embed", help="encode a spec's prompts and the named sources' captions into the embedding cache")
    e.add_argument("spec")
    e.add_argument("sources", nargs="*", help="pairs and / or data.<split> (e.g. data.target)")
    for name, fn in (("prompts", prompts), ("images", images), ("pairs", pairs)):
        q = sub.add_parser(name)
        q.add_argument("out")
        q.add_argument("--dataset", required=True, help="hub id, local folder, or builder name with --data-files")
        q.add_argument("--data-files", nargs="*", default=None)
        q.add_argument("--split", default="train")
        q.add_argument("--limit", type=int, default=0, help="at most this many rows (0: all)")
        q.add_argument("--column", default=None, help="the prompt / caption column")
        q.set_defaults(fn=fn)
        if name == "prompts":
            q.add_argument("--unique", action="store_true", help="drop repeated prompts")
        if name == "images":
            q.add_argument("--image-column", default=None)
            q.add_argument("--caption-column", default=None)
            q.add_argument("--caption", default=None, help="one caption for every image (a DreamBooth concept)")
    a = p.parse_args(argv)
    if a.command == "check":
        return check(a)
    if a.command == "embed":
        return embed(a)
    if a.command == "images" and a.column and not a.caption_column:
        a.caption_column = a.column
    a.fn(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
