"""A launcher setting's first real run, rehearsed without downloading weights (docs/design.md section 12).

    python -m full.launch pso-online-flux-schnell --rehearse --gpu-memory 48
    python -m full.launch pso-offline-dmd2 --rehearse --gpu-memory 80 --num-processes 8
    python -m full.rehearse pso-offline-dmd2 --gpu-memory 24 --rows 100000 --keep /tmp/rehearsal

A tiny pipeline proves the wiring; a first real run fails where it does not look: the real scheduler configs, the
real data set's size and layout, the real model's size, the GPUs it gets. The rehearsal does what the run does,
in its order, with everything real but the weights:

1. **Command**: the launcher's command for `--gpu-memory` / `--num-processes` (full/launch.py), as it would run on
   a machine with CUDA: the per-GPU batch is the memory plan's; a setting that does not fit is refused here, with
   the smallest settings that fit, and the rehearsal stops (exit status 1) as the launcher would.
2. **Memory**: the memory plan of this setting, computed now (full/memory_plan.py: the real architectures on the
   meta device) at the chosen batch and process count: the update, evaluation and loading peaks per GPU, and the
   host RAM of the node while the processes load their models.
3. **Downloads**: every checkpoint part the run reads (the roles the method builds, VAE, text encoders, reward
   models) with its parameter count from the shipped configs (meta device) and the dtype of its weight files
   (STORED_DTYPE), so roughly how many GB; the data sets the run opens with their size where their card gives it
   (DATASET_CARDS), else "unknown".
4. **Data**: each data source the spec names is replaced by a synthetic one in the same layout in a temporary
   folder: Pick-a-Pic v2's parquet columns for preference pairs (`rows` rows of small JPEGs in several files and
   row groups), an image + text parquet for a `datasets` image-caption set with the rows its card states
   (CARD_ROWS), a folder of images for a folder, text files for the prompt lists. They are read through the same code as the real ones (`datasets.load_dataset` of
   the parquet files, full/data.py); the process's RSS before and after says what the data cost.
5. **Run**: the method's own `main` for one update and a two-sample evaluation, on the setting's spec with random
   weights (full/architectures.py) built at depth 1 (`architectures.depth`: every width, token count, scheduler
   and condition real, one block per stack), at `resolution` pixels, fp32 on this machine's CPU (or its GPU), one
   process. Everything the run does before and during its first update runs: argument checks, spec and path
   checks, the real scheduler configs and the roles' samplers and grids, the LoRA, the data sources it opens,
   the update, the evaluation, the checkpoint, the adapter export. A flow family's T5 / Qwen3 encoder reads TOKENS
   prompt tokens (the pipeline's 256-512 would make precomputing a data set's captions take an hour here).
6. **Prompt embeddings**: how many the run wrote to its embedding cache and their size at the real prompt length
   and dtype (with precompute_embeddings, all of them before the first update).

ImageReward has no offline configuration: a spec that names it is rehearsed with a random CLIP ViT-L/14 in its
place (the memory plan's stand-in), and the rehearsal says so. What is not rehearsed: the real weights (a NaN in a
checkpoint), the download itself, several processes (tests/test_fsdp.py and tests/test_full_runs.py run 2 CPU
processes), the GPU kernels (full.bench measures them).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import launch

# The dtype of each repository's default weight files (what from_pretrained reads without a `variant`), from the
# repositories' file listings (not checked here: no network). SDXL / SD 2.x / SD 1.5 ship fp32 files with fp16
# variants beside them (a spec's "variant": "fp16" reads those); FLUX.1 and SD3.5 ship bf16 / fp16 files.
STORED_DTYPE = {
    "stabilityai/stable-diffusion-xl-base-1.0": "fp32", "stabilityai/sdxl-turbo": "fp32",
    "stabilityai/stable-diffusion-2-1-base": "fp32", "stabilityai/sd-turbo": "fp32",
    "runwayml/stable-diffusion-v1-5": "fp32", "stable-diffusion-v1-5/stable-diffusion-v1-5": "fp32",
    "madebyollin/sdxl-vae-fp16-fix": "fp32",
    "stabilityai/stable-diffusion-3.5-medium": "bf16", "stabilityai/stable-diffusion-3.5-large": "bf16",
    "stabilityai/stable-diffusion-3.5-large-turbo": "bf16",
    "black-forest-labs/FLUX.1-schnell": "bf16", "black-forest-labs/FLUX.1-dev": "bf16",
    "yuvalkirstain/PickScore_v1": "fp32", "openai/clip-vit-large-patch14": "fp32",
    "Tongyi-MAI/Z-Image-Turbo": "bf16", "Tongyi-MAI/Z-Image": "bf16",
    "black-forest-labs/FLUX.2-klein-4B": "bf16", "black-forest-labs/FLUX.2-klein-base-4B": "bf16",
    "black-forest-labs/FLUX.2-klein-9B": "bf16", "black-forest-labs/FLUX.2-klein-base-9B": "bf16",
}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Data sets: the size their dataset card states, where this project has read it (the rows a synthetic copy gets).
DATASET_CARDS = {
    "yuvalkirstain/pickapic_v2": "train split 322.0 GB (its card's num_bytes: 322,022,952,127); ~959k rows (the row "
                                 "count of its image-less copy yuvalkirstain/pickapic_v2_no_images)",
    "lambdalabs/naruto-blip-captions": "1,221 train rows, 0.70 GB in 2 parquet files (its dataset_infos.json)",
}
CARD_ROWS = {"lambdalabs/naruto-blip-captions": 1221}
CAPTION_ROWS = 1000  # rows of a synthetic image-caption set whose card this project has not read
# Prompt tokens of the rehearsal's text encoders (a flow family's T5 / Qwen3; the CLIP encoders keep their 77): with
# precompute_embeddings every caption of an opened data set is one text-encoder pass before the first update, at
# the pipeline's 256-512 tokens ~2 s each on a 2-core CPU even at depth 1 (FLUX.2's Qwen3), and one file in the
# embedding cache (FLUX.2 klein 4B: 512 x 7680 values). The report scales what the rehearsal wrote to the real length.
TOKENS = 32
PROMPTS = 64  # the synthetic prompt list's length (the spec's prompts and eval_prompts)
# the reward models the reward names load (full/rewards.py DEFAULTS) and the config that sizes them
REWARD_MODELS = {"clip": ("openai/clip-vit-large-patch14", "reward_clip_vit_l14.json"),
                 "aesthetic": ("openai/clip-vit-large-patch14", "reward_clip_vit_l14.json"),
                 "pickscore": ("yuvalkirstain/PickScore_v1", "reward_clip_vit_h14.json"),
                 "imagereward": ("THUDM/ImageReward", None)}
ROLES = {"pso.py": ("student",), "sharpening.py": ("teacher",), "diff_instruct_pp.py": ("generator", "teacher")}
# a variant that builds a role more (pso.py's TRAINED_ROLE: base transfer trains its LoRA on the base, the teacher)
VARIANT_ROLES = {("pso.py", "base-transfer"): ("teacher",)}
DEPTH = 1  # blocks per stack of the rehearsal's random-weight networks
RESOLUTION = 64  # image side of the rehearsal's update (8x8 latents): every shipped kind's patch size divides it


# ----------------------------------------------------------------------------------------------- downloads
def downloads(spec, script: str, variant: str | None = None) -> list[dict]:
    """What a run of `script` on `spec` reads from the hub: one row per checkpoint part (source, part, parameters
    from the shipped config on the meta device, stored dtype, GB; None where unknown)."""
    import diffusers
    import transformers

    from . import architectures
    from .rewards import reward_name

    rows, seen = [], set()

    def add(source, part, params, dtype, note=""):
        if (source, part) in seen:
            return
        seen.add((source, part))
        gb = None if params is None or dtype is None else params * BYTES[dtype] / 1e9
        rows.append(dict(source=source, part=part, parameters=params, dtype=dtype, gb=gb, note=note))

    def stored(source):
        return "fp16" if spec.variant == "fp16" else STORED_DTYPE.get(source)

    index = architectures.model_index(spec.base)
    e = architectures.entry(spec.base)
    net = "transformer" if "transformer" in index else "unet"
    for role in ROLES[script] + VARIANT_ROLES.get((script, variant), ()):
        r = spec.roles.get(role)
        if r is not None and r.unet_file:
            dtype = "fp16" if "fp16" in r.unet_file else "fp32" if "fp32" in r.unet_file else None
            cls = getattr(diffusers, index[net][1])
            add(r.unet, r.unet_file, architectures.parameter_count(cls, e[net]), dtype,
                f"a state dict for the base {net} ({role})")
        else:
            source = (r.unet if r is not None and r.unet else None) or spec.base
            config = architectures.entry(source).get(net, e[net])
            add(source, net, architectures.parameter_count(getattr(diffusers, index[net][1]), config), stored(source),
                role)
        if r is not None and r.lora:
            add(r.lora, r.lora_weight_name or "LoRA", None, None, "a distillation LoRA fused first (size not in "
                                                                  "the configs)")
    vae = spec.vae or spec.base
    add(vae, "vae", architectures.parameter_count(diffusers.AutoencoderKL, architectures.entry(vae)["vae"]),
        STORED_DTYPE.get(vae) if spec.vae else stored(vae))
    for part in [p for p in index if p.startswith("text_encoder")]:
        cls = getattr(transformers, index[part][1])
        add(spec.base, part, architectures.parameter_count(cls, e[part]), stored(spec.base))
    for r in [spec.reward, spec.quality, *spec.eval_rewards]:
        name = reward_name(r)
        if isinstance(r, dict) and r.get("model"):
            add(r["model"], name, None, None, "a model of your own")
            continue
        source, config = REWARD_MODELS[name]
        params = architectures.parameter_count(transformers.CLIPModel, config) if config else None
        add(source, name if name != "aesthetic" else "clip", params, STORED_DTYPE.get(source) if config else None,
            "" if config else "no shipped configuration (BLIP + MLP head)")
    return rows


def data_sources(spec) -> list[tuple[str, dict]]:
    """(spec key, source) of every data source the spec names."""
    out = [(f"data.{split}", src) for split, src in (spec.data or {}).items()]
    return out + ([("pairs", spec.pairs)] if spec.pairs else [])


def dataset_size(source: dict) -> str:
    if "dataset" not in source:
        return f"a local folder ({source.get('folder')})"
    return DATASET_CARDS.get(source["dataset"]) or "unknown (no dataset card read for it)"


# ----------------------------------------------------------------------------------------------- synthetic data
CAPTIONS = ["a {} fox in a snowy forest", "a {} lighthouse at dawn, watercolor", "an astronaut riding a {} horse",
            "a bowl of {} ramen, studio lighting", "a {} city skyline at night", "a {} corgi on a beach"]
COLOURS = ["red", "blue", "green", "golden", "purple", "silver", "black", "white"]


def caption(k: int) -> str:
    """Synthetic prompts, repeated as Pick-a-Pic's are (several pairs per prompt)."""
    return CAPTIONS[k % len(CAPTIONS)].format(COLOURS[(k // len(CAPTIONS)) % len(COLOURS)]) + f" #{k % 4096}"


def jpeg_pool(n: int = 64, side: int = 32, seed: int = 0) -> list[bytes]:
    """`n` distinct small JPEGs (random colours), reused across rows: the rows' image bytes are real JPEGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def write_pickapic(folder: Path, rows: int, rows_per_file: int = 25_000, row_group: int = 5000,
                   seed: int = 0) -> list[Path]:
    """Pick-a-Pic v2's train-split layout (the columns of its dataset card, jpg_0 / jpg_1 as JPEG bytes, label_0 in
    {1, 0, 0.5}: about 12 % ties) as parquet shards of `rows_per_file` rows in `row_group`-row groups (the hub's
    split is many shards too). Written one row group at a time: memory does not grow with `rows`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pool, rng = jpeg_pool(seed=seed), np.random.default_rng(seed)
    schema = pa.schema([("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
                        ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()),
                        ("image_0_uid", pa.string()), ("image_0_url", pa.string()), ("image_1_uid", pa.string()),
                        ("image_1_url", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64()), ("model_0", pa.string()),
                        ("model_1", pa.string()), ("ranking_id", pa.int64()), ("user_id", pa.int64()),
                        ("num_example_per_prompt", pa.int64()), ("__index_level_0__", pa.int64())])
    files = max(1, -(-rows // rows_per_file))
    paths, per_file, start = [], rows_per_file, 0
    for f in range(files):
        n_file = min(per_file, rows - start)
        if n_file <= 0:
            break
        path = folder / f"train-{f:05d}-of-{files:05d}.parquet"
        with pq.ParquetWriter(path, schema) as writer:
            for lo in range(start, start + n_file, row_group):
                k = np.arange(lo, min(lo + row_group, start + n_file))
                u = rng.random(len(k))
                label = np.where(u < 0.12, 0.5, np.where(u < 0.56, 1.0, 0.0))
                uid0, uid1 = [f"{i:08x}-0" for i in k], [f"{i:08x}-1" for i in k]
                writer.write_table(pa.table({
                    "are_different": np.ones(len(k), bool), "best_image_uid": [a if lab == 1 else b for a, b, lab in
                                                                               zip(uid0, uid1, label)],
                    "caption": [caption(int(i)) for i in k],
                    "created_at": pa.array(np.full(len(k), 1_680_000_000 * 10**9, dtype="int64"),
                                           pa.timestamp("ns")),
                    "has_label": np.ones(len(k), bool), "image_0_uid": uid0,
                    "image_0_url": [f"https://example.invalid/{u}.png" for u in uid0], "image_1_uid": uid1,
                    "image_1_url": [f"https://example.invalid/{u}.png" for u in uid1],
                    "jpg_0": [pool[int(i) % len(pool)] for i in k], "jpg_1": [pool[(int(i) * 7 + 3) % len(pool)] for i in k],
                    "label_0": label, "label_1": 1.0 - label, "model_0": ["sdxl"] * len(k), "model_1": ["sd21"] * len(k),
                    "ranking_id": k, "user_id": k % 997, "num_example_per_prompt": np.ones(len(k), "int64"),
                    "__index_level_0__": k}, schema=schema), row_group_size=row_group)
        paths.append(path)
        start += n_file
    return paths


def write_image_captions(folder: Path, rows: int, image_column: str = "image", caption_column: str = "text",
                         seed: int = 0) -> list[Path]:
    """A `datasets` image-caption set's layout (lambdalabs/naruto-blip-captions: an Image feature and a text
    column) as one parquet file with the datasets features metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pool = jpeg_pool(seed=seed + 1)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {image_column: {"_type": "Image"}, caption_column: {"dtype": "string", "_type": "Value"}}
    schema = pa.schema([(image_column, image), (caption_column, pa.string())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    path = folder / "train-00000-of-00001.parquet"
    table = pa.table({image_column: [{"bytes": pool[i % len(pool)], "path": None} for i in range(rows)],
                      caption_column: [caption(i) for i in range(rows)]}, schema=schema)
    pq.write_table(table, path, row_group_size=max(1, rows // 4))
    return [path]


def write_image_folder(folder: Path, n: int = 5, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(jpeg_pool(n, seed=seed + 2)):
        (folder / f"{i:02d}.jpg").write_bytes(data)
    return folder


def synthetic_source(key: str, source: dict, root: Path, rows: int) -> dict:
    """A synthetic source in the layout of `source` (same options: columns, prompt, class_prompt), under `root`."""
    folder = root / key.replace(".", "_")
    keep = {k: v for k, v in source.items() if k not in ("dataset", "folder", "file", "data_files", "split",
                                                          "cache_dir", "name", "revision", "data_dir")}
    if key == "pairs":
        files = write_pickapic(folder, rows)
    elif "dataset" in source:  # the real set's rows: every caption is encoded before training (precompute)
        files = write_image_captions(folder, CARD_ROWS.get(source["dataset"], CAPTION_ROWS),
                                     source.get("image_column", "image"), source.get("caption_column", "text"))
    else:
        return {**keep, "folder": str(write_image_folder(folder))}
    return {**keep, "dataset": "parquet", "data_files": {"train": [str(f) for f in files]}, "split": "train",
            "cache_dir": str(root / "datasets-cache")}


def prompt_tokens(spec) -> int | None:
    """The prompt length of the spec's flow-family text encoder as the run uses it (full/world.py
    max_sequence_length); None for the CLIP-only UNet families."""
    from . import architectures, models

    fam = models.family(models.PIPELINES[architectures.model_index(spec.base)["_class_name"]])
    if not fam.max_sequence_length:
        return None
    return spec.max_sequence_length or models.pipeline_facts(spec.base).get("max_sequence_length") or \
        fam.max_sequence_length


def rehearsal_spec(spec_file: str, root: Path, rows: int, resolution: int = RESOLUTION) -> tuple[Path, list[str]]:
    """The setting's spec with random weights, fp32, `resolution`, synthetic prompts and data (notes: what was
    replaced), written to root/spec.json."""
    from .rewards import reward_name
    from .spec import load_spec

    spec = load_spec(spec_file)
    d = json.loads(Path(spec_file).read_text()) if Path(spec_file).suffix == ".json" else {"base": spec.base}
    notes = []
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(caption(k) for k in range(PROMPTS)) + "\n")
    d.update(random_weights=True, dtype="fp32", resolution=resolution, decode_batch=1, prompts=str(prompts),
             eval_prompts=str(prompts), embedding_cache=str(root / "embeddings"))  # (random encoders' embeddings
    # stay out of the user's cache)
    d["data"] = {split: synthetic_source(f"data.{split}", src, root, rows) for split, src in spec.data.items()}
    if spec.pairs:
        d["pairs"] = synthetic_source("pairs", spec.pairs, root, rows)
    for key in ("reward", "quality"):
        if reward_name(d.get(key, "clip")) == "imagereward":
            d[key] = "clip"
            notes.append(f"{key}: imagereward has no offline configuration; rehearsed with a random CLIP ViT-L/14")
    if any(reward_name(r) == "imagereward" for r in d.get("eval_rewards", [])):
        d["eval_rewards"] = [r for r in d["eval_rewards"] if reward_name(r) != "imagereward"]
        notes.append("eval_rewards: imagereward dropped (no offline configuration)")
    from . import architectures, models

    fam = models.family(models.PIPELINES[architectures.model_index(spec.base)["_class_name"]])
    if fam.text_encoder_out_layers and not spec.text_encoder_out_layers:  # FLUX.2: hidden states 9, 18, 27 of
        # a Qwen3 that has DEPTH layers here
        d["text_encoder_out_layers"] = [min(k, DEPTH) for k in fam.text_encoder_out_layers]
        notes.append(f"text_encoder_out_layers: {list(fam.text_encoder_out_layers)} read from a {DEPTH}-layer text "
                     f"encoder as {d['text_encoder_out_layers']} (the real run reads the pipeline's)")
    for key, src in data_sources(spec):
        if "dataset" in src and key != "pairs":
            rows_here = CARD_ROWS.get(src["dataset"])
            notes.append(f"{key}: {rows_here:,} rows, as its card states" if rows_here else
                         f"{key}: {CAPTION_ROWS:,} rows (its card was not read here)")
    real = prompt_tokens(spec)
    if real:  # see TOKENS
        d["max_sequence_length"] = min(real, TOKENS)
        notes.append(f"max_sequence_length: {d['max_sequence_length']} prompt tokens (the real run: {real}); the "
                     "embedding cache's size is scaled to the real length below")
    for role in d.get("roles", {}).values():  # a relative role source (a folder) is relative to the shipped spec
        for k in ("unet", "transformer", "lora"):
            if isinstance(role, dict) and role.get(k) and not Path(role[k]).is_absolute() and Path(
                    Path(spec_file).parent, role[k]).exists():
                role[k] = str(Path(spec_file).parent / role[k])
    path = root / "spec.json"
    path.write_text(json.dumps(d, indent=1))
    return path, notes


def embedding_cache_size(folder: Path, tokens: int | None, real_tokens: int | None, nbytes: int) -> tuple[int, float, float]:
    """(prompt embeddings in the cache under `folder`, their bytes here, bytes at the real run's prompt length and
    dtype): a tensor whose first axis is the rehearsal's `tokens` grows to `real_tokens` rows."""
    from safetensors import safe_open

    n, here, real = 0, 0.0, 0.0
    for f in Path(folder).rglob("*.safetensors"):
        n += 1
        here += f.stat().st_size
        with safe_open(str(f), framework="pt") as t:
            for k in t.keys():
                shape = t.get_slice(k).get_shape()
                count = 1
                for d in shape:
                    count *= d
                if tokens and real_tokens and shape and shape[0] == tokens:
                    count = count // tokens * real_tokens
                real += count * nbytes
    return n, here, real


# ----------------------------------------------------------------------------------------------- the run
def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB."""
    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return psutil.Process().memory_info().rss / 2**20, peak


def small_run(name: str, out: Path) -> list[str]:
    """The options that make a setting's run one update and a two-sample evaluation (after the setting's own: the
    last value of a flag wins)."""
    return ["--steps", "1", "--batch", "1", "--out", str(out), "--save-every", "1", *launch.small_run(name)]


def run_update(name: str, spec_path: Path, out: Path, extra: list[str]) -> dict:
    """The method's main: one update, a two-sample evaluation, at depth DEPTH. Returns log row, NFEs, seconds."""
    import csv
    import importlib

    from . import architectures

    script, argv = launch.method_argv(name, str(spec_path), 1, [*small_run(name, out), *extra])
    sys.path.insert(0, str(script.parent))
    method = importlib.import_module(script.stem)
    import harness

    worlds, load = [], harness.load_world

    def keep(*a, **kw):  # the run's world: what it sampled with
        worlds.append(load(*a, **kw))
        return worlds[-1]

    harness.load_world = keep  # the methods call harness.load_world(cfg.model) at run time
    tick = time.perf_counter()
    try:
        with architectures.depth(DEPTH), opened_sources() as opened:
            metrics = method.main(argv)
    finally:
        harness.load_world = load
    seconds = time.perf_counter() - tick
    with open(out / "log.csv") as f:
        log = list(csv.DictReader(f))
    world = worlds[-1]
    roles = [{"role": d.role, "sampler": d.sampler, "timesteps": list(d.timesteps),
              "scheduler": type(world._role_scheduler(d.role)).__name__} for d in world.denoisers]
    return {"seconds": seconds, "log": log, "metrics": metrics, "argv": argv, "roles": roles, "opened": opened,
            "schedule": getattr(world.schedule, "name", type(world.schedule).__name__)}


@contextlib.contextmanager
def opened_sources():
    """The data sources (image-caption sets, preference pairs) the run opens, with their rows: a list filled as
    full/data.py's readers are built."""
    from . import data

    opened, saved = [], {}
    for cls in (data.ImageCaptions, data.PreferencePairs):
        def init(self, source, *a, _real=cls.__init__, **kw):
            _real(self, source, *a, **kw)
            opened.append({"source": dict(source), "kind": type(self).__name__, "rows": len(self)})

        saved[cls] = cls.__init__
        cls.__init__ = init
    try:
        yield opened
    finally:
        for cls, real in saved.items():
            cls.__init__ = real


def _print(title: str, lines) -> None:
    print(f"\n== {title}", flush=True)
    for line in lines:
        print(f"   {line}", flush=True)


def rehearse(name: str, gpu_memory: float = 80, num_processes: int = 1, model: str | None = None,
             extra: list[str] = (), launcher: str = "accelerate", rows: int = 100_000, workdir: Path | None = None,
             update: bool = True) -> dict:
    """Rehearse a launcher setting (see the module docstring); returns what it found. `fits` False: the launcher
    refuses the setting (the other sections are then not run)."""
    from . import defaults, memory_plan
    from .spec import load_spec

    s = launch.SETTINGS[name]
    extra = list(extra)
    report = {"setting": name, "gpu_memory": gpu_memory, "num_processes": num_processes}
    # 1. the command, as on a machine with CUDA
    try:
        cmd = launch.command(name, num_processes, launcher, model, extra, gpu_memory=gpu_memory, cuda=True)
    except launch.DoesNotFit as e:
        _print("command: refused by the memory plan", str(e).splitlines())
        return {**report, "fits": False, "refusal": str(e)}
    import shlex

    batch = int(cmd[cmd.index("--batch") + 1])
    accumulation = int(cmd[cmd.index("--gradient-accumulation-steps") + 1]) if (
        "--gradient-accumulation-steps" in cmd) else 1
    lines = [shlex.join(cmd), f"per-GPU batch {batch} x {num_processes} process(es) x accumulation {accumulation} = "
                              f"global batch {batch * num_processes * accumulation} (the paper's: {s.batch})"]
    if launcher == "accelerate" and num_processes > 1 and not launch._has_cuda():
        lines.append(f"here (no CUDA) the launcher would refuse it: {launch.CPU_MODE}; --launcher torchrun")
    _print("command", lines)
    report.update(fits=True, command=cmd, batch=batch, accumulation=accumulation)
    # 2. the memory plan, now, at this batch and process count
    training = launch.training_of(name, extra)
    spec_file = model or str(launch.SPECS / s.spec)
    spec = load_spec(spec_file)
    if model is None and training is not None:
        gpus = num_processes if s.fsdp and num_processes > 1 and training == "own" else 1
        tick = time.perf_counter()
        row = memory_plan.plan_setting(name, spec.gradient_checkpointing, None if training == "own" else training,
                                       batch, None, 1, (gpus,))[0]
        host = row.host_gib(num_processes) if gpus > 1 else num_processes * row.load_host_rank_gib
        _print(f"memory plan ({time.perf_counter() - tick:.0f} s; full/memory_plan.py, computed, not measured)", [
            f"{row.training}, checkpointing {'on' if row.checkpointing else 'off'}, {row.resolution}^2, batch "
            f"{row.batch}/GPU{f', FSDP over {gpus} GPUs' if gpus > 1 else ''}",
            f"per GPU: resident {row.resident_gib:.1f} GiB, update {row.update_gib:.1f}, evaluation chunk "
            f"{row.eval_gib:.1f}, loading {row.load_gpu_gib:.1f}"
            + (f", start-up probe {row.startup_gib:.1f}" if row.startup_gib is not None else "") + " GiB",
            f"peak {row.peak_gib:.1f} GiB + {defaults.MARGIN - 1:.0%} = {row.peak_gib * defaults.MARGIN * 2**30 / 1e9:.1f}"
            f" GB of {gpu_memory:g} GB: {'fits' if defaults.fits(row.peak_gib, gpu_memory) else 'DOES NOT FIT'}",
            f"host RAM while {num_processes} process(es) load their models: {host:.1f} GiB on the node",
            f"NFE per update: {row.nfe:g} planned / {row.stated_nfe:g} stated, {row.grad_nfe:g} with autograd"])
        report["plan"] = {**row.__dict__, "peak_gib": row.peak_gib, "host_gib": host}
    else:
        _print("memory plan", ["not planned: the plan covers the setting's shipped spec and training mode "
                               "(python -m full.bench measures another)"])
    # 3. downloads
    rows_dl = downloads(spec, s.script, launch.method_variant(s)[1])
    total = sum(r["gb"] for r in rows_dl if r["gb"] is not None)
    lines = [f"{r['source']} {r['part']}: " + (f"{r['parameters'] / 1e9:.2f} B parameters" if r["parameters"] else
                                                 "parameters not in the configs")
             + (f" x {r['dtype']} = {r['gb']:.1f} GB" if r["gb"] is not None else ", size unknown")
             + (f" ({r['note']})" if r["note"] else "") for r in rows_dl]
    lines.append(f"total known: {total:.1f} GB (Hugging Face cache: HF_HOME, ~/.cache/huggingface by default)")
    for key, src in data_sources(spec):
        lines.append(f"data set {key}: {src.get('dataset') or src.get('folder')} ({src.get('split', 'train')}): "
                     f"{dataset_size(src)}")
    _print("downloads (parameters from full/configs on the meta device x the weight files' dtype)", lines)
    report.update(downloads=rows_dl, download_gb=total)
    if not update:
        return report
    # 4. synthetic data and 5. the run
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"fewstep-rehearse-{name}-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        tick = time.perf_counter()
        before = rss_mb()
        spec_path, notes = rehearsal_spec(spec_file, root, rows)
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6
        _print(f"synthetic data ({time.perf_counter() - tick:.0f} s, {size:.0f} MB in {root})", [
            f"{key}: {src.get('data_files', {}).get('train', [src.get('folder')])[0]}" for key, src in
            data_sources(load_spec(str(spec_path)))] + notes + [f"rehearsal spec: {spec_path}"])
        result = run_update(name, spec_path, root / "run", extra)
        after = rss_mb()
        row = result["log"][-1]
        _print(f"run: one update at depth {DEPTH}, {RESOLUTION}^2, fp32 ({result['seconds']:.0f} s)", [
            "python " + shlex.join([s.script, *result["argv"]]),
            *[f"role {r['role']}: {r['scheduler']} -> sampler {r['sampler']} on {r['timesteps']}" for r in
              result["roles"]],
            *[f"opened {o['kind']} {o['source'].get('dataset') or o['source'].get('folder')}: {o['rows']:,} rows"
              for o in result["opened"]],
            "not opened: " + (", ".join(key for key, src in data_sources(load_spec(str(spec_path))) if not any(
                o["source"] == src for o in result["opened"])) or "-"),
            "log.csv: " + ", ".join(f"{k}={v}" for k, v in row.items() if v != ""),
            f"RSS {before[0]:.0f} MB before the data, {after[0]:.0f} MB after the run, peak {after[1]:.0f} MB"])
        rspec = load_spec(str(spec_path))
        tokens = prompt_tokens(spec)
        n, here, real = embedding_cache_size(root / "embeddings", rspec.max_sequence_length, tokens,
                                             BYTES.get(spec.dtype or "fp32", 4))
        _print("prompt embeddings (the embedding cache)", [
            f"{n:,} encoded: the opened data sets' captions and {PROMPTS} synthetic prompts ({here / 1e6:.0f} MB here, "
            f"fp32, {rspec.max_sequence_length or 77} tokens)",
            f"the real run: ~{real / max(n, 1) / 1e6:.2f} MB each ({spec.dtype or 'fp32'}"
            + (f", {tokens} tokens" if tokens else "") + f"), ~{real / 1e9:.2f} GB for these {n:,} (your prompt "
            "lists add theirs), " + ("all written before the first update (precompute_embeddings)"
                                     if spec.precompute_embeddings else "written as prompts are drawn")])
        report.update(run={k: result[k] for k in ("seconds", "log", "argv", "roles", "schedule", "opened")},
                      rss_mb={"before": before[0], "after": after[0], "peak": after[1]}, notes=notes,
                      embeddings={"count": n, "bytes_here": here, "bytes_real": real})
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return report


def verdict(report: dict) -> int:
    print(f"\nrehearsal of {report['setting']}: " + ("passed" if report["fits"] else "REFUSED (see above)"), flush=True)
    return 0 if report["fits"] else 1


def main_from_launcher(name: str, gpu_memory: float, num_processes: int, model: str | None, extra: list[str],
                       launcher: str) -> int:
    """`python -m full.launch SETTING --rehearse ...`: the defaults of `python -m full.rehearse`."""
    return verdict(rehearse(name, gpu_memory, num_processes, model, extra, launcher))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("setting", choices=sorted(launch.SETTINGS), metavar="SETTING")
    p.add_argument("--gpu-memory", type=float, default=80, help="GB per GPU of the machine the run is for")
    p.add_argument("--num-processes", type=int, default=1, help="processes (GPUs) of the run")
    p.add_argument("--model", help="a model spec replacing the setting's")
    p.add_argument("--launcher", default="accelerate", choices=["accelerate", "torchrun", "python"])
    p.add_argument("--rows", type=int, default=100_000, help="rows of the synthetic preference-pair set")
    p.add_argument("--keep", help="write the synthetic data, spec and run here and keep them (default: a temporary "
                                  "folder, removed)")
    p.add_argument("--no-update", action="store_true", help="command, memory plan and downloads only")
    p.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)
    report = rehearse(a.setting, a.gpu_memory, a.num_processes, a.model, extra, a.launcher, a.rows,
                      Path(a.keep) if a.keep else None, not a.no_update)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    return verdict(report)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
