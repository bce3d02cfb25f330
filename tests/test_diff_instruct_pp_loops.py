"""Diff-Instruct++'s training loop, wiring checked from the outside (issue 14): the real `train()` runs for a few
updates while every network call and both losses are recorded, then each call is checked for the model that made
it (generator, TA, reference = TA with its adapter disabled, CFG null), its input state, timestep and condition,
which terms carry gradient and which noises are shared. Direction tests run on an analytic Gaussian world where
the IKL's fixed point is known."""
import math

import pytest
import torch

import common
import diff_instruct_pp as dipp


# ---------------------------------------------------------------------------------------------------
# Recording: a world whose denoisers log every call
# ---------------------------------------------------------------------------------------------------
class RecordingDenoiser:
    def __init__(self, den, name, log):
        self.den, self.name, self.log = den, name, log
        self.in_frozen = False

    def __call__(self, x_t, t, cond):
        out = self.den(x_t, t, cond)
        t = torch.as_tensor(t).expand(x_t.shape[0]).clone()
        self.log.append(dict(model=self.name + ("/frozen" if self.in_frozen else ""), x=x_t.detach().clone(),
                             x_grad=x_t.requires_grad, grad=torch.is_grad_enabled(), t=t, cond=cond.clone(),
                             out=out.detach().clone(), out_grad=out.requires_grad))
        return out

    def frozen(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.in_frozen = True
            try:
                with self.den.frozen():
                    yield
            finally:
                self.in_frozen = False
        return ctx()

    def __getattr__(self, name):
        return getattr(self.__dict__["den"], name)


class RecordingWorld:
    """The tiny toy2d world; its first denoiser is the generator, its second the TA (the order train() builds them)."""

    def __init__(self, world):
        self.world, self.calls, self.made = world, [], []

    def denoiser(self, role, **kw):
        name = ["generator", "ta"][len(self.made)]
        den = RecordingDenoiser(self.world.denoiser(role, **kw), name, self.calls)
        self.made.append((name, role, kw))
        return den

    def __getattr__(self, name):
        return getattr(self.__dict__["world"], name)


def record(tmp_path, world, monkeypatch, **kw):
    """Run train() and return (world, per-update call lists, pseudo-loss calls, TA-loss calls)."""
    rec = RecordingWorld(world)
    losses = {"g": [], "ta": []}
    real_g, real_ta = dipp.generator_pseudo_loss, dipp.ta_loss

    def g_loss(x_t, score_ta, score_ref, weight, reward, reward_scale):
        losses["g"].append(dict(x_t=x_t.detach().clone(), x_t_grad=x_t.requires_grad, score_ta=score_ta.clone(),
                                score_ta_grad=score_ta.requires_grad, score_ref=score_ref.clone(),
                                score_ref_grad=score_ref.requires_grad, weight=weight.clone(), reward=reward.detach(),
                                reward_grad=reward.requires_grad, reward_scale=reward_scale, n=len(rec.calls)))
        return real_g(x_t, score_ta, score_ref, weight, reward, reward_scale)

    def t_loss(eps_pred, eps):
        losses["ta"].append(dict(eps_pred=eps_pred.detach().clone(), pred_grad=eps_pred.requires_grad,
                                 eps=eps.clone(), n=len(rec.calls)))
        return real_ta(eps_pred, eps)

    monkeypatch.setattr(dipp, "generator_pseudo_loss", g_loss)
    monkeypatch.setattr(dipp, "ta_loss", t_loss)
    base = dict(steps=2, batch=8, eval_samples=8, out=str(tmp_path / "run"), progress=False, save_every=100)
    dipp.train(dipp.Config(**{**base, **kw}), world=rec)
    return rec, losses


def update_calls(rec, per_update):
    """The calls of the training updates: after the base evaluation (1 call) and before the final evaluation."""
    calls = rec.calls[1:]
    n = per_update
    return [calls[i * n:(i + 1) * n] for i in range(2)]


def x0_of(call, sched):
    return common.x0_from_eps(sched, call["x"], call["out"], call["t"])


CASES = {
    "dipp": dict(reward_scale=0.5, cfg_scale=1.0, ta_steps=2),
    "dipp-cfg": dict(reward_scale=0.5, cfg_scale=3.0, ta_steps=2),
    "di": dict(variant="di", cfg_scale=4.5, ta_steps=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_network_call_and_loss_input_of_an_update(tmp_path, toy2d_tiny, monkeypatch, case):
    kw = CASES[case]
    rec, losses = record(tmp_path, toy2d_tiny, monkeypatch, **kw)
    sched, omega, B = toy2d_tiny.schedule, kw["cfg_scale"], 8
    gen_t = dipp.init_timestep(sched, 2.5) if case == "di" else 999
    assert rec.made[0][1] == ("teacher" if case == "di" else "generator") and rec.made[1][1] == "teacher"
    null = toy2d_tiny.null_condition(B)
    # per update: generator(grad), TA, reference (1 call; CFG: one call on [cond; null]), TA step on that sample,
    # then for the second TA step a fresh generator sample (no grad) and its TA step
    per_update = 6
    for step, calls in enumerate(update_calls(rec, per_update), start=1):
        g, ta, ref, ta1, g2, ta2 = calls
        assert [c["model"] for c in calls] == ["generator", "ta", "ta/frozen", "ta", "generator", "ta"]
        # the generator: at its one timestep, from z drawn on this update's stream (dipp: x_t = z; di: sigma_t z)
        gen = common.step_generator(0, step, 0)
        cond = toy2d_tiny.conditions(B, gen)
        z = torch.randn(B, 2, generator=gen)
        sigma_g = sched.alpha_sigma(gen_t)[1]
        torch.testing.assert_close(g["x"], z * (sigma_g if case == "di" else 1.0), rtol=1e-5, atol=1e-6)
        assert (g["t"] == gen_t).all() and torch.equal(g["cond"], cond) and g["grad"] and g["out_grad"]
        x0 = x0_of(g, sched)
        # TA and reference at the same x_t (shared noise), with the rows' own t, no graph
        lg = losses["g"][step - 1]
        assert torch.equal(ta["x"], lg["x_t"]) and torch.equal(ta["t"], ref["t"][:B]) and not ta["grad"]
        assert torch.equal(ta["cond"], cond) and not ref["grad"]
        if omega != 1.0:
            assert torch.equal(ref["x"], torch.cat([lg["x_t"]] * 2)) and torch.equal(ref["cond"], torch.cat([cond, null]))
            eps_c, eps_null = ref["out"].chunk(2)
            eps_ref = eps_null + omega * (eps_c - eps_null)
        else:
            assert torch.equal(ref["x"], lg["x_t"]) and torch.equal(ref["cond"], cond)
            eps_ref = ref["out"]
        t = ta["t"]
        alpha, sigma = sched.alpha_sigma(t, x0)
        assert t.min() >= 20 and t.max() <= 980 and len(t.unique()) > 1  # per-row t ~ pi, not one t
        # the pseudo-loss: x_t = alpha_t x0 + sigma_t eps carries the generator graph, the scores are constants
        eps = (lg["x_t"] - alpha * x0) / sigma
        assert eps.std() > 0.3  # a real noise draw, not x_t = alpha x0
        assert lg["x_t_grad"] and not lg["score_ta_grad"] and not lg["score_ref_grad"]
        torch.testing.assert_close(lg["score_ta"], -ta["out"] / sigma)
        torch.testing.assert_close(lg["score_ref"], -eps_ref / sigma)
        torch.testing.assert_close(lg["weight"], sigma**2 / alpha**2)
        assert lg["reward_scale"] == (0.0 if case == "di" else kw["reward_scale"])
        if case != "di":
            assert lg["reward_grad"]
            torch.testing.assert_close(lg["reward"], toy2d_tiny.reward(x0, cond))
        # TA step 1: on this update's generator sample, detached, a fresh t and a fresh noise
        l1, l2 = losses["ta"][2 * step - 2: 2 * step]
        a1, s1 = sched.alpha_sigma(ta1["t"], x0)
        assert ta1["grad"] and not ta1["x_grad"] and ta1["out_grad"] and l1["pred_grad"]
        torch.testing.assert_close(ta1["x"], a1 * x0 + s1 * l1["eps"])
        torch.testing.assert_close(l1["eps_pred"], ta1["out"])
        assert torch.equal(ta1["cond"], cond) and not torch.equal(ta1["t"], t)
        assert (l1["eps"] - eps).abs().max() > 0.1  # not the generator step's noise
        # TA step 2: a fresh generator sample (no graph), same pairing
        assert not g2["grad"] and (g2["t"] == gen_t).all() and not torch.equal(g2["x"], g["x"])
        x0b = x0_of(g2, sched)
        a2, s2 = sched.alpha_sigma(ta2["t"], x0b)
        torch.testing.assert_close(ta2["x"], a2 * x0b + s2 * l2["eps"])
        torch.testing.assert_close(l2["eps_pred"], ta2["out"])
        assert torch.equal(ta2["cond"], g2["cond"]) and ta2["grad"]
        assert not torch.equal(ta1["t"], ta2["t"]) and not torch.equal(l1["eps"], l2["eps"])  # each TA step draws its own


def test_the_lognormal_density_and_its_range_reach_the_loop(tmp_path, toy2d_tiny, monkeypatch):
    rec, losses = record(tmp_path, toy2d_tiny, monkeypatch, reward_scale=0.5, time_density="lognormal", t_min=300,
                         t_max=400, weighting="unit", ta_steps=1, batch=64)
    calls = rec.calls[1:]
    ts = torch.cat([c["t"] for c in calls if c["model"] != "generator"])
    assert ts.min() >= 300 and ts.max() <= 400 and len(ts.unique()) > 10
    assert all(torch.equal(lg["weight"], torch.ones_like(lg["weight"])) for lg in losses["g"])


def test_ema_is_the_authors_recursion_and_changes_nothing_in_training(tmp_path, toy2d_tiny, monkeypatch):
    """theta_ema(0) = theta(0), theta_ema(k) = d theta_ema(k-1) + (1 - d) theta(k) after each generator update; the
    raw generator is the same with and without --ema."""
    from safetensors.torch import load_file

    seen, initial = [], []
    real, real_init = dipp.GeneratorEMA.update, dipp.GeneratorEMA.__init__

    def spy_init(self, den, decay):
        initial.append([p.detach().clone() for p in den.trainable_parameters()])  # the generator before update 1
        real_init(self, den, decay)

    def spy(self):
        seen.append([p.detach().clone() for p in self.params])
        real(self)

    monkeypatch.setattr(dipp.GeneratorEMA, "update", spy)
    monkeypatch.setattr(dipp.GeneratorEMA, "__init__", spy_init)
    kw = dict(steps=3, batch=8, eval_samples=8, progress=False, reward_scale=0.5, lr=1e-2)
    with_ema = dipp.train(dipp.Config(out=str(tmp_path / "a"), ema=True, ema_decay=0.8, **kw), world=toy2d_tiny)
    without = dipp.train(dipp.Config(out=str(tmp_path / "b"), **kw), world=toy2d_tiny)
    assert with_ema["reward_tuned"] == without["reward_tuned"] and with_ema["reward_ema"] != with_ema["reward_tuned"]
    ema = load_file(str(tmp_path / "a" / "checkpoint-3" / "model-generator_ema.safetensors"))
    gen = toy2d_tiny.denoiser("generator", lora_rank=16)
    names = [n for n, p in gen.module.named_parameters() if p.requires_grad]
    expected = initial[0]
    assert len(seen) == 3
    for params in seen:
        expected = [0.8 * e + 0.2 * p for e, p in zip(expected, params)]
    assert sorted(ema) == sorted(names)
    for n, e in zip(names, expected):
        torch.testing.assert_close(ema[n], e, rtol=1e-5, atol=1e-7)
    assert any("lora_B" in n and ema[n].abs().sum() > 0 for n in ema)


# ---------------------------------------------------------------------------------------------------
# Direction: an analytic Gaussian world (every score exact; the TA is the reference with a trainable mean)
# ---------------------------------------------------------------------------------------------------
class GaussDenoiser(torch.nn.Module):
    """eps of N(mean_c, v I) diffused: eps(x_t) = sigma (x_t - alpha mean) / (alpha^2 v + sigma^2). The adapter is
    a trainable shift `delta` of the means (zero at start); `frozen()` drops it. As the generator (sampler
    x0_renoise at t = 999) it is instead x0 = mean_c + delta_c + sqrt(v) z, written as an eps-prediction."""

    def __init__(self, means, var, sched, generator=False, sampler="ddim", timesteps=(999,)):
        super().__init__()
        self.register_buffer("means", means.clone())
        self.delta = torch.nn.Parameter(torch.zeros_like(means))
        self.var, self.sched, self.is_gen = var, sched, generator
        self.sampler, self.timesteps, self._frozen = sampler, list(timesteps), False

    def forward(self, x_t, t, cond):
        t = torch.as_tensor(t).expand(len(x_t))
        alpha, sigma = self.sched.alpha_sigma(t, x_t)
        mean = self.means[cond] + (0 if self._frozen else self.delta[cond])
        if self.is_gen:
            x0 = mean + self.var**0.5 * x_t
            return (x_t - alpha * x0) / sigma
        return sigma * (x_t - alpha * mean) / (alpha**2 * self.var + sigma**2)

    def frozen(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self._frozen = True
            try:
                yield
            finally:
                self._frozen = False
        return ctx()

    @property
    def module(self):
        return self

    def trainable_parameters(self):
        return [self.delta]

    def adapter_state(self):
        return {"delta": self.delta.detach().clone()}

    def load_adapter_state(self, state):
        with torch.no_grad():
            self.delta.copy_(state["delta"])


class GaussWorld:
    """Two classes with reference means M[c] and a null condition whose mean is their average; var 0.05."""

    name, shape, decode_batch, var = "gauss", (2,), 4096, 0.05
    M = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, 0.25]])  # rows: class 0, class 1, null (the average)

    def __init__(self, gen_offset=(0.0, 0.0)):
        from accelerate import Accelerator

        self.schedule = common.Schedule("scaled_linear")
        self.accelerator = Accelerator(cpu=True)
        self.gen_offset = torch.tensor(gen_offset)
        self.made = []

    def denoiser(self, role, lora_rank=16, train_full=False, sampler=None, timesteps=None):
        if role == "generator":
            den = GaussDenoiser(self.M + self.gen_offset, self.var, self.schedule, generator=True,
                                sampler="x0_renoise")
        else:  # the first teacher of a di run is its generator: it gets the offset
            means = self.M + (self.gen_offset if not self.made else 0)
            den = GaussDenoiser(means, self.var, self.schedule, sampler=sampler or "ddim",
                                timesteps=timesteps or [999])
        self.made.append(den)
        return den

    def conditions(self, n, generator):
        return torch.randint(0, 2, (n,), generator=generator)

    def eval_conditions(self, n):
        return torch.arange(n) % 2

    def null_condition(self, n):
        return torch.full((n,), 2, dtype=torch.long)

    def reward(self, x0, cond):
        return x0[:, 1]

    def metrics(self, x0, cond, split="base"):
        err = torch.stack([(x0[cond == c].mean(0) - self.M[c]).norm() for c in (0, 1)]).mean()
        return {"reward": float(x0[:, 1].mean()), "quality": float(-err), "distance": float(err)}

    def plot_samples(self, panels, path, marks=None):
        open(path, "wb").write(b"")

    def save_adapter(self, den, path):
        import os

        os.makedirs(path, exist_ok=True)


def gauss_run(tmp_path, world, **kw):
    base = dict(steps=25, batch=256, eval_samples=512, lr=0.05, ta_lr=0.1, progress=False, reward_scale=0.0,
                out=str(tmp_path / "g"), save_every=1000, max_grad_norm=0.0)
    return dipp.train(dipp.Config(**{**base, **kw}), world=world)


def test_diff_instruct_moves_the_generator_onto_the_reference_and_the_ta_follows(tmp_path):
    world = GaussWorld(gen_offset=(0.6, -0.4))
    m = gauss_run(tmp_path, world)
    assert m["distance_base"] > 0.6 and m["distance_tuned"] < 0.35 * m["distance_base"]
    gen, ta = world.made
    # the TA tracks the generator: its mean shift is near the generator's offset from the reference
    shift = (gen.means + gen.delta - world.M)[:2].detach()
    assert (ta.delta[:2].detach() - shift).norm(dim=1).max() < 0.5 * torch.tensor([0.6, -0.4]).norm()
    rows = __import__("csv").DictReader(open(tmp_path / "g" / "log.csv"))
    pulls = [float(r["ikl_pull"]) for r in rows]
    assert pulls[-1] < 0.5 * max(pulls)  # the IKL pull shrinks as the generator reaches the reference


def test_the_explicit_reward_moves_samples_up_against_the_ikl(tmp_path):
    m0 = gauss_run(tmp_path / "a", GaussWorld(), reward_scale=0.0)
    m1 = gauss_run(tmp_path / "b", GaussWorld(), reward_scale=1.0)
    assert m1["reward_tuned"] > m0["reward_tuned"] + 0.1 and m1["reward_tuned"] > m1["reward_base"] + 0.1
    assert abs(m0["reward_tuned"] - m0["reward_base"]) < 0.05  # at the reference without a reward: it stays


def test_cfg_pushes_each_class_away_from_the_null_mean(tmp_path):
    world = GaussWorld()
    gauss_run(tmp_path, world, cfg_scale=3.0)
    gen = world.made[0]
    for c in (0, 1):
        away = world.M[c] - world.M[2]
        assert float(gen.delta[c].detach() @ away) > 0.05 * float(away @ away)


def test_variant_di_moves_the_reference_read_at_sigma_init_onto_the_data_mean(tmp_path):
    world = GaussWorld(gen_offset=(0.6, -0.4))
    m = gauss_run(tmp_path, world, variant="di", cfg_scale=1.0, steps=30)
    assert m["distance_base"] > 0.6 and m["distance_tuned"] < 0.35 * m["distance_base"]
    assert world.made[0].timesteps == [dipp.init_timestep(world.schedule, 2.5)]


def test_accumulated_micro_batches_draw_their_own_streams_and_each_ta_step_sees_all(tmp_path, toy2d_tiny,
                                                                                    monkeypatch):
    rec, losses = record(tmp_path, toy2d_tiny, monkeypatch, reward_scale=0.5, ta_steps=2, gradient_accumulation_steps=2)
    calls = rec.calls[1:]
    per_update = 12  # 2 x (generator, TA, reference), 2 TA steps on them, 2 x (fresh sample, TA step)
    for step in (1, 2):
        u = calls[(step - 1) * per_update: step * per_update]
        assert [c["model"] for c in u] == ["generator", "ta", "ta/frozen"] * 2 + ["ta", "ta"] + ["generator", "ta"] * 2
        for m, g in enumerate((u[0], u[3])):
            gen = common.step_generator(0, step, 0, micro=m)
            toy2d_tiny.conditions(8, gen)
            assert g["grad"] and torch.equal(g["x"], torch.randn(8, 2, generator=gen))
        for m, (g, ta) in enumerate(((u[0], u[6]), (u[3], u[7]))):  # TA step 1: micro-batch m on sample m
            x0 = x0_of(g, toy2d_tiny.schedule)
            a, s = toy2d_tiny.schedule.alpha_sigma(ta["t"], x0)
            eps = losses["ta"][4 * (step - 1) + m]["eps"]
            torch.testing.assert_close(ta["x"], a * x0 + s * eps)
    assert {float(r["nfe"]) for r in __import__("csv").DictReader(open(tmp_path / "run" / "log.csv"))} == {6.0}
