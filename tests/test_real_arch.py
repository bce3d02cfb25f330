"""The real architectures (full/configs, full/architectures.py) and the memory plan (full/memory_plan.py).

Fast: the shipped configs build the public parameter counts on the meta device, every shipped spec resolves to
shipped configs under random_weights, the byte counter agrees with autograd's saved tensors and with itself on real
CPU tensors, and the planned update programs make the NFEs the methods state.
Slow (-m slow; minutes and ~15 GB of RAM each, run one at a time): one update and one evaluation of each method
through its `main` on the real architectures with random weights, at 16x16 latents in fp32 on the CPU."""
import csv
import json

import pytest
import torch

from full import architectures, launch, memory_plan, rehearse, tiny
from full.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_thread")

# the public parameter counts of the checkpoints' components
COUNTS = {
    ("UNet2DConditionModel", "unet_sdxl.json"): 2_567_463_684,  # SDXL base, SDXL-Turbo, DMD2
    ("UNet2DConditionModel", "unet_sd15.json"): 859_520_964,
    ("UNet2DConditionModel", "unet_sd21.json"): 865_910_724,  # SD 2.1-base, SD-Turbo
    ("AutoencoderKL", "vae_sdxl.json"): 83_653_863,
    ("AutoencoderKL", "vae_sdxl_fp16_fix.json"): 83_653_863,
    ("AutoencoderKL", "vae_sd.json"): 83_653_863,
    ("CLIPTextModel", "text_clip_vit_l.json"): 123_060_480,  # SD1.5 / SDXL text_encoder
    ("CLIPTextModelWithProjection", "text_openclip_bigg.json"): 694_659_840,  # SDXL text_encoder_2
    ("CLIPTextModel", "text_openclip_h.json"): 340_387_840,  # SD 2.x text_encoder
    ("CLIPModel", "reward_clip_vit_l14.json"): 427_616_513,  # openai/clip-vit-large-patch14
    ("CLIPModel", "reward_clip_vit_h14.json"): 986_109_441,  # PickScore_v1 (CLIP ViT-H/14)
    # flow-matching pipelines. FLUX.1: the transformer counts of the hub's bf16 safetensors (dev 11,901,408,320, as
    # diffusers' examples/controlnet/train_controlnet_flux.py states too; schnell has no guidance embedder).
    ("FluxTransformer2DModel", "transformer_flux_dev.json"): 11_901_408_320,
    ("FluxTransformer2DModel", "transformer_flux_schnell.json"): 11_891_178_560,
    ("AutoencoderKL", "vae_flux.json"): 83_819_683,  # FLUX.1 / SD3 16-channel VAE: 244 tensors
    ("AutoencoderKL", "vae_sd3.json"): 83_819_683,
    # SD3 / SD3.5 text encoders (the module table of stable-diffusion-3-medium-diffusers in NVIDIA's aitune docs)
    ("CLIPTextModelWithProjection", "text_clip_vit_l_projection.json"): 123_650_304,
    ("T5EncoderModel", "text_t5_xxl.json"): 4_762_310_656,  # google/t5-v1_1-xxl encoder, SD3 / FLUX text_encoder_3/_2
}

# SD3.5 transformers: the hub's counts are of the safetensors file, i.e. parameters plus the persistent sin-cos
# position table (pos_embed_max_size^2 x hidden, a buffer). Medium: 2,469,663,936 elements in 909 tensors (a public
# checkpoint audit of an SD3.5-medium transformer file; the model card says 2.5 B); large: the model card's 8.1 B.
CHECKPOINT_ELEMENTS = {"transformer_sd35_medium.json": (2_469_663_936, 909)}
ROUNDED_BILLIONS = {"transformer_sd35_medium.json": 2.5, "transformer_sd35_large.json": 8.1}


def _cls(name):
    import diffusers
    import transformers

    return getattr(diffusers, name, None) or getattr(transformers, name)


@pytest.mark.parametrize("cls,file", sorted(COUNTS))
def test_shipped_configs_have_the_public_parameter_counts(cls, file):
    assert architectures.parameter_count(_cls(cls), file) == COUNTS[(cls, file)]


@pytest.mark.parametrize("file", sorted(ROUNDED_BILLIONS))
def test_sd35_transformer_configs_have_the_public_checkpoint_sizes(file):
    from diffusers import SD3Transformer2DModel

    elements, tensors = architectures.checkpoint_elements(SD3Transformer2DModel, file)
    if file in CHECKPOINT_ELEMENTS:
        assert (elements, tensors) == CHECKPOINT_ELEMENTS[file]
    assert round(elements / 1e9, 1) == ROUNDED_BILLIONS[file]
    c = architectures.read_config(file)  # the position table is a buffer: parameters + table = file
    table = c["pos_embed_max_size"] ** 2 * c["num_attention_heads"] * c["attention_head_dim"]
    assert architectures.parameter_count(SD3Transformer2DModel, file) + table == elements


FLOW_PIPELINES = {  # hub id -> (pipeline class, transformer config, scheduler config, T5 part)
    "stabilityai/stable-diffusion-3.5-medium": ("StableDiffusion3Pipeline", "transformer_sd35_medium.json",
                                                "scheduler_sd35_medium.json", "text_encoder_3"),
    "stabilityai/stable-diffusion-3.5-large": ("StableDiffusion3Pipeline", "transformer_sd35_large.json",
                                               "scheduler_sd35_large.json", "text_encoder_3"),
    "stabilityai/stable-diffusion-3.5-large-turbo": ("StableDiffusion3Pipeline", "transformer_sd35_large.json",
                                                     "scheduler_sd35_large_turbo.json", "text_encoder_3"),
    "black-forest-labs/FLUX.1-schnell": ("FluxPipeline", "transformer_flux_schnell.json",
                                         "scheduler_flux_schnell.json", "text_encoder_2"),
    "black-forest-labs/FLUX.1-dev": ("FluxPipeline", "transformer_flux_dev.json", "scheduler_flux_dev.json",
                                     "text_encoder_2"),
}


@pytest.mark.parametrize("hub_id", sorted(FLOW_PIPELINES))
def test_flow_pipelines_model_index_names_every_part_the_pipeline_takes(hub_id):
    import inspect

    import diffusers

    pipe, transformer, scheduler, t5 = FLOW_PIPELINES[hub_id]
    index = architectures.model_index(hub_id)
    assert index["_class_name"] == pipe
    cls = getattr(diffusers, pipe)
    wanted = {n for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and p.default is inspect.Parameter.empty}
    assert wanted <= set(index), sorted(wanted - set(index))  # every required component is there
    assert index[t5] == ["transformers", "T5EncoderModel"]
    assert architectures.entry(hub_id)["transformer"] == transformer
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    sched = architectures.build(diffusers.FlowMatchEulerDiscreteScheduler, hub_id, "scheduler")
    assert architectures.entry(hub_id)["scheduler"] == scheduler
    if pipe == "StableDiffusion3Pipeline":  # SD3 / SD3.5: a fixed shift 3.0
        assert sched.config.shift == 3.0 and not sched.config.use_dynamic_shifting
    elif "dev" in hub_id:  # FLUX.1-dev: the resolution-dependent shift mu(image tokens) between 256 and 4096 tokens
        assert sched.config.use_dynamic_shifting and (sched.config.base_shift, sched.config.max_shift) == (0.5, 1.15)
        assert (sched.config.base_image_seq_len, sched.config.max_image_seq_len) == (256, 4096)
    else:  # FLUX.1-schnell: no shift (shift 1.0, no dynamic shifting), timestep-distilled for 1-4 steps
        assert sched.config.shift == 1.0 and not sched.config.use_dynamic_shifting


def test_flow_architectures_fit_together():
    """The transformers' conditioning widths are their text encoders' outputs; the VAE has the 16 latent channels
    the transformers take (FLUX packs 2x2 patches: 64 = 16 x 4)."""
    bigg, clip_l = architectures.read_config("text_openclip_bigg.json"), architectures.read_config("text_clip_vit_l.json")
    t5 = architectures.read_config("text_t5_xxl.json")
    for file in ("transformer_sd35_medium.json", "transformer_sd35_large.json"):
        c = architectures.read_config(file)
        assert c["pooled_projection_dim"] == clip_l["projection_dim"] + bigg["projection_dim"]  # 768 + 1280
        assert c["joint_attention_dim"] == t5["d_model"] and c["in_channels"] == 16
    for file in ("transformer_flux_schnell.json", "transformer_flux_dev.json"):
        c = architectures.read_config(file)
        assert c["pooled_projection_dim"] == clip_l["hidden_size"] and c["joint_attention_dim"] == t5["d_model"]
        assert c["in_channels"] == 4 * architectures.read_config("vae_flux.json")["latent_channels"]
        assert sum(c["axes_dims_rope"]) == c["attention_head_dim"]
    assert architectures.read_config("vae_sd3.json")["latent_channels"] == 16


def test_t5_tokenizer_and_rms_norms_under_random_weights():
    """The T5 tokenizer is tiny_t5_tokenizer with the shipped length; RMSNorm weights get 1 (not N(0, 1/d)), so a
    random T5 keeps its activations' scale."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tok = architectures.build(T5TokenizerFast, "black-forest-labs/FLUX.1-schnell", "tokenizer_2")
    assert tok.model_max_length == 512
    ids = tok(["a photo of a cat"], padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    assert ids.input_ids.shape == (1, 256)
    cfg = {k: v for k, v in architectures.read_config("text_t5_xxl.json").items()
           if k not in ("architectures", "model_type")}
    cfg.update(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=tok.vocab_size)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        enc = T5EncoderModel(T5Config(**cfg))
    architectures.random_init_(enc)
    norms = [m.weight for n, m in enc.named_modules() if type(m).__name__ == "T5LayerNorm"]
    assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms)
    out = enc(ids.input_ids).last_hidden_state
    assert out.shape == (1, 256, 32) and torch.isfinite(out).all()


def test_sdxl_unet_config_is_the_sdxl_architecture():
    c = architectures.read_config("unet_sdxl.json")
    assert c["transformer_layers_per_block"] == [1, 2, 10]
    assert c["addition_embed_type"] == "text_time" and c["projection_class_embeddings_input_dim"] == 2816
    # 2816 = the pooled text_encoder_2 embedding + 6 time ids x addition_time_embed_dim
    bigg = architectures.read_config("text_openclip_bigg.json")
    assert bigg["projection_dim"] + 6 * c["addition_time_embed_dim"] == 2816
    assert c["cross_attention_dim"] == 768 + bigg["hidden_size"]


@pytest.mark.parametrize("spec", sorted(p.name for p in launch.SPECS.glob("*.json")))
def test_every_shipped_spec_resolves_to_shipped_configs(spec):
    s = load_spec(str(launch.SPECS / spec), random_weights=True)
    index = architectures.model_index(s.base)
    denoiser = "transformer" if "transformer" in index else "unet"  # SD3 / FLUX pipelines have a transformer
    for part in (denoiser, "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index
        if part != "scheduler":
            architectures.component_config(s.base, part)
    if s.vae:
        architectures.component_config(s.vae, "vae")
    for role in s.roles.values():
        if role.unet and not role.unet_file:
            architectures.component_config(role.unet, denoiser)
        for source in (role.unet, role.lora):
            if source:
                architectures.entry(source)


def test_random_weights_name_a_checkpoint_without_a_shipped_config():
    from full import models

    spec = load_spec("someone/unknown-model", random_weights=True)
    with pytest.raises(models.ModelError, match=r"someone/unknown-model.*index\.json"):
        models.load_parts(spec)


def test_random_init_gives_finite_real_values_and_keeps_buffers():
    from transformers import CLIPTextModel

    enc = architectures.build(CLIPTextModel, "stabilityai/stable-diffusion-xl-base-1.0", "text_encoder")
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in enc.parameters())
    ids = dict(enc.named_buffers())["embeddings.position_ids"] if "embeddings.position_ids" in dict(
        enc.named_buffers()) else dict(enc.named_buffers())["text_model.embeddings.position_ids"]
    assert torch.equal(ids, torch.arange(77)[None])  # a buffer: kept, not emptied
    from transformers import CLIPTokenizer

    tok = architectures.build(CLIPTokenizer, "stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2")
    assert tok.model_max_length == 77 and tok.pad_token == "!"
    out = enc(tok(["a photo of a cat"], padding="max_length", return_tensors="pt").input_ids).last_hidden_state
    assert out.shape == (1, 77, 768) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------- the byte counter
def _tiny_unet_inputs(device, rows=2, side=8):
    return (torch.randn(rows, 4, side, side, device=device), torch.full((rows,), 500, device=device),
            torch.randn(rows, 77, 64, device=device),
            {"text_embeds": torch.randn(rows, 32, device=device), "time_ids": torch.randn(rows, 6, device=device)})


def _forward_backward(unet, device, counter_dtype=None):
    x, t, enc, added = _tiny_unet_inputs(device)
    with memory_plan.counting(counter_dtype) as c:
        out = unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)[0]
        after_forward = c.live
        out.float().square().mean().backward()
        peak = c.peak
    return after_forward, peak, out


def test_counter_agrees_with_autograds_saved_tensors_on_real_cpu_tensors():
    """Independent count: the distinct storages autograd saves (saved-tensor hooks) plus the output are what the
    counter sees alive after the forward (the model's weights were made before it and are not counted)."""
    torch.manual_seed(0)
    unet = tiny.tiny_unet(sdxl=True, sample_size=8).train()
    x, t, enc, added = _tiny_unet_inputs("cpu")
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    saved = {}

    def pack(tensor):
        st = tensor.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in (x.data_ptr(), t.data_ptr(), enc.data_ptr()):
            saved[st.data_ptr()] = st.nbytes()
        return tensor

    with memory_plan.counting(None) as c, torch.autograd.graph.saved_tensors_hooks(pack, lambda t_: t_):
        out = unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)[0]
        live = c.live
    out_bytes = out.untyped_storage().nbytes() if out.untyped_storage().data_ptr() not in saved else 0
    expected = sum(saved.values()) + out_bytes
    assert expected > 0
    assert abs(live - expected) <= 0.02 * expected, (live, expected)


def test_counter_on_meta_equals_the_counter_on_real_tensors():
    """The plan runs on the meta device: it must count what the same run allocates on real tensors."""
    torch.manual_seed(0)
    cpu = tiny.tiny_unet(sdxl=True, sample_size=8).train()
    with torch.device("meta"):
        meta = tiny.tiny_unet(sdxl=True, sample_size=8).train()
    for ckpt in (False, True):
        if ckpt:
            memory_plan.enable_checkpointing(cpu, None)
            memory_plan.enable_checkpointing(meta, None)
        a_cpu, peak_cpu, _ = _forward_backward(cpu, "cpu")
        a_meta, peak_meta, _ = _forward_backward(meta, "meta")
        assert a_cpu == a_meta and peak_cpu == peak_meta, (ckpt, a_cpu, a_meta, peak_cpu, peak_meta)
    for p in cpu.parameters():
        p.grad = None


def test_checkpointing_and_fused_attention_lower_the_planned_activations():
    with torch.device("meta"):
        unet = tiny.tiny_unet(sdxl=True, sample_size=8).train()
    plain, _, out = _forward_backward(unet, "meta", torch.bfloat16)
    assert out.dtype == torch.bfloat16  # conv_out under autocast's policy, as torch.autocast gives it
    memory_plan.enable_checkpointing(unet, torch.bfloat16)
    ckpt, peak, _ = _forward_backward(unet, "meta", torch.bfloat16)
    assert ckpt < plain / 2 and peak > ckpt
    with torch.device("meta"):
        q = torch.empty(1, 8, 4096, 64, dtype=torch.bfloat16, requires_grad=True)
    with memory_plan.counting(torch.bfloat16) as c:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert c.live == out.untyped_storage().nbytes() + 8 * 4096 * 4  # output + fp32 log-sum-exp, no 4096^2 matrix


# --------------------------------------------------------------------------------------------- the plan programs
def _tiny_sim(kind="sdxl"):
    cfg = dict(tiny.tiny_unet(kind == "sdxl").config)
    vae = dict(tiny.tiny_vae().config)
    sim = memory_plan.Sim(cfg, vae, kind, 8, torch.bfloat16, checkpointing=False)  # NFEs do not depend on it
    return sim


FAST = {"pso-online-dmd2", "pso-offline-dmd2", "sharpening-rlhf-sdxl", "dipp-sd-turbo"}  # one per program family


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in launch.SETTINGS])
def test_planned_update_makes_the_nfes_the_method_states(name, monkeypatch):
    """Each launcher setting's update program, run on tiny models, evaluates the UNet as often as the method's
    own NFE count says (the slow tests check the same count against the real runs' log.csv)."""
    from full.spec import RoleSpec

    module, cfg, s = memory_plan.method_config(name, None)
    spec, _ = memory_plan.setting_spec(s)
    method, update, evaluate, _, role = memory_plan.METHODS[s.script]
    sim = _tiny_sim()
    ns = dict(vars(cfg))
    train_full = cfg.full_finetune if method == "sharpening" else cfg.train_full
    if method == "pso":
        own = memory_plan.role_grid(spec, "student", spec.roles.get("student", RoleSpec()))
        ns["grid"] = own
        stated = module.nfe_per_update(cfg, len(own), len(own))
        sim.add_unet("student", cfg.lora_rank, train_full)
        ns["trained_role"] = module.TRAINED_ROLE.get(cfg.variant, "student")  # base transfer trains the teacher
        if ns["trained_role"] != "student":
            sim.add_unet(ns["trained_role"], cfg.lora_rank, train_full)
    elif method == "sharpening":
        ns["grid"] = memory_plan.role_grid(spec, "teacher", spec.roles.get("teacher", RoleSpec()))
        sim.add_unet("teacher", cfg.lora_rank, train_full)
        stated = cfg.n * cfg.m + (cfg.n * len(ns["grid"]) + 2 * cfg.m if cfg.variant == "rlhf" else 0) + (
            (cfg.m if cfg.variant == "sft" else 2 * cfg.m) if cfg.recompute else 0)
    else:
        sim.add_unet("generator", cfg.lora_rank, train_full)
        sim.add_unet("teacher", cfg.ta_lora_rank, cfg.ta_train_full)
        stated = module.nfe_per_update(cfg)
    sim.build_vae()
    monkeypatch.setattr(memory_plan, "reward_image_size", lambda name: 32)
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig(text_config=tiny.TEXT, vision_config=dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
            patch_size=8), projection_dim=16))
    sim.rewards = {"reward": ("clip", clip.requires_grad_(False))}
    opts = {r: memory_plan.adamw(sim.trainable(r)) for r in sim.unets}
    from types import SimpleNamespace

    with memory_plan.counting(torch.bfloat16):
        update(sim, SimpleNamespace(**ns), 2, opts)
    assert sim.rows / 2 == stated


def test_fsdp_units_split_the_frozen_weights_into_blocks_and_a_root():
    """The FSDP rows' all-gathered units: the blocks of _no_split_modules (outermost first, none counted twice)
    and the root's remaining weights add up to every frozen weight; the LoRA is not in any unit."""
    from peft import LoraConfig

    from full.world import LORA_TARGETS

    with torch.device("meta"):
        unet = tiny.tiny_unet(sdxl=True, sample_size=8).to(torch.bfloat16).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    largest, root = memory_plan.fsdp_units(unet)
    frozen = memory_plan.param_bytes(unet, trainable=False)
    names = set(unet._no_split_modules)
    blocks = [m for n, m in unet.named_modules() if type(m).__name__ in names]
    outer = [m for m in blocks if not any(m is not b and any(m is x for x in b.modules()) for b in blocks)]
    sizes = [memory_plan.param_bytes(m, trainable=False) for m in outer]
    assert 0 < largest == max(sizes) and 0 < root and root + sum(sizes) == frozen


def test_the_docs_and_launcher_tables_are_the_generated_ones_of_every_setting():
    """docs/full.md and full/defaults.py hold `python -m full.memory_plan --write-docs`'s tables of
    benchmarks/results/memory_plan.json, which has rows of every launcher setting: batch 1 for the docs (FSDP
    settings also at 8 GPUs), every PLANNED_BATCHES batch of its own training mode (and of the LoRA alternative of
    a full fine-tuning setting) for the launcher, per FSDP process count."""
    from full import defaults

    rows = json.loads(memory_plan.ROWS.read_text())
    doc = (launch.ROOT / "docs" / "full.md").read_text()
    inside = doc.split(memory_plan.BEGIN, 1)[1].split(memory_plan.END, 1)[0]
    assert inside == "\n" + memory_plan.table(memory_plan.docs_rows(rows))
    table = memory_plan.launcher_table(rows)
    assert defaults.PLANNED_BATCHES == memory_plan.PLANNED_BATCHES and defaults.PLANNED_PEAK_GIB == table
    for name, s in launch.SETTINGS.items():
        expected = {("own", g) for g in (memory_plan.LAUNCH_GPUS if s.fsdp else (1,))}
        expected |= {("lora", 1)} if memory_plan.full_training(name) else set()
        assert set(table[name]) == expected, name
        for key, peaks in table[name].items():  # a larger batch never needs less memory
            assert list(peaks) == sorted(peaks), (name, key)
        docs = {r.get("gpus", 1) for r in memory_plan.docs_rows(rows) if r["setting"] == name}
        assert docs == ({1, memory_plan.FSDP_GPUS} if s.fsdp else {1}), (name, docs)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(launch.SETTINGS))
def test_the_rows_are_what_the_plan_computes_now(name):
    """benchmarks/results/memory_plan.json (and so the launcher's table) is the plan of the current code: the
    setting's own training mode at the launcher's batches and process counts, planned again, gives its rows."""
    rows = json.loads(memory_plan.ROWS.read_text())
    training, ckpt, batches, gpus = next(x for x in memory_plan.simulations(name) if len(x[2]) > 1 and x[0] is None)
    fresh = memory_plan.plan_setting(name, ckpt, training, 1, None, 1, gpus, batches)
    stored = {(r["batch"], r["gpus"]): r for r in rows if r["setting"] == name and r["variant"] == "own"
              and r["checkpointing"] == ckpt}
    for r in fresh:
        old = stored[(r.batch, r.gpus)]
        for k, v in r.__dict__.items():
            assert (old[k] == pytest.approx(v) if isinstance(v, float) else old[k] == v), (r.batch, r.gpus, k)


def test_fsdp_rows_count_a_start_up_without_a_whole_network_on_any_gpu():
    """The 8-GPU rows' loading peak: the shards plus one parameter in transit, far below the network; the host RAM
    of process 0 holds the networks (it alone reads them), the other processes' does not."""
    rows = json.loads(memory_plan.ROWS.read_text())
    for name in [n for n, s in launch.SETTINGS.items() if s.fsdp]:
        one = next(r for r in rows if r["setting"] == name and r["batch"] == 1 and r["gpus"] == 1
                   and r["variant"] == "own" and r["checkpointing"])
        eight = next(r for r in rows if r["setting"] == name and r["batch"] == 1 and r["gpus"] == 8
                     and r["variant"] == "own" and r["checkpointing"])
        assert eight["load_gpu_gib"] < one["load_gpu_gib"] / 2 and eight["load_gpu_gib"] > 0
        assert eight["load_host_rank0_gib"] > eight["load_host_rank_gib"]  # the networks: process 0 only
        assert one["load_host_rank0_gib"] == one["load_host_rank_gib"]


def test_affine_peaks_equal_the_direct_counts_at_larger_batches(monkeypatch):
    """The launcher's batches 8 and 16 come from traces at 2 and 4 (memory_plan.affine_peaks): on tiny models
    with the real update programs they equal a direct count."""
    from types import SimpleNamespace

    from transformers import CLIPConfig, CLIPModel

    monkeypatch.setattr(memory_plan, "reward_image_size", lambda name: 32)
    for variant in ("online", "offline", "pso"):
        sim = _tiny_sim()
        sim.add_unet("student", 4, False)
        sim.build_vae()
        with torch.device("meta"):
            clip = CLIPModel(CLIPConfig(text_config=tiny.TEXT, vision_config=dict(
                hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                patch_size=8), projection_dim=16))
        sim.rewards = {"reward": ("clip", clip.requires_grad_(False))}
        opts = {"student": memory_plan.adamw(sim.trainable("student"))}
        cfg = SimpleNamespace(variant=variant, grid=[999, 749, 499, 249], one_timestep=False, trained_role="student")
        traces, direct = {}, {}
        with memory_plan.counting(torch.bfloat16) as c:
            memory_plan.init_states(opts["student"], sim.trainable("student"))
            base = c.live
            for b in (2, 4, 8, 16):
                c.start_trace()
                memory_plan.pso_update(sim, cfg, b, opts)
                traces[b] = [x - base for x in c.stop_trace()]
                direct[b] = base + max(traces[b])
        predicted = memory_plan.affine_peaks({2: traces[2], 4: traces[4]}, (8, 16))
        assert {b: base + p for b, p in predicted.items()} == {8: direct[8], 16: direct[16]}, variant


def test_flow_settings_plan_on_their_shipped_specs():
    for name in ("pso-online-flux-schnell", "sharpening-rlhf-sd35-medium", "dipp-sd35-large-turbo"):
        s = launch.SETTINGS[name]
        spec, note = memory_plan.setting_spec(s)
        assert architectures.entry(spec.base)["architecture"] in ("sd3", "flux") and note is None


def test_bench_plumbing_on_a_tiny_pipeline(tmp_path):
    """full.bench runs a setting as its launcher does (here `python`, the worker in place of pso.py) with
    checkpointing on and off: s/update, the update's network calls split into grad / other NFEs (PSO online:
    3 roll-out steps of 2 rows with autograd, the last step and the frozen call on 6 rows without), the NFE bound
    and its ratio; without CUDA the GPU columns are empty and the peak RSS is reported. A setting that cannot run
    is a row with its reason, listed at the end of the table, and the loop goes on."""
    from full import bench

    spec = tiny.save_tiny_setup(tmp_path / "tiny", "sdxl", "lcm")
    rows = bench.main(["pso-online-dmd2", "--model", str(spec), "--steps", "3", "--batch", "1",
                       "--checkpointing", "both", "--out", str(tmp_path / "bench")])
    assert [r["overrides"]["gradient_checkpointing"] for r in rows] == [True, False]
    for r in rows:
        assert r["nfe_logged"] == 14 and (r["nfe_grad"], r["nfe_other"]) == (6, 8) and r["updates"] == 3
        assert r["fwd_bwd_s"] > r["fwd_s"] > 0 and 0 < r["bound_ratio"] < float("inf")
        assert r["bound_s"] == pytest.approx(6 * r["fwd_bwd_s"] + 8 * r["fwd_s"])
        parts = r["parts_s"]  # where the update's time went: every part measured, the rest what is left
        assert parts["forward"] > 0 and parts["backward"] > 0 and parts["vae"] > 0 and parts["reward"] > 0
        assert parts["optimizer"] > 0 and sum(parts.values()) == pytest.approx(r["s_per_update"], rel=0.35)
        assert r["train_allocated_gib"] is None and r["eval_reserved_gib"] is None and r["rss_peak_mib"] > 100
    assert json.loads((tmp_path / "bench" / "bench.json").read_text()) == rows
    failed = bench.bench("pso-online-dmd2", str(spec), 2, 1, {"reward": "imagereward"}, tmp_path / "bench2")
    assert "imagereward" in failed["error"].lower()  # the reason, from the run's own error
    text = bench.table([*rows, failed])
    assert text.index("Could not run") > text.index(rows[-1]["setting"]) and "imagereward" in text


@pytest.mark.slow
def test_bench_runs_a_setting_in_two_processes_through_the_launcher(tmp_path):
    """--num-processes 2 --launcher torchrun (CPU, gloo): two workers, each reporting its memory; one row."""
    from full import bench

    spec = tiny.save_tiny_setup(tmp_path / "tiny", "sdxl", "lcm")
    rows = bench.main(["sharpening-rlhf-sdxl", "--model", str(spec), "--steps", "2", "--batch", "1",
                       "--num-processes", "2", "--launcher", "torchrun", "--out", str(tmp_path / "bench"),
                       "--", "--n", "2", "--m", "2"])
    (r,) = rows
    assert "error" not in r and r["processes"] == 2 and r["updates"] == 2 and r["command"][0] == "torchrun"
    assert len(list((tmp_path / "bench").rglob("bench-worker.rank*.json"))) == 2
    assert "fwd_s" not in r  # the unit timing is single-process only


# --------------------------------------------------------------------------------------------- slow: real runs
def _random_spec(tmp_path, spec_name: str, **overrides) -> str:
    """A shipped spec with random real-size weights, fp32, 16x16 latents, tiny reward models and local prompts."""
    clip = tiny.save_tiny_clip(tmp_path / "clip")
    head = tiny.save_tiny_aesthetic_head(tmp_path / "aesthetic_head.pth")
    d = json.loads((launch.SPECS / spec_name).read_text())
    d.update(random_weights=True, dtype="fp32", resolution=128, decode_batch=1, gradient_checkpointing=True,
             reward={"name": "pickscore", "model": str(clip)},
             quality={"name": "aesthetic", "model": str(clip), "head": str(head)},
             eval_rewards=[{"name": "clip", "model": str(clip)}],
             prompts=["a red cube", "a blue sphere"], eval_prompts=["a green cone"], pairs=None, data={},
             precompute_embeddings=False, **overrides)
    path = tmp_path / spec_name
    path.write_text(json.dumps({k: v for k, v in d.items() if v is not None}))
    return str(path)


def _attention_count(unet) -> int:
    from diffusers.models.attention_processor import Attention

    return sum(isinstance(m, Attention) for m in unet.modules())


def _lora_targets(unet) -> dict:
    """LoRA-wrapped modules by the name they end with."""
    found = {}
    for name, m in unet.named_modules():
        if hasattr(m, "lora_A"):
            key = "to_out.0" if name.endswith("to_out.0") else name.rsplit(".", 1)[-1]
            found[key] = found.get(key, 0) + 1
    return found


def _count_checkpoints(monkeypatch) -> list:
    import torch.utils.checkpoint as ckpt

    calls, real = [], ckpt.checkpoint

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(ckpt, "checkpoint", counted)
    return calls


def _log(out):
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


# transformer blocks of the SDXL UNet (transformer depth 1 / 2 / 10 per level, the 320 level has none):
# down 2 x 2 (640) + 2 x 10 (1280), mid 10, up 3 x 10 (1280) + 3 x 2 (640); two attentions each
SDXL_BLOCKS = 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2


@pytest.mark.slow
def test_pso_online_one_update_on_the_real_sdxl_architecture(tmp_path, monkeypatch):
    import full
    import pso

    spec = _random_spec(tmp_path, "sdxl_dmd2.json")
    world = full.load_world(spec)
    calls = _count_checkpoints(monkeypatch)
    cfg = pso.Config(model=spec, variant="online", beta=5, lora_rank=16, steps=1, batch=1, eval_samples=1,
                     eval_every=1, save_every=1, out=str(tmp_path / "run"))
    metrics = pso.train(cfg, world)
    unet = world.denoisers[0].unet
    assert sum(p.numel() for n, p in unet.named_parameters() if "lora" not in n) == 2_567_463_684
    assert _attention_count(unet) == 2 * SDXL_BLOCKS == 140
    assert _lora_targets(unet) == {"to_q": 140, "to_k": 140, "to_v": 140, "to_out.0": 140}
    assert unet.is_gradient_checkpointing and calls  # checkpointed blocks ran in the update
    row = _log(tmp_path / "run")[0]
    assert float(row["nfe"]) == metrics["nfe_per_update"] == 14
    assert row["eval_reward"] != "" and metrics["eval_samples"] == 1


@pytest.mark.slow
def test_sharpening_rlhf_one_update_on_the_real_sdxl_architecture(tmp_path, monkeypatch):
    import sharpening

    grid = [999, 749, 499, 249]  # a 4-step teacher grid: the real UNet, fewer CPU minutes
    spec = _random_spec(tmp_path, "sdxl_base.json",
                        roles={"teacher": {"scheduler": "DDIMScheduler", "scheduler_config": {"timestep_spacing":
                                                                                             "trailing"},
                                           "timesteps": grid}})
    calls = _count_checkpoints(monkeypatch)
    out = tmp_path / "run"
    sharpening.main(["--model", spec, "--variant", "rlhf", "--n", "2", "--m", "2", "--recompute", "--steps", "1",
                     "--batch", "1", "--eval-samples", "1", "--final-samples", "1", "--eval-every", "1",
                     "--out", str(out)])
    n, m, K = 2, 2, len(grid)
    assert float(_log(out)[0]["nfe"]) == n * K + n * m + 2 * m + 2 * m  # sampling, roll-out, reference, recompute
    assert calls


@pytest.mark.slow
def test_dipp_one_update_on_the_real_sd21_architecture(tmp_path, monkeypatch):
    """DI++ holds two UNets (generator and teacher + TA): two fp32 SDXL UNets (20.6 GB) do not fit this
    machine's RAM, so the DI++ run uses its own shipped SD-Turbo / SD 2.1 spec."""
    import diff_instruct_pp

    spec = _random_spec(tmp_path, "sd_turbo_dipp.json")
    calls = _count_checkpoints(monkeypatch)
    out = tmp_path / "run"
    diff_instruct_pp.main(["--model", spec, "--variant", "dipp", "--reward-scale", "100", "--cfg-scale", "4.5",
                           "--steps", "1", "--batch", "1", "--eval-samples", "1", "--out", str(out)])
    assert float(_log(out)[0]["nfe"]) == 2 * 2 + 3
    assert calls


@pytest.mark.slow
def test_sharpening_rlhf_one_update_on_the_real_sd35_medium_transformer(tmp_path, monkeypatch):
    """A real flow architecture: SD3.5-medium's transformer at full depth (random weights, fp32) runs one RLHF
    update and an evaluation at 8x8 latents through sharpening.main, the SD3 conditioning shapes real (77 CLIP + 256
    T5 tokens of 4096, pooled 2048); the text encoders and reward towers are built at depth 1 (real widths; T5-XXL in
    fp32 alone would need 19 GB), the data synthetic (full/rehearse.py). ~10 GB of RAM: run alone."""
    import harness
    import sharpening
    from diffusers import SD3Transformer2DModel

    spec, _ = rehearse.rehearsal_spec(str(launch.SPECS / "sd35_medium.json"), tmp_path, rows=100, resolution=64)
    d = json.loads(spec.read_text())
    d["roles"]["teacher"]["steps"] = 4  # 4 teacher steps of its pipeline: the real network, fewer CPU minutes
    spec.write_text(json.dumps(d))
    calls = _count_checkpoints(monkeypatch)
    worlds, load = [], harness.load_world
    monkeypatch.setattr(harness, "load_world", lambda *a, **k: worlds.append(load(*a, **k)) or worlds[-1])
    out = tmp_path / "run"
    with architectures.depth(1, denoisers=False):
        sharpening.main(["--model", str(spec), "--variant", "rlhf", "--n", "2", "--m", "2", "--recompute", "--steps",
                         "1", "--batch", "1", "--eval-samples", "1", "--final-samples", "1", "--eval-every", "1",
                         "--out", str(out)])
    net = worlds[0].denoisers[0].unet
    real = architectures.parameter_count(SD3Transformer2DModel, "transformer_sd35_medium.json")
    assert sum(p.numel() for n, p in net.named_parameters() if "lora" not in n) == real > 2e9
    assert worlds[0].encode(["a cat"])["prompt_embeds"].shape == (1, 77 + 256, 4096)
    assert float(_log(out)[0]["nfe"]) == 2 * 4 + 2 * 2 + 2 * 2 + 2 * 2 and calls


def test_random_weight_rewards_have_the_real_backbones():
    from full import rewards

    r = rewards.load_reward("clip", random_weights=True)
    assert sum(p.numel() for p in r.model.parameters()) == 427_616_513
    score = r(torch.rand(1, 3, 64, 64) * 2 - 1, ["a cat"])
    assert score.shape == (1,) and torch.isfinite(score).all()
    with pytest.raises(ValueError, match="imagereward"):
        rewards.load_reward("imagereward", random_weights=True)


def test_cpu_overhead_alone_benches_each_cpu_row_on_its_rehearsal_data(tmp_path, monkeypatch):
    """`python -m full.bench --cpu-overhead` (no setting named) runs every CPU_ROWS setting on the rehearsal's
    synthetic data with shallow text encoders and rewards, its flags and spec overrides passed on."""
    from full import bench, rehearse

    made, benched = [], []
    monkeypatch.setattr(rehearse, "rehearsal_spec", lambda spec, folder, rows, resolution: (
        made.append((spec.rsplit("/", 1)[-1], rows, resolution)) or (folder / "spec.json", None)))
    monkeypatch.setattr(bench, "bench", lambda name, spec, steps, batch, overrides, out, *a, **kw: (
        benched.append((name, overrides, kw)) or {"setting": name, "processes": 1, "error": "not run here"}))
    bench.main(["--cpu-overhead", "--out", str(tmp_path)])
    assert [b[0] for b in benched] == [r[0] for r in bench.CPU_ROWS]
    assert all(kw["shallow_parts"] and o["precompute_embeddings"] is False for _, o, kw in benched)
    assert benched[-1][1]["roles"] == {"teacher": {"steps": 4}} and all(m[1:] == (100, 128) for m in made)
    assert json.loads((tmp_path / "bench.json").read_text())[0]["setting"] == "pso-online-dmd2"
