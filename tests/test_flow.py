"""Flow-matching math of common.py (docs/design.md section 10): the shifted sigmas and the Euler step are diffusers'
FlowMatchEulerDiscreteScheduler's, and the MDP kernels have the right Gaussian policies in a linear-Gaussian world
where the velocity is known in closed form."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import common


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_are_the_schedulers_training_sigmas(shift):
    sched = common.FlowSchedule(shift)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    # the scheduler holds its training sigmas from timestep 1000 down to 1; ours are indexed t = timestep - 1
    assert torch.equal(sched.sigma(torch.arange(999, -1, -1)), ref.sigmas[:1000].float())
    assert float(sched.sigma(-1)) == 0.0 and float(sched.sigma(999)) == 1.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_deterministic_flow_step_is_the_schedulers_euler_step(shift):
    sched = common.FlowSchedule(shift)
    kernel = common.make_kernel("flow_sde", sched, eta=0.0)
    times = [999, 749, 499, 249]
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(sigmas=[(t + 1) / 1000 for t in times])  # the scheduler shifts them as ours are shifted
    assert torch.allclose(ref.sigmas[:-1], sched.sigma(torch.tensor(times)), atol=0, rtol=0)
    x = torch.randn(3, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    for k, (t, t_next) in enumerate(zip(times, times[1:] + [-1])):
        v = torch.randn(x.shape, generator=g)
        expected = ref.step(v, ref.timesteps[k], x).prev_sample
        mean, std = kernel.step(x, v, t, t_next)
        assert torch.allclose(mean, expected, atol=1e-6) and float(std.abs().max()) == 0.0
        x = expected


def gaussian_world(mu=1.5, s=0.4):
    """x_0 ~ N(mu, s^2) per dimension: the exact velocity E[eps - x_0 | x_t] of the flow x_t = (1-sig) x_0 + sig eps."""

    def velocity(x, sig):
        var = (1 - sig) ** 2 * s**2 + sig**2
        r = x - (1 - sig) * mu
        return sig / var * r - (mu + (1 - sig) * s**2 / var * r)

    return mu, s, velocity


def test_flow_conversions_agree_with_the_closed_form():
    sched = common.FlowSchedule(3.0)
    mu, s, velocity = gaussian_world()
    t = 600
    sig = float(sched.sigma(t))
    x0, eps = torch.randn(50000) * s + mu, torch.randn(50000)
    x_t = common.add_noise(sched, x0[:, None], eps[:, None], t)
    assert torch.allclose(x_t[:, 0], (1 - sig) * x0 + sig * eps)
    v = velocity(x_t, sig)
    # x0_hat(x_t) = E[x_0 | x_t] and eps_hat = E[eps | x_t]: their errors are orthogonal to x_t (least squares)
    for est, truth in ((sched.x0_from_pred(x_t, v, t), x0), (sched.eps_from_pred(x_t, v, t), eps)):
        err = est[:, 0] - truth
        assert abs(float(err.mean())) < 0.01 and abs(float((err * (x_t[:, 0] - x_t.mean())).mean())) < 0.01
    assert torch.equal(sched.pred_target(x0, eps, t), eps - x0)


def test_flow_sde_keeps_the_marginals_and_its_eta_zero_limit_is_the_ode():
    """From x ~ p_1 = N(0, 1), 400 SDE steps with the exact velocity end at N(mu, s^2): the stochastic step has the
    ODE's marginals. A kernel without the score correction (mean = x + v dt, the same noise) would not."""
    sched = common.FlowSchedule(1.0)
    mu, s, velocity = gaussian_world()
    times = [round(999 * (1 - k / 400)) for k in range(400)] + [-1]
    times = sorted(set(times), reverse=True)
    g = torch.Generator().manual_seed(0)
    for eta, tol in ((0.0, 0.02), (0.7, 0.03)):
        kernel = common.make_kernel("flow_sde", sched, eta=eta)
        x = torch.randn(40000, 1, generator=g)
        for t, t_next in zip(times[:-1], times[1:]):
            mean, std = kernel.step(x, velocity(x, sched.sigma(t, x)), t, t_next)
            x = mean + std * torch.randn(x.shape, generator=g)
        assert abs(float(x.mean()) - mu) < tol and abs(float(x.std()) - s) < tol, (eta, float(x.mean()), float(x.std()))
    # the same chain without the -g^2/2 score term in the drift drifts off the marginals
    x = torch.randn(40000, 1, generator=g)
    for t, t_next in zip(times[:-1], times[1:]):
        sig, sig_next = float(sched.sigma(t)), float(sched.sigma(t_next))
        g2 = 0.49 * min(sig, 0.999) / (1 - min(sig, 0.999)) if sig_next > 0 else 0.0
        x = x + velocity(x, sig) * (sig_next - sig) + math.sqrt(g2 * (sig - sig_next)) * torch.randn(x.shape,
                                                                                                     generator=g)
    assert abs(float(x.std()) - s) > 0.1


def flow_grpo_sde_step(x, v, sigmas, k, eta):
    """Flow-GRPO's sde_step_with_logprob (github.com/yifan123/flow_grpo, flow_grpo/diffusers_patch/
    sd3_sde_with_logprob.py, sde_type "sde"), re-derived from its published formula for step k of a grid `sigmas`
    (the scheduler's, with the final 0): std_dev_t = noise_level sqrt(sigma / (1 - sigma*)), sigma* = sigmas[1]
    where sigma == 1 else sigma; mean = x (1 + std_dev_t^2 dt / (2 sigma)) + v (1 + std_dev_t^2 (1 - sigma) /
    (2 sigma)) dt; the step's std = std_dev_t sqrt(-dt); its log-prob averaged over dimensions."""
    sig, sig_prev = float(sigmas[k]), float(sigmas[k + 1])
    dt = sig_prev - sig
    std_dev_t = eta * math.sqrt(sig / (1 - (float(sigmas[1]) if sig == 1 else sig)))
    mean = x * (1 + std_dev_t**2 / (2 * sig) * dt) + v * (1 + std_dev_t**2 * (1 - sig) / (2 * sig)) * dt
    std = std_dev_t * math.sqrt(-dt)

    def log_prob(x_next):
        lp = -((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
        return lp.flatten(1).mean(1)

    return mean, std, log_prob


def _pipeline_grid(sched, steps):
    """SD3's grid: FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(steps), placed on the schedule's times."""
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=sched.shift)
    ref.set_timesteps(steps)
    return sched.grid_times(ref.sigmas[:-1].tolist()) + [-1], ref.sigmas


@pytest.mark.parametrize("grid", ["pipeline-10", "integer-25"])
def test_flow_sde_is_flow_grpos_sde_step_at_shift_3(grid):
    """Every step's mean, std and log-prob equal Flow-GRPO's formula on a shift-3 grid (SD3's own 10-step grid, or
    the integer 25-step grid [999, 959, ..., 39]): the first step's sigma / (1 - sigma) is taken at the grid's second
    sigma. The last step is deterministic here (x0_hat), sampled there."""
    sched = common.FlowSchedule(3.0)
    if grid == "pipeline-10":
        times, sigmas = _pipeline_grid(sched, 10)
    else:
        times = common.few_step_timesteps(25) + [-1]
        sigmas = sched.sigma(torch.tensor(times))
    assert torch.equal(sched.sigma(torch.tensor(times)), sigmas.float())
    eta = 0.7
    kernel = common.make_kernel("flow_sde", sched, eta=eta)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    for k, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        v = torch.randn(x.shape, generator=g)
        mean, std = kernel.step(x, v, t, t_next)
        if t_next == -1:  # the conventions differ only here
            assert float(std.abs().max()) == 0.0 and torch.allclose(mean, x - float(sigmas[k]) * v, atol=1e-6)
            break
        ref_mean, ref_std, ref_log_prob = flow_grpo_sde_step(x, v, sigmas, k, eta)
        assert torch.allclose(mean, ref_mean, atol=2e-5, rtol=1e-5), (k, float((mean - ref_mean).abs().max()))
        assert torch.allclose(std, torch.full_like(x, ref_std), rtol=1e-5, atol=0), (k, float(std[0, 0, 0, 0]), ref_std)
        x_next = mean + std * torch.randn(x.shape, generator=g)
        lp = common.gaussian_log_prob(x_next, mean, std, reduce="mean")
        assert torch.allclose(lp, ref_log_prob(x_next), atol=1e-4), (k, lp, ref_log_prob(x_next))
        x = x_next
    else:
        raise AssertionError("the grid must end at the clean sample")


def test_flow_sde_keeps_the_odes_end_distribution_on_few_steps_at_shift_3():
    """SD3's 10-step grid at shift 3 in a 1-D Gaussian world with the exact velocity: the SDE (eta 0.7) ends where
    the ODE does (both carry the grid's discretisation error). With sigma / (1 - sigma) of the first step taken at
    the largest training sigma below 1 (factor ~3000 instead of ~25) the end std was 1.55 against the ODE's 0.27."""
    sched = common.FlowSchedule(3.0)
    times, _ = _pipeline_grid(sched, 10)
    mu, s, velocity = gaussian_world()
    ends = {}
    for eta in (0.0, 0.7):
        kernel = common.make_kernel("flow_sde", sched, eta=eta)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(200000, 1, generator=g)
        for t, t_next in zip(times[:-1], times[1:]):
            mean, std = kernel.step(x, velocity(x, sched.sigma(t, x)), t, t_next)
            x = mean + std * torch.randn(x.shape, generator=g)
        ends[eta] = float(x.mean()), float(x.std())
    (m_ode, s_ode), (m_sde, s_sde) = ends[0.0], ends[0.7]
    assert abs(m_sde - m_ode) < 0.01 and abs(s_sde - s_ode) < 0.1, ends
    assert abs(m_ode - mu) < 0.01 and 0.2 < s_ode < s  # the ODE itself: Euler on 10 steps shrinks the std


def test_grid_times_carry_a_pipelines_sigmas_exactly():
    """SD3's 4-step sigmas [1.0, 0.858, 0.602, 0.0089] at shift 3 sit between integer times; grid_times places each
    on the nearest time, where sigma(t) then is the scheduler's float32 value bit for bit; every other time keeps
    its sigma and the table stays increasing. A second grid wanting a taken time with another sigma moves to the
    next free one; a grid finer than the table is an error."""
    sched = common.FlowSchedule(3.0)
    before = sched.sigmas.clone()
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(4)
    times = sched.grid_times(ref.sigmas[:-1].tolist())
    assert times == [999, 667, 334, 2]
    assert torch.equal(sched.sigma(torch.tensor(times)), ref.sigmas[:-1])
    assert [round(float(x), 3) for x in sched.sigma(torch.tensor(times))] == [1.0, 0.858, 0.602, 0.009]
    changed = (sched.sigmas != before).nonzero().flatten().tolist()
    assert set(changed) <= set(times) and len(changed) == 3  # sigma(999) = 1 was already the table's
    assert bool((sched.sigmas[1:] > sched.sigmas[:-1]).all())
    assert sched.grid_times(ref.sigmas[:-1].tolist()) == times  # placing the same grid again changes nothing
    other = float(sched.sigmas[667]) + 1e-5  # another grid's sigma nearest to t = 667
    assert sched.grid_times([other]) == [668] and float(sched.sigma(668)) == torch.tensor(other).item()
    with pytest.raises(ValueError, match="no free integer time"):
        sched.grid_times(torch.linspace(1.0, 0.5, 900).tolist())
    with pytest.raises(ValueError, match="strictly decreasing"):
        sched.grid_times([0.5, 0.7])


def test_flow_x0_renoise_policy_and_its_deterministic_last_step():
    sched = common.FlowSchedule(3.0)
    kernel = common.make_kernel("flow_x0_renoise", sched)
    mu, s, velocity = gaussian_world()
    x = torch.randn(6, 2)
    v = velocity(x, 1.0)
    mean, std = kernel.step(x, v, 999, 499)
    sig_next = float(sched.sigma(499))
    assert torch.allclose(mean, (1 - sig_next) * (x - v)) and torch.allclose(std, torch.full_like(x, sig_next))
    # the Gaussian log-prob of a transition is the closed form
    x_next = mean + std * torch.randn(x.shape)
    lp = common.gaussian_log_prob(x_next, mean, std)
    closed = (-((x_next - mean) ** 2) / (2 * sig_next**2) - math.log(sig_next) - 0.5 * math.log(2 * math.pi)).sum(1)
    assert torch.allclose(lp, closed)
    mean0, std0 = kernel.step(x, v, 249, -1)
    assert torch.allclose(mean0, x - float(sched.sigma(249)) * v) and float(std0.max()) == 0.0


def test_flow_schedule_refuses_ddpm_only_use():
    with pytest.raises(TypeError, match="no alpha_bar"):
        common.make_kernel("ddim", common.FlowSchedule(1.0)).step(torch.zeros(1, 2), torch.zeros(1, 2), 999, 499)
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        common.FlowSchedule(0.0)


def test_flow2d_base_models_are_flow_models_on_the_shared_interface():
    import toy

    world = toy.load_world("flow2d", budget="tiny", progress=False)
    assert isinstance(world.schedule, common.FlowSchedule) and world.schedule.prediction == "flow"
    for role, sampler in (("teacher", "flow_sde"), ("student", "flow_x0_renoise"), ("generator", "flow_x0_renoise")):
        den = world.denoiser(role)
        assert den.sampler == sampler
        kernel = common.make_kernel(den.sampler, world.schedule, eta=0.0)
        cond = world.eval_conditions(16)
        x0 = common.sample(den, kernel, torch.randn(16, 2), cond, den.timesteps, torch.Generator().manual_seed(0))
        assert x0.shape == (16, 2) and torch.isfinite(x0).all()


# --- every method and variant on the flow toy: runs, counts its stated NFEs, resumes bit-identically ----------------
def _flow_runs():
    import diff_instruct_pp as dipp
    import pso
    import sharpening

    small = dict(steps=4, batch=8, save_every=2, progress=False)
    runs = [("pso", v, lambda out, v=v, **kw: pso.train(pso.Config(**{
        **small, "variant": v, "eval_samples": 32, "eval_every": 1000, "naive_baseline": False,
        "reference_images": 8, "concept_images": 3, "out": out, **kw}), FLOW)[0])
        for v in ("pso", "offline", "online", "customize", "naive")]
    runs += [("sharpening", v, lambda out, v=v, **kw: sharpening.train(sharpening.Config(**{
        **small, "variant": v, "eval_samples": 16, "final_samples": 32, "eval_every": 1000, "out": out, **kw}), FLOW))
        for v in ("sft", "rlhf")]
    runs += [("diff_instruct_pp", "dipp", lambda out, **kw: dipp.train(dipp.Config(**{
        **small, "eval_samples": 32, "out": out, **kw}), FLOW))]
    return runs


FLOW = None


@pytest.fixture(scope="module")
def flow_world():
    import toy

    global FLOW
    FLOW = toy.load_world("flow2d", budget="tiny", progress=False)
    return FLOW


@pytest.mark.parametrize("method,variant,run", _flow_runs(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_method_runs_on_the_flow_toy_counts_its_nfes_and_resumes_bit_identically(method, variant, run, tmp_path,
                                                                                      flow_world):
    import csv

    from safetensors.torch import load_file

    straight = run(str(tmp_path / "a"))
    rows = list(csv.DictReader(open(tmp_path / "a" / "log.csv")))
    assert len(rows) == 4 and all(float(r["nfe"]) == straight["nfe_per_update"] for r in rows), (method, variant)
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    run(str(tmp_path / "b"), steps=2)  # interrupted after update 2 ...
    run(str(tmp_path / "b"), resume=True)  # ... and resumed to 4
    a, b = (load_file(str(tmp_path / x / "checkpoint-4" / f)) for x in "ab"
            for f in [next(p.name for p in (tmp_path / "a" / "checkpoint-4").glob("model-*.safetensors"))])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "log.csv")))
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows]


def test_the_methods_regress_the_velocity_in_a_flow_world():
    """Each method's regression target goes through the schedule: with a network that returns the true velocity
    eps - x_0 of the noise it was given, every data-side error is zero in a flow world (and not with eps)."""
    import diff_instruct_pp as dipp
    import pso
    import sharpening

    sched = common.FlowSchedule(3.0)
    x0 = torch.randn(6, 2)
    eps = torch.randn(2, 6, 2)
    times = [749, 249]

    class Oracle:  # knows x0 and the noise drawn for each state: returns v = eps - x0
        def __call__(self, x_t, t, cond):
            t = torch.as_tensor(t).expand(len(x_t))
            return torch.stack([eps[times.index(int(t[i]))][i % len(x0)] - x0[i % len(x0)] for i in range(len(x_t))])

        def frozen(self):
            import contextlib

            return contextlib.nullcontext()

    cond = torch.zeros(len(x0), dtype=torch.long)
    lr, _, _ = pso.forward_log_ratios(Oracle(), sched, x0, cond, times, None, "mean", use_reference=False, eps=eps)
    assert torch.allclose(lr, torch.zeros_like(lr), atol=1e-6)
    targets = sharpening.eps_targets(sched, [common.add_noise(sched, x0, eps[0], t) for t in times], times, x0,
                                     eps[0], "noise")
    assert all(torch.allclose(g, eps[0] - x0) for g in targets)
    assert torch.allclose(sched.eps_from_pred(common.add_noise(sched, x0, eps[0], 749), eps[0] - x0, 749), eps[0],
                          atol=1e-5)  # what DI++'s scores read: eps_hat from the velocity
    assert dipp.log_sigma_ve(sched)[-1] == float("inf") and torch.isfinite(dipp.log_sigma_ve(sched)[:-1]).all()
