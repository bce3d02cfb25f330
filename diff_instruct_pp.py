"""Diff-Instruct++ (DI++): align a one-step generator with a reward, regularised by the Integral KL divergence
to a frozen reference diffusion model.

Paper: Luo, "Diff-Instruct++: Training One-step Text-to-image Generator Model to Align with Human Preferences",
arXiv 2410.18881 (equations restored in DESIGN.md section 6). There is no public code: this file is the
reference implementation.

Objects. Generator x_0 = g_theta(z, c), z ~ N(0, I): the world's one-step model, x_0 = x0_hat(z, t=999).
Reference eps_ref(x_t, t, c) with a null condition for classifier-free guidance (CFG): the world's "teacher".
TA ("teaching assistant") eps_psi: a LoRA on the reference network, so `with ta.frozen():` *is* the reference
(no second copy), trained on generator samples to follow the generator's diffused score. Scores: s = -eps/sigma_t.

What is implemented (equation -> function):
  (3.3)        objective  L(theta) = E_c[ -alpha_rew E r(g_theta(z,c), c) + int w(t) KL(p_theta,t || p_ref,t) dt ],
               the time integral taken against pi(t): int ... dt := sum_t pi(t) w(t) KL_t   (not computed here;
               tests/test_diff_instruct_pp.py evaluates it in closed form in a Gaussian world)
  (3.4)        its gradient  E[ -alpha_rew grad_x r . dx_0/dtheta + w(t) (s_theta,t - s_ref,t)(x_t) . dx_t/dtheta ],
               s_theta,t estimated by the TA's score s_psi                                   -> generator_pseudo_loss
  (3.5), Thm 3.4  CFG = an implicit reward: eps_cfg = eps_ref(null) + omega (eps_ref(c) - eps_ref(null)); using it
               as the reference is DI++ with r_cfg at scale omega - 1                                -> common.eps_cfg
  (3.7)-(3.9)  pseudo-loss  L_G = -alpha_rew r(x_0, c) + w(t) < sg[s_psi(x_t) - s_ref^cfg(x_t)], x_t >
                                                                                             -> generator_pseudo_loss
  Alg. 1 step 1  TA update: the reference's own eps-loss for eps_psi on sg(x_0) (DSM, (2.2))             -> ta_loss
  pi(t)        "uniform" (default) on [t_min, t_max] = [20, 980] (DESIGN section 6; DMD2 / SiD); "lognormal":
               the paper's App. C / (C.5), ln sigma_VE ~ N(-2, 2^2) with sigma_VE(t) = sqrt((1 - alpha_bar_t) /
               alpha_bar_t), rounded to the nearest t (use it with --t-min 0 --t-max 999) -> time_density, sample_t
  w(t)         "snr_inv" (default): w = sigma_t^2 / alpha_t^2; "unit": w = 1                           -> ikl_weight

The weighting. At one t the IKL part of the gradient on x_0 is alpha_t w(t) (s_psi - s_ref)(x_t) =
alpha_t^2 w(t) / sigma_t^2 * (x0_hat_psi - x0_hat_ref)(x_t). With "snr_inv" it is the plain difference of the two
models' clean-sample predictions (Diff-Instruct's sigma^2 weighting in the variance-exploding scale; DMD's direction
before its per-sample normalisation): every noise level pulls in x_0 units and none amplifies the networks' errors.
With "unit" it is that difference times SNR(t), so low noise levels dominate, as in the KL between two sharp
distributions. The paper sets the generator weighting to the constant 1 (App. A.2, App. C table) in its EDM
parametrisation; which quantity the constant multiplies is in the equations the paper copy lost, so both readings
are offered. Measured (benchmarks/results/diff_instruct_pp.md): on MNIST, "unit" with the paper's log-normal pi
(half its mass at sigma_VE <= 0.14, a third on t = 0) turns plain Diff-Instruct into a collapse (quality 0.78 ->
0.10 in 150 updates; the logged ikl_pull is ~400 against ~10: most likely the TA's and the reference's
pixel-level errors at the lowest noise levels, amplified by alpha/sigma ~ 34, dominate the pull), while "snr_inv"
with uniform pi improves the generator (0.78 -> 0.98). On
toy2d (2D modes of std 0.05, narrower than the smallest noise level sigma_VE(20) = 0.14 of the uniform pi)
"snr_inv" resists a shift delta of a mode with a pull of at most delta, so the reward is partly gained by sliding
samples off the modes; "unit" + log-normal, which sees the modes' width, trades better there (reward 0.44 at
quality 0.65 against 0.38 at 0.30). The default is the one that is stable on both.
tests/test_diff_instruct_pp.py checks, for both weightings and both time densities, in a Gaussian world where
every score is analytic and the generator is affine in z, that the theta-gradient of the pseudo-loss equals the
gradient of (3.3) computed in closed form (Theorem 3.2; this also checks that the term through d p_theta,t /
d theta vanishes, App. B.2), and Theorem 3.4 in a class-conditional Gaussian-mixture world.

Variants (--variant):
  dipp  DI++ alignment of the world's one-step generator with --reward-scale (alpha_rew) and --cfg-scale (omega).
        alpha_rew = 0, omega = 1 is plain Diff-Instruct; alpha_rew = 0, omega > 1 is Diff-Instruct with a CFG
        teacher, i.e. DI++ with only the implicit CFG reward (Thm 3.4).
  di    Diff-Instruct pre-training (the paper's stage 1): the generator starts from the *reference* network read
        at t = 999 (x_0 = x0_hat_ref(z), a blurry mean) instead of the world's distilled generator, and no
        explicit reward (--reward-scale is ignored; --cfg-scale still applies).

NFEs (network evaluations) per update, with K = --ta-steps and batch B (every one on B samples):
  generator step: 1 generator (with grad) + 1 TA + 1 reference (2 with omega != 1: conditional and null) = 3 | 4
  TA steps:       K TA (with grad); the first reuses the generator step's sample x_0 (detached), each further
                  one draws fresh samples, 1 generator call (no grad) each:                           K + (K - 1)
  total 2K + 2 (omega = 1) or 2K + 3 (omega != 1); the default K = 2 with omega = 1 gives 6. This is the
  minimum: no sample or reference prediction is computed twice. The reward model is not counted. log.csv's `nfe`
  is counted by common.CountingDenoiser around the generator and the TA; nfe_per_update states the minimum.

Differences from the paper (and why):
  * The order inside an update is generator step, then TA steps on the generator's (detached) sample, as DMD2's
    code does, where the paper's Alg. 1 lists the TA step first with its own samples. Reusing the sample saves one
    generator call per update and the generator is never scored by a TA that was just fitted to its own batch.
  * The paper's EDM parametrisation (data prediction, log-normal sigma, weighting (C.8)-(C.9)) is rewritten in
    the DDPM eps / alpha_bar parametrisation every model here uses. The paper's log-normal pi is the default of
    neither weighting here (measured above): with --time-density lognormal it is put on the VE noise level of each
    discrete t, and its truncation [0.01, 156.6] becomes the schedule's own range [0.029, 14.6] (SDXL schedule),
    so the mass below 0.029 (about 31%) lands on t = 0. The generator weighting of App. C was lost from the paper
    copy: w(t) is our documented choice above, tested for the gradient identity.
  * No EMA of the generator (the paper uses a decay of 0.95 in alignment: an average over ~20 updates); we report
    the raw generator.
  * LoRA adapters on generator and TA by default (the paper fine-tunes every weight: --train-full,
    --ta-train-full); the TA as a LoRA on the reference is what makes the reference free in memory.
  * Adam betas (0, 0.999) as the paper; learning rates and batch are scaled for the toy worlds (paper: 5e-6 and
    batch 256 on SD1.5 / PixArt-alpha) and --reward-scale is per world: the IKL term is summed over dimensions
    (the true KL), so the scale that balances it depends on the data dimension (paper: 1-10 on PixArt-alpha,
    100-1000 on SD1.5).
  * --ta-warmup optional TA-only updates before alignment (not in the paper, 0 by default): the TA starts equal
    to the reference, so until it has tracked the generator the IKL term reads as zero.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import common


@dataclass
class Config:
    model: str = common.arg("toy2d", "toy world (toy2d, mnist) or a diffusers checkpoint folder / hub id")
    variant: str = common.arg("dipp", "dipp: align the one-step generator; di: Diff-Instruct pre-training from the "
                              "reference network (no reward)", choices=["dipp", "di"])
    steps: int = common.arg(400, "generator updates")
    batch: int = common.arg(256, "samples per update (paper: 256 in alignment)")
    reward_scale: float = common.arg(0.1, "alpha_rew, weight of the explicit reward (paper: 1-10 PixArt, 100-1000 "
                                     "SD1.5; per-world scale, see docstring)")
    cfg_scale: float = common.arg(1.0, "omega, CFG scale of the reference = implicit reward at scale omega-1 "
                                  "(Thm 3.4; paper 1.5-4.5)")
    ta_steps: int = common.arg(2, "K_TA: TA updates per generator update (Alg. 1 alternates one and one; "
                               "DMD2 uses 5)")
    ta_warmup: int = common.arg(0, "TA-only updates on generator samples before alignment starts (not in the paper)")
    weighting: str = common.arg("snr_inv", "w(t): snr_inv = sigma^2/alpha^2 (IKL gradient on x_0 = x0_hat_psi - "
                                "x0_hat_ref), unit = 1", choices=["snr_inv", "unit"])
    time_density: str = common.arg("uniform", "pi(t): uniform on [t_min, t_max] (DMD2 / SiD) or lognormal (paper "
                                   "App. C: ln sigma_VE ~ N(-2, 2^2); use --t-min 0 --t-max 999)",
                                   choices=["uniform", "lognormal"])
    t_min: int = common.arg(20, "pi(t): smallest timestep (0.02 T)")
    t_max: int = common.arg(980, "pi(t): largest timestep (0.98 T)")
    lr: float = common.arg(1e-4, "generator learning rate (paper 5e-6 on full networks; toy LoRA scale)")
    ta_lr: float = common.arg(3e-3, "TA learning rate (paper 5e-6; the TA must track the generator)")
    adam_beta1: float = common.arg(0.0, "Adam beta1 for both optimizers (paper 0)")
    adam_beta2: float = common.arg(0.999, "Adam beta2 for both optimizers (paper 0.999)")
    max_grad_norm: float = common.arg(10.0, "gradient-norm clip of each update (0 = off)")
    lora_rank: int = common.arg(16, "generator LoRA rank")
    ta_lora_rank: int = common.arg(16, "TA LoRA rank (on the reference network)")
    train_full: bool = common.arg(False, "fine-tune every generator weight instead of a LoRA (paper)")
    ta_train_full: bool = common.arg(False, "fine-tune every TA weight (a frozen copy of the reference is then kept)")
    eval_samples: int = common.arg(2000, "samples for the base vs tuned metrics")
    save_every: int = common.arg(100, "checkpoint every N updates")
    seed: int = common.arg(0, "seed of initialisation and of every update's randomness")
    out: str = common.arg("", "run folder (default runs/diff_instruct_pp-<model>-<variant>)")
    resume: bool = common.arg(False, "continue from the run folder's last checkpoint")


# ---------------------------------------------------------------------------------------------------
# Losses and the quantities they need
# ---------------------------------------------------------------------------------------------------
def time_density(sched: common.Schedule, kind: str, t_min: int, t_max: int) -> torch.Tensor:
    """pi(t) as probabilities over t = 0..T-1 [T], zero outside [t_min, t_max]."""
    t = torch.arange(common.T)
    if kind == "uniform":
        # pi(t) = U{t_min, ..., t_max}  (DESIGN section 6: uniform on [0.02 T, 0.98 T], as DMD2 / SiD)
        pi = torch.ones(common.T, dtype=torch.float64)
    elif kind == "lognormal":
        # paper App. C (EDM, (C.5)): ln sigma ~ N(-2, 2^2) for the variance-exploding noise level
        # sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t), each sigma rounded to the nearest discrete t
        log_sigma = (1 / sched.alphas_cumprod.double() - 1).sqrt().log()
        edges = torch.cat([log_sigma[:1] - 50, (log_sigma[1:] + log_sigma[:-1]) / 2, log_sigma[-1:] + 50])
        cdf = torch.distributions.Normal(-2.0, 2.0).cdf(edges)
        pi = cdf[1:] - cdf[:-1]
    else:
        raise ValueError(f"unknown time density {kind!r}; choose 'uniform' or 'lognormal'")
    pi = torch.where((t >= t_min) & (t <= t_max), pi, torch.zeros_like(pi))
    return pi / pi.sum()


def sample_t(n: int, generator: torch.Generator, pi: torch.Tensor) -> torch.Tensor:
    # t ~ pi(t)
    return torch.multinomial(pi, n, replacement=True, generator=generator)


def ikl_weight(sched: common.Schedule, t: torch.Tensor, kind: str, like: torch.Tensor) -> torch.Tensor:
    """w(t) of the IKL (3.3), broadcast against `like`."""
    alpha, sigma = sched.alpha_sigma(t, like)
    if kind == "snr_inv":
        # w(t) = sigma_t^2 / alpha_t^2: then alpha_t w(t) (s_psi - s_ref) = x0_hat_psi - x0_hat_ref
        return sigma**2 / alpha**2
    if kind == "unit":
        return torch.ones_like(alpha)
    raise ValueError(f"unknown weighting {kind!r}; choose 'snr_inv' or 'unit'")


def score_from_eps(eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # s(x_t) = grad log p_t(x_t) = -eps(x_t) / sigma_t
    return -eps / sigma


def generator_pseudo_loss(x_t: torch.Tensor, score_ta: torch.Tensor, score_ref: torch.Tensor, weight: torch.Tensor,
                          reward: torch.Tensor, reward_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (pseudo-loss per sample [B], IKL gradient on x_t per sample [B, ...]).

    x_t = alpha_t g_theta(z, c) + sigma_t eps carries the generator's graph; `reward` = r(g_theta(z, c), c) too.
    score_ta, score_ref (the CFG score when omega != 1) are evaluated at x_t and are constants here. Its theta-
    gradient is (3.4) with s_theta replaced by s_psi."""
    # grad_{x_t} of the IKL term: w(t) sg[s_psi(x_t) - s_ref^cfg(x_t)]
    ikl_grad = (weight * (score_ta - score_ref)).detach()
    # (3.7)-(3.9): L_G = -alpha_rew r(x_0, c) + w(t) < sg[s_psi - s_ref^cfg], x_t >  (inner product over dims)
    loss = -reward_scale * reward + common.reduce_dims(ikl_grad * x_t)
    return loss, ikl_grad


def ta_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    # Alg. 1, TA step: || eps_psi(alpha_t sg(x_0) + sigma_t eps, t, c) - eps ||^2 (the reference's own eps-loss)
    return (eps_pred - eps).pow(2).flatten(1).mean(1).mean()


def generate(generator, kernel: common.Kernel, z: torch.Tensor, cond) -> torch.Tensor:
    # x_0 = g_theta(z, c): the one-step model's clean-sample prediction at its only timestep (t = 999)
    t = generator.timesteps[0]
    x = kernel.init(z, t)
    return kernel.x0(x, generator(kernel.net_input(x, t), t, cond), t)


@torch.no_grad()
def generate_in_chunks(generator, kernel: common.Kernel, z: torch.Tensor, cond, chunk: int) -> torch.Tensor:
    """Evaluation samples, `chunk` at a time (the training batch: what fits in memory)."""
    return torch.cat([generate(generator, kernel, z[i:i + chunk], common.cond_index(cond, slice(i, i + chunk)))
                      for i in range(0, len(z), chunk)])


def nfe_per_update(cfg: Config) -> int:
    """The docstring's NFE count per update (K = --ta-steps): 2K + 2, or 2K + 3 with a CFG reference. log.csv's
    `nfe` column is the counted value; tests and benchmarks/report.py compare the two."""
    return 2 * cfg.ta_steps + 2 + (cfg.cfg_scale != 1.0)


def check_reward_is_differentiable(world, x0: torch.Tensor, cond) -> None:
    """DI++ back-propagates through the reward: fail early and clearly if it cannot."""
    probe = x0.detach().clone().requires_grad_(True)
    r = world.reward(probe, cond)
    if not isinstance(r, torch.Tensor) or r.shape != (len(probe),):
        raise ValueError(f"world.reward must return one value per sample (shape [{len(probe)}]), got "
                         f"{getattr(r, 'shape', type(r))}")
    if r.grad_fn is None:
        raise ValueError("the reward is not differentiable in the sample (its result has no grad_fn): DI++ needs "
                         "grad_x r(x_0, c). Use a differentiable reward model (no torch.no_grad / .detach / "
                         "numpy inside), or run with --reward-scale 0 (Diff-Instruct with the CFG reward only).")


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def train(cfg: Config) -> dict:
    timer = common.Timer()
    if cfg.variant == "di" and cfg.reward_scale != 0:
        print(f"[diff_instruct_pp] variant di is Diff-Instruct: --reward-scale {cfg.reward_scale} is ignored "
              "(set to 0)")
        cfg = dataclasses.replace(cfg, reward_scale=0.0)
    for name in ("steps", "batch", "ta_steps", "eval_samples", "save_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.t_min <= cfg.t_max < common.T:
        raise ValueError(f"need 0 <= --t-min <= --t-max < {common.T}, got t_min={cfg.t_min}, t_max={cfg.t_max}")
    if cfg.reward_scale < 0 or cfg.cfg_scale < 0:
        raise ValueError(f"--reward-scale and --cfg-scale must be >= 0, got {cfg.reward_scale}, {cfg.cfg_scale}")

    common.seed_everything(cfg.seed)
    world = common.load_world(cfg.model)
    acc, sched = world.accelerator, world.schedule
    run = common.RunDir(cfg.out or f"runs/diff_instruct_pp-{cfg.model}-{cfg.variant}", cfg, resume=cfg.resume)

    # generator g_theta: the world's one-step model, or (variant di) the reference network read at t = 999
    if cfg.variant == "di":
        generator = world.denoiser("teacher", lora_rank=cfg.lora_rank, train_full=cfg.train_full,
                                   sampler="x0_renoise", timesteps=[common.T - 1])
    else:
        generator = world.denoiser("generator", lora_rank=cfg.lora_rank, train_full=cfg.train_full)
    if len(generator.timesteps) != 1:
        raise ValueError(f"Diff-Instruct++ trains a one-step generator; this one samples on {generator.timesteps}")
    kernel = common.make_kernel(generator.sampler, sched)
    pi = time_density(sched, cfg.time_density, cfg.t_min, cfg.t_max)
    # TA diffusion eps_psi = a LoRA on the reference; `with ta.frozen():` is the reference eps_ref
    ta = world.denoiser("teacher", lora_rank=cfg.ta_lora_rank, train_full=cfg.ta_train_full)
    # every network call of an update goes through a counter, so log.csv's nfe is measured, not assumed
    g_net, ta_net = common.CountingDenoiser(generator), common.CountingDenoiser(ta)
    adam = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=0.0)
    opt_g = acc.prepare(torch.optim.AdamW(generator.trainable_parameters(), lr=cfg.lr, **adam))
    opt_ta = acc.prepare(torch.optim.AdamW(ta.trainable_parameters(), lr=cfg.ta_lr, **adam))
    optimizers = {"generator": opt_g, "ta": opt_ta}

    # base generator, fixed evaluation seeds (the same noise for base and tuned)
    dev = acc.device
    eval_cond = common.cond_to(world.eval_conditions(cfg.eval_samples), dev)
    eval_z = torch.randn(cfg.eval_samples, *world.shape,
                         generator=torch.Generator().manual_seed(2**31 - 1 - cfg.seed)).to(dev)
    with generator.frozen():
        x0_base = generate_in_chunks(generator, kernel, eval_z, eval_cond, cfg.batch)
    if cfg.reward_scale > 0:
        check_reward_is_differentiable(world, x0_base[:8], common.cond_index(eval_cond, slice(0, 8)))

    start = 0
    if cfg.resume:
        start, tensors, _ = run.load_checkpoint(optimizers)
        if tensors is None:
            print(f"[diff_instruct_pp] --resume: no checkpoint in {run.ckpt}; starting from scratch")
        else:
            generator.load_adapter_state({k[10:]: v for k, v in tensors.items() if k.startswith("generator.")})
            ta.load_adapter_state({k[3:]: v for k, v in tensors.items() if k.startswith("ta.")})
            print(f"[diff_instruct_pp] resumed from update {start} ({run.ckpt})")
        run.truncate_log(start)

    def ta_update(x0: torch.Tensor, cond, gen: torch.Generator, step: int) -> float:
        # one TA step on a detached generator sample: t ~ pi, x_t = alpha_t sg(x_0) + sigma_t eps
        t = sample_t(len(x0), gen, pi).to(dev)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        with acc.autocast():
            loss = ta_loss(ta_net(common.add_noise(sched, x0.detach(), eps, t), t, cond), eps)
        common.check_finite(loss, step, run)
        opt_ta.zero_grad(set_to_none=True)
        acc.backward(loss)
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(ta.trainable_parameters(), cfg.max_grad_norm)
        opt_ta.step()
        return loss.item()

    def draw(gen: torch.Generator, grad: bool):
        cond = common.cond_to(world.conditions(cfg.batch, gen), dev)
        z = torch.randn(cfg.batch, *world.shape, generator=gen).to(dev)
        with torch.set_grad_enabled(grad), acc.autocast():
            return generate(g_net, kernel, z, cond), cond

    # optional TA warm-up (step index < 0 keeps its random streams apart from the updates')
    if start == 0:
        for step in range(-cfg.ta_warmup, 0):
            gen = common.step_generator(cfg.seed, step, acc.process_index)
            ta_update(*draw(gen, grad=False), gen, step)

    for step in range(start + 1, cfg.steps + 1):
        t0 = common.Timer()
        gen = common.step_generator(cfg.seed, step, acc.process_index)
        g_net.rows = ta_net.rows = 0

        # ---- generator step: (3.7)-(3.9) --------------------------------------------------------------
        x0, cond = draw(gen, grad=True)  # 1 NFE, carries the generator graph
        t = sample_t(cfg.batch, gen, pi).to(dev)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        # x_t = alpha_t g_theta(z, c) + sigma_t eps
        x_t = common.add_noise(sched, x0, eps, t)
        _, sigma = sched.alpha_sigma(t, x_t)
        with torch.no_grad(), acc.autocast():
            eps_ta = ta_net(x_t.detach(), t, cond)  # 1 NFE
            with ta_net.frozen():
                if cfg.cfg_scale != 1.0:  # conditional and null in one batch: 2 NFEs
                    both = ta_net(torch.cat([x_t.detach()] * 2), torch.cat([t, t]),
                                  common.cond_cat([cond, common.cond_to(world.null_condition(cfg.batch), dev)]))
                    eps_c, eps_null = both.chunk(2)
                    # eps_cfg = eps_ref(null) + omega (eps_ref(c) - eps_ref(null))   (3.5, Thm 3.4)
                    eps_ref = common.eps_cfg(eps_c, eps_null, cfg.cfg_scale)
                else:
                    eps_ref = ta_net(x_t.detach(), t, cond)  # 1 NFE
        with acc.autocast():
            reward = world.reward(x0, cond) if cfg.reward_scale > 0 else torch.zeros(cfg.batch, device=dev)
            loss, ikl_grad = generator_pseudo_loss(
                x_t, score_from_eps(eps_ta.float(), sigma), score_from_eps(eps_ref.float(), sigma),
                ikl_weight(sched, t, cfg.weighting, x_t), reward, cfg.reward_scale)
            loss = loss.mean()
        common.check_finite(loss, step, run)
        opt_g.zero_grad(set_to_none=True)
        acc.backward(loss)
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(generator.trainable_parameters(), cfg.max_grad_norm)
        opt_g.step()

        # ---- TA steps: fit eps_psi to the generator's current samples ----------------------------------
        ta_losses = [ta_update(x0, cond, gen, step)]  # reuses this update's sample (detached)
        for _ in range(cfg.ta_steps - 1):
            ta_losses.append(ta_update(*draw(gen, grad=False), gen, step))  # fresh samples, 1 NFE each

        # the IKL pull on x_0: alpha_t w(t) (s_psi - s_ref), per-sample norm (x0_hat_psi - x0_hat_ref for snr_inv)
        alpha, _ = sched.alpha_sigma(t, x_t)
        pull = (alpha * ikl_grad).flatten(1).norm(dim=1).mean().item()
        nfe = (g_net.rows + ta_net.rows) / cfg.batch  # measured; nfe_per_update(cfg) states the minimum
        row = dict(step=step, loss=loss.item(), reward=reward.detach().float().mean().item(), nfe=nfe,
                   seconds=t0(), ta_loss=sum(ta_losses) / len(ta_losses), ikl_pull=pull)
        if acc.is_main_process:
            run.log(row)
            if step % cfg.save_every == 0 or step == cfg.steps:
                tensors = {**{f"generator.{k}": v for k, v in generator.adapter_state().items()},
                           **{f"ta.{k}": v for k, v in ta.adapter_state().items()}}
                run.save_checkpoint(step, tensors, optimizers, {"nfe_per_update": nfe_per_update(cfg)})
        if step % max(1, cfg.steps // 10) == 0:
            print(f"update {step:5d}  loss {row['loss']:+.4f}  reward {row['reward']:+.4f}  "
                  f"ta_loss {row['ta_loss']:.4f}  ikl_pull {pull:.4f}  {row['seconds'] * 1e3:.0f} ms")

    # ---- evaluation: base vs tuned from the same seeds ------------------------------------------------
    x0_tuned = generate_in_chunks(generator, kernel, eval_z, eval_cond, cfg.batch)
    base, tuned = world.metrics(x0_base, eval_cond), world.metrics(x0_tuned, eval_cond)
    metrics = {f"{k}_base": v for k, v in base.items()} | {f"{k}_tuned": v for k, v in tuned.items()}
    metrics |= dict(seconds=timer(), updates=cfg.steps, nfe_per_update=nfe_per_update(cfg),
                    reward_scale=cfg.reward_scale, cfg_scale=cfg.cfg_scale, variant=cfg.variant)
    if acc.is_main_process:
        run.metrics(metrics)
        base_name, name = ("base generator", "DI++") if cfg.variant == "dipp" else ("reference at t=999", "DI")
        world.plot_samples({base_name: (x0_base, eval_cond),
                            f"{name} (alpha_rew={cfg.reward_scale:g}, omega={cfg.cfg_scale:g})": (x0_tuned, eval_cond)},
                           run.path / "samples.png")
        plot_curves(run.read_log(), run.path / "curves.png")
        world.save_adapter(generator, run.path / "adapter")
        print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        print(f"wrote {run.path}")
    return metrics


def plot_curves(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward", "reward of the generator batch"), ("ikl_pull", "IKL pull |alpha w (s_psi - s_ref)|"),
            ("ta_loss", "TA eps-loss"), ("loss", "pseudo-loss (only its gradient matters)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3))
    steps = [int(r["step"]) for r in rows]
    for ax, (key, title) in zip(axes, keys):
        ax.plot(steps, [float(r[key]) for r in rows], lw=0.8)
        ax.set(title=title, xlabel="update")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    return train(common.parse_config(Config, argv, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    main()
