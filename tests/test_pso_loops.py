"""pso.train's loop, variant by variant: what went into each loss (which rows are target / reference, at which states
and timesteps the policy and the frozen model were evaluated, which terms carry gradient, which noises are shared),
and one direction test per variant (a few updates move the objective's quantity the right way).

The real `train()` runs on the tiny toy2d world; a recording denoiser (it replaces pso.CountingDenoiser) logs every
network row, and wrappers log the arguments of the loss helpers and the world's draws, during the update only."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import pso


class Recorder:
    """Everything one update did: network rows (input, t, cond, output, frozen?, grad?) and the calls of the loss
    helpers and the world (name -> list of (args, kwargs, returned))."""

    def __init__(self):
        self.active, self.rows, self.calls = False, [], {}

    def clear(self):
        self.rows, self.calls = [], {}

    def log(self, name, args, kwargs, out):
        if self.active:
            self.calls.setdefault(name, []).append((args, kwargs, out))

    def one(self, name):
        (call,) = self.calls[name]
        return call

    def table(self, frozen):
        rows = [r for r in self.rows if r["frozen"] == frozen]
        if not rows:
            return None
        return {k: torch.cat([r[k] for r in rows]) for k in ("x", "t", "cond", "out", "grad")}

    def output(self, x, t, frozen, cond=None):
        """The network's output rows at inputs x [B, ...] and times t ([B] or int), asserting that the policy
        (frozen=False) or the pre-trained model (frozen=True) was evaluated at exactly these rows; -> (out, grad [B])."""
        tab = self.table(frozen)
        assert tab is not None, f"no {'frozen' if frozen else 'policy'} call in this update"
        t = torch.as_tensor(t).expand(len(x))
        match = (tab["x"].flatten(1)[None] == x.detach().flatten(1)[:, None]).all(-1) & (tab["t"][None] == t[:, None])
        if cond is not None:
            match &= tab["cond"][None] == cond[:, None]
        assert match.any(1).all(), (f"{int((~match.any(1)).sum())} of {len(x)} rows were never given to the "
                                    f"{'frozen' if frozen else 'policy'} model at these times")
        j = match.float().argmax(1)
        return tab["out"][j], tab["grad"][j]

    def count(self, x, t, frozen):
        tab = self.table(frozen)
        t = torch.as_tensor(t).expand(len(x))
        return ((tab["x"].flatten(1)[None] == x.detach().flatten(1)[:, None]).all(-1)
                & (tab["t"][None] == t[:, None])).sum(1)


@pytest.fixture
def rec(monkeypatch, toy2d_tiny):
    """Install the recording wrappers; only the last update's calls are kept (each update starts a fresh record)."""
    r = Recorder()

    class RecordingDenoiser(common.CountingDenoiser):
        frozen_now = False

        def __call__(self, x_t, t, cond):
            out = super().__call__(x_t, t, cond)
            if r.active:
                r.rows.append({"x": x_t.detach().clone(), "t": torch.as_tensor(t).expand(len(x_t)).clone(),
                               "cond": cond.clone(), "out": out.detach().clone(),
                               "grad": torch.full((len(x_t),), out.requires_grad), "frozen": self.frozen_now})
            return out

        def frozen(self):
            import contextlib

            @contextlib.contextmanager
            def ctx():
                with self.denoiser.frozen():
                    RecordingDenoiser.frozen_now = True
                    try:
                        yield
                    finally:
                        RecordingDenoiser.frozen_now = False
            return ctx()

    monkeypatch.setattr(pso, "CountingDenoiser", RecordingDenoiser)

    def wrap(owner, name):
        real = getattr(owner, name)

        def recorded(*a, **k):
            out = real(*a, **k)
            r.log(name, a, k, out)
            return out
        monkeypatch.setattr(owner, name, recorded)

    for name in ("eps_log_ratio", "transition_log_ratio", "pso_loss", "naive_loss", "sample_trajectory"):
        wrap(pso, name)
    for name in ("data", "preference_pairs", "conditions", "reward"):
        wrap(toy2d_tiny, name)
    for variant, update in list(pso.UPDATES.items()):
        def active(s, gen, update=update):
            r.clear()
            r.active, r.setup = True, s
            try:
                return update(s, gen)
            finally:
                r.active = False
        monkeypatch.setitem(pso.UPDATES, variant, active)
    return r


def run(tmp_path, world, **kw):
    base = dict(steps=2, batch=6, lr=1e-3, eval_samples=8, eval_every=1000, save_every=1000, naive_baseline=False,
                out=str(tmp_path / "run"), reference_images=5, concept_images=3, progress=False)
    metrics, den = pso.train(pso.Config(**{**base, **kw}), world)
    return metrics, den


def last_loss(tmp_path):
    import csv

    with open(tmp_path / "run" / "log.csv") as f:
        return float(list(csv.DictReader(f))[-1]["loss"])


def stacked(rec, name):
    return torch.stack([out for _, _, out in rec.calls[name]], 1)


def check_forward_side(rec, world, x0, cond, times, frozen_too=True):
    """Each eps_log_ratio call k: eps_theta is the policy's output (with gradient) at x_t = alpha_t x0 + sigma_t eps_k
    at t = times[k] with the rows' condition, eps_pre the frozen model's (without gradient) at the same rows."""
    calls = rec.calls["eps_log_ratio"]
    assert len(calls) == len(times)
    for (args, _, _), t in zip(calls, times):
        eps, eps_theta, eps_pre = args[:3]
        x_t = common.add_noise(world.schedule, x0, eps, t)
        out, grad = rec.output(x_t, t, frozen=False, cond=cond)
        assert torch.equal(out, eps_theta.detach()) and eps_theta.requires_grad and grad.all()
        if frozen_too:
            out_pre, grad_pre = rec.output(x_t, t, frozen=True, cond=cond)
            assert torch.equal(out_pre, eps_pre) and not eps_pre.requires_grad and not grad_pre.any()
        else:
            assert eps_pre is None
    return [args[0] for args, _, _ in calls]


def check_model_side(rec, s, traj, n):
    """Each transition_log_ratio call k: x' is the stored state k+1 (detached), mu_theta the kernel mean from the
    policy's own roll-out prediction at state k (with gradient; evaluated once: no work twice), mu_pre the kernel mean
    from the frozen model at the same state, std the kernel's."""
    kernel = s.kernel
    calls = rec.calls["transition_log_ratio"]
    assert len(calls) == n
    for k, (args, _, _) in enumerate(calls):
        x_next, mean_theta, mean_pre, std = args[:4]
        t, t_next = traj.times[k], traj.times[k + 1]
        inp = kernel.net_input(traj.states[k], t)
        eps_pol, grad = rec.output(inp, t, frozen=False)
        eps_pre, grad_pre = rec.output(inp, t, frozen=True)
        assert grad.all() and not grad_pre.any()
        assert (rec.count(inp, t, frozen=False) == 1).all()  # the roll-out's prediction is reused as mu_theta
        assert torch.equal(x_next, traj.states[k + 1]) and not x_next.requires_grad
        assert mean_theta.requires_grad and torch.allclose(mean_theta, kernel.step(traj.states[k], eps_pol, t,
                                                                                    t_next)[0], atol=1e-6)
        assert not mean_pre.requires_grad and torch.allclose(mean_pre, kernel.step(traj.states[k], eps_pre, t,
                                                                                    t_next)[0], atol=1e-6)
        assert torch.allclose(std, kernel.step(traj.states[k], eps_pol, t, t_next)[1])
    # the roll-out is the policy's: each next state's input was given to the policy at the next time
    for k in range(n):
        rec.output(kernel.net_input(traj.states[k], traj.times[k]), traj.times[k], frozen=False)


def loss_args(rec):
    args, kwargs, (loss, margin) = rec.one("pso_loss")
    return args, kwargs, loss


# ----------------------------------------------------------------------------------------------- wiring
@pytest.mark.parametrize("sampler", ["x0_renoise", "euler_ancestral"])
def test_eq5_target_is_the_forward_diffused_data_and_reference_the_policys_own_trajectory(sampler, rec, tmp_path,
                                                                                         toy2d_tiny):
    metrics, _ = run(tmp_path, toy2d_tiny, variant="pso", sampler=sampler)
    s = rec.setup
    (args, kw, (x0, cond)), = rec.calls["data"]
    assert args[2:] == ("target",) or kw.get("split") == "target"
    grid = [999, 749, 499, 249]
    check_forward_side(rec, toy2d_tiny, x0, cond, grid[:-1])  # t_N .. t_2: the last step is not trained
    (targs, _, traj), = rec.calls["sample_trajectory"]
    assert traj.times == grid and torch.equal(targs[3], cond)  # the reference is drawn for the target's condition
    check_model_side(rec, s, traj, 3)
    args, kw, loss = loss_args(rec)
    lr_target, lr_reference, beta = args[:3]
    assert torch.equal(lr_target, stacked(rec, "eps_log_ratio")) and lr_target.requires_grad
    assert torch.equal(lr_reference, stacked(rec, "transition_log_ratio")) and lr_reference.requires_grad
    assert beta == 50.0 == metrics["beta"]
    assert abs(last_loss(tmp_path) - float(loss)) <= 1e-5 * abs(float(loss))  # the loss that was stepped is this one


def test_offline_pairs_share_noise_and_timesteps_and_the_winner_is_the_target(rec, tmp_path, toy2d_tiny):
    run(tmp_path, toy2d_tiny, variant="offline")
    (_, _, (x_win, x_lose, cond)), = [c for c in rec.calls["preference_pairs"]]
    b = len(cond)
    both = torch.cat([x_win, x_lose])
    eps = check_forward_side(rec, toy2d_tiny, both, torch.cat([cond, cond]), [999, 749, 499])
    for e in eps:  # same-noise pairing at each t_n
        assert torch.equal(e[:b], e[b:])
    args, _, _ = loss_args(rec)
    lr = stacked(rec, "eps_log_ratio")
    assert torch.equal(args[0], lr[:b]) and torch.equal(args[1], lr[b:])  # rows 0..B-1 are the winners


@pytest.mark.parametrize("draw, allowed", [("grid", {999, 749, 499}), ("leading", {750, 500, 250, 0}),
                                           ("uniform", None)])
def test_one_timestep_draws_one_shared_t_per_pair_from_its_set(draw, allowed, rec, tmp_path, toy2d_tiny):
    run(tmp_path, toy2d_tiny, variant="offline", one_timestep=True, one_timestep_from=draw, batch=64)
    (_, _, (x_win, x_lose, cond)), = rec.calls["preference_pairs"]
    (args, _, _), = rec.calls["eps_log_ratio"]
    tab = rec.table(frozen=False)
    t = tab["t"]
    b = len(cond)
    assert len(t) == 2 * b and torch.equal(t[:b], t[b:])  # winner and loser at the same t
    check_forward_side(rec, toy2d_tiny, torch.cat([x_win, x_lose]), torch.cat([cond, cond]), [t])
    if allowed is None:  # U[0, T): not confined to a few values
        assert len(set(t.tolist())) > 40 and 0 <= int(t.min()) and int(t.max()) < 1000
    else:
        assert set(t.tolist()) <= allowed and len(set(t.tolist())) == len(allowed)


def test_offline_target_pairs_take_the_reference_from_the_frozen_model(rec, tmp_path, toy2d_tiny):
    run(tmp_path, toy2d_tiny, variant="offline", offline_pairs="target")
    (_, _, (x_win, cond)), = rec.calls["data"]
    kernel = rec.setup.kernel
    frozen = rec.table(frozen=True)
    last = frozen["t"] == 249  # the frozen model's last sampling step gives the reference image
    x_lose = kernel.step(frozen["x"][last], frozen["out"][last], 249, -1)[0]
    both = torch.cat([x_win, x_lose])
    check_forward_side(rec, toy2d_tiny, both, torch.cat([cond, cond]), [999, 749, 499])
    assert torch.equal(frozen["cond"][last], cond)


@pytest.mark.parametrize("sampler", ["x0_renoise", "euler_ancestral"])
def test_online_winner_is_the_higher_reward_per_condition(sampler, rec, tmp_path, toy2d_tiny):
    run(tmp_path, toy2d_tiny, variant="online", sampler=sampler, batch=16)
    (_, _, cond), = [c for c in rec.calls["conditions"]]
    (targs, _, traj), = rec.calls["sample_trajectory"]
    b = len(cond)
    assert torch.equal(targs[3], torch.cat([cond, cond]))  # rows i and B + i: two samples of condition i
    assert traj.times == [999, 749, 499, 249, -1]
    (rargs, _, reward), = rec.calls["reward"]
    assert torch.equal(rargs[0], traj.x0) and torch.equal(rargs[1], targs[3])  # the clean samples are scored
    check_model_side(rec, rec.setup, traj, 3)
    last_in = rec.setup.kernel.net_input(traj.states[3], 249)
    assert not rec.output(last_in, 249, frozen=False)[1].any()  # the untrained last step runs without gradient
    lr = stacked(rec, "transition_log_ratio")
    first = reward[:b] >= reward[b:]
    assert first.any() and (~first).any()  # both orders occur, so a swap or pooling shows
    win = torch.where(first[:, None], lr[:b], lr[b:])
    lose = torch.where(first[:, None], lr[b:], lr[:b])
    args, _, _ = loss_args(rec)
    assert torch.equal(args[0], win) and torch.equal(args[1], lose) and args[2] == 5.0


def test_customize_drops_eps_pre_and_adds_the_prior_on_the_references(rec, tmp_path, toy2d_tiny, monkeypatch):
    kept = {}
    real = pso.customize_images

    def keep(s):
        nfe = real(s)
        kept["concept"], kept["references"] = s.concept[0].clone(), s.references.clone()
        return nfe
    monkeypatch.setattr(pso, "customize_images", keep)
    run(tmp_path, toy2d_tiny, variant="customize", reference_scale=0.1, prior_weight=0.5, hinge=True)
    assert rec.table(frozen=True) is None  # no reference model in the updates
    calls = rec.calls["eps_log_ratio"]
    b = 6
    sched = toy2d_tiny.schedule
    for (args, _, _), t in zip(calls, [999, 749, 499]):
        eps, eps_theta, eps_pre = args[:3]
        assert eps_pre is None and eps_theta.requires_grad and torch.equal(eps[:b], eps[b:])
        tab = rec.table(frozen=False)
        rows = tab["t"] == t
        a, sg = sched.alpha_sigma(torch.tensor(t), eps)
        x0 = (tab["x"][rows] - sg * eps) / a  # undo the forward process
        d_concept = torch.cdist(x0[:b], kept["concept"]).min(1).values
        d_reference = torch.cdist(x0[b:], kept["references"]).min(1).values
        assert d_concept.max() < 1e-3 and d_reference.max() < 1e-3  # targets = concept images, rest = references
    args, kw, loss = loss_args(rec)
    lr = stacked(rec, "eps_log_ratio")
    assert torch.equal(args[0], lr[:b]) and torch.equal(args[1], lr[b:])
    assert args[5] is True and args[6] == 0.1  # hinge and the reference scale reach the loss
    prior = -lr[b:].mean()
    logged = float(last_loss(tmp_path))
    assert abs(logged - (float(loss) + 0.5 * float(prior))) < 1e-5  # loss + lambda * prior, prior on references


@pytest.mark.parametrize("naive_t", ["uniform", "grid"])
def test_naive_regresses_the_policy_on_the_true_noise_of_the_target(naive_t, rec, tmp_path, toy2d_tiny):
    run(tmp_path, toy2d_tiny, variant="naive", naive_t=naive_t, batch=32)
    (_, _, (x0, cond)), = rec.calls["data"]
    (args, _, _), = rec.calls["naive_loss"]
    eps, eps_theta = args[:2]
    assert rec.table(frozen=True) is None and eps_theta.requires_grad
    tab = rec.table(frozen=False)
    b = len(cond)
    t = tab["t"]
    x_t = common.add_noise(toy2d_tiny.schedule, x0.repeat(4, 1), eps, t)
    out, grad = rec.output(x_t, t, frozen=False, cond=cond.repeat(4))
    assert torch.equal(out, eps_theta.detach()) and grad.all()
    if naive_t == "grid":
        assert torch.equal(t, torch.tensor([999, 749, 499, 249]).repeat_interleave(b))  # t_1 = 249 included
    else:
        assert len(set(t.tolist())) > 60 and int(t.min()) < 100 and int(t.max()) >= 900  # t ~ U[0, T)


# ----------------------------------------------------------------------------------------------- direction
def train_few(tmp_path, world, variant, steps=10, lr=1e-3, **kw):
    return pso.train(pso.Config(variant=variant, steps=steps, batch=64, lr=lr, eval_samples=256, eval_every=1000,
                                save_every=1000, naive_baseline=False, out=str(tmp_path / "run"), progress=False, **kw),
                     world)


def held_out(den, world, variant, key, frozen=False, n=2, **kw):
    """Mean of an update's `key` (margin, log_ratio_target; None = the loss) on fresh batches of 256, for the trained
    policy or (frozen) the base model."""
    cfg = pso.Config(variant=variant, batch=256, **kw)
    s = pso.Setup(cfg, world, common.CountingDenoiser(den), common.make_kernel(den.sampler, world.schedule),
                  list(den.timesteps), cfg.beta or pso.PAPER_BETA[variant])
    if variant == "customize":
        pso.customize_images(s)
    values = []
    with torch.no_grad(), den.frozen() if frozen else torch.enable_grad():
        for i in range(n):
            loss, info = pso.UPDATES[variant](s, torch.Generator().manual_seed(10_000 + i))
            values.append(info[key] if key else float(loss))
    return sum(values) / n


@pytest.mark.parametrize("variant, key, kw, gain", [
    # Eq. 5: the target's log-ratio (exactly 0 at theta_pre) rises; beta 5 (at the paper's 50 the 2-D toy holds still)
    ("pso", "log_ratio_target", dict(beta=5.0), 3e-3),
    ("offline", "margin", dict(beta=5.0), 0.1),  # Eq. 6: the preferred image's margin over the rejected one
    ("customize", "margin", dict(reference_images=16, concept_images=3), 0.1),  # concept over references
])
def test_a_few_updates_raise_the_target_likelihood_over_the_reference(variant, key, kw, gain, tmp_path, toy2d_tiny):
    _, den = train_few(tmp_path, toy2d_tiny, variant, **kw)
    start = held_out(den, toy2d_tiny, variant, key, frozen=True, **kw)
    after = held_out(den, toy2d_tiny, variant, key, **kw)
    assert after - start > gain, (variant, start, after)


def test_a_few_online_updates_raise_the_reward(tmp_path, toy2d_tiny):
    metrics, _ = train_few(tmp_path, toy2d_tiny, "online")  # the default reward: membership of the upper modes
    assert metrics["reward_tuned"] - metrics["reward_base"] > 0.05, metrics  # measured 0.09 -> 0.19; sd ~0.02


def test_a_few_naive_updates_lower_the_eps_mse_on_the_target(tmp_path, toy2d_tiny):
    _, den = train_few(tmp_path, toy2d_tiny, "naive", lr=3e-3)
    base = held_out(den, toy2d_tiny, "naive", None, frozen=True, n=4)
    tuned = held_out(den, toy2d_tiny, "naive", None, n=4)
    assert base - tuned > 1e-3, (base, tuned)  # paired noises: a sign error raises it
