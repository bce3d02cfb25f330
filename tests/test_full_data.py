"""What a full-backend run reads (docs/full.md "Data and prompt embeddings"): a run opens only the data sources it
uses (online PSO on FLUX-schnell with a pairs source that cannot be opened runs), precompute_embeddings counts the
prompts it encodes, prompt embeddings live on disk behind a bounded RAM cache, and preference pairs can be a subset
(split slicing, or streamed through a shuffle buffer) whose size is said on stderr when they are opened."""
import io
import json

import pytest
import torch

import full
from full import data as data_lib
from full import tiny
from full import world as world_mod

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return tiny.save_tiny_setup(tmp_path_factory.mktemp("schnell"), "flux_schnell", sample_size=8)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return tiny.save_tiny_setup(tmp_path_factory.mktemp("xl"), "sdxl", "lcm")


def _spec(path, tmp_path, **changes):
    spec = {**json.loads(path.read_text()), **changes}
    out = path.parent / f"spec-{tmp_path.name}.json"
    out.write_text(json.dumps(spec))
    return out


def test_online_pso_on_flux_schnell_never_opens_the_pairs(schnell, tmp_path):
    """The shipped FLUX-schnell spec's setting (precompute_embeddings, a Pick-a-Pic "pairs" source) on the tiny
    FLUX-schnell pipeline, with a pairs source that cannot be opened: online PSO runs (it reads prompts only);
    before, the world opened every source named in the spec at start-up and stopped there."""
    import pso

    spec = _spec(schnell, tmp_path, precompute_embeddings=True,
                 pairs={"dataset": "no-such-org/pickapic-that-does-not-exist", "split": "train"})
    with pytest.raises(data_lib.DataError, match="cannot load the data set 'no-such-org"):  # it cannot be opened
        data_lib.PreferencePairs(full.load_spec(str(spec)).pairs)
    out = pso.main(["--model", str(spec), "--variant", "online", "--steps", "1", "--batch", "2", "--eval-samples", "2",
                    "--eval-every", "100", "--no-naive-baseline", "--lora-rank", "2", "--out", str(tmp_path / "run")])
    assert out["nfe_per_update"] > 0 and (tmp_path / "run" / "adapter").is_dir()


def test_precompute_counts_the_prompts_it_encodes(xl, tmp_path, monkeypatch):
    """PRECOMPUTE_LIMIT bounds what precompute_embeddings actually encodes before training: the prompts count (the
    tiny setup has 4 + 2 + the negative prompt = 7), and texts already in the embedding cache do not."""
    monkeypatch.setattr(world_mod, "PRECOMPUTE_LIMIT", 6)
    monkeypatch.setenv("FEWSTEP_EMBEDDING_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="would encode 7 prompt embeddings of the prompts"):
        full.load_world(str(xl), precompute_embeddings=True)
    monkeypatch.setattr(world_mod, "PRECOMPUTE_LIMIT", 7)
    full.load_world(str(xl), precompute_embeddings=True)
    monkeypatch.setattr(world_mod, "PRECOMPUTE_LIMIT", 0)  # a second run finds all 7 on disk: nothing to encode
    w = full.load_world(str(xl), precompute_embeddings=True)
    assert w.parts.text_encoders == []


def test_prompt_embeddings_live_on_disk_behind_a_bounded_ram_cache(xl, tmp_path, monkeypatch):
    """Every encoded prompt is a safetensors file in a folder keyed by the model; RAM keeps at most EMBED_RAM_BYTES
    of them; an evicted one comes back from disk bit for bit; a new world on the same model reads the files instead
    of encoding; the same prompts under another max length / dtype get another folder."""
    monkeypatch.setenv("FEWSTEP_EMBEDDING_CACHE", str(tmp_path / "cache"))
    w = full.load_world(str(xl))
    one = sum(r.numel() * r.element_size() for r in w._rows(["a red cube"])[0])
    monkeypatch.setattr(w.embeddings, "ram_bytes", 3 * one)
    prompts = [f"prompt number {i}" for i in range(12)]
    first = w.encode(prompts)
    assert len(w.embeddings.ram) <= 3 and w.embeddings.bytes <= 3 * one
    assert len(list(w.embeddings.dir.glob("*.safetensors"))) >= 12 + 1
    again = w.encode(prompts)  # 9 of them were evicted: read back from disk
    assert torch.equal(first["prompt_embeds"], again["prompt_embeds"]) and torch.equal(first["text_embeds"],
                                                                                     again["text_embeds"])
    w2 = full.load_world(str(xl))
    monkeypatch.setattr(type(w2._encoder_pipe), "encode_prompt", lambda *a, **k: pytest.fail("encoded again"))
    assert torch.equal(w2.encode(prompts)["prompt_embeds"], first["prompt_embeds"])
    assert w2.embeddings.dir == w.embeddings.dir
    key = w._embedding_key()
    assert {"base", "dtype", "device", "max_sequence_length", "files"} <= set(key)  # "files": the local encoders
    assert data_lib.EmbeddingCache(tmp_path / "cache", {**key, "dtype": "torch.bfloat16"}, one).dir != w.embeddings.dir


def test_a_source_opened_during_the_run_gets_its_captions_encoded_once(xl, tmp_path, monkeypatch, capsys):
    """With precompute_embeddings the world frees its text encoders after the prompts; the pairs, opened when the run
    first draws them, bring them back to encode their captions, say so and how big the source is, and free them."""
    rows = [json.loads(r) for r in (xl.parent / "pairs" / "pairs.jsonl").read_text().splitlines()]
    (xl.parent / "pairs" / "other.jsonl").write_text("".join(
        json.dumps({**r, "caption": "new " + r["caption"]}) + "\n" for r in rows))  # captions no prompt file has
    spec = _spec(xl, tmp_path, pairs={"folder": "pairs", "file": "pairs/other.jsonl"})
    monkeypatch.setenv("FEWSTEP_EMBEDDING_CACHE", str(tmp_path / "cache"))
    w = full.load_world(str(spec), precompute_embeddings=True)
    assert w.parts.text_encoders == [] and w._encoder_pipe is None
    win, lose, cond = w.preference_pairs(2, torch.Generator().manual_seed(0))
    err = capsys.readouterr().err
    assert "loading the text encoders" in err and "3 captions of the preference pairs" in err
    assert "preference pairs" in err and "3 rows without ties (4 read, 1 ties dropped)" in err
    assert w.parts.text_encoders == [] and w._encoder_pipe is None and cond["prompt_embeds"].shape[0] == 2
    assert all(w.prompt_texts(cond)[i] in w.embeddings for i in range(2))


def test_preference_pairs_subset_by_split_slicing(xl, capsys):
    pairs = data_lib.PreferencePairs({"folder": str(xl.parent / "pairs"), "split": "train[:2]"})
    assert len(pairs) == 2 and pairs.captions() == ["a red cube", "a blue sphere"]
    assert "(train[:2]): 2 rows without ties (2 read, 0 ties dropped)" in capsys.readouterr().err


def _pickapic_parquet(path, n, seed=0):
    """n rows in the Pick-a-Pic v2 layout (caption, jpg_0 / jpg_1 image bytes, label_0 with some ties), several
    row groups."""
    import datasets
    import numpy as np
    from PIL import Image

    def png(i):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), i % 256, dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    labels = [1.0, 0.0, 0.5, 1.0]
    ds = datasets.Dataset.from_dict({"caption": [f"caption {i}" for i in range(n)],
                                     "jpg_0": [png(i) for i in range(n)], "jpg_1": [png(i + 1) for i in range(n)],
                                     "label_0": [labels[i % 4] for i in range(n)]})
    ds.to_parquet(str(path), batch_size=max(1, n // 5))
    return path


def test_preference_pairs_streamed_subset_through_a_shuffle_buffer(tmp_path, capsys):
    """{"streaming": true, "rows": N}: N rows of the streamed split through a shuffle buffer, written once to an Arrow
    file; the same seed gives the same rows, another seed others; the size is said on stderr; bad settings name the
    key."""
    path = _pickapic_parquet(tmp_path / "pickapic.parquet", 200)
    source = {"dataset": "parquet", "data_files": str(path), "streaming": True, "rows": 40, "shuffle_buffer": 50,
              "seed": 0, "cache_dir": str(tmp_path / "hf")}
    pairs = data_lib.PreferencePairs(source)
    assert len(pairs) + pairs.ties == 40 and 0 < pairs.ties < 40  # a quarter of the 200 rows are ties
    err = capsys.readouterr().err
    assert "streamed subset of 40 rows" in err
    assert f"{len(pairs)} rows without ties (40 read, {pairs.ties} ties dropped)" in err
    again = data_lib.PreferencePairs(source)
    assert again.captions() == pairs.captions()
    other = data_lib.PreferencePairs({**source, "seed": 1})
    assert other.captions() != pairs.captions()
    assert pairs.captions() != sorted(pairs.captions(), key=lambda c: int(c.split()[1]))  # shuffled
    win, lose = pairs.images(0, 8)
    assert win.shape == (3, 8, 8)
    with pytest.raises(data_lib.DataError, match='needs "rows" as an integer >= 1'):
        data_lib.PreferencePairs({**source, "rows": None})


def test_prepare_data_embed_fills_the_cache_so_the_run_encodes_nothing(xl, tmp_path, monkeypatch):
    from full import prepare_data

    monkeypatch.setenv("FEWSTEP_EMBEDDING_CACHE", str(tmp_path / "cache"))
    assert prepare_data.main(["embed", str(xl), "pairs", "data.target"]) == 0
    w = full.load_world(str(xl), precompute_embeddings=True)
    monkeypatch.setattr(w, "_text_encoders", lambda *a: pytest.fail("encoded again"))
    w.preference_pairs(2, torch.Generator().manual_seed(0))
    w.data(2, torch.Generator().manual_seed(0), "target")
