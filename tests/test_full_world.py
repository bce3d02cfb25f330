"""full/ world side of a real SDXL run (issue 13) on tiny random pipelines: the trained UNet through
accelerator.prepare, loading in the weight dtype, mixed precision from accelerate, the VAE outside autocast,
decode_batch bounds, lazily read data sets, precomputed embeddings with evaluation and LoRA fusion, the paper's
defaults, and errors that name the file and key. The 2-process DDP checks are in tests/test_full_runs.py."""
import gc
import json
import tracemalloc

import pytest
import torch

import full
from full import data as data_lib
from full import defaults, evaluate, models, tiny
from full.spec import RoleSpec, load_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def xl_spec(tmp_path_factory):
    return tiny.save_tiny_setup(tmp_path_factory.mktemp("xl13"), "sdxl", "lcm")


@pytest.fixture(scope="module")
def xl(xl_spec):
    return full.load_world(str(xl_spec))


def write_spec(xl_spec, name, **changes):
    spec = {**json.loads(xl_spec.read_text()), **changes}
    path = xl_spec.parent / name
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture
def fresh_accelerate():
    """accelerate's state is a process-wide singleton: start empty so a test may pick its precision, and put back the
    state it found (the session's toy worlds hold Accelerators that read it)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    saved = [(cls, dict(cls._shared_state)) for cls in (PartialState, AcceleratorState, GradientState)]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for cls, state in saved:
        cls._shared_state.clear()
        cls._shared_state.update(state)


# --------------------------------------------------------------------------------------------- the trained module
def test_grad_calls_go_through_the_prepared_module_and_frozen_or_no_grad_calls_do_not(xl):
    den = xl.denoiser("student", lora_rank=4)
    assert den.module is not None and getattr(den.module, "_is_accelerate_prepared", False)
    calls = []
    real = den.module

    class Spy(torch.nn.Module):
        def forward(self, *a, **kw):
            calls.append(torch.is_grad_enabled())
            return real(*a, **kw)

    den.module = Spy()
    x, cond = torch.randn(1, *xl.shape), xl.encode(["a"])
    den(x, 500, cond).sum().backward()  # a training call: through DDP's wrapper (here: the prepared UNet)
    with torch.no_grad():
        den(x, 500, cond)  # sampling without a graph: the plain UNet
    with den.frozen():
        den(x, 500, cond)  # the reference (adapter disabled): the plain UNet, even with grad enabled
    assert calls == [True]


def test_adapter_state_is_a_cpu_copy(xl):
    den = xl.denoiser("student", lora_rank=4)
    state = den.adapter_state()
    assert all(v.device.type == "cpu" for v in state.values())
    before = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for p in den.trainable_parameters():
            p.add_(1.0)
    assert all(torch.equal(state[k], before[k]) for k in state)  # not a view of the live weights


def test_unets_are_loaded_in_the_weight_dtype_and_train_full_loads_its_reference_instead_of_copying(xl, monkeypatch):
    parts, spec = xl.parts, xl.spec
    unet = models.load_unet(spec, RoleSpec(), parts, "test", torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    seen = []
    real = models.load_unet

    def spy(*a, **kw):
        seen.append(a[4] if len(a) > 4 else kw.get("dtype"))
        return real(*a, **kw)

    monkeypatch.setattr(models, "load_unet", spy)
    import copy

    real_copy = copy.deepcopy

    def no_module_copies(obj, *a, **k):
        if isinstance(obj, torch.nn.Module):
            pytest.fail("deepcopy of a UNet")
        return real_copy(obj, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", no_module_copies)
    den = xl.denoiser("teacher", train_full=True)
    assert seen == [torch.float32, xl.dtype] and den.reference_unet is not den.unet
    assert all(p.dtype == torch.float32 and p.requires_grad for p in den.unet.parameters())
    assert not any(p.requires_grad for p in den.reference_unet.parameters())


def test_a_unet_file_is_loaded_into_an_empty_unet_not_over_the_base_weights(xl_spec, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    other = tiny.save_tiny_unet(tmp_path / "other", "sdxl", seed=7, sample_size=8)
    ref = UNet2DConditionModel.from_pretrained(other)
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    path = write_spec(xl_spec, "file_role.json",
                      roles={"student": {"unet": str(tmp_path), "unet_file": "w.safetensors"}})
    world = full.load_world(str(path))
    real = UNet2DConditionModel.from_pretrained
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pytest.fail("the base UNet was loaded")))
    den = world.denoiser("student", lora_rank=4)
    x, cond = torch.randn(1, *world.shape), world.encode(["a"])
    kw = {"encoder_hidden_states": cond["prompt_embeds"],
          "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}}
    with torch.no_grad():
        assert torch.allclose(den(x, 500, cond), ref(x, torch.tensor([500]), **kw).sample, atol=1e-5)
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", real)
    state = ref.state_dict()
    state.pop(next(iter(state)))
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(full.ModelError, match=r"w.safetensors .* does not fit the unet .*missing \["):
        world.denoiser("student")


# --------------------------------------------------------------------------------------------- precision
def test_mixed_precision_comes_from_accelerate_unless_the_spec_names_a_dtype(xl_spec, monkeypatch, fresh_accelerate):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    spec = json.loads(xl_spec.read_text())
    assert "dtype" not in spec
    world = full.load_world(str(xl_spec))
    assert world.dtype == torch.bfloat16 and world.accelerator.mixed_precision == "bf16"
    assert {p.dtype for p in world.parts.text_encoders[0].parameters()} == {torch.bfloat16}
    den = world.denoiser("student", lora_rank=4)
    frozen = {p.dtype for p in den.unet.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and all(p.dtype == torch.float32 for p in den.trainable_parameters())


def test_a_spec_dtype_wins_over_accelerates_configuration(xl_spec, monkeypatch, fresh_accelerate):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    world = full.load_world(str(xl_spec), dtype="fp32")
    assert world.dtype == torch.float32


def test_vae_decode_runs_outside_the_callers_autocast_in_the_vae_dtype(xl):
    from full.world import vae_dtype

    assert vae_dtype(torch.float16, {"force_upcast": True}, fixed_vae=False) == torch.float32  # SDXL's VAE
    assert vae_dtype(torch.float16, {"force_upcast": True}, fixed_vae=True) == torch.float16  # the fp16-fix VAE
    assert vae_dtype(torch.bfloat16, {"force_upcast": True}, fixed_vae=False) == torch.bfloat16
    seen = []
    hook = xl.vae.decoder.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the methods' accelerator.autocast()
            images = xl.decode(torch.randn(1, *xl.shape))
    finally:
        hook.remove()
    assert seen == [xl.vae_dtype] == [torch.float32] and images.dtype == torch.float32


# --------------------------------------------------------------------------------------------- bounded transients
def test_no_vae_or_reward_call_sees_more_than_decode_batch_rows(xl_spec, tmp_path):
    world = full.load_world(str(xl_spec), decode_batch=2)
    assert world.decode_batch == 2
    sizes = {"vae": [], "reward": []}
    hooks = [world.vae.decoder.register_forward_hook(lambda m, i, o: sizes["vae"].append(len(i[0])))]
    for which in ("reward", "quality", "clip"):
        hooks.append(world.reward_model(which).register_forward_hook(
            lambda m, i, o: sizes["reward"].append(len(i[0]))))
    x0, cond = torch.randn(5, *world.shape), world.encode(["a", "b", "c", "d", "e"])
    r = world.reward(x0, cond)
    assert r.shape == (5,) and sum(sizes["vae"]) == 5
    world.metrics(x0, cond)
    world.plot_samples({"x": (torch.randn(6, *world.shape), world.encode(list("abcdef")))}, tmp_path / "s.png")
    pipe = world.pipeline("student")
    unet_rows = []
    hooks.append(pipe.unet.register_forward_hook(lambda m, i, o: unet_rows.append(len(i[0]))))
    sampler, grid = world.role_sampler("student")
    evaluate.sample_latents(world, pipe, ["a", "b", "c", "d", "e"], 0, grid, sampler, 0.0)
    for h in hooks:
        h.remove()
    assert max(sizes["vae"]) <= 2 and max(sizes["reward"]) <= 2 and max(unet_rows) <= 2, (sizes, unet_rows)


# --------------------------------------------------------------------------------------------- data
def _png_bytes(seed, size=48):
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _pairs_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = [[1.0, 0.0, 0.5][i % 3] for i in range(rows)]
    table = pa.table({"caption": [f"prompt {i}" for i in range(rows)],
                      "jpg_0": [_png_bytes(2 * i) for i in range(rows)],
                      "jpg_1": [_png_bytes(2 * i + 1) for i in range(rows)], "label_0": labels})
    pq.write_table(table, path)
    return path


def _retained_bytes(build):
    gc.collect()
    tracemalloc.start()
    obj = build()
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return obj, current


def test_preference_pairs_memory_does_not_grow_with_the_number_of_rows(tmp_path):
    small = _pairs_parquet(tmp_path / "small.parquet", 30)
    large = _pairs_parquet(tmp_path / "large.parquet", 300)  # 10x the rows: ~9 MB more image bytes
    src = lambda f: {"dataset": "parquet", "data_files": str(f), "cache_dir": str(tmp_path / "cache")}  # noqa: E731
    data_lib.PreferencePairs(src(small))  # warm up: imports and datasets' one-time caches
    pairs_small, mem_small = _retained_bytes(lambda: data_lib.PreferencePairs(src(small)))
    pairs_large, mem_large = _retained_bytes(lambda: data_lib.PreferencePairs(src(large)))
    assert len(pairs_small) == 20 and pairs_large.ties == 100 and len(pairs_large) == 200
    assert mem_large - mem_small < 1_000_000, (mem_small, mem_large)  # the old list kept every image: +9 MB
    win, lose = pairs_large.images(1, 16)  # row 1 has label 0: jpg_1 preferred
    assert torch.equal(win, data_lib.to_tensor(_png_bytes(3), 16, "")) and pairs_large.caption(1) == "prompt 1"
    assert torch.equal(lose, data_lib.to_tensor(_png_bytes(2), 16, ""))


def test_a_bad_label_is_named_with_its_row(tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"caption": "a", "jpg_0": "x.png", "jpg_1": "y.png", "label_0": 1}\n'
                                          '{"caption": "b", "jpg_0": "x.png", "jpg_1": "y.png", "label_0": 2}\n')
    with pytest.raises(data_lib.DataError, match=r"row 1 of .*pairs.jsonl: label_0=2"):
        data_lib.PreferencePairs({"folder": str(tmp_path), "cache_dir": str(tmp_path / "cache")})


def test_image_caption_sets_from_a_dataset_and_a_metadata_folder_are_read_lazily(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [{"bytes": _png_bytes(i), "path": None} for i in range(4)],
                             "text": [f"cap {i}" for i in range(4)]}), tmp_path / "d.parquet")
    ds = data_lib.ImageCaptions({"dataset": "parquet", "data_files": str(tmp_path / "d.parquet"),
                                 "cache_dir": str(tmp_path / "cache")})
    assert len(ds) == 4 and ds.caption(2) == "cap 2" and ds.captions() == [f"cap {i}" for i in range(4)]
    assert torch.equal(ds.image(2, 16), data_lib.to_tensor(_png_bytes(2), 16, ""))
    folder = tmp_path / "folder"
    folder.mkdir()
    tiny._png(folder / "a.png", 0)
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a cube"}\n')
    ds = data_lib.ImageCaptions({"folder": str(folder), "cache_dir": str(tmp_path / "cache")})
    assert ds.captions() == ["a cube"] and torch.equal(ds.image(0, 16), data_lib.to_tensor(folder / "a.png", 16, ""))
    with pytest.raises(data_lib.DataError, match="has no caption column: expected one of \\['txt'\\]"):
        data_lib.ImageCaptions({"dataset": "parquet", "data_files": str(tmp_path / "d.parquet"),
                                "caption_column": "txt", "cache_dir": str(tmp_path / "cache")})


def test_missing_spec_paths_are_named_before_any_model_is_loaded(xl_spec, monkeypatch):
    path = write_spec(xl_spec, "missing_paths.json", prompts="data/pickapic_train_prompts.txt",
                      pairs={"folder": "data/nothing_here"})
    monkeypatch.setattr(models, "load_parts", lambda *a, **k: pytest.fail("a model was loaded first"))
    with pytest.raises(FileNotFoundError, match=r"(?s)prompts: .*data/pickapic_train_prompts.txt.*pairs.folder"):
        full.load_world(str(path))


# --------------------------------------------------------------------------------------------- precompute
def _tiny_distill_lora(out, seed=3):
    """A random LoRA on more layers than ours (as LCM-LoRA is), in the diffusers format."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = tiny.tiny_unet(True, 8)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=layers)
    return out


def test_precomputed_embeddings_with_a_fused_distillation_lora(xl_spec, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    lora = _tiny_distill_lora(tmp_path / "lcm_lora")
    path = write_spec(xl_spec, "lcm_pre.json", precompute_embeddings=True,
                      roles={"student": {"lora": str(lora), "scheduler": "LCMScheduler"}})
    world = full.load_world(str(path))
    assert world._encoder_pipe is None  # the text encoders are gone ...
    den = world.denoiser("student", lora_rank=4)  # ... and the LoRA still fuses
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_spec.parent / "pipeline")
    x, cond = torch.randn(1, *world.shape), world.encode(["a red cube"])
    kw = {"encoder_hidden_states": cond["prompt_embeds"],
          "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}}
    with torch.no_grad():
        plain = pipe.unet(x, 500, **kw).sample
        pipe.load_lora_weights(lora)
        pipe.fuse_lora()
        fused = pipe.unet(x, 500, **kw).sample
        ours = den(x, 500, cond)
    assert torch.allclose(ours, fused, atol=1e-5) and not torch.allclose(plain, fused, atol=1e-4)


def test_precomputed_embeddings_with_evaluation(xl_spec, tmp_path, monkeypatch):
    world = full.load_world(str(xl_spec))
    den = world.denoiser("student", lora_rank=4)
    with torch.no_grad():
        for p in den.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    world.save_adapter(den, tmp_path / "adapter")
    path = write_spec(xl_spec, "eval_pre.json", precompute_embeddings=True)
    loads = []
    real = models.load_unet
    monkeypatch.setattr(models, "load_unet", lambda *a, **k: loads.append(1) or real(*a, **k))
    res = evaluate.evaluate(str(path), [str(tmp_path / "adapter")], None, 2, 0, "student", 0.0, None,
                            str(tmp_path / "eval"))
    assert set(res) == {"base", f"{tmp_path.name}/adapter"} and len(loads) == 1  # the role's UNet loaded once
    assert res["base"]["pickscore"] != res[f"{tmp_path.name}/adapter"]["pickscore"]
    assert (tmp_path / "eval" / "results.json").is_file()


def test_evaluate_refuses_an_adapter_with_missing_or_extra_weights_naming_the_file(xl, xl_spec, tmp_path):
    import re

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    xl.save_adapter(xl.denoiser("student", lora_rank=4), tmp_path / "adapter")
    f = tmp_path / "adapter" / "pytorch_lora_weights.safetensors"
    with safe_open(str(f), "pt") as sf:
        meta = sf.metadata()
    state = load_file(str(f))
    keys = sorted(state)
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, str(f), metadata=meta)  # half the layers' weights
    with pytest.raises(ValueError, match=rf"--lora {re.escape(str(f))}: {len(keys) - len(keys) // 2} of the "
                                         rf"{len(keys)} LoRA weights of the unet's .* are missing .* and 0 of its "
                                         rf"{len(keys) // 2} weights are not of this unet"):
        evaluate.evaluate(str(xl_spec), [str(tmp_path / "adapter")], None, 2, 0, "student", 0.0, None,
                          str(tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()  # refused before any sample or file
    save_file({**state, "unet.mid_block.extra.lora.down.weight": state[keys[0]].clone()}, str(f), metadata=meta)
    with pytest.raises(ValueError, match=rf"0 of the {len(keys)} .* and 1 of its {len(keys) + 1} weights are not of "
                                         r"this unet \(e.g. mid_block.extra A\)"):
        evaluate.check_adapter(str(tmp_path / "adapter"), xl.pipeline("student").unet, "unet")
    save_file(state, str(f), metadata=meta)
    evaluate.check_adapter(str(tmp_path / "adapter"), xl.pipeline("student").unet, "unet")  # the whole adapter fits


# --------------------------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("method, variant, expect", [
    ("pso", "online", dict(lr=1e-5, beta=5.0, eval_samples=256)),
    ("pso", "offline", dict(lr=1e-5, beta=50.0, steps=5000)),
    ("sharpening", "rlhf", dict(lr=5e-6, beta=2500.0, adam_beta1=0.0, adam_beta2=0.99, final_samples=256)),
    ("diff_instruct_pp", "dipp", dict(lr=5e-6, reward_scale=100.0, cfg_scale=4.5, eval_samples=256)),
])
def test_method_defaults_are_the_papers_and_name_real_config_fields(xl, method, variant, expect):
    d = xl.method_defaults(method, variant)
    assert {k: d[k] for k in expect} == expect
    assert set(d) <= defaults.config_fields(method)
    assert 1 <= d["batch"] <= defaults.GLOBAL_BATCH[(method, variant)]
    assert xl.method_defaults(method, "nonexistent") == {}


def test_planned_per_gpu_batch_fits_and_accumulation_reaches_the_global_batch():
    from full import launch

    for name, s in launch.SETTINGS.items():
        method, variant = launch.method_variant(s)
        for gb in defaults.CARDS:
            for procs in (1, 2, 8):
                m = defaults.planned_batch(name, gb, procs, s.batch // procs)
                if s.batch % procs or m is None:
                    continue
                k = defaults.accumulation_steps(method, variant, m, procs)
                assert m * k * procs == s.batch and defaults.fits(defaults.planned_peak(name, m, procs), gb)


def test_a_run_on_a_settings_spec_gets_the_plans_batch_for_its_card(monkeypatch):
    """method_defaults' batch: the memory plan's for the card (a launcher setting's model), 1 for anything else
    or without CUDA; a full fine-tuning setting's plain run (the paper defaults train a LoRA) uses its LoRA row."""
    from types import SimpleNamespace

    from full import launch

    spec = load_spec(str(launch.SPECS / "sdxl_dmd2.json"))
    assert defaults.setting_of("pso", "online", spec) == "pso-online-dmd2"
    world = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1), device=None, spec=spec)
    assert defaults.default_batch("pso", "online", world) == 1  # no CUDA here
    monkeypatch.setattr(defaults, "gpu_memory_gb", lambda device=None: 80.0)
    assert defaults.default_batch("pso", "online", world) == defaults.planned_batch("pso-online-dmd2", 80, 1, 32) > 1
    base = load_spec(str(launch.SPECS / "sdxl_base.json"))
    lora = defaults.planned_batch("sharpening-rlhf-sdxl", 80, 1, 8, "lora")
    assert defaults.default_batch("sharpening", "rlhf", SimpleNamespace(**{**vars(world), "spec": base})) == lora
    other = load_spec(str(launch.SPECS / "sdxl_dmd2.json"), resolution=512)
    assert defaults.default_batch("pso", "online", SimpleNamespace(**{**vars(world), "spec": other})) == 1


# --------------------------------------------------------------------------------------------- errors
def test_malformed_model_index_names_the_file_and_what_was_expected(xl_spec, tmp_path):
    import shutil

    broken = tmp_path / "pipe"
    shutil.copytree(xl_spec.parent / "pipeline", broken)
    index = broken / "model_index.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    with pytest.raises(full.ModelError, match=r"model_index.json is not valid JSON .*line \d+"):
        full.load_world(str(broken))
    index.write_text(json.dumps({**json.loads(text), "unet": "UNet2DConditionModel"}))
    with pytest.raises(full.ModelError, match=r"model_index.json: key 'unet' must be \[library, class\].*found "
                                              r"'UNet2DConditionModel'"):
        full.load_world(str(broken))
    index.write_text("[1, 2]")
    with pytest.raises(full.ModelError, match="expected a JSON object .*found a list"):
        full.load_world(str(broken))


def test_malformed_specs_name_the_file_and_the_line(tmp_path):
    (tmp_path / "s.json").write_text('{"base": "stabilityai/sdxl-turbo", "dtype": ')
    with pytest.raises(ValueError, match=r"model spec .*s.json: not valid JSON .*line 1"):
        load_spec(str(tmp_path / "s.json"))
    (tmp_path / "e.json").write_text("")
    with pytest.raises(ValueError, match="the file is empty"):
        load_spec(str(tmp_path / "e.json"))
    pytest.importorskip("yaml")
    (tmp_path / "s.yaml").write_text("base: [unclosed\n")
    with pytest.raises(ValueError, match=r"model spec .*s.yaml: not valid YAML"):
        load_spec(str(tmp_path / "s.yaml"))
    (tmp_path / "e.yaml").write_text("")
    with pytest.raises(ValueError, match=r"must hold a mapping .*found nothing \(empty file\)"):
        load_spec(str(tmp_path / "e.yaml"))
    (tmp_path / "r.json").write_text('{"base": "x/y", "roles": {"student": "dmd2"}}')
    with pytest.raises(ValueError, match="role student must be a mapping"):
        load_spec(str(tmp_path / "r.json"))


def test_a_hub_id_with_the_hub_offline_says_so(fresh_accelerate):
    with pytest.raises(full.ModelError, match=r"nobody-here/no-such-model.*the hub is offline \(HF_HUB_OFFLINE=1\) "
                                              r"and .* is not in the local cache"):
        full.load_world("nobody-here/no-such-model")


def test_adam_8bit_without_bitsandbytes_is_a_clear_error(xl_spec, fresh_accelerate):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    world = full.load_world(str(xl_spec), adam_8bit=True)
    den = world.denoiser("student", lora_rank=4)
    with pytest.raises(ImportError, match=r"adam_8bit.*pip install bitsandbytes"):
        world.accelerator.prepare(torch.optim.AdamW(den.trainable_parameters(), lr=1e-4))


# --------------------------------------------------------------------------------------------- prepare_data
def test_prepare_data_writes_what_the_loaders_read_and_check_names_the_missing_files(tmp_path, xl_spec, capsys):
    from full import prepare_data

    parquet = _pairs_parquet(tmp_path / "p.parquet", 6)
    base = ["--dataset", "parquet", "--data-files", str(parquet)]
    prepare_data.main(["prompts", str(tmp_path / "data" / "prompts.txt"), *base, "--unique", "--limit", "4"])
    assert data_lib.load_prompts(str(tmp_path / "data" / "prompts.txt")) == [f"prompt {i}" for i in range(4)]
    prepare_data.main(["pairs", str(tmp_path / "data" / "pairs"), *base])
    pairs = data_lib.PreferencePairs({"folder": str(tmp_path / "data" / "pairs"), "cache_dir": str(tmp_path / "c")})
    assert len(pairs) == 4 and pairs.ties == 2
    assert torch.equal(pairs.images(1, 16)[0], data_lib.to_tensor(_png_bytes(3), 16, ""))  # label 0: jpg_1 wins
    prepare_data.main(["images", str(tmp_path / "data" / "dog"), *base, "--image-column", "jpg_0", "--caption",
                       "a photo of sks dog", "--limit", "2"])
    ds = data_lib.ImageCaptions({"folder": str(tmp_path / "data" / "dog"), "cache_dir": str(tmp_path / "c")})
    assert ds.captions() == ["a photo of sks dog"] * 2
    spec = write_spec(xl_spec, "needs_data.json", prompts=str(tmp_path / "data" / "pickapic_train_prompts.txt"),
                      eval_prompts=str(tmp_path / "data" / "prompts.txt"))
    capsys.readouterr()
    assert prepare_data.main(["check", str(spec)]) == 1
    out = capsys.readouterr().out
    assert "MISSING prompts" in out and "--dataset yuvalkirstain/pickapic_v2 --split train" in out
    assert "ok      eval_prompts" in out
