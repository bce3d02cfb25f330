"""sharpening.py: trajectory choice, roll-outs vs diffusers' DDIM, Eq. 9 / 11 on hand-computed tensors, NFEs,
end-to-end runs of both variants on the tiny toy worlds, resume identity, NaN stop and bad input."""
import csv
import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

import common
import harness
import sharpening

SDXL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
TINY = dict(batch=4, steps=2, eval_every=1, eval_samples=8, final_samples=16, save_every=1, progress=False)


def read_log(out):
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def tiny_world(monkeypatch, toy2d_tiny):
    monkeypatch.setattr(harness, "load_world", lambda name: toy2d_tiny)
    return toy2d_tiny


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, toy2d_tiny):
    """A finished run of 1 and one of 2 updates, trained once for the tests that only try to resume or replace
    them (each copies one into its own folder)."""
    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(harness, "load_world", lambda name: toy2d_tiny)
        for steps in (1, 2):
            sharpening.train(sharpening.Config(out=str(root / str(steps)), **{**TINY, "steps": steps}))
    return lambda steps, dest: shutil.copytree(root / str(steps), dest, dirs_exist_ok=True)





# ---------------------------------------------------------------------------------------------------
# Trajectory scores and the per-condition choice (Eq. 8)
# ---------------------------------------------------------------------------------------------------
def test_chosen_trajectory_is_the_per_condition_argmax_of_summed_rewards():
    # m = 3 states, B = 2 conditions, n = 3 candidates each (rows condition-major: c0 c0 c0 c1 c1 c1)
    rewards = torch.tensor([[1.0, 5.0, 0.0, -1.0, -2.0, -3.0],
                            [1.0, -4.0, 0.5, -1.0, -2.0, 2.5],
                            [1.0, 0.0, 0.8, -1.0, -2.0, -3.0]])
    scores = sharpening.trajectory_scores(rewards)  # sums: [3, 1, 1.3, -3, -6, -3.5]
    assert torch.allclose(scores, torch.tensor([3.0, 1.0, 1.3, -3.0, -6.0, -3.5]))
    best, worst = sharpening.choose_best_worst(scores, n=3)
    assert best.tolist() == [0, 3] and worst.tolist() == [1, 4]
    # the best state of a single step (row 1: reward 5) does not win: the sum over the trajectory decides
    assert rewards[0].argmax() == 1
    # a pooled argmax over the batch (the official code) would train only condition 0's row 0
    assert scores.argmax() == 0 and 3 in best.tolist()


def test_one_candidate_is_its_own_best():
    best, worst = sharpening.choose_best_worst(torch.tensor([0.3, -2.0, 7.0]), n=1)
    assert best.tolist() == worst.tolist() == [0, 1, 2]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_rollout_reproduces_diffusers_ddim_from_the_same_start(toy2d_tiny, eta):
    world = toy2d_tiny
    den = world.denoiser("teacher")
    ref = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, **SDXL)
    ref.set_timesteps(25)
    grid = den.timesteps
    assert grid == ref.timesteps.tolist()  # the teacher's grid is diffusers' 25-step trailing DDIM grid
    times = grid[18:22]  # m = 4 states from t = 279
    cond = torch.tensor([0, 1, 2, 0, 1, 2])
    x_t = common.add_noise(world.schedule, world.data_for(cond, torch.Generator().manual_seed(1)),
                           torch.randn(6, 2), times[0])
    kernel = common.make_kernel("ddim", world.schedule, eta)
    states, eps_pred, rewards = sharpening.sharpening_rollout(den, kernel, x_t, cond, times, world.reward,
                                                              torch.Generator().manual_seed(3), grad=False)
    assert len(states) == len(eps_pred) == 4 and rewards.shape == (4, 6)
    x, g = x_t, torch.Generator().manual_seed(3)
    for k, t in enumerate(times):
        with torch.no_grad():
            eps = den(x, t, cond)
        out = ref.step(eps, t, x, eta=eta, variance_noise=torch.randn(x.shape, generator=g))
        assert torch.allclose(states[k], x, atol=1e-5), f"state at t={t}"
        # each state is scored by the reward of diffusers' pred_original_sample (the one-step x0 estimate)
        assert torch.allclose(rewards[k], world.reward(out.pred_original_sample, cond), atol=1e-5)
        x = out.prev_sample


# ---------------------------------------------------------------------------------------------------
# Losses (Eq. 9, 10, 11)
# ---------------------------------------------------------------------------------------------------
def test_sft_loss_is_the_summed_eps_mse_of_the_best_trajectory():
    eps = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    eps_pred = [torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[3.0, 0.0], [1.0, 2.0]])]
    # per-dimension means: row 0: (0 + 1)/2 + (4 + 0)/2 = 2.5; row 1: (0 + 4)/2 + (1 + 0)/2 = 2.5
    assert sharpening.sft_loss(eps_pred, eps, "mean").item() == pytest.approx(2.5)
    assert sharpening.sft_loss(eps_pred, eps, "sum").item() == pytest.approx(5.0)
    # one state (m = 1) is the standard denoising loss of diffusers' training scripts
    assert sharpening.sft_loss(eps_pred[:1], eps).item() == pytest.approx(F.mse_loss(eps_pred[0], eps).item())


def test_x0_targets_take_every_state_back_to_its_x0(toy2d_tiny):
    world, den = toy2d_tiny, toy2d_tiny.denoiser("teacher")
    cond, eps = torch.tensor([0, 1, 2, 2]), torch.randn(4, 2)
    x0 = world.data_for(cond, torch.Generator().manual_seed(0))
    times = den.timesteps[5:8]
    x_t = common.add_noise(world.schedule, x0, eps, times[0])
    states, _, _ = sharpening.sharpening_rollout(den, common.make_kernel("ddim", world.schedule, 0.0), x_t, cond,
                                                 times, world.reward, None, grad=False)
    noise = sharpening.eps_targets(world.schedule, states, times, x0, eps, "noise")
    x0_targets = sharpening.eps_targets(world.schedule, states, times, x0, eps, "x0")
    assert all(torch.equal(e, eps) for e in noise)
    assert torch.allclose(x0_targets[0], eps, atol=1e-5)  # the first state is the forward-diffused x_0 itself
    for s, e, t in zip(states, x0_targets, times):
        assert torch.allclose(common.add_noise(world.schedule, x0, e, t), s, atol=1e-5)
    assert not torch.allclose(x0_targets[2], eps, atol=1e-3)  # below the start the DDIM steps left the line


READINGS = ["inside", "outside-minus", "outside-plus"]


@pytest.mark.parametrize("where", READINGS)
def test_rlhf_loss_equals_hand_computed_value_in_each_reading(where):
    mse_w, mse_l = torch.tensor([0.30, 0.10]), torch.tensor([0.50, 0.40])
    ref_w, ref_l = torch.tensor([0.32, 0.12]), torch.tensor([0.48, 0.35])
    gap, beta = torch.tensor([3.0, 0.5]), 10.0
    loss, margin = sharpening.rlhf_loss(mse_w, mse_l, ref_w, ref_l, gap, beta, where)
    # row 0: 10 [(0.32 - 0.30) - (0.48 - 0.50)] = 0.4; row 1: 10 [(0.12 - 0.10) - (0.35 - 0.40)] = 0.7
    assert torch.allclose(margin, torch.tensor([0.4, 0.7]))
    softplus = lambda x: math.log(1 + math.exp(-x))  # -log sigma(x)  # noqa: E731
    rows = {"inside": [softplus(0.4 - 3.0), softplus(0.7 - 0.5)],  # -log sigma(beta D - (R_w - R_l))
            "outside-minus": [softplus(0.4) - 3.0, softplus(0.7) - 0.5],  # -log sigma(beta D) - (R_w - R_l)
            "outside-plus": [softplus(0.4) + 3.0, softplus(0.7) + 0.5]}[where]  # the official code's sign
    assert loss.item() == pytest.approx(sum(rows) / 2, abs=1e-6)


def _rlhf_grad(where, gap):
    torch.manual_seed(0)
    theta = torch.randn(4, requires_grad=True)
    x_w, x_l, eps_w, eps_l = torch.randn(4, 4, 3).unbind(0)  # 4 rows of 3 dimensions each
    eps_theta = lambda x: torch.tanh(theta[:3] * x + theta[3])  # a differentiable toy eps_theta  # noqa: E731
    mse = lambda e, target: ((e - target) ** 2).mean(1)  # noqa: E731
    loss, _ = sharpening.rlhf_loss(mse(eps_theta(x_w), eps_w), mse(eps_theta(x_l), eps_l),
                                   mse(0.9 * x_w, eps_w), mse(0.9 * x_l, eps_l), gap, 5.0, where)
    (g,) = torch.autograd.grad(loss, theta)
    return loss.detach(), g


def test_outside_readings_shift_the_loss_and_leave_the_gradient_alone():
    gap = torch.tensor([5.0, 1.0, 8.0, 0.1], requires_grad=True)
    loss0, g0 = _rlhf_grad("outside-minus", torch.zeros(4))  # plain Diffusion-DPO on the m states
    for where, sign in (("outside-minus", -1), ("outside-plus", 1)):
        loss, g = _rlhf_grad(where, gap)
        assert torch.equal(g, g0) and g0.abs().sum() > 0, where
        assert loss.item() == pytest.approx(loss0.item() + sign * (5 + 1 + 8 + 0.1) / 4, abs=1e-5), where


def test_inside_reading_is_a_per_pair_margin_that_changes_the_gradient():
    _, g0 = _rlhf_grad("inside", torch.zeros(4))
    assert torch.allclose(g0, _rlhf_grad("outside-plus", torch.zeros(4))[1])  # no gap: all three are DPO
    _, g = _rlhf_grad("inside", torch.tensor([5.0, 1.0, 8.0, 0.1]))
    assert not torch.allclose(g, g0, rtol=1e-2)
    # the gap weights each pair's DPO gradient by sigma(gap - margin): a pair with a larger gap pulls harder
    margin = torch.tensor([0.0, 0.0])
    w = [torch.autograd.grad(sharpening.rlhf_loss(-m, torch.zeros(1), torch.zeros(1), torch.zeros(1),
                                                  torch.tensor([gap]), 1.0, "inside")[0], m)[0]
         for gap, m in ((0.0, margin[:1].clone().requires_grad_()), (3.0, margin[:1].clone().requires_grad_()))]
    assert w[0].item() == pytest.approx(-torch.sigmoid(torch.tensor(0.0)).item())
    assert w[1].item() == pytest.approx(-torch.sigmoid(torch.tensor(3.0)).item())


def test_m_reduce_mean_keeps_beta_the_same_for_every_m():
    eps, pred = torch.zeros(2, 3), torch.ones(2, 3)
    for m in (1, 3, 8):
        assert sharpening.trajectory_mse([pred] * m, eps, "mean", "mean").tolist() == [1.0, 1.0]
        assert sharpening.trajectory_mse([pred] * m, eps, "mean", "sum").tolist() == [float(m)] * 2


def test_random_and_worst_choices_stay_within_each_condition():
    scores = torch.tensor([3.0, 1.0, 1.3, -3.0, -6.0, -3.5, 0.0, 9.0, 2.0])
    assert sharpening.choose(scores, 3, "worst").tolist() == [1, 4, 6]
    picks = torch.stack([sharpening.choose(scores, 3, "random", torch.Generator().manual_seed(s)) for s in range(300)])
    for c in range(3):
        assert set(picks[:, c].tolist()) == {3 * c, 3 * c + 1, 3 * c + 2}  # every candidate, only this condition's
    again = sharpening.choose(scores, 3, "random", torch.Generator().manual_seed(7))
    assert torch.equal(again, picks[7])  # drawn from the update's generator: reproducible on resume


def test_rlhf_controls_swap_or_shuffle_the_winner_and_loser_of_each_condition():
    scores = torch.tensor([3.0, 1.0, 1.3, -3.0, -6.0, -3.5, 0.0, 9.0, 2.0])
    best, worst = sharpening.choose_best_worst(scores, 3)
    assert best.tolist() == [0, 3, 7] and worst.tolist() == [1, 4, 6]
    w, l = sharpening.choose_best_worst(scores, 3, "worst")
    assert w.tolist() == [1, 4, 6] and l.tolist() == [0, 3, 7]  # the preference reversed
    pairs = [sharpening.choose_best_worst(scores, 3, "random", torch.Generator().manual_seed(s)) for s in range(200)]
    for c in range(3):
        winners = {int(w[c]) for w, _ in pairs}
        assert winners == {int(best[c]), int(worst[c])}  # a coin between this condition's best and worst
        assert all({int(w[c]), int(l[c])} == {int(best[c]), int(worst[c])} for w, l in pairs)
    w7, _ = sharpening.choose_best_worst(scores, 3, "random", torch.Generator().manual_seed(7))
    assert torch.equal(w7, pairs[7][0])  # drawn from the update's generator: reproducible on resume


def test_rlhf_with_one_state_is_diffusion_dpo():
    # Wallace et al. (Diffusion-DPO): -log sigma(-beta (||e_w - e_theta(x_w)||^2 - ||e_w - e_ref(x_w)||^2
    #                                                 - (||e_l - e_theta(x_l)||^2 - ||e_l - e_ref(x_l)||^2)))
    g = torch.Generator().manual_seed(0)
    e_w, e_l, th_w, th_l, ref_w, ref_l = torch.randn(6, 5, 8, generator=g).unbind(0)
    sq = lambda a, b: ((a - b) ** 2).mean(1)
    beta = 0.7
    dpo = -F.logsigmoid(-beta * (sq(e_w, th_w) - sq(e_w, ref_w) - (sq(e_l, th_l) - sq(e_l, ref_l)))).mean()
    m = sharpening.trajectory_mse
    loss, _ = sharpening.rlhf_loss(m([th_w], e_w), m([th_l], e_l), m([ref_w], e_w), m([ref_l], e_l),
                                   torch.zeros(5), beta, "inside")  # a zero gap: every reading is DPO
    assert loss.item() == pytest.approx(dpo.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# NFEs and the two ways of getting the policy's predictions
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,n,m,recompute,expected", [
    ("sft", 3, 3, False, 9),  # n m
    ("sft", 2, 4, False, 8),
    ("sft", 3, 3, True, 12),  # n m + m
    ("rlhf", 3, 3, False, 90),  # n K + n m + 2 m, K = 25
    ("rlhf", 2, 4, False, 66),
    ("rlhf", 3, 3, True, 96),  # n K + n m + 4 m
])
def test_measured_nfe_per_update_is_the_documented_minimum(tmp_path, tiny_world, variant, n, m, recompute, expected):
    cfg = sharpening.Config(variant=variant, n=n, m=m, recompute=recompute, out=str(tmp_path), **{**TINY, "steps": 1})
    metrics = sharpening.train(cfg)
    assert [float(r["nfe"]) for r in read_log(tmp_path)] == [expected]  # counted
    assert metrics["nfe_per_update"] == sharpening.nfe_per_update(cfg, 25) == expected  # stated


@pytest.mark.parametrize("variant", ["sft", "rlhf"])
def test_recomputing_the_chosen_predictions_gives_the_same_loss_and_gradient(tmp_path, tiny_world, variant):
    rows = []
    for recompute in (False, True):
        out = tmp_path / str(recompute)
        sharpening.train(sharpening.Config(variant=variant, recompute=recompute, out=str(out), **{**TINY, "steps": 1}))
        rows.append(read_log(out)[0])
    stored, recomputed = rows
    assert float(recomputed["nfe"]) > float(stored["nfe"])
    for key in ("loss", "grad_norm", "score_chosen"):  # grad_norm: the norm of the same gradient before clipping
        assert float(stored[key]) == pytest.approx(float(recomputed[key]), rel=1e-5), key


def test_sft_data_top_keeps_the_highest_reward_pairs(toy2d_tiny):
    cfg = sharpening.Config(batch=10, data_top=0.25)
    x0, cond = sharpening.sft_data(toy2d_tiny, cfg, torch.Generator().manual_seed(0))
    pool, pool_cond = toy2d_tiny.data(40, torch.Generator().manual_seed(0))
    keep = toy2d_tiny.reward(pool, pool_cond).topk(10).indices.sort().values
    assert torch.equal(x0, pool[keep]) and torch.equal(cond, pool_cond[keep])
    assert toy2d_tiny.reward(x0, cond).min() >= toy2d_tiny.reward(pool, pool_cond).median()


# ---------------------------------------------------------------------------------------------------
# End to end on the tiny worlds: outputs, resume, NaN, bad input
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_name", ["toy2d_tiny", "mnist_tiny"])
@pytest.mark.parametrize("variant", ["sft", "rlhf"])
def test_each_variant_runs_end_to_end_and_writes_its_outputs(tmp_path, monkeypatch, request, world_name, variant):
    world = request.getfixturevalue(world_name)
    monkeypatch.setattr(harness, "load_world", lambda name: world)
    cfg = ["--variant", variant, "--out", str(tmp_path), "--batch", "3", "--steps", "2", "--eval-every", "1",
           "--eval-samples", "4", "--final-samples", "12", "--m", "2", "--no-progress"]
    metrics = sharpening.main(cfg)
    for name in ("config.json", "log.csv", "metrics.json", "samples.png", "curves.png",
                 "adapter/adapter.safetensors", "checkpoint-2/model-model.safetensors"):
        assert (tmp_path / name).exists(), name
    for key in ("reward_base", "reward_tuned", "quality_base", "quality_tuned", "distance_tuned", "seconds"):
        assert math.isfinite(metrics[key]), key
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "sharpening"
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == ["1", "2"] and all(r["eval_reward"] for r in rows)
    assert {"loss", "reward", "nfe", "seconds"} <= rows[0].keys()


def test_the_summary_table_is_printed(tmp_path, tiny_world, capsys):
    sharpening.train(sharpening.Config(out=str(tmp_path), **TINY))
    out = capsys.readouterr().out
    assert out.splitlines()[-4].split() == ["model", "reward", "quality", "distance"]
    assert "NFE per update 9" in out and f"wrote {tmp_path}" in out


class Crash(RuntimeError):
    pass


def _cut_at(monkeypatch, variant, update):
    """Make the loss function of `variant` raise during its `update`-th call (a kill mid-update)."""
    loss_fn = getattr(sharpening, f"{variant}_loss")
    calls = []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == update:
            raise Crash("killed")
        return loss_fn(*a, **k)

    monkeypatch.setattr(sharpening, f"{variant}_loss", dying)
    return loss_fn


@pytest.mark.parametrize("variant,extra", [("sft", {}), ("rlhf", {}), ("sft", dict(choose="random"))])
def test_an_interrupted_and_resumed_run_ends_bit_identical(tmp_path, tiny_world, monkeypatch, variant, extra):
    cfg = dict(variant=variant, **{**TINY, "steps": 4, "save_every": 2}, **extra)
    sharpening.train(sharpening.Config(out=str(tmp_path / "straight"), **cfg))
    loss_fn = _cut_at(monkeypatch, variant, 3)  # killed during update 3, after the checkpoint of update 2
    with pytest.raises(Crash):
        sharpening.train(sharpening.Config(out=str(tmp_path / "cut"), **cfg))
    monkeypatch.setattr(sharpening, f"{variant}_loss", loss_fn)
    sharpening.train(sharpening.Config(out=str(tmp_path / "cut"), resume=True, **cfg))
    a = (tmp_path / "straight" / "adapter" / "adapter.safetensors").read_bytes()
    b = (tmp_path / "cut" / "adapter" / "adapter.safetensors").read_bytes()
    assert a == b  # bit-identical
    straight, cut = read_log(tmp_path / "straight"), read_log(tmp_path / "cut")
    assert [r["step"] for r in cut] == ["1", "2", "3", "4"]
    assert [r["loss"] for r in cut] == [r["loss"] for r in straight]


@pytest.mark.parametrize("variant", ["sft", "rlhf"])
def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, tiny_world, monkeypatch, variant):
    loss_fn = getattr(sharpening, f"{variant}_loss")
    calls = []

    def nan_at_3(*a, **k):
        calls.append(1)
        out = loss_fn(*a, **k)
        if len(calls) < 3:
            return out
        return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")

    monkeypatch.setattr(sharpening, f"{variant}_loss", nan_at_3)
    with pytest.raises(harness.NonFiniteLoss, match=r"non-finite loss \(nan\) at update 3.*checkpoint-2\) is kept"):
        sharpening.train(sharpening.Config(variant=variant, out=str(tmp_path), **{**TINY, "steps": 5}))
    assert json.loads((tmp_path / "checkpoint-2" / "state.json").read_text())["step"] == 2
    assert [r["step"] for r in read_log(tmp_path)] == ["1", "2"]


def test_non_finite_rewards_stop_the_run(tmp_path, tiny_world, monkeypatch):
    monkeypatch.setattr(tiny_world, "reward", lambda x0, cond: torch.full((len(x0),), float("nan")))
    with pytest.raises(harness.NonFiniteLoss, match="reward returned non-finite scores.*no checkpoint was written"):
        sharpening.train(sharpening.Config(out=str(tmp_path), **TINY))


@pytest.mark.parametrize("variant", ["sft", "rlhf"])
def test_gradient_accumulation_runs_and_counts_the_same_nfes_per_micro_batch(tmp_path, tiny_world, variant):
    one = sharpening.train(sharpening.Config(variant=variant, out=str(tmp_path / "g1"), **{**TINY, "steps": 2}))
    two = sharpening.train(sharpening.Config(variant=variant, out=str(tmp_path / "g2"), gradient_accumulation_steps=2,
                                             **{**TINY, "steps": 2}))
    rows1, rows2 = read_log(tmp_path / "g1"), read_log(tmp_path / "g2")
    assert [r["nfe"] for r in rows2] == [r["nfe"] for r in rows1] == [str(one["nfe_per_update"])] * 2
    assert two["nfe_per_update"] == one["nfe_per_update"]
    assert all(r["grad_norm"] for r in rows2) and rows2[0]["loss"] != rows1[0]["loss"]  # two micro-batches, meaned


@pytest.mark.parametrize("overrides,message", [
    (dict(variant="rlhf", n=1), "--n: expected a finite number >= 2, got 1"),
    (dict(m=26), "--m: expected at most the sampler grid's 25 times"),
    (dict(m=4, start_t=79), "--m: expected at most 2 states: only 1 grid times lie below --start-t 79"),
    (dict(start_t=500), "--start-t: expected a time of the sampler grid"),
    (dict(n=0), "--n: expected a finite number >= 1, got 0"),
    (dict(m=0), "--m: expected a finite number >= 1, got 0"),
    (dict(data_top=0.0), "--data-top: expected a finite number > 0 and <= 1, got 0.0"),
    (dict(lr=float("nan")), "--lr: expected a finite number > 0"),
    (dict(variant="rlhf", choose="any"), "--choose: expected one of ['best', 'random', 'worst'], got 'any'"),
    (dict(reward_gap="outside"), "--reward-gap: expected one of"),
    (dict(beta=0.0), "--beta: expected a finite number > 0"),
])
def test_bad_input_gets_a_clear_error_and_keeps_saved_files(tmp_path, tiny_world, finished_runs, overrides, message):
    finished_runs(1, tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(harness.ConfigError, match=re.escape(message)):  # even where it would replace the run
        sharpening.train(sharpening.Config(out=str(tmp_path), overwrite=True, **{**TINY, "steps": 1}, **overrides))
    with pytest.raises(harness.ConfigError):  # on --resume: this error or the changed-setting one, before any write
        sharpening.train(sharpening.Config(out=str(tmp_path), resume=True, **{**TINY, "steps": 1}, **overrides))
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("change", [dict(variant="rlhf"), dict(reward_gap="outside-plus"), dict(m_reduce="sum"),
                                    dict(choose="worst"), dict(beta=50.0)])
def test_resume_with_a_changed_setting_is_refused_before_anything_is_written(tmp_path, tiny_world, finished_runs,
                                                                              change):
    finished_runs(2, tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    (name, value), = change.items()
    with pytest.raises(harness.ConfigError, match=re.escape(f"{harness.flag(name)} saved")):
        sharpening.train(sharpening.Config(out=str(tmp_path), resume=True, **{**TINY, **change}))
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_resumed_run_may_change_steps_and_evaluation_sizes(tmp_path, tiny_world, finished_runs):
    """--steps and the evaluation sizes may change: a longer run of the same experiment."""
    finished_runs(2, tmp_path)
    sharpening.train(sharpening.Config(out=str(tmp_path), resume=True, **{**TINY, "steps": 3, "final_samples": 8}))
    assert [r["step"] for r in read_log(tmp_path)] == ["1", "2", "3"]


def test_resume_of_another_methods_run_folder_is_refused(tmp_path, tiny_world):
    (tmp_path / "config.json").write_text(json.dumps({"method": "pso", "seed": 0}))
    with pytest.raises(harness.ConfigError, match="is a run of 'pso', not of 'sharpening'"):
        sharpening.train(sharpening.Config(out=str(tmp_path), resume=True, **TINY))
    assert json.loads((tmp_path / "config.json").read_text()) == {"method": "pso", "seed": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
