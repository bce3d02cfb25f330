"""Diff-Instruct++ (diff_instruct_pp.py): the gradient identities of the paper checked numerically in worlds
where every score is analytic (no networks), then the training script's plumbing on the tiny toy worlds."""
import json
import math

import pytest
import torch

import common
import harness
import diff_instruct_pp as dipp

SCHED = common.Schedule("scaled_linear")
PI_UNIFORM = dipp.time_density(SCHED, "uniform", 20, 980)  # the script's default pi(t)
DENSITIES = {"uniform": PI_UNIFORM, "lognormal": dipp.time_density(SCHED, "lognormal", 0, 999)}


def alpha_sigma(t):
    a, s = SCHED.alpha_sigma(t)
    return a.double()[:, None], s.double()[:, None]


def gaussian_score(x, mean, cov):
    """grad_x log N(x; mean, cov) for rows x [N, d], mean [N, d], cov [N, d, d]."""
    return -torch.linalg.solve(cov, (x - mean).unsqueeze(-1)).squeeze(-1)


def gaussian_kl(m0, c0, m1, c1):
    """KL(N(m0, c0) || N(m1, c1)) for batches of means [N, d] and covariances [N, d, d]."""
    d = m0.shape[-1]
    c1_inv = torch.linalg.inv(c1)
    diff = (m1 - m0).unsqueeze(-1)
    return 0.5 * (torch.einsum("nij,nji->n", c1_inv, c0) + (diff.mT @ c1_inv @ diff).squeeze((-1, -2)) - d
                  + torch.logdet(c1) - torch.logdet(c0))


def moment_matched_normals(blocks, n, dim, seed):
    """[blocks, n, dim] normal draws whose empirical mean is exactly 0 and covariance exactly I in every block:
    Monte-Carlo averages of any polynomial of degree <= 2 in them are then exact expectations."""
    u = torch.randn(blocks, n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = u - u.mean(1, keepdim=True)
    chol = torch.linalg.cholesky(u.mT @ u / n)
    return torch.linalg.solve_triangular(chol, u.mT, upper=False).mT


# ---------------------------------------------------------------------------------------------------
# Gaussian world: reference N(m_ref, S_ref), generator x_0 = mu + A z, quadratic reward
# ---------------------------------------------------------------------------------------------------
D = 2
M_REF = torch.tensor([0.5, -0.3], dtype=torch.float64)
L_REF = torch.tensor([[0.8, 0.0], [0.3, 0.5]], dtype=torch.float64)
S_REF = L_REF @ L_REF.T
B_REW = torch.tensor([0.2, 1.0], dtype=torch.float64)
Q_REW = torch.tensor([[0.5, 0.1], [0.1, 0.3]], dtype=torch.float64)


def reward(x0):
    # r(x) = b.x - x.Q.x / 2: grad r = b - Q x is affine, so E[grad r . dx_0/dtheta] is a degree-2 moment of z
    return x0 @ B_REW - 0.5 * ((x0 @ Q_REW) * x0).sum(1)


def generator_params():
    mu = torch.tensor([-0.4, 0.9], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([[0.6, 0.2], [-0.1, 1.1]], dtype=torch.float64, requires_grad=True)
    return mu, a


def objective(mu, a, reward_scale, weighting, pi):
    """(3.3) in closed form: -alpha_rew E r(x_0) + sum_t pi(t) w(t) KL(p_theta,t || p_ref,t)."""
    cov = a @ a.T
    expected_reward = B_REW @ mu - 0.5 * (mu @ Q_REW @ mu + torch.trace(Q_REW @ cov))
    support = torch.nonzero(pi).squeeze(1)
    al, si = alpha_sigma(support)
    eye = torch.eye(D, dtype=torch.float64)
    var_t = lambda c: al[:, :, None] ** 2 * c + si[:, :, None] ** 2 * eye  # alpha^2 C + sigma^2 I, [N, d, d]
    kl = gaussian_kl(al * mu, var_t(cov), al * M_REF, var_t(S_REF))
    w = dipp.ikl_weight(SCHED, support, weighting, torch.zeros(len(support), 1)).double().squeeze(1)
    return -reward_scale * expected_reward + (pi[support] * w * kl).sum()


def pseudo_loss_gradient(mu, a, reward_scale, weighting, z, eps, t, row_weight=None):
    """theta-gradient of the script's pseudo-loss (3.7)-(3.9) with the exact generator score in place of the TA,
    averaged over rows (or summed with `row_weight`)."""
    x0 = mu + z @ a.T
    al, si = alpha_sigma(t)
    x_t = al * x0 + si * eps
    eye = torch.eye(D, dtype=torch.float64)
    cov_theta = al[:, :, None] ** 2 * (a @ a.T).detach() + si[:, :, None] ** 2 * eye
    cov_ref = al[:, :, None] ** 2 * S_REF + si[:, :, None] ** 2 * eye
    score_theta = gaussian_score(x_t.detach(), al * mu.detach(), cov_theta)
    score_ref = gaussian_score(x_t.detach(), al * M_REF, cov_ref)
    w = dipp.ikl_weight(SCHED, t, weighting, x_t).double()
    loss, _ = dipp.generator_pseudo_loss(x_t, score_theta, score_ref, w, reward(x0), reward_scale)
    loss = loss.mean() if row_weight is None else (row_weight * loss).sum()
    return torch.autograd.grad(loss, (mu, a))


@pytest.mark.parametrize("density", ["uniform", "lognormal"])
@pytest.mark.parametrize("weighting", ["snr_inv", "unit"])
@pytest.mark.parametrize("reward_scale", [0.0, 0.7])
def test_pseudo_loss_gradient_is_ikl_gradient(weighting, reward_scale, density):
    """Theorem 3.2 + Lemma B.1: E grad_theta L_G = grad_theta [-alpha_rew E r + int w KL dpi], exactly. The
    expectation over (z, eps) is taken with moment-matched draws (exact for this degree-2 integrand) and the one
    over t by summing over every t in the support of pi with weight pi(t), so the only error is floating point."""
    pi = DENSITIES[density]
    mu, a = generator_params()
    exact = torch.autograd.grad(objective(mu, a, reward_scale, weighting, pi), (mu, a))
    n = 8
    support = torch.nonzero(pi).squeeze(1)
    u = moment_matched_normals(len(support), n, 2 * D, seed=1)
    z, eps = u[..., :D].reshape(-1, D), u[..., D:].reshape(-1, D)
    t = support.repeat_interleave(n)
    estimate = pseudo_loss_gradient(mu, a, reward_scale, weighting, z, eps, t, row_weight=pi[t] / n)
    for g_exact, g_est in zip(exact, estimate):
        assert g_exact.abs().max() > 1e-2  # the comparison is not between two zeros
        torch.testing.assert_close(g_est, g_exact, rtol=1e-6, atol=1e-9)


def test_pseudo_loss_gradient_monte_carlo_with_t_drawn_from_pi():
    """The estimator the training loop uses (t ~ pi, z and eps plain normal draws) agrees with the closed-form
    gradient within 4 standard errors (estimated from 32 independent chunks) and within 3% of its norm."""
    mu, a = generator_params()
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(objective(mu, a, 0.7, "snr_inv", PI_UNIFORM),
                                                                (mu, a))])
    gen = torch.Generator().manual_seed(3)
    chunks = []
    for _ in range(32):
        n = 4096
        t = dipp.sample_t(n, gen, PI_UNIFORM)
        z = torch.randn(n, D, generator=gen, dtype=torch.float64)
        eps = torch.randn(n, D, generator=gen, dtype=torch.float64)
        chunks.append(torch.cat([g.flatten() for g in pseudo_loss_gradient(mu, a, 0.7, "snr_inv", z, eps, t)]))
    chunks = torch.stack(chunks)
    estimate, stderr = chunks.mean(0), chunks.std(0) / math.sqrt(len(chunks))
    assert ((estimate - exact).abs() < 4 * stderr + 1e-9).all(), (estimate, exact, stderr)
    assert (estimate - exact).norm() < 0.03 * exact.norm()


def test_snr_inv_weighting_makes_the_ikl_pull_the_x0_prediction_difference():
    """alpha_t w(t) (s_psi - s_ref) = x0_hat_psi - x0_hat_ref for w = sigma^2 / alpha^2 (the docstring's claim)."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([20, 300, 700, 980])
    x_t, eps_ta, eps_ref = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    alpha, sigma = (v.double() for v in SCHED.alpha_sigma(t, x_t))
    w = dipp.ikl_weight(SCHED, t, "snr_inv", x_t).double()
    _, ikl_grad = dipp.generator_pseudo_loss(x_t, dipp.score_from_eps(eps_ta, sigma),
                                             dipp.score_from_eps(eps_ref, sigma), w, torch.zeros(4), 0.0)
    x0_ta, x0_ref = (common.x0_from_eps(SCHED, x_t, e, t).double() for e in (eps_ta, eps_ref))
    torch.testing.assert_close(alpha * ikl_grad, x0_ta - x0_ref, rtol=1e-5, atol=1e-6)


def test_pi_t_covers_its_support_uniformly():
    t = dipp.sample_t(200_000, torch.Generator().manual_seed(0), PI_UNIFORM)
    assert t.min() == 20 and t.max() == 980
    counts = torch.bincount(t - 20, minlength=961).double()
    assert (counts - counts.mean()).abs().max() < 6 * counts.mean().sqrt()


def test_lognormal_pi_t_is_the_papers_noise_level_distribution_truncated_to_the_schedule():
    """App. C: ln sigma ~ N(-2, 2^2) for sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t), truncated to the schedule's
    range by rejection and rounded to the nearest t: P(sigma(t) <= s) = (Phi(s) - Phi(s_min)) / (Phi(s_max) -
    Phi(s_min)) up to the width of one t bin."""
    pi = DENSITIES["lognormal"]
    sigma = (1 / SCHED.alphas_cumprod.double() - 1).sqrt()
    phi = lambda s: 0.5 * (1 + math.erf((math.log(s) + 2.0) / (2.0 * math.sqrt(2))))  # noqa: E731
    lo, hi = phi(float(sigma[0])), phi(float(sigma[-1]))
    for s in (0.1, 0.5, 1.0, 3.0):
        k = int(torch.searchsorted(sigma, torch.tensor(s, dtype=torch.float64)))  # first t with sigma(t) >= s
        cdf = (phi(s) - lo) / (hi - lo)
        assert pi[: k - 1].sum() <= cdf <= pi[: k + 1].sum()  # sigma(k-1) < s <= sigma(k)
    assert math.isclose(float(pi.sum()), 1.0)


def test_lognormal_pi_t_equals_rejection_sampling_not_clamping():
    """Draw ln sigma ~ N(-2, 2^2), redraw those outside [sigma(t_min), sigma(t_max)], round to the nearest t in
    ln sigma: the histogram is pi(t) (within 5 standard errors per bin), and the end bins hold no piled-up mass."""
    log_sigma = dipp.log_sigma_ve(SCHED)
    for t_min, t_max in ((0, 999), (20, 980)):
        pi = dipp.time_density(SCHED, "lognormal", t_min, t_max)
        g = torch.Generator().manual_seed(0)
        draws = torch.randn(1_000_000, generator=g, dtype=torch.float64) * 2 - 2
        draws = draws[(draws >= log_sigma[t_min]) & (draws <= log_sigma[t_max])]  # rejection
        t = torch.bucketize(draws, (log_sigma[t_min + 1:t_max + 1] + log_sigma[t_min:t_max]) / 2) + t_min
        freq = torch.bincount(t, minlength=common.T).double() / len(t)
        se = (pi * (1 - pi) / len(t)).sqrt()
        assert ((freq - pi).abs() <= 5 * se + 1e-12).all()
        assert pi[:t_min].sum() == 0 and pi[t_max + 1:].sum() == 0
        # clamping would put every draw below sigma(t_min) on t_min: the truncated end bin is half a bin's mass
        below = 0.5 * (1 + math.erf((float(log_sigma[t_min]) + 2.0) / (2.0 * math.sqrt(2))))
        assert pi[t_min] < 0.5 * below


def test_init_timestep_is_the_nearest_noise_level():
    t = dipp.init_timestep(SCHED, 2.5)
    sigma = dipp.log_sigma_ve(SCHED).exp()
    assert abs(sigma[t] - 2.5) <= min(abs(sigma[t - 1] - 2.5), abs(sigma[t + 1] - 2.5))
    assert dipp.init_timestep(SCHED, 1e6) == common.T - 1


# ---------------------------------------------------------------------------------------------------
# Theorem 3.4: a class-conditional Gaussian-mixture world (2 classes + null), analytic scores
# ---------------------------------------------------------------------------------------------------
MIX_MEANS = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]], dtype=torch.float64)
MIX_VARS = torch.tensor([0.05, 0.1, 0.08], dtype=torch.float64)
CLASS_WEIGHTS = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.2, 0.7]], dtype=torch.float64)  # p(component | c)
NULL_WEIGHTS = CLASS_WEIGHTS.mean(0)  # p(component | null) with p(c) uniform


def mixture_parts(x, t, weights):
    """Diffused mixture sum_k pi_k N(alpha m_k, (alpha^2 v_k + sigma^2) I): per component log pi_k N(x) [N, K],
    and the per-component scores [N, K, d]."""
    al, si = alpha_sigma(t)
    var = al**2 * MIX_VARS + si**2  # [N, K]
    diff = x[:, None, :] - al[:, :, None] * MIX_MEANS  # [N, K, d]
    log_comp = (weights.clamp_min(1e-300).log() - 0.5 * (diff**2).sum(-1) / var - 0.5 * D * (2 * math.pi * var).log())
    return log_comp, -diff / var[..., None]


def mixture_log_density(x, t, weights):
    return torch.logsumexp(mixture_parts(x, t, weights)[0], dim=1)


def mixture_score(x, t, weights):
    """Analytic score: responsibilities times component scores (no autograd)."""
    log_comp, comp_scores = mixture_parts(x, t, weights)
    return (log_comp.softmax(1)[..., None] * comp_scores).sum(1)


def mixture_setup(n, seed):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randint(0, 2, (n,), generator=g)
    mu = torch.tensor([[0.6, 0.1], [-0.2, -0.5]], dtype=torch.float64, requires_grad=True)  # per class
    a = torch.tensor([[[0.3, 0.0], [0.1, 0.2]], [[0.25, -0.05], [0.0, 0.4]]], dtype=torch.float64, requires_grad=True)
    z, eps = (torch.randn(n, D, generator=g, dtype=torch.float64) for _ in range(2))
    t = dipp.sample_t(n, g, PI_UNIFORM)
    return cond, mu, a, z, eps, t


def forward(cond, mu, a, z, eps, t):
    x0 = mu[cond] + torch.einsum("nij,nj->ni", a[cond], z)  # generator affine in z, per class
    al, si = alpha_sigma(t)
    x_t = al * x0 + si * eps
    eye = torch.eye(D, dtype=torch.float64)
    cov_theta = al[:, :, None] ** 2 * (a @ a.mT).detach()[cond] + si[:, :, None] ** 2 * eye
    score_theta = gaussian_score(x_t.detach(), al * mu.detach()[cond], cov_theta)
    return x0, x_t, score_theta, si


def di_with_cfg_teacher_gradient(omega, weighting, cond, mu, a, z, eps, t):
    """Diff-Instruct (alpha_rew = 0) whose reference score is the CFG score of scale omega, built the way the
    training loop builds it: eps_cfg = eps(null) + omega (eps(c) - eps(null)), s = -eps / sigma."""
    x0, x_t, score_theta, sigma = forward(cond, mu, a, z, eps, t)
    s_c = mixture_score(x_t.detach(), t, CLASS_WEIGHTS[cond])
    s_null = mixture_score(x_t.detach(), t, NULL_WEIGHTS.expand(len(cond), -1))
    eps_ref = common.eps_cfg(-sigma * s_c, -sigma * s_null, omega)
    w = dipp.ikl_weight(SCHED, t, weighting, x_t).double()
    loss, _ = dipp.generator_pseudo_loss(x_t, score_theta, dipp.score_from_eps(eps_ref, sigma), w,
                                         torch.zeros(len(cond), dtype=torch.float64), 0.0)
    return torch.autograd.grad(loss.mean(), (mu, a))


def di_pp_with_cfg_reward_gradient(omega, weighting, cond, mu, a, z, eps, t):
    """DI++ with the plain conditional reference (omega = 1) and the explicit reward r_cfg of (3.5) at scale
    omega - 1, one draw of r_cfg(x_0, c) = w(t) [log p_t(x_t | c) - log p_t(x_t | null)], differentiated by
    autograd through the mixture log-densities."""
    x0, x_t, score_theta, _ = forward(cond, mu, a, z, eps, t)
    w = dipp.ikl_weight(SCHED, t, weighting, x_t).double()
    r_cfg = w.squeeze(1) * (mixture_log_density(x_t, t, CLASS_WEIGHTS[cond])
                            - mixture_log_density(x_t, t, NULL_WEIGHTS.expand(len(cond), -1)))
    s_c = mixture_score(x_t.detach(), t, CLASS_WEIGHTS[cond])
    loss, _ = dipp.generator_pseudo_loss(x_t, score_theta, s_c, w, r_cfg, omega - 1.0)
    return torch.autograd.grad(loss.mean(), (mu, a))


@pytest.mark.parametrize("omega", [1.5, 4.5])
@pytest.mark.parametrize("weighting", ["snr_inv", "unit"])
def test_cfg_teacher_diff_instruct_is_dipp_with_implicit_cfg_reward(omega, weighting):
    """Theorem 3.4: the Diff-Instruct gradient with a CFG teacher of scale omega equals the DI++ gradient with
    reward r_cfg at scale omega - 1. Both are evaluated on the same draws (c, z, t, eps), so they agree to floating
    point draw by draw, hence in expectation. The CFG side uses the analytic mixture scores combined as the training
    loop combines eps-predictions; the reward side differentiates the mixture log-densities with autograd."""
    draws = mixture_setup(4096, seed=0)
    di = di_with_cfg_teacher_gradient(omega, weighting, *draws)
    dipp_grad = di_pp_with_cfg_reward_gradient(omega, weighting, *draws)
    plain = di_with_cfg_teacher_gradient(1.0, weighting, *draws)
    for g_di, g_dipp, g_plain in zip(di, dipp_grad, plain):
        torch.testing.assert_close(g_dipp, g_di, rtol=1e-9, atol=1e-12)
        assert (g_di - g_plain).abs().max() > 1e-3 * g_plain.abs().max()  # CFG changes the gradient


# ---------------------------------------------------------------------------------------------------
# The training script on the tiny toy worlds (plumbing)
# ---------------------------------------------------------------------------------------------------
def tiny_cfg(tmp_path, **kw):
    base = dict(steps=4, batch=32, eval_samples=64, save_every=2, out=str(tmp_path / "run"), progress=False)
    return dipp.Config(**{**base, **kw})


@pytest.fixture
def tiny(toy2d_tiny):
    return toy2d_tiny


def log_rows(out):
    import csv

    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kw, nfe", [
    (dict(variant="dipp", reward_scale=0.1, ta_steps=1), 4),  # 2K + 2 with K = 1, omega = 1
    (dict(variant="dipp", reward_scale=0.1, cfg_scale=2.0, ta_steps=2, ema=True), 7),  # 2K + 3
    (dict(variant="di", cfg_scale=1.5, ta_steps=1, ta_warmup=2), 5),
])
def test_each_variant_runs_end_to_end_and_writes_its_outputs(tmp_path, tiny, kw, nfe):
    metrics = dipp.train(tiny_cfg(tmp_path, **kw), world=tiny)
    out = tmp_path / "run"
    models = ["generator", "ta"] + (["generator_ema"] if kw.get("ema") else [])
    for name in ["config.json", "log.csv", "metrics.json", "samples.png", "curves.png", "adapter/adapter.safetensors",
                 "checkpoint-4/optimizer-generator.pt", "checkpoint-4/optimizer-ta.pt", "checkpoint-2/state.json"] + \
            [f"checkpoint-4/model-{m}.safetensors" for m in models]:
        assert (out / name).exists(), name
    rows = log_rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {float(r["nfe"]) for r in rows} == {nfe}  # counted in every update == the docstring's minimum
    assert {"loss", "reward", "seconds", "ta_loss", "ikl_pull"} <= rows[0].keys()
    keys = ["reward_base", "reward_tuned", "quality_base", "quality_tuned", "distance_tuned", "seconds"]
    for key in keys + (["reward_ema", "quality_ema", "distance_ema"] if kw.get("ema") else []):
        assert math.isfinite(metrics[key]), key
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["nfe_per_update"] == nfe and json.loads((out / "config.json").read_text())["method"] == dipp.METHOD
    if kw["variant"] == "di":
        assert metrics["alpha_rew"] == 0.0  # Diff-Instruct: the explicit reward is off
        assert metrics["generator_timestep"] == dipp.init_timestep(tiny.schedule, 2.5)


def test_variant_di_defaults_to_the_papers_cfg_teacher_only_when_not_given(tmp_path):
    cfg = dipp.resolve_variant(harness.parse_config(dipp.Config, ["--variant", "di"]))
    assert (cfg.cfg_scale, cfg.reward_scale) == (dipp.DI_CFG_SCALE, 0.0)
    cfg = dipp.resolve_variant(harness.parse_config(dipp.Config, ["--variant", "di", "--cfg-scale", "1"]))
    assert cfg.cfg_scale == 1.0
    assert dipp.resolve_variant(harness.parse_config(dipp.Config, [])).cfg_scale == 1.0  # dipp: unchanged


def test_ta_is_a_lora_on_the_reference_and_only_it_trains(tmp_path, tiny):
    """The TA starts equal to the reference (LoRA B = 0), its eps-loss moves it, and `frozen()` is still the
    reference afterwards: the reference costs no second network."""
    ta = tiny.denoiser("teacher", lora_rank=4)
    ref = tiny.denoiser("teacher")
    x, t, c = torch.randn(16, 2), torch.full((16,), 500), torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(ta(x, t, c), ref(x, t, c))
    opt = torch.optim.Adam(ta.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        eps = torch.randn(16, 2)
        loss = dipp.ta_loss(ta(common.add_noise(tiny.schedule, x, eps, t), t, c), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(ta(x, t, c), ref(x, t, c))
        with ta.frozen():
            torch.testing.assert_close(ta(x, t, c), ref(x, t, c))


# ---------------------------------------------------------------------------------------------------
# The harness: resume rule, bit-identical resume, accumulation, NaN
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(variant="di"), "--variant saved 'dipp', now 'di'"),  # a di run must not load a dipp adapter
    (dict(reward_scale=0.3), "--reward-scale saved 0.1, now 0.3"),
    (dict(weighting="unit"), "--weighting saved 'snr_inv', now 'unit'"),
    (dict(ema=True), "--ema saved False, now True"),
    (dict(gradient_accumulation_steps=2), "--gradient-accumulation-steps saved 1, now 2"),
])
def test_resume_with_a_changed_setting_is_refused_before_anything_is_written(tmp_path, tiny, change, message):
    dipp.train(tiny_cfg(tmp_path, steps=2), world=tiny)
    before = files_of(tmp_path / "run")
    with pytest.raises(harness.ConfigError, match=message.replace("(", r"\(")):
        dipp.train(tiny_cfg(tmp_path, steps=3, resume=True, **change), world=tiny)
    assert files_of(tmp_path / "run") == before


def test_resume_of_another_methods_folder_is_refused_before_anything_is_written(tmp_path, tiny):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"method": "pso", "variant": "pso", "steps": 4}))
    before = files_of(out)
    with pytest.raises(harness.ConfigError, match="is a run of 'pso', not of 'diff_instruct_pp'"):
        dipp.train(tiny_cfg(tmp_path, resume=True), world=tiny)
    assert files_of(out) == before


def test_an_interrupted_and_resumed_run_ends_bit_identical(tmp_path, tiny, monkeypatch):
    """Killed inside update 4 (after the checkpoint of update 3): the resumed run restores generator, TA, both
    optimizers and the EMA and ends with the same adapters, checkpoint and log as an uninterrupted run."""
    from safetensors.torch import load_file

    kw = dict(reward_scale=0.1, cfg_scale=2.0, ta_steps=2, ema=True, steps=6, save_every=3)
    dipp.train(tiny_cfg(tmp_path, out=str(tmp_path / "full"), **kw), world=tiny)
    real = harness.Run.check_finite

    def killed_in_update_4(self, loss, step):
        if step == 4:
            raise KeyboardInterrupt("simulated kill")
        return real(self, loss, step)

    monkeypatch.setattr(harness.Run, "check_finite", killed_in_update_4)
    with pytest.raises(KeyboardInterrupt):
        dipp.train(tiny_cfg(tmp_path, out=str(tmp_path / "split"), **kw), world=tiny)
    monkeypatch.setattr(harness.Run, "check_finite", real)
    assert not (tmp_path / "split" / "checkpoint-6").exists() and (tmp_path / "split" / "checkpoint-3").exists()
    dipp.train(tiny_cfg(tmp_path, out=str(tmp_path / "split"), resume=True, **kw), world=tiny)
    names = ["adapter/adapter.safetensors"] + [f"checkpoint-6/model-{m}.safetensors"
                                               for m in ("generator", "ta", "generator_ema")]
    for name in names:
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "split" / name))
        assert a.keys() == b.keys() and a, name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    full, split = log_rows(tmp_path / "full"), log_rows(tmp_path / "split")
    assert [r["step"] for r in split] == [str(i) for i in range(1, 7)]
    assert [r["loss"] for r in full] == [r["loss"] for r in split]
    a, b = (json.loads((tmp_path / f / "metrics.json").read_text()) for f in ("full", "split"))
    assert a["quality_ema"] == b["quality_ema"] and a["reward_tuned"] == b["reward_tuned"]


@pytest.mark.parametrize("cfg_scale, nfe", [(1.0, 6), (2.0, 7)])
def test_gradient_accumulation_runs_and_counts_the_same_nfe_per_micro_batch(tmp_path, tiny, cfg_scale, nfe):
    dipp.train(tiny_cfg(tmp_path, steps=2, gradient_accumulation_steps=2, cfg_scale=cfg_scale), world=tiny)
    assert {float(r["nfe"]) for r in log_rows(tmp_path / "run")} == {nfe}


def test_gradient_accumulation_one_is_the_plain_run(tmp_path, tiny):
    """--gradient-accumulation-steps 1 keeps the random streams of an update without accumulation."""
    dipp.train(tiny_cfg(tmp_path, out=str(tmp_path / "a"), steps=2), world=tiny)
    dipp.train(tiny_cfg(tmp_path, out=str(tmp_path / "b"), steps=2, gradient_accumulation_steps=2), world=tiny)
    dipp.train(tiny_cfg(tmp_path, out=str(tmp_path / "c"), steps=2, gradient_accumulation_steps=1), world=tiny)
    a, b, c = (log_rows(tmp_path / f) for f in "abc")
    assert [r["loss"] for r in a] == [r["loss"] for r in c] and [r["loss"] for r in a] != [r["loss"] for r in b]


def test_nan_loss_stops_with_the_message_and_keeps_the_last_checkpoint(tmp_path, tiny, monkeypatch):
    calls = {"n": 0}
    reward = tiny.reward

    def nan_after_a_while(x0, cond):
        calls["n"] += 1
        r = reward(x0, cond)
        return r * float("nan") if calls["n"] > 4 else r  # probe + updates 1..3 fine, update 4 NaN

    monkeypatch.setattr(tiny, "reward", nan_after_a_while)
    with pytest.raises(harness.NonFiniteLoss, match=r"update 4 .*checkpoint-2\) is kept"):
        dipp.train(tiny_cfg(tmp_path, steps=6, save_every=2, reward_scale=0.1), world=tiny)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    monkeypatch.setattr(tiny, "reward", reward)
    metrics = dipp.train(tiny_cfg(tmp_path, steps=6, save_every=2, reward_scale=0.1, resume=True), world=tiny)
    assert math.isfinite(metrics["reward_tuned"])


def test_the_differentiability_probe_uses_one_sample_and_a_non_differentiable_reward_is_a_clear_error(
        tmp_path, tiny, monkeypatch):
    seen = []
    reward = tiny.reward

    def recording(x0, cond):
        seen.append((len(x0), x0.requires_grad))
        return reward(x0, cond)

    monkeypatch.setattr(tiny, "reward", recording)
    dipp.train(tiny_cfg(tmp_path, steps=1, batch=16), world=tiny)
    assert seen[:2] == [(1, True), (16, True)]  # probe: one sample; then the update's batch (then evaluation)
    seen.clear()
    monkeypatch.setattr(tiny, "reward_is_differentiable", True, raising=False)  # the world vouches: no probe
    dipp.train(tiny_cfg(tmp_path, steps=1, batch=16, out=str(tmp_path / "b")), world=tiny)
    assert seen[0] == (16, True)
    monkeypatch.setattr(tiny, "reward", lambda x0, cond: x0[:, 1].detach())
    with pytest.raises(ValueError, match="not differentiable"):  # caught in the update when the probe is skipped
        dipp.train(tiny_cfg(tmp_path, steps=1, out=str(tmp_path / "c")), world=tiny)
    monkeypatch.delattr(tiny, "reward_is_differentiable")
    with pytest.raises(ValueError, match="not differentiable"):
        dipp.train(tiny_cfg(tmp_path, reward_scale=0.1, out=str(tmp_path / "d")), world=tiny)
    assert not (tmp_path / "d").exists()  # the probe fails before anything is written
    dipp.train(tiny_cfg(tmp_path, reward_scale=0.0, steps=1, out=str(tmp_path / "e")), world=tiny)  # not needed


@pytest.mark.parametrize("kw, message", [
    (dict(t_min=500, t_max=400), "--t-max: expected a finite number >= 500"),
    (dict(steps=0), "--steps: expected"),
    (dict(ta_steps=0), "--ta-steps: expected"),
    (dict(reward_scale=-1.0), "--reward-scale: expected a finite number >= 0"),
    (dict(lr=1e39), "--lr: expected a finite number > 0 and <= 1"),
    (dict(ema_decay=1.0), "--ema-decay: expected"),
    (dict(init_sigma=0.0), "--init-sigma: expected a finite number > 0"),
    (dict(gradient_accumulation_steps=0), "--gradient-accumulation-steps: expected"),
])
def test_bad_input_is_a_clear_error_before_anything_is_written(tmp_path, tiny, kw, message):
    with pytest.raises(harness.ConfigError, match=message):
        dipp.train(tiny_cfg(tmp_path, **kw), world=tiny)
    assert not (tmp_path / "run").exists()


def test_unknown_variant_and_weighting_are_rejected_by_the_command_line():
    with pytest.raises(SystemExit):
        dipp.main(["--variant", "dpo"])
    with pytest.raises(SystemExit):
        dipp.main(["--weighting", "edm"])


def test_mnist_runs_end_to_end(tmp_path, monkeypatch, mnist_tiny):
    monkeypatch.setattr(harness, "load_world", lambda name: mnist_tiny)
    metrics = dipp.main(["--model", "mnist", "--steps", "2", "--batch", "8", "--eval-samples", "20",
                         "--reward-scale", "0.1", "--cfg-scale", "2", "--no-progress", "--out", str(tmp_path / "m")])
    assert math.isfinite(metrics["quality_tuned"]) and (tmp_path / "m" / "samples.png").exists()
