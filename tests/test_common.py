"""common.py against diffusers' schedulers and closed forms."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, LCMScheduler

import common

SDXL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def fake_eps_model(x_t, t, cond=None):
    """A fixed nonlinear eps-predictor so every step depends on the state and the time."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.tanh(0.7 * x_t + 0.001 * t) - 0.2 * x_t.flip(-1)


def test_schedules_are_the_diffusers_tables():
    s = common.Schedule("scaled_linear")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert s.alpha_bar(-1) == 1.0
    assert abs(float(s.alpha_bar(999)) - 0.00466) < 1e-4
    for name in ("linear", "cosine"):
        a = common.Schedule(name).alphas_cumprod
        assert a.shape == (1000,) and (a[1:] < a[:-1]).all()
    with pytest.raises(ValueError, match="cosine"):
        common.Schedule("sigmoid")


@pytest.mark.parametrize("n", [1, 2, 4, 8, 25])
def test_few_step_timesteps_are_trailing_spacing(n):
    ref = EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **SDXL)
    ref.set_timesteps(n)
    assert common.few_step_timesteps(n) == ref.timesteps.long().tolist()
    assert common.few_step_timesteps(4) == [999, 749, 499, 249]


def test_add_noise_matches_ddpm_scheduler():
    sched, ref = common.Schedule(), DDPMScheduler(**SDXL)
    x0, eps, t = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 249, 500, 998, 999])
    assert torch.allclose(common.add_noise(sched, x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-6)
    x_t = common.add_noise(sched, x0, eps, t)
    assert torch.allclose(common.x0_from_eps(sched, x_t, eps, t), x0, atol=1e-3)
    assert torch.allclose(common.eps_from_x0(sched, x_t, x0, t), eps, atol=1e-4)


def test_euler_ancestral_kernel_matches_diffusers_bit_for_bit():
    sched = common.Schedule()
    kernel = common.make_kernel("euler_ancestral", sched)
    ref = EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **SDXL)
    ref.set_timesteps(4)
    noise = torch.randn(3, 4, 8, 8)
    x_ref = noise * ref.init_noise_sigma
    x = kernel.init(noise, 999)
    assert torch.equal(x, x_ref)
    times = common.few_step_timesteps(4) + [-1]
    g_ref, g = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t_ref, t, t_next in zip(ref.timesteps, times[:-1], times[1:]):
        inp_ref = ref.scale_model_input(x_ref, t_ref)
        eps = fake_eps_model(inp_ref, t)
        x_ref = ref.step(eps, t_ref, x_ref, generator=g_ref).prev_sample
        assert torch.allclose(kernel.net_input(x, t), inp_ref, rtol=0, atol=1e-6)
        mean, std = kernel.step(x, eps, t, t_next)
        x = mean + std * torch.randn(x.shape, generator=g)
        assert torch.equal(x, x_ref), f"step at t={t} differs"
    assert float(std.max()) == 0.0  # the last step (sigma_to = 0) is deterministic


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_kernel_matches_diffusers(eta):
    sched = common.Schedule()
    kernel = common.make_kernel("ddim", sched, eta=eta)
    ref = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, **SDXL)
    ref.set_timesteps(25)
    times = common.few_step_timesteps(25) + [-1]
    assert ref.timesteps.tolist() == times[:-1]
    x = x_ref = torch.randn(2, 4, 8, 8)
    for t, t_next in zip(times[:-1], times[1:]):
        eps, z = fake_eps_model(x_ref, t), torch.randn(x.shape)
        x_ref = ref.step(eps, t, x_ref, eta=eta, variance_noise=z).prev_sample
        mean, std = kernel.step(x, eps, t, t_next)
        x = mean + std * z
        assert torch.allclose(x, x_ref, atol=1e-5), f"t={t}"


def test_x0_renoise_kernel_matches_the_dmd2_loop_and_lcm_scheduler():
    """DMD2's sampler: x0 = (x - sigma eps)/alpha, then DDPMScheduler.add_noise(x0, z, t_next)."""
    sched = common.Schedule()
    kernel = common.make_kernel("x0_renoise", sched)
    ddpm = DDPMScheduler(**SDXL)
    lcm = LCMScheduler(**SDXL)
    lcm.set_timesteps(timesteps=[999, 749, 499, 249])
    times = common.few_step_timesteps(4) + [-1]
    x = x_dmd2 = x_lcm = torch.randn(2, 4, 8, 8)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        z = torch.randn(x.shape)
        eps = fake_eps_model(x, t)
        a = ddpm.alphas_cumprod[t]
        x0 = (x_dmd2 - (1 - a).sqrt() * eps) / a.sqrt()
        x_dmd2 = ddpm.add_noise(x0, z, torch.tensor([t_next])) if t_next >= 0 else x0
        # LCM's boundary conditions make c_skip ~ 4e-8 at t >= 249 (timestep_scaling 10): the same kernel.
        eps_lcm = fake_eps_model(x_lcm, t)
        mean, std = kernel.step(x_lcm, eps_lcm, t, t_next)
        x_lcm_ours = mean + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        x_lcm = lcm.step(eps_lcm, t, x_lcm, generator=torch.Generator().manual_seed(i)).prev_sample
        assert torch.allclose(x_lcm_ours, x_lcm, atol=1e-4), f"LCMScheduler, t={t}"
        mean, std = kernel.step(x, eps, t, t_next)
        x = mean + std * z
        assert torch.allclose(x, x_dmd2, atol=1e-5), f"DMD2 loop, t={t}"
    assert float(std.max()) == 0.0


def test_unknown_kernel_lists_the_choices():
    with pytest.raises(ValueError, match="euler_ancestral"):
        common.make_kernel("heun", common.Schedule())


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gaussian_log_prob_matches_torch_distributions(reduce):
    x, mean, std = torch.randn(5, 3, 4), torch.randn(5, 3, 4), torch.rand(5, 3, 4) + 0.1
    ref = torch.distributions.Normal(mean, std).log_prob(x).flatten(1)
    ref = ref.sum(1) if reduce == "sum" else ref.mean(1)
    assert torch.allclose(common.gaussian_log_prob(x, mean, std, reduce), ref, atol=1e-5)
    scalar_std = common.gaussian_log_prob(x, mean, torch.tensor(0.3), reduce)
    ref = torch.distributions.Normal(mean, 0.3).log_prob(x).flatten(1)
    assert torch.allclose(scalar_std, ref.sum(1) if reduce == "sum" else ref.mean(1), atol=1e-5)


def test_x0_renoise_trajectory_log_likelihood_equals_the_closed_form():
    """Linear-Gaussian world: data x0 ~ N(m, s^2) per dimension, the exact denoiser E[x0 | x_t] is affine, so the
    sampler's trajectory (x_999, x_749, x_499, x_249) is jointly Gaussian. The summed kernel log-probs plus
    log N(x_999; 0, I) must equal the joint Gaussian density built from the chain's moments."""
    sched = common.Schedule()
    kernel = common.make_kernel("x0_renoise", sched)
    m, s = 0.7, 0.5
    times = common.few_step_timesteps(4)

    def denoiser(x_t, t, cond=None):  # exact eps for Gaussian data
        a, sig = sched.alpha_sigma(t)
        x0 = m + a * s**2 / (a**2 * s**2 + sig**2) * (x_t - a * m)
        return (x_t - a * x0) / sig

    traj = common.rollout(denoiser, kernel, torch.randn(64, 2), None, times, torch.Generator().manual_seed(0))
    logp = common.gaussian_log_prob(traj.states[0], torch.zeros(1), torch.ones(1))
    for k in range(len(times) - 1):
        mean, std = kernel.step(traj.states[k], denoiser(traj.states[k], times[k]), times[k], times[k + 1])
        logp = logp + common.gaussian_log_prob(traj.states[k + 1], mean, std)
    # the chain x_{k+1} = A_k x_k + b_k + c_k z, scalar per dimension: joint moments by recursion
    A, b, c = [], [], []
    for t, t_next in zip(times[:-1], times[1:]):
        a, sig = sched.alpha_sigma(t)
        a2, sig2 = sched.alpha_sigma(t_next)
        gain = a * s**2 / (a**2 * s**2 + sig**2)
        A.append(float(a2 * gain))
        b.append(float(a2 * (m - gain * a * m)))
        c.append(float(sig2))
    n = len(times)
    mu, cov = torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    cov[0, 0] = 1.0
    for k in range(n - 1):
        mu[k + 1] = A[k] * mu[k] + b[k]
        cov[k + 1, : k + 1] = A[k] * cov[k, : k + 1]
        cov[: k + 1, k + 1] = cov[k + 1, : k + 1]
        cov[k + 1, k + 1] = A[k] ** 2 * cov[k, k] + c[k] ** 2
    states = torch.stack(traj.states, -1).double()  # [64, 2 dims, n]
    joint = torch.distributions.MultivariateNormal(mu, cov).log_prob(states).sum(1)
    assert torch.allclose(logp.double(), joint, atol=1e-3)


def test_rollout_stores_every_transition_and_counts_nfe():
    sched = common.Schedule()
    kernel = common.make_kernel("x0_renoise", sched)
    times = common.few_step_timesteps(4) + [-1]
    traj = common.rollout(fake_eps_model, kernel, torch.randn(3, 2), None, times, torch.Generator().manual_seed(1))
    assert len(traj.states) == 5 and len(traj.stds) == 4 and traj.nfe == 4
    for k in range(4):  # the stored prediction is the one the policy makes at the stored state
        assert torch.equal(traj.eps[k], fake_eps_model(traj.states[k], times[k]))
    assert torch.equal(traj.x0, traj.states[-1])
    cfg = common.rollout(fake_eps_model, kernel, torch.randn(3, 2), None, times, cfg_scale=3.0, null_cond=None)
    assert cfg.nfe == 8


def test_cfg_is_the_guided_combination():
    e_c, e_0 = torch.randn(4), torch.randn(4)
    assert torch.allclose(common.eps_cfg(e_c, e_0, 1.0), e_c)
    assert torch.allclose(common.eps_cfg(e_c, e_0, 3.0), e_0 + 3 * (e_c - e_0))
