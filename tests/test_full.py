"""full/: the diffusers backend on tiny random SD1.5 / SDXL pipelines built offline (docs/design.md section 8).

Loading and validation errors, SDXL conditioning against the pipeline's own encode_prompt, the world's sampler
against the diffusers pipelines, LoRA export into `load_lora_weights`, the reward wrappers against CLIP's own
logits, preference pairs with ties dropped, and the launcher settings. The end-to-end method runs, resume and the
2-process run are in tests/test_full_runs.py."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import common
import harness
import full
from full import data as data_lib
from full import defaults, launch, models, rewards, tiny
from full.spec import load_spec


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def xl_spec(tmp_path_factory):
    """A tiny SDXL pipeline with an LCMScheduler (the DMD2 / LCM MDP) and everything its spec names."""
    return tiny.save_tiny_setup(tmp_path_factory.mktemp("xl"), "sdxl", "lcm")


@pytest.fixture(scope="module")
def sd15_spec(tmp_path_factory):
    """A tiny SD1.5 pipeline with a trailing Euler-ancestral scheduler (the SDXL-Turbo MDP)."""
    return tiny.save_tiny_setup(tmp_path_factory.mktemp("sd15"), "sd15", "euler_ancestral")


@pytest.fixture(scope="module")
def xl(xl_spec):
    return full.load_world(str(xl_spec))


@pytest.fixture(scope="module")
def sd15(sd15_spec):
    return full.load_world(str(sd15_spec))


def perturb_lora(den, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in den.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------- loading errors
def test_a_model_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(full.ModelError, match=r"nope.*does not exist"):
        harness.load_world(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="model spec file .*missing.json.* does not exist"):
        harness.load_world(str(tmp_path / "missing.json"))


def test_a_data_set_taken_off_the_hub_is_named_before_anything_loads(xl_spec, tmp_path, monkeypatch):
    spec = json.loads(xl_spec.read_text())
    spec["data"] = {"target": {"dataset": "lambdalabs/pokemon-blip-captions"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    monkeypatch.setattr(models, "load_parts", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(data_lib.DataError, match=r"data.target.dataset 'lambdalabs/pokemon-blip-captions'.*taken down"
                                             r".*naruto-blip-captions"):
        full.load_world(str(tmp_path / "spec.json"))


def test_no_shipped_spec_names_a_data_set_taken_off_the_hub():
    from full.data import REMOVED_DATASETS

    for f in sorted((Path(full.__file__).parent / "specs").glob("*.json")):
        assert not set(REMOVED_DATASETS) & set(re.findall(r'"([\w.-]+/[\w.-]+)"', f.read_text())), f.name


def test_a_pipeline_without_unet_names_the_missing_unet(xl_spec, tmp_path):
    broken = tmp_path / "no_unet"
    shutil.copytree(xl_spec.parent / "pipeline", broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(full.ModelError, match=r"lacks unet/"):
        full.load_world(str(broken))
    (broken / "model_index.json").unlink()
    with pytest.raises(full.ModelError, match="lacks model_index.json"):
        full.load_world(str(broken))


def test_a_role_unet_source_without_a_unet_is_named(xl_spec, tmp_path):
    (tmp_path / "empty").mkdir()
    spec = json.loads(xl_spec.read_text())
    spec["roles"] = {"student": {"unet": str(tmp_path / "empty")}}
    path = xl_spec.parent / "bad_role.json"
    path.write_text(json.dumps(spec))
    world = full.load_world(str(path))
    with pytest.raises(full.ModelError, match="empty.*lacks unet/config.json"):
        world.denoiser("student")


def test_unknown_spec_keys_and_roles_are_errors(xl_spec):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['resolutoin'\]"):
        load_spec(str(xl_spec), resolutoin=64)
    with pytest.raises(ValueError, match="unknown role 'critic'"):
        full.spec.from_dict({"base": "x", "roles": {"critic": {}}})


@pytest.mark.parametrize("change, message", [
    ({"resolution": "512"}, "resolution must be an integer or null, got '512' (str)"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be true or false, got 'yes'"),
    ({"guidance": True}, "guidance must be a number or null, got True (bool)"),
    ({"eval_rewards": "clip"}, "eval_rewards must be a list, got 'clip'"),
    ({"data": ["data/pokemon"]}, "data must be a mapping, got ['data/pokemon']"),
    ({"roles": {"student": {"timesteps": [999, "249"]}}}, "role student: timesteps must be a list of integers or "
                                                          "null, got [999, '249']"),
])
def test_a_spec_value_of_the_wrong_type_names_the_file_and_the_key(tmp_path, change, message):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"base": "stabilityai/sdxl-turbo", **change}))
    with pytest.raises(ValueError) as e:
        load_spec(str(path))
    assert str(e.value).startswith(f"model spec {path}") and message in str(e.value)


# --------------------------------------------------------------------------------------------- MDP validation
@pytest.mark.parametrize("kind, config, role, sampler, message", [
    ("lcm", {}, "student", "euler_ancestral", "euler_ancestral MDP does not match the checkpoint's scheduler LCMScheduler"),
    ("euler_ancestral", {}, "student", "x0_renoise", "x0_renoise MDP does not match .*EulerAncestralDiscreteScheduler"),
    ("euler_ancestral", {"timestep_spacing": "leading"}, "student", None, "'trailing'"),
    ("euler", {}, "student", None, "EulerDiscreteScheduler is not a few-step sampler.*LCMScheduler"),
    ("ddim", {}, "student", "ddpm", "unknown sampler 'ddpm'"),
])
def test_a_scheduler_that_does_not_match_the_mdp_is_a_clear_error(kind, config, role, sampler, message):
    scheduler = tiny.make_scheduler(kind)
    scheduler = type(scheduler).from_config(scheduler.config, **config)
    with pytest.raises(full.ModelError, match=message):
        models.role_sampler(role, scheduler, sampler)


def test_matching_schedulers_give_the_papers_mdps():
    assert models.role_sampler("student", tiny.make_scheduler("euler_ancestral")) == (
        "euler_ancestral", [999, 749, 499, 249])  # SDXL-Turbo
    assert models.role_sampler("student", tiny.make_scheduler("lcm")) == ("x0_renoise", [999, 749, 499, 249])  # DMD2
    assert models.role_sampler("teacher", tiny.make_scheduler("euler"))[0] == "ddim"  # any multi-step eps-model
    assert models.role_sampler("generator", tiny.make_scheduler("euler"), timesteps=[399]) == ("x0_renoise", [399])
    # one step needs no scheduler agreement: Diff-Instruct reads the teacher at t = 999 as a generator
    assert models.role_sampler("teacher", tiny.make_scheduler("euler"), "x0_renoise", [999]) == ("x0_renoise", [999])


def test_v_prediction_and_foreign_schedules_are_rejected(xl_spec):
    cfg = dict(tiny.make_scheduler("lcm").config)
    assert models.schedule_name(cfg, "x") == "scaled_linear"
    with pytest.raises(full.ModelError, match="eps-prediction"):
        models.schedule_name({**cfg, "prediction_type": "v_prediction"}, "x")
    with pytest.raises(full.ModelError, match="beta schedule"):
        models.schedule_name({**cfg, "beta_end": 0.02}, "x")
    spec = json.loads(xl_spec.read_text())
    spec["roles"] = {"teacher": {"scheduler_config": {"prediction_type": "v_prediction"}}}
    (xl_spec.parent / "vpred.json").write_text(json.dumps(spec))
    with pytest.raises(full.ModelError, match="role teacher.*eps-prediction"):
        full.load_world(str(xl_spec.parent / "vpred.json"))  # at load time, before any training


# --------------------------------------------------------------------------------------------- conditioning
def test_sdxl_conditions_are_the_pipelines_own_prompt_embeddings(xl):
    texts = ["a red cube", "a blue sphere"]
    cond = xl.encode(texts)
    # the pipeline's own encode_prompt, one prompt per call as the world encodes them (a batch may change the
    # pooled projection in the last bits, and a prompt's embedding must not depend on its batch: exact resume)
    rows = [xl._make_encoder_pipe().encode_prompt([t], device="cpu", do_classifier_free_guidance=False) for t in texts]
    embeds, pooled = torch.cat([r[0] for r in rows]), torch.cat([r[2] for r in rows])
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["text_embeds"], pooled)
    batched = xl._make_encoder_pipe().encode_prompt(texts, device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(batched[0], embeds, atol=1e-5) and torch.allclose(batched[2], pooled, atol=1e-5)
    r = xl.resolution
    assert cond["time_ids"].tolist() == [[r, r, 0, 0, r, r]] * 2  # SDXL add_time_ids: no crop, native size
    null = xl.null_condition(3)  # force_zeros_for_empty_prompt: SDXL's unconditional input is all zeros
    assert null["prompt_embeds"].abs().sum() == 0 and null["text_embeds"].abs().sum() == 0
    assert xl.prompt_texts(common.cond_cat([cond, null])) == texts + ["", "", ""]
    assert xl.prompt_texts(common.cond_repeat(cond, 2)) == ["a red cube"] * 2 + ["a blue sphere"] * 2


def test_sd15_null_condition_is_the_empty_prompt(sd15):
    assert "text_embeds" not in sd15.encode(["x"])
    assert torch.equal(sd15.null_condition(1)["prompt_embeds"][0], sd15.encode([""])["prompt_embeds"][0])


# --------------------------------------------------------------------------------------------- denoiser
@pytest.mark.parametrize("world_name", ["xl", "sd15"])
def test_world_sampling_matches_the_diffusers_pipeline(world_name, request):
    """common.sample with the world's denoiser and kernel == the pipeline's own loop given the same noise:
    LCMScheduler at [999, 749, 499, 249] (DMD2) on SDXL, trailing Euler ancestral (SDXL-Turbo) on SD1.5."""
    world = request.getfixturevalue(world_name)
    den = world.denoiser("student")
    kernel = common.make_kernel(den.sampler, world.schedule)
    prompts = ["a red cube", "a green cone"]
    noise = torch.randn(2, *world.shape, generator=torch.Generator().manual_seed(3))
    ours = common.sample(den, kernel, noise, world.encode(prompts), den.timesteps, torch.Generator().manual_seed(7))
    pipe = world.pipeline("student")
    steps = dict(timesteps=den.timesteps) if den.sampler == "x0_renoise" else dict(num_inference_steps=4)
    theirs = pipe(prompts, guidance_scale=0.0 if world.kind == "sdxl" else 1.0, latents=noise.clone(),
                  generator=torch.Generator().manual_seed(7), output_type="latent", height=world.resolution,
                  width=world.resolution, **steps).images
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_lora_starts_at_the_pretrained_model_and_frozen_disables_it(xl):
    den = xl.denoiser("student", lora_rank=4)
    x = torch.randn(2, *xl.shape)
    t = torch.tensor([999, 499])
    cond = xl.encode(["a", "b"])
    base = den(x, t, cond)
    assert torch.equal(den(x, t, cond), base) and len(den.trainable_parameters()) > 0
    assert all(p.dtype == torch.float32 for p in den.trainable_parameters())
    perturb_lora(den)
    tuned = den(x, t, cond)
    with den.frozen():
        assert torch.equal(den(x, t, cond), base)
    assert not torch.allclose(tuned, base) and torch.equal(den(x, t, cond), tuned)  # re-enabled after the block
    assert torch.allclose(den(x, 999, cond)[:1], den(x[:1], torch.tensor([999]), common.cond_index(cond, [0])),
                          atol=1e-5)  # an int t is broadcast over the batch
    den(x, t, cond).square().mean().backward()
    assert all(p.grad is not None for p in den.trainable_parameters())


def test_saved_lora_loads_into_a_fresh_pipeline_and_reproduces_the_denoiser(xl, xl_spec, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    den = xl.denoiser("student", lora_rank=8)
    perturb_lora(den, seed=2)
    xl.save_adapter(den, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_spec.parent / "pipeline")
    cond = xl.encode(["a red cube"])
    x = torch.randn(1, *xl.shape)
    call = lambda: pipe.unet(x, 749, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs={  # noqa: E731
        "text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
    with torch.no_grad():
        before = call()
        image = lambda: pipe("a red cube", timesteps=[999, 749, 499, 249], guidance_scale=0.0, output_type="latent",  # noqa: E731
                             generator=torch.Generator().manual_seed(0)).images
        image_before = image()
        pipe.load_lora_weights(tmp_path / "adapter")
        after, image_after = call(), image()
        ours = den(x, 749, cond)
    assert torch.allclose(after, ours, atol=1e-5) and not torch.allclose(before, after)
    assert not torch.allclose(image_before, image_after)


def test_adapter_state_round_trips_and_a_wrong_rank_is_rejected(xl):
    a, b = xl.denoiser("student", lora_rank=4), xl.denoiser("student", lora_rank=4)
    perturb_lora(a, seed=5)
    b.load_adapter_state(a.adapter_state())
    x, cond = torch.randn(1, *xl.shape), xl.encode(["q"])
    assert torch.equal(a(x, 500, cond), b(x, 500, cond))
    with pytest.raises(ValueError, match="does not fit this UNet's LoRA"):
        xl.denoiser("student", lora_rank=2).load_adapter_state(a.adapter_state())


def test_full_fine_tuning_keeps_a_frozen_reference(xl):
    den = xl.denoiser("teacher", train_full=True)
    x, cond = torch.randn(1, *xl.shape), xl.encode(["q"])
    base = den(x, 500, cond)
    with torch.no_grad():
        for p in den.trainable_parameters()[:5]:
            p.add_(0.5)
    with den.frozen():
        assert torch.equal(den(x, 500, cond), base)
    assert not torch.equal(den(x, 500, cond), base)


# --------------------------------------------------------------------------------------------- rewards
@pytest.fixture(scope="module")
def clip_dir(xl_spec):
    return xl_spec.parent / "clip"


def test_clip_score_and_pickscore_equal_the_clip_models_own_logits(clip_dir):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir)
    images = torch.rand(3, 3, 32, 32) * 2 - 1  # already at the model's input size: no resize involved
    prompts = ["a red cube", "a blue sphere", "a red cube"]
    tok = tiny.tiny_tokenizer()(prompts, padding=True, return_tensors="pt")
    pixels = rewards.differentiable_preprocess(images, 32)
    logits = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels).logits_per_image
    pick = rewards.load_reward({"name": "pickscore", "model": str(clip_dir)})(images, prompts)
    clip = rewards.load_reward({"name": "clip", "model": str(clip_dir)})(images, prompts)
    assert torch.allclose(pick, logits.diagonal(), atol=1e-4)
    assert torch.allclose(clip, logits.diagonal() / model.logit_scale.exp(), atol=1e-5)


def test_aesthetic_reward_is_the_laion_head_on_normalised_clip_image_embeddings(clip_dir, xl_spec):
    from transformers import CLIPModel

    head_path = xl_spec.parent / "aesthetic_head.pth"
    r = rewards.load_reward({"name": "aesthetic", "model": str(clip_dir), "head": str(head_path)})
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    emb = CLIPModel.from_pretrained(clip_dir).get_image_features(pixel_values=rewards.differentiable_preprocess(images, 32))
    emb = getattr(emb, "pooler_output", emb)
    head = rewards.AestheticHead(16)
    head.load_state_dict(torch.load(head_path, weights_only=True))
    expected = head.eval()(torch.nn.functional.normalize(emb, dim=-1)).squeeze(-1)
    assert torch.allclose(r(images, ["x", "y"]), expected, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit a 16-dim CLIP embedding"):
        rewards.AestheticReward(str(clip_dir), str(tiny.save_tiny_aesthetic_head(head_path.parent / "h32.pth", 32)))


@pytest.mark.parametrize("name", ["reward", "quality", "clip"])
def test_each_reward_wrapper_is_differentiable_in_the_latents(xl, name):
    """world.reward decodes latents with the VAE; DI++ needs d reward / d x0."""
    x0 = torch.randn(2, *xl.shape, requires_grad=True)
    images = xl.decode(x0)
    assert images.shape == (2, 3, xl.resolution, xl.resolution) and images.abs().max() <= 1
    r = xl.reward_model(name)(images, ["a red cube", "a blue sphere"])
    r.sum().backward()
    assert r.shape == (2,) and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0


def test_reward_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'hps'"):
        rewards.load_reward("hps")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rewards.load_reward({"name": "clip", "model": str(tmp_path / "none")})
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install image-reward"):
            rewards.load_reward("imagereward")


def test_metrics_report_every_named_reward_and_a_distance_for_splits_with_data(xl):
    x0, cond = xl.data(3, torch.Generator().manual_seed(0), split="target")
    m = xl.metrics(x0, cond, split="target")
    assert set(m) == {"reward", "quality", "clip", "distance"} and m["distance"] >= 0
    assert xl.metrics(x0, cond, split="nothing")["distance"] != xl.metrics(x0, cond, split="nothing")["distance"]  # NaN


# --------------------------------------------------------------------------------------------- data
def test_preference_pairs_drop_ties_and_put_the_preferred_image_first(xl_spec):
    folder = xl_spec.parent / "pairs"
    pairs = data_lib.PreferencePairs({"folder": str(folder)})
    assert len(pairs) == 3 and pairs.ties == 1  # rows: label 1, 0, tie, 1
    win, lose = pairs.images(1, 16)  # row 1 has label_0 = 0: image 1 was preferred
    assert torch.equal(win, data_lib.to_tensor(folder / "1_1.png", 16, "")) and win.shape == (3, 16, 16)
    assert torch.equal(lose, data_lib.to_tensor(folder / "1_0.png", 16, ""))
    assert [pairs.caption(j) for j in range(3)] == ["a red cube", "a blue sphere", "a small house"]


def test_world_preference_pairs_are_the_vae_latents_of_the_winner_and_loser(xl):
    win, lose, cond = xl.preference_pairs(4, torch.Generator().manual_seed(0))
    assert win.shape == lose.shape == (4, *xl.shape) and not torch.equal(win, lose)
    texts = xl.prompt_texts(cond)
    pairs = xl._pairs(None)
    j = pairs.captions().index(texts[0])
    w, _ = pairs.images(j, xl.resolution)
    assert torch.allclose(win[0], xl.encode_images(w[None])[0], atol=1e-5)


def test_a_data_row_that_cannot_be_decoded_is_named(tmp_path):
    (tmp_path / "good.png").write_bytes(b"")
    tiny._png(tmp_path / "good.png", 0)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    rows = [{"caption": "ok", "jpg_0": "good.png", "jpg_1": "good.png", "label_0": 1},
            {"caption": "bad", "jpg_0": "good.png", "jpg_1": "broken.png", "label_0": 1}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = data_lib.PreferencePairs({"folder": str(tmp_path)})
    pairs.images(0, 8)
    with pytest.raises(data_lib.DataError, match=r"pair 1 \('bad'\) of .*pairs.jsonl \(rejected image\) \(.*broken.png\): cannot decode"):
        pairs.images(1, 8)
    (tmp_path / "pairs.jsonl").write_text('{"caption": "x", "jpg_0": "a.png", "label_0": 1}\n')
    with pytest.raises(data_lib.DataError, match="rows of .*pairs.jsonl lack jpg_0/jpg_1.*found \\['caption', 'jpg_0', 'label_0'\\]"):
        data_lib.PreferencePairs({"folder": str(tmp_path)})
    (tmp_path / "pairs.jsonl").write_text('{"caption": "x", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 0.5}\n')
    with pytest.raises(data_lib.DataError, match="no untied pair"):
        data_lib.PreferencePairs({"folder": str(tmp_path)})


def test_prompt_lists_in_every_format(tmp_path):
    (tmp_path / "p.txt").write_text("a\n\nb\n")
    (tmp_path / "p.json").write_text('["a", {"caption": "b"}]')
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    (tmp_path / "p.csv").write_text("id,caption\n1,a\n2,b\n")
    for suffix in ("txt", "json", "jsonl", "csv"):
        assert data_lib.load_prompts(str(tmp_path / f"p.{suffix}")) == ["a", "b"]
    assert data_lib.load_prompts(None) == data_lib.DEFAULT_PROMPTS
    (tmp_path / "bad.csv").write_text("id,words\n1,a\n")
    with pytest.raises(data_lib.DataError, match="no 'prompt', 'caption' or 'text' column"):
        data_lib.load_prompts(str(tmp_path / "bad.csv"))


def test_missing_data_splits_and_concepts_say_what_to_add(xl_spec):
    spec = json.loads(xl_spec.read_text())
    spec.pop("data")
    spec.pop("pairs")
    (xl_spec.parent / "nodata.json").write_text(json.dumps(spec))
    world = full.load_world(str(xl_spec.parent / "nodata.json"))
    with pytest.raises(ValueError, match="needs data split 'target'.*\"data\""):
        world.data(2, torch.Generator(), split="target")
    with pytest.raises(ValueError, match="no preference pairs.*pairs"):
        world.preference_pairs(2, torch.Generator())
    with pytest.raises(ValueError, match="class_prompt"):
        world.concept_images(2, torch.Generator())


def test_concept_images_cycle_the_folder_with_instance_and_class_prompts(xl):
    x0, concept, klass = xl.concept_images(5, torch.Generator().manual_seed(0))
    assert x0.shape == (5, *xl.shape)
    assert xl.prompt_texts(concept) == ["a photo of sks cube"] * 5 and xl.prompt_texts(klass) == ["a photo of a cube"] * 5


def test_precomputed_embeddings_free_the_text_encoders(xl_spec):
    world = full.load_world(str(xl_spec), precompute_embeddings=True)
    assert world._encoder_pipe is None
    cond = world.conditions(3, torch.Generator().manual_seed(0))
    assert cond["prompt_embeds"].shape[0] == 3 and world.data(1, torch.Generator(), "target")[0].shape[0] == 1
    with pytest.raises(RuntimeError, match="not precomputed"):
        world.encode(["a prompt nobody listed"])


# --------------------------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("name", sorted(launch.SETTINGS))
def test_every_launcher_setting_is_a_valid_method_command(name):
    import importlib

    s = launch.SETTINGS[name]
    procs = 2 if s.batch % 2 == 0 else 1
    for gpu in defaults.CARDS:
        peak = defaults.planned_peak(name, 1, procs)
        if not defaults.fits(peak, gpu):  # the memory plan refuses it here, naming what fits
            with pytest.raises(launch.DoesNotFit, match=f"{name} does not fit"):
                launch.method_argv(name, num_processes=procs, gpu_memory=gpu)
            continue
        script, argv = launch.method_argv(name, num_processes=procs, gpu_memory=gpu)
        method = importlib.import_module(script.stem)
        cfg = harness.parse_config(method.Config, argv)  # every flag exists in the method's CLI
        micro, steps = launch.per_process_batch(name, procs, gpu)
        assert cfg.batch == micro and defaults.fits(defaults.planned_peak(name, micro, procs), gpu)
        bigger = [b for b in defaults.PLANNED_BATCHES if b > micro and (s.batch // procs) % b == 0]
        assert all(not defaults.fits(defaults.planned_peak(name, b, procs), gpu) for b in bigger)  # the largest
        assert micro * steps * procs == s.batch  # the paper's global batch, by accumulation
        assert cfg.gradient_accumulation_steps == steps
    assert load_spec(cfg.model).base  # the spec file parses
    cmd = launch.command(name, num_processes=4, launcher="accelerate", gpu_memory=80, cuda=True)
    assert cmd[:2] == ["accelerate", "launch"] and cmd[cmd.index("--num_processes") + 1] == "4"
    assert ("--multi_gpu" in cmd) != s.fsdp and ("--config_file" in cmd) == s.fsdp


def test_fsdp_settings_launch_with_the_shipped_fsdp_config_accelerate_accepts():
    """The >= 4 B settings get --config_file full/accelerate/fsdp.yaml with several processes (not --multi_gpu,
    which accelerate refuses next to an FSDP config), plain accelerate with one; accelerate's own launch parser
    reads the command as FSDP2 with 8 processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    fsdp = sorted(n for n, s in launch.SETTINGS.items() if s.fsdp)
    assert fsdp == ["dipp-sd35-large-turbo", "pso-base-transfer-zimage-turbo", "pso-dedistill-zimage-turbo",
                    "pso-online-flux-schnell", "pso-online-zimage-turbo", "pso-style-zimage-turbo",
                    "sharpening-rlhf-zimage"]  # the >= 6 B transformers (FLUX.1, SD3.5-large, Z-Image)
    for name in fsdp:
        cmd = launch.command(name, num_processes=8, cuda=True)
        assert cmd[cmd.index("--config_file") + 1] == str(launch.ACCELERATE_FSDP) and "--multi_gpu" not in cmd
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[2:]))
        assert args.use_fsdp and str(args.fsdp_version) == "2" and args.num_processes == 8 and not args.multi_gpu
        assert "--config_file" not in launch.command(name, num_processes=1)
    assert "--config_file" not in launch.command("sharpening-rlhf-sd35-medium", num_processes=8, cuda=True)


def test_every_launcher_setting_has_its_script():
    scripts = {p.name: p.read_text() for p in (launch.ROOT / "full" / "launchers").glob("*.sh")}
    for name in launch.SETTINGS:
        text = scripts[name.replace("-", "_") + ".sh"]
        assert f"python -m full.launch {name} " in text and launch.SETTINGS[name].spec in text


def test_launcher_rejects_a_batch_the_processes_do_not_divide():
    with pytest.raises(ValueError, match="do not divide the global batch 64"):
        launch.method_argv("pso-offline-dmd2", num_processes=3)
    _, argv = launch.method_argv("pso-offline-dmd2", num_processes=3, extra=["--batch", "5"])
    assert argv[argv.index("--batch") + 1] == "5"


def test_preference_pairs_from_a_pairs_file_path_and_a_yaml_spec(xl_spec, xl):
    """pso.py --pairs FILE hands the path to world.preference_pairs; specs may also be YAML."""
    win, lose, cond = xl.preference_pairs(2, torch.Generator().manual_seed(1), path=xl_spec.parent / "pairs" / "pairs.jsonl")
    assert win.shape == (2, *xl.shape) and set(xl.prompt_texts(cond)) <= {"a red cube", "a blue sphere", "a small house"}
    yaml = pytest.importorskip("yaml")
    (xl_spec.parent / "spec.yaml").write_text(yaml.safe_dump(json.loads(xl_spec.read_text())))
    assert load_spec(str(xl_spec.parent / "spec.yaml")) == load_spec(str(xl_spec))
