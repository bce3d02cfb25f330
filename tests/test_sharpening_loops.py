"""sharpening.train wired right: what went into each loss, recorded from the real loop (issue 14).

A recording world wraps toy2d_tiny: every denoiser call (time, rows, input, output, frozen or policy, autograd on
or off), every reward call and every forward diffusion (common.add_noise) is logged, and the loss functions are
intercepted. One update is the stretch from `sharpening.candidates` to the loss call. The checks compare the
loss's arguments with the recorded network calls; they do not call the loop's helpers to re-derive them.
Then a direction test per variant: a few updates move the objective the right way."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import common
import sharpening

SMALL = dict(batch=4, n=3, m=3, steps=2, eval_every=100, eval_samples=4, final_samples=8, save_every=100,
             progress=False, lr=1e-3)


class RecordingDenoiser:
    def __init__(self, den, log):
        self.den, self.log, self.is_frozen = den, log, False

    def __call__(self, x, t, cond):
        out = self.den(x, t, cond)
        self.log.append(dict(kind="net", t=int(t), x=x.detach().clone(), cond=cond.clone(), out=out,
                             frozen=self.is_frozen, grad=torch.is_grad_enabled() and out.requires_grad))
        return out

    @contextlib.contextmanager
    def frozen(self):
        with self.den.frozen():
            self.is_frozen = True
            try:
                yield
            finally:
                self.is_frozen = False

    def __getattr__(self, name):  # timesteps, module, adapter_state, ...
        return getattr(self.__dict__["den"], name)


class RecordingWorld:
    def __init__(self, world, log):
        self.world, self.log = world, log

    def denoiser(self, *a, **k):
        return RecordingDenoiser(self.world.denoiser(*a, **k), self.log)

    def reward(self, x0, cond):
        r = self.world.reward(x0, cond)
        self.log.append(dict(kind="reward", x=x0.detach().clone(), cond=cond.clone(), out=r.detach().clone()))
        return r

    def __getattr__(self, name):
        return getattr(self.__dict__["world"], name)


def record(tmp_path, monkeypatch, world, **overrides):
    """Run the real train() on a recording world; -> (cfg, [one dict per update], all events)."""
    log = []
    real_candidates, real_add_noise = sharpening.candidates, common.add_noise
    real_sft, real_rlhf = sharpening.sft_loss, sharpening.rlhf_loss

    def candidates(*a, **k):
        log.append(dict(kind="begin"))
        return real_candidates(*a, **k)

    def add_noise(sched, x0, eps, t):
        out = real_add_noise(sched, x0, eps, t)
        log.append(dict(kind="noise", x0=x0.clone(), eps=eps.clone(), t=int(t), out=out.clone()))
        return out

    def sft_loss(*a, **k):
        loss = real_sft(*a, **k)
        log.append(dict(kind="loss", args=a, kw=k, loss=loss))
        return loss

    def rlhf_loss(*a, **k):
        out = real_rlhf(*a, **k)
        log.append(dict(kind="loss", args=a, kw=k, loss=out[0]))
        return out

    monkeypatch.setattr(sharpening, "candidates", candidates)
    monkeypatch.setattr(common, "add_noise", add_noise)
    monkeypatch.setattr(sharpening, "sft_loss", sft_loss)
    monkeypatch.setattr(sharpening, "rlhf_loss", rlhf_loss)
    cfg = sharpening.Config(out=str(tmp_path), **{**SMALL, **overrides})
    sharpening.train(cfg, RecordingWorld(world, log))
    updates, cur = [], None
    for e in log:
        if e["kind"] == "begin":
            cur = dict(net=[], reward=[], noise=[])
        elif cur is not None and e["kind"] == "loss":
            cur["loss"] = e
            updates.append(cur)
            cur = None
        elif cur is not None:
            cur[e["kind"]].append(e)
    assert len(updates) == cfg.steps * cfg.gradient_accumulation_steps
    return cfg, updates, log


def grid_of(world):
    return list(world.denoiser("teacher").timesteps)


def check_rollout(world, cfg, u, calls):
    """The m roll-out calls: consecutive grid times from the forward-diffused start, every candidate row, policy
    with autograd, each state the DDIM step of the one before with that call's prediction; each state scored by
    the reward of its one-step x0 estimate. -> (times, per-state rewards [m, B*n])."""
    grid, (noise,) = grid_of(world), u["noise"]
    times = [c["t"] for c in calls]
    i = grid.index(noise["t"])
    assert times == grid[i:i + cfg.m]  # the start is the forward-diffusion time, then the next m-1 grid times
    assert torch.equal(calls[0]["x"], noise["out"])  # the first state is x_t = alpha x_0 + sigma eps
    kernel = common.make_kernel("ddim", world.schedule, 0.0)
    for k, c in enumerate(calls):
        assert len(c["x"]) == cfg.batch * cfg.n and not c["frozen"]
        assert c["grad"] == (not cfg.recompute)
        if k + 1 < len(calls):  # eta = 0: the next state is the DDIM mean of this state and prediction
            mean, _ = kernel.step(c["x"], c["out"].detach(), c["t"], calls[k + 1]["t"])
            assert torch.allclose(calls[k + 1]["x"], mean, atol=1e-5)
    scored = [r for r in u["reward"] if len(r["x"]) == cfg.batch * cfg.n][-cfg.m:]
    for c, r in zip(calls, scored):  # Eq. 6: the reward of x0_hat = (x_t - sigma eps_theta) / alpha
        a, s = world.schedule.alpha_sigma(c["t"], c["x"])
        assert torch.allclose(r["x"], (c["x"] - s * c["out"].detach()) / a, atol=1e-5)
        assert torch.equal(r["cond"], c["cond"])
    return times, torch.stack([r["out"] for r in scored])


def chosen_candidates(cfg, rollout_out, loss_pred):
    """Which candidate of each condition the loss got, found by matching its predictions to the roll-out's."""
    chosen = []
    for b in range(cfg.batch):
        rows = [j for j in range(cfg.n) if torch.allclose(loss_pred[b], rollout_out[b * cfg.n + j].detach())]
        assert len(rows) == 1, f"condition {b}: the loss's prediction matches candidates {rows}"
        chosen.append(rows[0])
    return torch.tensor(chosen)


def conditions_are_candidate_major(cfg, cond):
    c = cond.view(cfg.batch, cfg.n)
    assert (c == c[:, :1]).all()  # the n candidates of a condition are adjacent rows of the same condition


# ---------------------------------------------------------------------------------------------------
# SFT (Alg. 1): which candidate, which states, which targets, which gradients
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["best", "random", "worst"])
@pytest.mark.parametrize("recompute", [False, True])
def test_sft_loss_gets_the_chosen_candidate_of_each_condition_at_its_m_states(tmp_path, monkeypatch, toy2d_tiny,
                                                                               how, recompute):
    cfg, updates, _ = record(tmp_path, monkeypatch, toy2d_tiny, variant="sft", choose=how, recompute=recompute,
                             steps=3)
    picked = []
    for u in updates:
        (noise,) = u["noise"]
        roll = u["net"][:cfg.m]
        times, rewards = check_rollout(toy2d_tiny, cfg, u, roll)
        conditions_are_candidate_major(cfg, roll[0]["cond"])
        x0 = noise["x0"].view(cfg.batch, cfg.n, -1)
        assert (x0 == x0[:, :1]).all()  # Alg. 1: every candidate re-noises the same data x_0
        eps = noise["eps"].view(cfg.batch, cfg.n, -1)
        assert not torch.allclose(eps[:, 0], eps[:, 1])  # ... with its own noise
        scores = rewards.sum(0).view(cfg.batch, cfg.n)  # Eq. 8
        eps_pred, target = u["loss"]["args"][:2]
        assert len(eps_pred) == cfg.m
        chosen_t = chosen_candidates(cfg, roll[0]["out"], eps_pred[0])
        if how == "best":
            assert torch.equal(chosen_t, scores.argmax(1))
        elif how == "worst":
            assert torch.equal(chosen_t, scores.argmin(1))
        picked += chosen_t.tolist()
        rows = torch.arange(cfg.batch) * cfg.n + chosen_t
        if recompute:  # m more calls with autograd, on the chosen rows' stored states
            again = u["net"][cfg.m:]
            assert [c["t"] for c in again] == times and all(c["grad"] and not c["frozen"] for c in again)
            for c, r in zip(again, roll):
                assert torch.equal(c["x"], r["x"][rows]) and torch.equal(c["cond"], r["cond"][rows])
            source = [c["out"] for c in again]
        else:  # the roll-out's own predictions, reused
            assert len(u["net"]) == cfg.m
            source = [c["out"][rows] for c in roll]
        for k in range(cfg.m):
            assert torch.equal(eps_pred[k], source[k]) and eps_pred[k].requires_grad  # the policy, with autograd
        targets = target if isinstance(target, list) else [target] * cfg.m
        for t in targets:  # Eq. 9: the chosen candidate's own noise at every state, a constant
            assert torch.equal(t, noise["eps"][rows]) and not t.requires_grad
        assert u["loss"]["args"][2:] == (cfg.reduce, cfg.m_reduce)
    if how == "random":  # a random candidate: not always the best nor always the worst
        assert len(set(picked)) > 1


def test_sft_target_x0_regresses_each_state_on_the_noise_back_to_its_x0(tmp_path, monkeypatch, toy2d_tiny):
    cfg, updates, _ = record(tmp_path, monkeypatch, toy2d_tiny, variant="sft", target="x0")
    for u in updates:
        (noise,) = u["noise"]
        eps_pred, targets = u["loss"]["args"][:2]
        roll = u["net"][:cfg.m]
        rows = torch.arange(cfg.batch) * cfg.n + chosen_candidates(cfg, roll[0]["out"], eps_pred[0])
        for k, c in enumerate(roll):
            a, s = toy2d_tiny.schedule.alpha_sigma(c["t"], c["x"])
            assert torch.allclose(a * noise["x0"][rows] + s * targets[k], c["x"][rows], atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# RLHF (Alg. 2): samples, re-noising, winner and loser, reference, the three reward-gap readings
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reading,extra", [
    ("inside", {}), ("outside-minus", {}), ("outside-plus", {}), ("inside", dict(recompute=True)),
    ("inside", dict(same_noise=False, m_reduce="sum", reward_gap_scale=2.0)),
    ("inside", dict(choose="worst"))])  # the control: winner and loser swapped
def test_rlhf_loss_gets_winner_and_loser_of_each_condition_against_the_frozen_reference(tmp_path, monkeypatch,
                                                                                        toy2d_tiny, reading, extra):
    cfg, updates, _ = record(tmp_path, monkeypatch, toy2d_tiny, variant="rlhf", reward_gap=reading, **extra)
    grid, K, B, n, m = grid_of(toy2d_tiny), len(grid_of(toy2d_tiny)), cfg.batch, cfg.n, cfg.m
    kernel = common.make_kernel("ddim", toy2d_tiny.schedule, 0.0)
    for u in updates:
        calls = u["net"]
        sampling, roll = calls[:K], calls[K:K + m]
        ref = [c for c in calls[K + m:] if c["frozen"]]
        again = [c for c in calls[K + m:] if not c["frozen"]]
        assert len(ref) == m and len(again) == (m if cfg.recompute else 0)  # m calls on 2B rows each
        # Alg. 2: n samples per condition of the current model, K DDIM steps on the grid, no autograd
        assert [c["t"] for c in sampling] == grid and all(not c["frozen"] and not c["grad"] for c in sampling)
        conditions_are_candidate_major(cfg, sampling[0]["cond"])
        x = sampling[-1]["x"]
        x0, _ = kernel.step(x, sampling[-1]["out"], grid[-1], -1)
        (noise,) = u["noise"]
        assert torch.allclose(noise["x0"], x0, atol=1e-5)  # the re-noised x_0 are the model's own samples
        eps = noise["eps"].view(B, n, -1)
        if cfg.same_noise:  # one eps per condition, shared by its n samples; different across conditions
            assert (eps == eps[:, :1]).all() and not torch.allclose(eps[0, 0], eps[1, 0])
        else:
            assert not torch.allclose(eps[:, 0], eps[:, 1])
        times, rewards = check_rollout(toy2d_tiny, cfg, u, roll)
        scores = rewards.sum(0).view(B, n)
        best = torch.arange(B) * n + scores.argmax(1)
        worst = torch.arange(B) * n + scores.argmin(1)
        if cfg.choose == "worst":
            best, worst = worst, best
        rows = torch.cat([best, worst])
        # the frozen reference at the winner's and loser's m states, the same times as the policy, no autograd
        assert [c["t"] for c in ref] == times
        for c, r in zip(ref, roll):
            assert torch.equal(c["x"], r["x"][rows]) and torch.equal(c["cond"], r["cond"][rows]) and not c["grad"]
        policy = [c["out"] for c in again] if cfg.recompute else [r["out"][rows] for r in roll]
        target = noise["eps"][rows]

        def M(outs):  # Eq. 10 over the m states, as configured
            mse = sum(((o.detach() - target) ** 2).mean(1) for o in outs)
            return mse / m if cfg.m_reduce == "mean" else mse

        mse_w, mse_l, ref_w, ref_l, gap, beta, where = u["loss"]["args"]
        assert torch.allclose(mse_w, M(policy)[:B]) and torch.allclose(mse_l, M(policy)[B:])  # winner, loser
        assert torch.allclose(ref_w, M([c["out"] for c in ref])[:B])
        assert torch.allclose(ref_l, M([c["out"] for c in ref])[B:])
        assert mse_w.requires_grad and mse_l.requires_grad  # the policy side carries the gradient
        assert not (ref_w.requires_grad or ref_l.requires_grad or gap.requires_grad)
        # R_w - R_l: per-state mean score difference, times the scale
        assert torch.allclose(gap, cfg.reward_gap_scale * (rewards[:, best] - rewards[:, worst]).mean(0))
        assert ((gap >= 0) if cfg.choose == "best" else (gap <= 0)).all()  # swapped: the winner scored lower
        assert beta == cfg.beta and where == reading


def test_rlhf_logged_loss_is_the_chosen_reading(tmp_path, monkeypatch, toy2d_tiny):
    import csv

    for reading in ("inside", "outside-minus", "outside-plus"):
        cfg, updates, _ = record(tmp_path / reading, monkeypatch, toy2d_tiny, variant="rlhf", reward_gap=reading)
        rows = list(csv.DictReader(open(tmp_path / reading / "log.csv")))
        for row, u in zip(rows, updates):
            mse_w, mse_l, ref_w, ref_l, gap, beta, _ = u["loss"]["args"]
            margin = beta * ((ref_w - ref_l) - (mse_w - mse_l)).detach()
            want = {"inside": -F.logsigmoid(margin - gap), "outside-minus": -F.logsigmoid(margin) - gap,
                    "outside-plus": -F.logsigmoid(margin) + gap}[reading].mean()
            assert float(row["loss"]) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
            assert float(row["reward_gap"]) == pytest.approx(float(gap.mean()), rel=1e-4, abs=1e-6)


def test_base_metrics_come_from_the_frozen_model_and_tuned_from_the_policy(tmp_path, monkeypatch, toy2d_tiny):
    cfg, updates, log = record(tmp_path, monkeypatch, toy2d_tiny, variant="sft")
    evals = [e for e in log if e["kind"] == "net" and len(e["x"]) == cfg.final_samples]
    K = len(grid_of(toy2d_tiny))
    assert len(evals) == 2 * K  # base and tuned, K deterministic DDIM steps each, from the same noise
    assert all(e["frozen"] for e in evals[:K]) and not any(e["frozen"] for e in evals[K:])
    assert torch.equal(evals[0]["x"], evals[K]["x"]) and torch.equal(evals[0]["cond"], evals[K]["cond"])


# ---------------------------------------------------------------------------------------------------
# Direction: a handful of updates move the objective the right way
# ---------------------------------------------------------------------------------------------------
def test_sft_updates_lower_the_denoising_loss_on_held_out_curated_pairs(tmp_path, toy2d_tiny_height):
    """Eq. 9 regresses the model on reward-curated data (--data-top 0.5): after a few updates the eps-MSE on held-out
    curated pairs (fresh data and noise at the training start time) is well below the base model's, and the samples
    moved up the reward; a sign error (ascent on Eq. 9) or training on the wrong rows does not do both."""
    from safetensors.torch import load_file

    m = sharpening.train(sharpening.Config(variant="sft", out=str(tmp_path), **{**SMALL, "steps": 30, "batch": 32,
                                                                                "start_t": 519, "final_samples": 256}),
                         toy2d_tiny_height)
    base, tuned = toy2d_tiny_height.denoiser("teacher"), toy2d_tiny_height.denoiser("teacher")
    tuned.load_adapter_state(load_file(str(tmp_path / "checkpoint-30" / "model-model.safetensors")))
    g = torch.Generator().manual_seed(99)
    x0, cond = sharpening.sft_data(toy2d_tiny_height, sharpening.Config(batch=512), g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = common.add_noise(toy2d_tiny_height.schedule, x0, eps, 519)
    with torch.no_grad():
        mse_base, mse_tuned = (float(((d(x_t, 519, cond) - eps) ** 2).mean()) for d in (base, tuned))
    assert mse_tuned < 0.85 * mse_base, (mse_base, mse_tuned)
    assert m["reward_tuned"] > m["reward_base"] + 0.25, m


def test_rlhf_updates_raise_the_reward_of_fixed_seed_samples(tmp_path, toy2d_tiny_height):
    """Eq. 11 prefers the higher-reward sample of each pair: a few updates raise the reward (height) of fixed-seed
    samples far above the base model's; with winner and loser swapped, or the margin's sign flipped, it falls."""
    m = sharpening.train(sharpening.Config(variant="rlhf", out=str(tmp_path), **{**SMALL, "steps": 20, "batch": 16,
                                                                                  "lr": 3e-3, "final_samples": 256}),
                         toy2d_tiny_height)
    assert m["reward_tuned"] > m["reward_base"] + 0.5, m
