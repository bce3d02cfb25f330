"""pso.py: the equations against closed forms, Diffusion-DPO and D3PO; NFE counts; runs, resume, NaN, bad input."""
import csv
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import common
import harness
import pso

KERNELS = ["x0_renoise", "euler_ancestral"]


class GaussDenoiser(torch.nn.Module):
    """The exact eps-predictor of Gaussian data N(mu, s^2 I): eps(x_t) = sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 +
    sigma_t^2). theta = mu; `frozen()` swaps in mu_pre (the pre-trained model), like a disabled adapter."""

    def __init__(self, mu_pre, s=0.3):
        super().__init__()
        self.sched, self.s = common.Schedule(), s
        self.mu = torch.nn.Parameter(mu_pre.clone())
        self.mu_pre = mu_pre.clone()
        self._frozen = False

    def __call__(self, x_t, t, cond=None):
        alpha, sigma = self.sched.alpha_sigma(torch.as_tensor(t).expand(len(x_t)), x_t)
        mu = self.mu_pre if self._frozen else self.mu
        return sigma * (x_t - alpha * mu) / (alpha**2 * self.s**2 + sigma**2)

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


def random_net(seed):
    """A fixed nonlinear eps-network (policy) and a second one (frozen reference) behind the Denoiser interface."""
    g = torch.Generator().manual_seed(seed)
    w_theta, w_pre = torch.randn(2, 2, generator=g), torch.randn(2, 2, generator=g)

    class Net:
        frozen_flag = False

        def __call__(self, x, t, cond=None):
            w = w_pre if self.frozen_flag else w_theta
            return torch.tanh(x @ w + 1e-3 * torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1))

        def frozen(self):
            net = self

            class Ctx:
                def __enter__(self):
                    net.frozen_flag = True

                def __exit__(self, *a):
                    net.frozen_flag = False
            return Ctx()
    return Net()


def chain_log_ratio(net, kernel, states, times):
    """Exact sum_n log p_theta / p_pre of a stored trajectory's stochastic transitions, from gaussian_log_prob."""
    total = 0.0
    for k, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        inp = kernel.net_input(states[k], t)
        mean_theta, std = kernel.step(states[k], net(inp, t), t, t_next)
        with net.frozen():
            mean_pre, _ = kernel.step(states[k], net(inp, t), t, t_next)
        total = total + common.gaussian_log_prob(states[k + 1], mean_theta, std) - \
            common.gaussian_log_prob(states[k + 1], mean_pre, std)
    return total


def forward_chain(kernel, x0, times, gen):
    """A forward-process trajectory x_{t_1} -> ... -> x_{t_N} (q's Markov chain), returned in the kernel's state
    scale ordered like a sampler: [x_{t_N}, ..., x_{t_1}]."""
    sched = kernel.sched
    asc = sorted(times)
    x = common.add_noise(sched, x0, torch.randn(x0.shape, generator=gen), asc[0])
    xs = [x]
    for t_prev, t in zip(asc[:-1], asc[1:]):
        a = sched.alpha_bar(t) / sched.alpha_bar(t_prev)
        x = a.sqrt() * x + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
        xs.append(x)
    xs = xs[::-1]
    if kernel.name == "euler_ancestral":  # VE scale: x / alpha_t
        xs = [x / sched.alpha_sigma(t)[0] for x, t in zip(xs, sorted(times, reverse=True))]
    return xs


# ----------------------------------------------------------------------------------------------- equations
@pytest.mark.parametrize("sampler", KERNELS)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_eq12_log_ratio_is_the_difference_of_gaussian_log_probs(sampler, reduce):
    kernel = common.make_kernel(sampler, common.Schedule())
    x = kernel.init(torch.randn(5, 3, 4, 4), 749)
    eps_theta, eps_pre = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    mean_theta, std = kernel.step(x, eps_theta, 749, 499)
    mean_pre, _ = kernel.step(x, eps_pre, 749, 499)
    x_next = mean_theta + std * torch.randn_like(x)
    ours = pso.transition_log_ratio(x_next, mean_theta, mean_pre, std, reduce)
    ref = common.gaussian_log_prob(x_next, mean_theta, std, reduce) - common.gaussian_log_prob(x_next, mean_pre, std,
                                                                                                 reduce)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_eq11_and_the_loss_on_hand_computed_numbers():
    eps, eps_theta, eps_pre = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])
    # -(0.25 - (1 + 1)) = 1.75 (sum) / 0.875 (mean); no reference: -0.25 / -0.125
    assert torch.allclose(pso.eps_log_ratio(eps, eps_theta, eps_pre, "sum"), torch.tensor([1.75]))
    assert torch.allclose(pso.eps_log_ratio(eps, eps_theta, eps_pre, "mean"), torch.tensor([0.875]))
    assert torch.allclose(pso.eps_log_ratio(eps, eps_theta, None, "mean"), torch.tensor([-0.125]))
    r_t, r_r = torch.tensor([[0.1, 0.2]]), torch.tensor([[0.0, 0.1]])
    loss, margin = pso.pso_loss(r_t, r_r, beta=2.0)
    assert torch.allclose(loss, F.softplus(torch.tensor(-0.4))) and torch.allclose(margin, torch.tensor([0.2]))
    per_step, _ = pso.pso_loss(r_t, r_r, beta=2.0, per_step=True)
    assert torch.allclose(per_step, F.softplus(torch.tensor(-0.2)))
    hinge, _ = pso.pso_loss(r_t, r_r, beta=2.0, hinge=True)
    assert torch.allclose(hinge, torch.tensor(0.6))  # relu(1 - 2 * 0.2)
    clamped, _ = pso.pso_loss(torch.tensor([[1.0]]), torch.tensor([[-1.0]]), beta=1.0, clamp=0.1)
    assert torch.allclose(clamped, F.softplus(-torch.tensor(math.log(1.1) - math.log(0.9))))


def test_offline_pso_with_one_timestep_is_diffusion_dpo():
    """Diffusion-DPO (Wallace et al.): per-pixel mean MSE, inside = -beta_dpo / 2 ((mse_w - mse_l) - (ref_w - ref_l)),
    one random t per pair, shared noise. Offline PSO's Eq. 6 with one timestep is that loss with beta = beta_dpo / 2."""
    sched, g = common.Schedule(), torch.Generator().manual_seed(0)
    net = random_net(1)
    x_w, x_l = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    eps = torch.randn(1, 16, 2, generator=g)
    lr, _, _ = pso.forward_log_ratios(net, sched, torch.cat([x_w, x_l]), None, [torch.cat([t, t])], None, "mean",
                                      eps=torch.cat([eps, eps], 1))
    beta = 2500.0 / 2
    ours, _ = pso.pso_loss(lr[:16], lr[16:], beta)

    def mse(x0, frozen):
        x_t = common.add_noise(sched, x0, eps[0], t)
        if frozen:
            with net.frozen():
                return ((net(x_t, t) - eps[0]) ** 2).mean(1)
        return ((net(x_t, t) - eps[0]) ** 2).mean(1)

    model_diff = mse(x_w, False) - mse(x_l, False)
    ref_diff = mse(x_w, True) - mse(x_l, True)
    dpo = -F.logsigmoid(-0.5 * 2500.0 * (model_diff - ref_diff)).mean()
    assert torch.allclose(ours, dpo, rtol=1e-5)


@pytest.mark.parametrize("sampler", KERNELS)
def test_online_pso_equals_the_d3po_sum_form(sampler):
    """Eq. 7 = -log sigmoid(beta sum_n [log pi_theta/pi_ref (a^w_n|s^w_n) - log pi_theta/pi_ref (a^l_n|s^l_n)]); the
    official per-step clamped loss = D3PO's per-step form."""
    kernel = common.make_kernel(sampler, common.Schedule())
    net, g, times = random_net(2), torch.Generator().manual_seed(3), [999, 749, 499, 249, -1]
    c = torch.zeros(8)  # the fake nets ignore the condition
    traj = pso.sample_trajectory(net, kernel, torch.randn(8, 2, generator=g), c, times, g, grad_steps=3)
    lr = pso.trajectory_log_ratios(net, kernel, traj, c, 3, "sum")
    ours, _ = pso.pso_loss(lr[:4], lr[4:], beta=5.0)
    per_step = []
    for k in range(3):  # D3PO: log pi_theta - log pi_ref at each stored transition
        per_step.append(chain_log_ratio(net, kernel, traj.states[k:k + 2], times[k:k + 2]))
    d = torch.stack(per_step, 1)
    d3po_sum = -F.logsigmoid(5.0 * (d[:4] - d[4:]).sum(1)).mean()
    assert torch.allclose(ours, d3po_sum, rtol=1e-4)
    official, _ = pso.pso_loss(lr[:4], lr[4:], beta=5.0, per_step=True, clamp=0.1)
    ratio = d.exp().clamp(0.9, 1.1)
    d3po_step = -torch.log(torch.sigmoid(5.0 * ratio[:4].log() - 5.0 * ratio[4:].log())).mean()
    assert torch.allclose(official, d3po_step, rtol=1e-4)


@pytest.mark.parametrize("variant", ["pso", "offline", "online"])
@pytest.mark.parametrize("sampler", KERNELS)
def test_one_gradient_step_raises_the_target_trajectory_likelihood_over_the_reference(variant, sampler):
    """Linear-Gaussian toy: base data N(0, 0.3^2), target data N(m, 0.3^2), the exact Gaussian eps-model with
    theta = its mean. After one gradient step of each objective, the kernel log-likelihood ratio p_theta/p_pre of
    target trajectories exceeds that of reference trajectories (it is 0 for both at theta_pre)."""
    sched = common.Schedule()
    kernel = common.make_kernel(sampler, sched)
    m = torch.tensor([1.0, 0.5])
    net = GaussDenoiser(torch.zeros(2))
    grid, g = [999, 749, 499, 249], torch.Generator().manual_seed(0)
    n = 2048
    c, c2 = torch.zeros(n), torch.zeros(2 * n)  # the Gaussian model is unconditional
    x_target = m + 0.3 * torch.randn(n, 2, generator=g)
    if variant == "pso":
        ref = pso.sample_trajectory(net, kernel, torch.randn(n, 2, generator=g), c, grid, g, grad_steps=3)
        lr_r = pso.trajectory_log_ratios(net, kernel, ref, c, 3, "mean")
        lr_t, _, _ = pso.forward_log_ratios(net, sched, x_target, c, grid[:-1], g, "mean")
        ref_states = lambda: ref.states  # noqa: E731
    elif variant == "offline":
        x_ref = 0.3 * torch.randn(n, 2, generator=g)
        lr, _, _ = pso.forward_log_ratios(net, sched, torch.cat([x_target, x_ref]), c2, grid[:-1], g, "mean")
        lr_t, lr_r = lr[:n], lr[n:]
        ref_states = lambda: forward_chain(kernel, x_ref, grid, torch.Generator().manual_seed(9))  # noqa: E731
    else:  # online: own trajectories ranked by the reward x . m
        traj = pso.sample_trajectory(net, kernel, torch.randn(2 * n, 2, generator=g), c2, grid + [-1], g, 3)
        lr = pso.trajectory_log_ratios(net, kernel, traj, c2, 3, "mean")
        first = ((traj.x0[:n] @ m) >= (traj.x0[n:] @ m))[:, None]
        lr_t, lr_r = torch.where(first, lr[:n], lr[n:]), torch.where(first, lr[n:], lr[:n])
        win = [torch.where(first, s[:n], s[n:]) for s in traj.states[:4]]
        lose = [torch.where(first, s[n:], s[:n]) for s in traj.states[:4]]
    loss, _ = pso.pso_loss(lr_t, lr_r, beta=5.0)
    assert abs(loss.item() - math.log(2)) < 1e-6  # theta = theta_pre
    loss.backward()
    assert torch.isfinite(net.mu.grad).all() and net.mu.grad.abs().sum() > 0
    with torch.no_grad():
        net.mu -= 0.05 * net.mu.grad / net.mu.grad.norm()
        if variant == "online":
            target_states, reference_states = win, lose
        else:
            target_states = forward_chain(kernel, x_target, grid, torch.Generator().manual_seed(8))
            reference_states = ref_states()
        gain_t = chain_log_ratio(net, kernel, target_states, grid).mean()
        gain_r = chain_log_ratio(net, kernel, reference_states, grid).mean()
    assert gain_t > gain_r, (float(gain_t), float(gain_r))


# ----------------------------------------------------------------------------------------------- runs
def tiny(tmp_path, **kw):
    base = dict(steps=2, batch=8, eval_samples=32, eval_every=1000, save_every=1000, naive_baseline=False,
                out=str(tmp_path / "run"), reference_images=8, concept_images=3, progress=False)
    return pso.Config(**{**base, **kw})


def fit(cfg, world):
    """pso.train's metrics (it also returns the trained denoiser)."""
    return pso.train(cfg, world)[0]


def read_log(path):
    with open(path / "log.csv") as f:
        return list(csv.DictReader(f))


CASES = {
    "pso": dict(variant="pso"),
    "pso_dense_grid_euler": dict(variant="pso", train_steps=6, sampler="euler_ancestral"),
    "offline": dict(variant="offline"),
    "offline_target_one_timestep": dict(variant="offline", offline_pairs="target", one_timestep=True),
    "offline_diffusion_dpo": dict(variant="offline", one_timestep=True, one_timestep_from="uniform"),
    "online": dict(variant="online"),
    "online_official": dict(variant="online", per_step_loss=True, clamp_ratio=0.1, beta=50.0,
                            sampler="euler_ancestral"),
    "customize": dict(variant="customize"),
    "customize_official": dict(variant="customize", hinge=True, reference_scale=0.1, one_timestep=True,
                               one_timestep_from="leading", prior_weight=0.5, beta=5.0),
    "naive": dict(variant="naive"),
    "naive_grid": dict(variant="naive", naive_t="grid"),
    "pso_accumulated": dict(variant="pso", gradient_accumulation_steps=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_variant_runs_counts_its_stated_nfe_and_starts_at_log_2(case, tmp_path, toy2d_tiny):
    cfg = tiny(tmp_path, **CASES[case])
    metrics = fit(cfg, toy2d_tiny)
    rows = read_log(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(float(r["nfe"]) == metrics["nfe_per_update"] for r in rows)  # counted == stated
    if cfg.variant in ("pso", "offline", "online"):  # the first loss is at theta = theta_pre
        assert abs(float(rows[0]["loss"]) - math.log(2)) < 1e-5
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert all(torch.isfinite(v).all() for v in adapter.values())
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # the update moved the adapter
    for key in ("reward_base", "reward_tuned", "quality_base", "quality_tuned", "seconds", "quality_tuned_1step"):
        assert key in metrics
    assert (tmp_path / "run" / "samples.png").exists() and (tmp_path / "run" / "curves.png").exists()
    stated = {"pso": 12, "pso_dense_grid_euler": 20, "offline": 12, "offline_target_one_timestep": 4 + 4,
              "offline_diffusion_dpo": 4, "online": 14, "online_official": 14, "customize": 6, "customize_official": 2,
              "naive": 4, "naive_grid": 4, "pso_accumulated": 12}  # per pair of one micro-batch
    assert metrics["nfe_per_update"] == stated[case]


def test_customize_has_no_reference_model_and_adds_prior_preservation(tmp_path, toy2d_tiny):
    """App. B.3: the eps_pre terms are dropped (no frozen call: r = -||eps - eps_theta||^2), plus lambda * the
    eps-MSE on the reference images; the references are sampled once (setup_nfe) from the frozen model."""
    sched, net = common.Schedule(), pso.CountingDenoiser(random_net(4))
    x0, eps, c = torch.randn(6, 2), torch.randn(1, 6, 2), torch.zeros(6)
    lr, _, _ = pso.forward_log_ratios(net, sched, x0, c, [499], None, "mean", use_reference=False, eps=eps)
    x_t = common.add_noise(sched, x0, eps[0], 499)
    assert torch.allclose(lr[:, 0], -((eps[0] - net.denoiser(x_t, 499)) ** 2).mean(1)) and net.rows == 6
    metrics = fit(tiny(tmp_path, variant="customize", steps=1), toy2d_tiny)
    row = read_log(tmp_path / "run")[0]
    assert float(row["prior"]) > 0 and float(row["loss"]) > float(row["prior"])  # -log sigmoid(.) > 0 plus prior
    assert abs(float(row["loss"]) - math.log(2) - float(row["prior"])) > 1e-3  # not the referenced log 2 start
    assert metrics["setup_nfe"] == 8 * 4  # 8 references x 4 steps, once


def test_default_run_has_a_naive_baseline_panel_and_metrics(tmp_path, toy2d_tiny):
    """experiment() (what `python pso.py` runs) trains the naive baseline into <out>/naive with the same settings, then
    the variant, and merges the baseline's tuned metrics as _naive (its samples are the same seeds)."""
    metrics = pso.experiment(tiny(tmp_path, naive_baseline=True), toy2d_tiny)
    naive = json.loads((tmp_path / "run" / "naive" / "metrics.json").read_text())
    assert naive["variant"] == "naive" and naive["updates"] == 2
    assert {"quality_naive", "reward_naive", "quality_naive_1step", "quality_naive_on_base_split"} <= metrics.keys()
    assert metrics["quality_naive"] == naive["quality_tuned"] and metrics["reward_naive_1step"] == naive[
        "reward_tuned_1step"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert json.loads((tmp_path / "run" / "naive" / "config.json").read_text())["naive_t"] == "uniform"


def test_the_command_line_run_takes_the_toys_eq5_defaults_and_prints_the_fig1_readouts(tmp_path, capsys,
                                                                                         monkeypatch):
    """`python pso.py` on toy2d: the world's defaults for options not given (toy2d.Toy2D.cli_defaults), the
    transfer / sharpness table for base, naive and pso at the model's grid and at one step, and the samples figure
    with the naive run's 1-step panel; options given on the command line win over the world's defaults."""
    from toy.toy2d import Toy2D

    monkeypatch.setenv("FEWSTEP_TOY_BUDGET", "tiny")
    argv = ["--steps", "1", "--batch", "4", "--eval-samples", "12", "--eval-every", "1000", "--no-progress"]
    metrics = pso.main(argv + ["--out", str(tmp_path / "run")])
    defaults = Toy2D.cli_defaults[("pso", "pso")]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {k: saved[k] for k in defaults} == defaults and metrics["beta"] == defaults["beta"]
    assert json.loads((tmp_path / "run" / "naive" / "config.json").read_text())["train_steps"] == defaults["train_steps"]
    table = pso.readouts(metrics)
    out = capsys.readouterr().out
    assert table in out and "transfer (4 steps)" in table and "sharpness (1 step)" in table
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in table.splitlines()[1:]}
    assert list(rows) == ["base", "naive", "pso"]
    for row, name in (("naive", "naive"), ("pso", "tuned")):
        want = [metrics[f"{k}_{name}{s}"] for s in ("", "_1step") for k in ("transfer", "sharpness")]
        assert rows[row] == pytest.approx(want, abs=5e-5)  # printed with 4 decimals
    assert pso.readouts({"variant": "pso", "reward_base": 1.0, "quality_base": 0.5, "reward_tuned": 2.0}) == ""
    metrics = pso.main(argv + ["--beta", "0", "--train-steps", "0", "--out", str(tmp_path / "paper")])
    assert metrics["beta"] == pso.PAPER_BETA["pso"] and metrics["train_grid"] == [999, 749, 499, 249]


def test_mnist_end_to_end(tmp_path, mnist_tiny):
    metrics = fit(tiny(tmp_path, variant="online", batch=4, eval_samples=8), mnist_tiny)
    assert "bold_share_tuned" in metrics and metrics["nfe_per_update"] == 14


def kill_at_update(monkeypatch, n):
    """Simulate a kill (an exception no handler catches) when update n checks its loss."""
    real = harness.Run.check_finite

    def killed(self, loss, step):
        if step == n:
            raise KeyboardInterrupt("simulated kill")
        return real(self, loss, step)

    monkeypatch.setattr(harness.Run, "check_finite", killed)
    return real


@pytest.mark.parametrize("accumulation", [1, 2])
def test_an_interrupted_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(accumulation, tmp_path, toy2d_tiny,
                                                                                   monkeypatch):
    kw = dict(steps=4, save_every=2, gradient_accumulation_steps=accumulation)
    full = fit(tiny(tmp_path, out=str(tmp_path / "a"), **kw), toy2d_tiny)
    real = kill_at_update(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path, out=str(tmp_path / "b"), **kw), toy2d_tiny)
    assert [r["step"] for r in read_log(tmp_path / "b")] == ["1", "2", "3"]  # update 3 logged, checkpoint at 2
    monkeypatch.setattr(harness.Run, "check_finite", real)
    resumed = fit(tiny(tmp_path, out=str(tmp_path / "b"), resume=True, **kw), toy2d_tiny)
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_log(tmp_path / "b")] == ["1", "2", "3", "4"]  # no duplicated rows
    assert [r["loss"] for r in read_log(tmp_path / "b")] == [r["loss"] for r in read_log(tmp_path / "a")]
    assert resumed["quality_tuned"] == full["quality_tuned"]


def test_gradient_accumulation_runs_each_micro_batch_with_the_stated_nfe_and_its_own_stream(tmp_path, toy2d_tiny,
                                                                                         monkeypatch):
    """--gradient-accumulation-steps 2: two micro-batches per update, each the stated NFEs (logged per pair of one
    micro-batch), each from its own random stream (micro = 0 is the stream of an update without accumulation)."""
    seen = []
    real = pso.target_batch

    def record(s, gen):
        x0, cond = real(s, gen)
        seen.append(x0.clone())
        return x0, cond

    monkeypatch.setattr(pso, "target_batch", record)
    metrics = fit(tiny(tmp_path, steps=1, gradient_accumulation_steps=2), toy2d_tiny)
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])
    assert float(read_log(tmp_path / "run")[0]["nfe"]) == metrics["nfe_per_update"] == 12
    seen.clear()
    fit(tiny(tmp_path, steps=1, out=str(tmp_path / "one")), toy2d_tiny)
    assert len(seen) == 1
    first_micro = seen[0]
    seen.clear()
    fit(tiny(tmp_path, steps=1, out=str(tmp_path / "two"), gradient_accumulation_steps=2), toy2d_tiny)
    assert torch.equal(seen[0], first_micro)


def test_nan_loss_stops_with_the_message_and_keeps_the_last_good_checkpoint(tmp_path, toy2d_tiny, monkeypatch):
    real, calls = pso.pso_loss, []

    def nan_on_third(*a, **k):
        loss, margin = real(*a, **k)
        calls.append(1)
        return (loss * float("nan"), margin) if len(calls) == 3 else (loss, margin)

    monkeypatch.setattr(pso, "pso_loss", nan_on_third)
    with pytest.raises(harness.NonFiniteLoss, match=r"update 3 of .*checkpoint-2\) is kept.*another --out"):
        fit(tiny(tmp_path, steps=5, save_every=2), toy2d_tiny)
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-2"]
    tensors = load_file(str(tmp_path / "run" / "checkpoint-2" / "model-student.safetensors"))
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path, toy2d_tiny, monkeypatch):
    monkeypatch.setattr(pso, "naive_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(harness.NonFiniteLoss, match="update 1 .*no checkpoint was written yet"):
        fit(tiny(tmp_path, variant="naive"), toy2d_tiny)


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_resume_with_a_changed_setting_is_refused_before_anything_is_written(tmp_path, toy2d_tiny):
    fit(tiny(tmp_path), toy2d_tiny)
    before = _files(tmp_path / "run")
    with pytest.raises(ValueError, match="--variant saved 'pso', now 'online'"):
        fit(tiny(tmp_path, variant="online", resume=True), toy2d_tiny)
    with pytest.raises(ValueError, match="--beta saved 0.0, now 5.0"):
        pso.experiment(tiny(tmp_path, beta=5.0, resume=True, naive_baseline=True), toy2d_tiny)
    with pytest.raises(ValueError, match="--naive-t saved 'uniform', now 'grid'"):
        fit(tiny(tmp_path, naive_t="grid", resume=True), toy2d_tiny)
    assert _files(tmp_path / "run") == before and not (tmp_path / "run" / "naive").exists()
    # the free options (more updates, evaluation size) continue the same experiment
    fit(tiny(tmp_path, steps=3, eval_samples=16, resume=True), toy2d_tiny)
    assert [r["step"] for r in read_log(tmp_path / "run")] == ["1", "2", "3"]


def test_resume_of_another_methods_run_folder_is_refused_before_anything_is_written(tmp_path, toy2d_tiny):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"method": "sharpening", "variant": "sft", "model": "toy2d"}))
    before = _files(folder)
    with pytest.raises(harness.ConfigError, match="is a run of 'sharpening', not of 'pso'"):
        fit(tiny(tmp_path, resume=True), toy2d_tiny)
    with pytest.raises(harness.ConfigError, match="is a run of 'sharpening', not of 'pso'"):
        pso.experiment(tiny(tmp_path, resume=True, naive_baseline=True), toy2d_tiny)
    assert _files(folder) == before


# ----------------------------------------------------------------------------------------------- bad input
def test_a_pairs_file_row_with_a_missing_image_or_label_is_named(tmp_path, toy2d_tiny):
    good = {"win": [0.0, 1.2], "lose": [1.2, 0.0], "cond": 2}
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, good, {"win": [0.0, 1.2], "cond": 1}]))
    with pytest.raises(ValueError, match=r"row 2: missing 'lose'"):
        fit(tiny(tmp_path, variant="offline", pairs=str(path)), toy2d_tiny)
    path.write_text("\n".join(json.dumps(r) for r in [good, {"win": [0.0, 1.2], "lose": [1.0, 0.0]}]))
    with pytest.raises(ValueError, match=r"row 1: missing 'cond'"):
        fit(tiny(tmp_path, variant="offline", pairs=str(path)), toy2d_tiny)
    path.write_text(json.dumps({**good, "cond": 7}))
    with pytest.raises(ValueError, match=r"row 0: label 7 is not a condition"):
        fit(tiny(tmp_path, variant="offline", pairs=str(path)), toy2d_tiny)
    st = tmp_path / "pairs.safetensors"
    save_file({"win": torch.zeros(3, 2), "lose": torch.zeros(3, 2), "cond": torch.zeros(2, dtype=torch.long)}, str(st))
    with pytest.raises(ValueError, match=r"row 2: missing 'cond'"):
        fit(tiny(tmp_path, variant="offline", pairs=str(st)), toy2d_tiny)
    save_file({"win": torch.zeros(2, 3), "lose": torch.zeros(2, 2), "cond": torch.zeros(2, dtype=torch.long)}, str(st))
    with pytest.raises(ValueError, match=r"row 0: 'win' has shape \(3,\)"):
        fit(tiny(tmp_path, variant="offline", pairs=str(st)), toy2d_tiny)


def test_a_valid_pairs_file_trains(tmp_path, toy2d_tiny):
    path = tmp_path / "pairs.pt"
    torch.save({"win": torch.randn(6, 2), "lose": torch.randn(6, 2), "cond": torch.arange(6) % 3}, path)
    metrics = fit(tiny(tmp_path, variant="offline", pairs=str(path)), toy2d_tiny)
    assert metrics["eval_split"] == "base" and metrics["nfe_per_update"] == 12


@pytest.mark.parametrize("bad, message", [
    (dict(beta=-1.0), "--beta"),
    (dict(train_steps=1), "--train-steps"),
    (dict(variant="online", pairs="x.jsonl"), "--pairs"),
    (dict(variant="pso", one_timestep=True), "--one-timestep"),
    (dict(variant="dpo"), "--variant"),
    (dict(clamp_ratio=1.5), "--clamp-ratio"),
    (dict(lr=1e39), "--lr: expected a finite number > 0 and <= 1, got 1e"),
    (dict(batch=0), "--batch"),
    (dict(reference_scale=0.1), "--reference-scale: expected 1 unless --variant customize"),
    (dict(naive_t="random"), "--naive-t"),
    (dict(variant="offline", one_timestep=True, one_timestep_from="ddpm"), "--one-timestep-from"),
    (dict(hinge=True, per_step_loss=True), "--hinge"),
    (dict(gradient_accumulation_steps=0), "--gradient-accumulation-steps"),
])
def test_bad_configs_fail_before_anything_is_written(bad, message, tmp_path, toy2d_tiny):
    with pytest.raises(ValueError, match=message):
        fit(tiny(tmp_path, **bad), toy2d_tiny)
    assert not (tmp_path / "run").exists()


def test_cli_parses_every_option():
    cfg = harness.parse_config(pso.Config, ["--variant", "online", "--sampler", "euler_ancestral", "--per-step-loss",
                                           "--clamp-ratio", "0.1", "--train-steps", "8", "--no-naive-baseline",
                                           "--naive-t", "grid", "--one-timestep-from", "uniform",
                                           "--gradient-accumulation-steps", "2"])
    assert cfg == dataclasses.replace(pso.Config(), variant="online", sampler="euler_ancestral", per_step_loss=True,
                                      clamp_ratio=0.1, train_steps=8, naive_baseline=False, naive_t="grid",
                                      one_timestep_from="uniform", gradient_accumulation_steps=2)
