"""Bad input to the toy backend: damaged base-model caches, adapter states that do not fit, bad pairs files and bad
MNIST IDX files. Each case checks that the message names the file (or key) and the problem."""
import gzip
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import toy
from toy.pairs import load_pairs


# ------------------------------------------------------------------------------------------ base-model caches
@pytest.fixture
def builds(monkeypatch, request):
    """Replace the (seconds-long) base-model build by a copy of the session's tiny weights; records each build."""
    calls = []

    def fake_build(world, budget, progress=True):
        calls.append(world.name)
        source = request.getfixturevalue(f"{world.name}_tiny").weights
        return {role: {k: v.clone() for k, v in sd.items()} for role, sd in source.items()}

    monkeypatch.setattr(toy, "build_base_models", fake_build)
    return calls


def _cached(tmp_path, name="toy2d"):
    """Build the cache file once (fake build) and return its path."""
    toy.load_world(name, cache=tmp_path, budget="tiny", progress=False)
    (path,) = tmp_path.glob(f"{name}-tiny-*.safetensors")
    return path


def _rewrite(path, change):
    """Rewrite a cache file with a valid hash after `change(weights)`: damage the hash cannot see."""
    with safe_open(str(path), "pt") as f:
        spec = json.loads(f.metadata()["spec"])
        flat = {k: f.get_tensor(k) for k in f.keys()}
    weights = {}
    for k, v in flat.items():
        role, _, name = k.partition("/")
        weights.setdefault(role, {})[name] = v
    change(weights)
    toy._write(path, weights, spec)


def test_a_cache_file_carries_a_content_hash_and_is_read_back_without_a_rebuild(tmp_path, builds, capsys):
    path = _cached(tmp_path)
    with safe_open(str(path), "pt") as f:
        stored = f.metadata()["sha256"]
        assert stored == toy.content_hash({k: f.get_tensor(k) for k in f.keys()})
    capsys.readouterr()
    world = toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False)
    assert builds == ["toy2d"] and capsys.readouterr().err == ""
    assert set(world.weights) == {"teacher", "student", "generator"}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_flipped_byte_in_a_cache_file_is_found_and_the_file_rebuilt(tmp_path, builds, capsys):
    path = _cached(tmp_path)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's bytes: still a readable safetensors file
    path.write_bytes(bytes(data))
    capsys.readouterr()
    toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False)
    err = capsys.readouterr().err
    assert str(path) in err and "content hash mismatch" in err and "rebuilding" in err
    assert builds == ["toy2d", "toy2d"]
    toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False)  # the rebuilt file is good
    assert builds == ["toy2d", "toy2d"] and capsys.readouterr().err == ""


def test_a_cache_file_from_before_the_hash_is_rebuilt_once(tmp_path, builds, capsys, toy2d_tiny):
    path = _cached(tmp_path)
    with safe_open(str(path), "pt") as f:
        meta, flat = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(flat, str(path), metadata={"spec": meta["spec"]})  # what the old writer stored
    capsys.readouterr()
    toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False)
    err = capsys.readouterr().err
    assert str(path) in err and "no content hash" in err and builds == ["toy2d", "toy2d"]
    toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False)
    assert builds == ["toy2d", "toy2d"] and capsys.readouterr().err == ""


def test_a_truncated_cache_file_is_rebuilt_with_a_message(tmp_path, builds, capsys):
    path = _cached(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    capsys.readouterr()
    toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False)
    err = capsys.readouterr().err
    assert str(path) in err and "unreadable" in err and len(err.strip().splitlines()) == 2  # reason, then build
    assert builds == ["toy2d", "toy2d"]


def test_a_cache_file_missing_a_role_is_rebuilt(tmp_path, builds, capsys):
    path = _cached(tmp_path)
    _rewrite(path, lambda w: w.pop("generator"))
    capsys.readouterr()
    world = toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False)
    err = capsys.readouterr().err
    assert str(path) in err and "generator" in err and "missing" in err and builds == ["toy2d", "toy2d"]
    assert "generator" in world.weights


def test_a_cache_file_with_a_wrong_weight_shape_is_rebuilt(tmp_path, builds, capsys):
    path = _cached(tmp_path)
    _rewrite(path, lambda w: w["student"].update({"out.weight": torch.zeros(3, 3)}))
    capsys.readouterr()
    toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False)
    err = capsys.readouterr().err
    assert str(path) in err and "student" in err and "out.weight" in err and builds == ["toy2d", "toy2d"]


def test_an_mnist_cache_without_its_classifier_is_rebuilt(tmp_path, builds, capsys, mnist_tiny, monkeypatch):
    digits = mnist_tiny.images, mnist_tiny.labels, mnist_tiny.source
    monkeypatch.setattr(toy.mnist, "load_digits", lambda mnist_path=None: digits)  # skip re-reading the digits
    path = _cached(tmp_path, "mnist")
    _rewrite(path, lambda w: w.pop("classifier"))
    capsys.readouterr()
    world = toy.load_world("mnist", cache=tmp_path, budget="tiny", progress=False)
    err = capsys.readouterr().err
    assert str(path) in err and "classifier" in err and "missing" in err and builds == ["mnist", "mnist"]
    x, c = mnist_tiny.data(8, torch.Generator().manual_seed(0))
    assert torch.equal(world.reward(x, c), mnist_tiny.reward(x, c))  # the trained classifier, not a random one
    weights = {k: v for k, v in mnist_tiny.weights.items() if k != "classifier"}
    with pytest.raises(ValueError, match="lack the classifier"):
        toy.MNIST(weights)


def test_an_unwritable_cache_folder_is_found_before_the_build(tmp_path, builds, monkeypatch):
    (tmp_path / "a-file").write_text("")
    folder = tmp_path / "a-file" / "cache"  # cannot be created (this also holds when running as root)
    monkeypatch.setenv("FEWSTEP_CACHE", str(folder))
    with pytest.raises(OSError) as err:
        toy.load_world("toy2d", budget="tiny", progress=False)
    assert str(folder) in str(err.value) and "FEWSTEP_CACHE" in str(err.value) and "not writable" in str(err.value)
    assert builds == []  # nothing was built


def test_the_cache_write_is_fsynced_before_the_rename_and_a_failed_write_keeps_the_old_file(tmp_path, builds,
                                                                                             monkeypatch):
    path = _cached(tmp_path)
    events = []
    real_fsync, real_replace = toy.os.fsync, toy.os.replace
    monkeypatch.setattr(toy.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(toy.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    _rewrite(path, lambda w: None)
    assert events[:2] == ["fsync", "replace"]
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(toy.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        _rewrite(path, lambda w: w.pop("teacher"))
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]  # old file intact, no temp file


# ------------------------------------------------------------------------------------------ adapter states
def test_the_toy_backend_offers_decode_batch_and_module(toy2d_tiny):
    den = toy2d_tiny.denoiser("student", lora_rank=4)
    assert toy2d_tiny.decode_batch == 4096
    assert den.module is den.net and isinstance(den.module, torch.nn.Module)
    state = den.adapter_state()
    assert all(v.device.type == "cpu" for v in state.values())
    first = next(iter(state))
    state[first].add_(1)  # a copy: changing it does not change the model
    assert not torch.equal(state[first], den.adapter_state()[first])


@pytest.mark.parametrize("train_full", [False, True])
def test_an_adapter_state_that_does_not_fit_names_missing_unexpected_and_mismatched_keys(toy2d_tiny, train_full):
    den = toy2d_tiny.denoiser("student", lora_rank=4, train_full=train_full)
    state = den.adapter_state()
    keys = sorted(state)
    missing = {k: v for k, v in state.items() if k != keys[0]}
    with pytest.raises(ValueError, match="1 missing key") as err:
        den.load_adapter_state(missing)
    assert keys[0] in str(err.value)
    with pytest.raises(ValueError, match="1 unexpected key.*extra.weight"):
        den.load_adapter_state({**state, "extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"shape mismatch.*expected \[.*found \[7\]") as err:
        den.load_adapter_state({**state, keys[1]: torch.zeros(7)})
    assert keys[1] in str(err.value)
    other = toy2d_tiny.denoiser("student", lora_rank=4, train_full=train_full)
    other.load_adapter_state(state)  # the complete state still loads


def test_an_adapter_of_another_rank_is_refused(toy2d_tiny):
    state = toy2d_tiny.denoiser("student", lora_rank=4).adapter_state()
    with pytest.raises(ValueError, match=r"shape mismatch.*expected \[8, .*found \[4, "):
        toy2d_tiny.denoiser("student", lora_rank=8).load_adapter_state(state)


# ------------------------------------------------------------------------------------------ pairs files
GOOD = {"win": [0.0, 1.2], "lose": [1.2, 0.0], "cond": 2}


def _jsonl(*rows):
    return "\n".join(json.dumps(r) for r in rows).encode()


def _tensors(**change):
    t = {"win": torch.zeros(3, 2), "lose": torch.ones(3, 2), "cond": torch.tensor([0, 1, 2])}
    t.update(change)
    return t


def _st(tensors):
    from safetensors.torch import save

    return save(tensors)


def _pt(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class NotATensor:
    pass


PAIRS_CASES = {  # name: (file name, bytes, the problem the message must state)
    "string label": ("p.jsonl", _jsonl(GOOD, {**GOOD, "cond": "2"}), r"row 1: 'cond' is not an integer.*str '2'"),
    "float label": ("p.jsonl", _jsonl({**GOOD, "cond": 1.5}), r"row 0: 'cond' is not an integer.*1\.5"),
    "bool label": ("p.jsonl", _jsonl({**GOOD, "cond": True}), r"row 0: 'cond' is not an integer.*True"),
    "label list": ("p.jsonl", _jsonl({**GOOD, "cond": [1, 2]}), r"row 0: 'cond' is not an integer"),
    "label out of range": ("p.jsonl", _jsonl(GOOD, GOOD, {**GOOD, "cond": 3}), r"row 2: label 3 .*out of range.*0\.\.2"),
    "negative label": ("p.jsonl", _jsonl({**GOOD, "cond": -1}), r"row 0: label -1 .*0\.\.2"),
    "wrong shape": ("p.jsonl", _jsonl({**GOOD, "lose": [1.0, 2.0, 3.0]}), r"row 0: 'lose' has shape \(3,\); expected .*\(2,\)"),
    "ragged image": ("p.jsonl", _jsonl({**GOOD, "win": [[1.0], 2.0]}), r"row 0: 'win' is not a numeric array"),
    "string image": ("p.jsonl", _jsonl({**GOOD, "win": ["a", "b"]}), r"row 0: 'win' is not a numeric array"),
    "object image": ("p.jsonl", _jsonl({**GOOD, "win": {"x": 1}}), r"row 0: 'win' is not a numeric array.*dict"),
    "NaN": ("p.jsonl", b'{"win": [NaN, 1.0], "lose": [1.0, 0.0], "cond": 0}', r"row 0: 'win' has 1 NaN or inf"),
    "missing image": ("p.jsonl", _jsonl(GOOD, {"win": [0.0, 1.2], "cond": 1}), r"row 1: missing 'lose'"),
    "non-UTF-8": ("p.jsonl", _jsonl(GOOD) + b"\n" + b'{"win": [0, 1], "lose": [1, 0], "cond": 0, "n": "\xff"}',
                  r"row 1 \(line 2\): not UTF-8 text \(byte 0xff"),
    "bad JSON": ("p.jsonl", _jsonl(GOOD) + b"\n{win: 1}", r"row 1 \(line 2\): not valid JSON"),
    "not an object": ("p.jsonl", b"[1, 2]", r"row 0 \(line 1\): expected an object.*list"),
    "empty jsonl": ("p.jsonl", b"", r"is empty"),
    "blank jsonl": ("p.jsonl", b"\n\n  \n", r"has no rows"),
    "truncated safetensors": ("p.safetensors", _st(_tensors())[:-5], r"not a readable \.safetensors file"),
    "garbage safetensors": ("p.safetensors", b"\x00garbage" * 20, r"not a readable \.safetensors file"),
    "empty safetensors": ("p.safetensors", b"", r"is empty"),
    "safetensors wrong shape": ("p.safetensors", _st(_tensors(win=torch.zeros(3, 5))),
                                r"row 0: 'win' has shape \(5,\)"),
    "safetensors NaN": ("p.safetensors", _st(_tensors(lose=torch.tensor([[0.0, 0], [0, float("nan")], [0, 0]]))),
                        r"row 1: 'lose' has 1 NaN"),
    "safetensors float label": ("p.safetensors", _st(_tensors(cond=torch.tensor([0.0, 1.5, 2.0]))),
                                r"row 1: 'cond' is not an integer"),
    "safetensors row counts": ("p.safetensors", _st(_tensors(cond=torch.tensor([0, 1]))),
                               r"different numbers of rows \(win 3, lose 3, cond 2\)"),
    "safetensors missing key": ("p.safetensors", _st({"win": torch.zeros(3, 2), "cond": torch.zeros(3)}),
                                r"no 'lose' tensor.*found keys \['cond', 'win'\]"),
    "garbage pt": ("p.pt", b"this is not a torch file" * 3, r"not a readable \.pt file"),
    "truncated pt": ("p.pt", _pt(_tensors())[:100], r"not a readable \.pt file"),
    "pickled object pt": ("p.pt", _pt({"win": NotATensor()}), r"not a readable \.pt file.*weights_only|not a readable"),
    "list pt": ("p.pt", _pt([torch.zeros(3, 2)]), r"expected a dict of tensors.*list"),
    "non-tensor value pt": ("p.pt", _pt(_tensors(win=[[0.0, 1.0]] * 3)),
                            r"key 'win': expected a tensor with one row per pair; found list"),
    "0-dim pt": ("p.pt", _pt(_tensors(cond=torch.tensor(1))), r"key 'cond': expected a tensor.*0-dim"),
    "empty pt": ("p.pt", b"", r"is empty"),
    "unknown suffix": ("p.csv", b"win,lose,cond\n", r"unknown format '\.csv'"),
}


@pytest.mark.parametrize("case", PAIRS_CASES)
def test_a_bad_pairs_file_is_named_with_its_problem(case, tmp_path):
    name, data, problem = PAIRS_CASES[case]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=problem) as err:
        load_pairs(path, (2,), 3)
    assert f"pairs file {path}" in str(err.value)


def test_a_missing_pairs_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as err:
        load_pairs(tmp_path / "nope.jsonl", (2,), 3)
    assert str(tmp_path / "nope.jsonl") in str(err.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".safetensors", ".pt"])
def test_a_good_pairs_file_loads_in_every_format(suffix, tmp_path):
    path = tmp_path / f"p{suffix}"
    t = _tensors(cond=torch.tensor([0.0, 1.0, 2.0]) if suffix == ".pt" else torch.tensor([0, 1, 2]))
    if suffix == ".jsonl":
        path.write_bytes(_jsonl(*[{"win": t["win"][i].tolist(), "lose": t["lose"][i].tolist(),
                                   "cond": int(t["cond"][i])} for i in range(3)]))
    else:
        path.write_bytes(_st(t) if suffix == ".safetensors" else _pt(t))
    win, lose, cond = load_pairs(path, (2,), 3)
    assert torch.equal(win, t["win"]) and torch.equal(lose, t["lose"]) and cond.tolist() == [0, 1, 2]
    assert cond.dtype == torch.long


# ------------------------------------------------------------------------------------------ MNIST IDX files
def _idx(ndim, dims, payload, magic=None):
    return bytes(magic or [0, 0, 8, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


IMAGES = np.zeros((3, 28, 28), dtype=np.uint8).tobytes()
GOOD_IMAGES = _idx(3, [3, 28, 28], IMAGES)
GOOD_LABELS = _idx(1, [3], bytes([3, 1, 4]))

IDX_CASES = {  # name: (images file bytes, labels file bytes, gzip the images?, which file is named, problem)
    "empty images": (b"", GOOD_LABELS, False, "images", r"is empty"),
    "empty gzip": (b"", GOOD_LABELS, True, "images", r"is empty"),
    "bad gzip": (b"not gzip at all", GOOD_LABELS, True, "images", r"not a valid gzip file"),
    "truncated gzip": (gzip.compress(GOOD_IMAGES)[:-20], GOOD_LABELS, True, "images", r"not a valid gzip file"),
    "float dtype": (_idx(3, [3, 28, 28], IMAGES, magic=[0, 0, 0x0D, 3]), GOOD_LABELS, False, "images",
                    r"bad magic number 00 00 0d 03; expected 00 00 08 03"),
    "wrong magic": (b"\x1f\x8b" + GOOD_IMAGES[2:], GOOD_LABELS, False, "images", r"bad magic number 1f 8b 08 03"),
    "labels as images": (GOOD_LABELS, GOOD_LABELS, False, "images", r"expected 00 00 08 03"),
    "short header": (bytes([0, 0, 8, 3, 0, 0]), GOOD_LABELS, False, "images", r"truncated header \(6 bytes\)"),
    "too few bytes": (GOOD_IMAGES[:-100], GOOD_LABELS, False, "images", r"3x28x28 = 2352 bytes.*2252 bytes"),
    "too many bytes": (GOOD_IMAGES + b"\0", GOOD_LABELS, False, "images", r"2352 bytes.*2353 bytes"),
    "wrong image size": (_idx(3, [3, 32, 32], bytes(3 * 32 * 32)), GOOD_LABELS, False, "images", r"32x32 pixels"),
    "labels too short": (GOOD_IMAGES, GOOD_LABELS[:-1], False, "labels", r"sizes 3 = 3 bytes.*2 bytes"),
    "label not a digit": (GOOD_IMAGES, _idx(1, [3], bytes([3, 12, 4])), False, "labels", r"label 1: 12; expected a digit"),
}


@pytest.mark.parametrize("case", IDX_CASES)
def test_a_bad_mnist_idx_file_is_named_with_its_problem(case, tmp_path):
    images, labels, gzipped, named, problem = IDX_CASES[case]
    image_file = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gzipped else ""))
    image_file.write_bytes(images)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(ValueError, match=problem) as err:
        toy.mnist.load_digits(str(tmp_path))
    named_file = image_file if named == "images" else tmp_path / "train-labels-idx1-ubyte"
    assert f"MNIST IDX file {named_file}" in str(err.value)


def test_mnist_idx_files_with_different_counts_name_both_files(tmp_path, monkeypatch):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(GOOD_IMAGES)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(1, [2], bytes([3, 1])))
    monkeypatch.setenv("MNIST_PATH", str(tmp_path))
    with pytest.raises(ValueError, match="3 images.*2 labels") as err:
        toy.mnist.load_digits()
    assert str(tmp_path / "train-images-idx3-ubyte") in str(err.value)
    assert str(tmp_path / "train-labels-idx1-ubyte") in str(err.value)


# ------------------------------------------------------------------------------------------ --model options
def test_a_model_value_carries_world_options_and_bad_ones_are_named(tmp_path, builds):
    import harness

    world = harness.load_world("toy2d:reward=modes", cache=tmp_path, budget="tiny", progress=False)
    assert world.reward_kind == "modes" and world.name == "toy2d"
    x = world.modes("base")[[2, 6]]  # mode 2 (90 degrees) is preferred, mode 6 (270 degrees) is not
    r = world.reward(x, torch.zeros(2, dtype=torch.long))
    assert r[0] > 0.99 and r[1] < 0.01  # the in-distribution optimum, not the height
    assert toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False).reward_kind == "modes"  # default
    height = harness.load_world("toy2d:reward=height", cache=tmp_path, budget="tiny", progress=False)
    assert height.reward_kind == "height" and torch.allclose(height.reward(x, torch.zeros(2, dtype=torch.long)), x[:, 1])  # the unbounded option
    assert len(list(tmp_path.glob("toy2d-tiny-*.safetensors"))) == 1  # options share the base models' cache
    for bad, match in [("toy2d:reward=aesthetic", r"reward='aesthetic', expected one of \['modes', 'height'\]"),
                       ("toy2d:beta=5", r"unknown world option 'beta=5' for 'toy2d'; expected reward=<modes\|height>"),
                       ("mnist:reward=modes",
                        r"mnist:reward=modes'?: reward='modes', expected one of \['logprob', 'prob', 'logit'\]"),
                       ("mnist:beta=5",
                        r"unknown world option 'beta=5' for 'mnist'; expected reward=<logprob\|prob\|logit>")]:
        with pytest.raises(ValueError, match=match):
            harness.load_world(bad, cache=tmp_path, budget="tiny", progress=False)
