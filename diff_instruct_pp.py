"""Diff-Instruct++ (DI++): align a one-step generator with a reward, regularised by the Integral KL divergence
to a frozen reference diffusion model.

Paper: Luo, "Diff-Instruct++: Training One-step Text-to-image Generator Model to Align with Human Preferences",
arXiv 2410.18881 (equations restored in docs/design.md section 6). There is no public DI++ code; the author's public
Diff-Instruct code (github.com/pkulwj1994/diff_instruct: training/di_loss.py, training/di_training_loop.py) is
the official reference for the parts the two methods share (the IKL weighting, the EMA, sigma_init).

Objects. Generator x_0 = g_theta(z, c), z ~ N(0, I): the world's one-step model, x_0 = x0_hat(z, t=999).
Reference eps_ref(x_t, t, c) with a null condition for classifier-free guidance (CFG): the world's "teacher".
TA ("teaching assistant") eps_psi: a LoRA on the reference network, so `with ta.frozen():` *is* the reference
(no second copy), trained on generator samples to follow the generator's diffused score. Scores: s = -eps/sigma_t.

Equation -> code:
  (3.3)        objective  L(theta) = E_c[ -alpha_rew E r(g_theta(z,c), c) + int w(t) KL(p_theta,t || p_ref,t) dt ],
               the time integral taken against pi(t) (not computed here; tests/test_diff_instruct_pp.py evaluates it
               in closed form in a Gaussian world)
  (3.4)        its gradient  E[ -alpha_rew grad_x r . dx_0/dtheta + w(t) (s_theta,t - s_ref,t)(x_t) . dx_t/dtheta ],
               s_theta,t estimated by the TA's score s_psi                                   -> generator_pseudo_loss
  (3.5), Thm 3.4  CFG = an implicit reward: eps_cfg = eps_ref(null) + omega (eps_ref(c) - eps_ref(null)); using it
               as the reference is DI++ with r_cfg at scale omega - 1                     -> reference_eps, common.eps_cfg
  (3.7)-(3.9)  pseudo-loss  L_G = -alpha_rew r(x_0, c) + w(t) < sg[s_psi(x_t) - s_ref^cfg(x_t)], x_t >
                                                                               -> generator_step, generator_pseudo_loss
  Alg. 1 step 1  TA update: the reference's own eps-loss for eps_psi on sg(x_0) (DSM, (2.2))      -> ta_step, ta_loss
  pi(t)        "lognormal": App. C / (C.5), ln sigma_VE ~ N(-2, 2^2) with sigma_VE(t) = sqrt((1 - alpha_bar_t) /
               alpha_bar_t), truncated to [sigma_VE(t_min), sigma_VE(t_max)] (a draw outside is redrawn) and rounded
               to the nearest t; "uniform" (default) on [t_min, t_max]                      -> time_density, sample_t
  w(t)         "snr_inv" (default): w = sigma_t^2 / alpha_t^2, i.e. weight 1 on the difference of the two models'
               clean-sample predictions, alpha_t w (s_psi - s_ref) = x0_hat_psi - x0_hat_ref: the author's
               Diff-Instruct code (di_loss.py, DI_EDMLoss.gloss: `weight = 1.0` times (D_TA - D_ref) . x_0).
               "unit": w = 1 on the score difference (not the author's; kept as an alternative)     -> ikl_weight
  EMA          --ema: theta_ema <- decay theta_ema + (1 - decay) theta after every generator update, starting from
               the initial generator (di_training_loop.py: Gema is a copy of G, lerp with ema_mu); the author's code
               evaluates and saves Gema                                                         -> GeneratorEMA

Variants (--variant):
  dipp  DI++ alignment of the world's one-step generator with --reward-scale (alpha_rew) and --cfg-scale (omega).
        alpha_rew = 0, omega = 1 is plain Diff-Instruct; alpha_rew = 0, omega > 1 is Diff-Instruct with a CFG
        teacher, i.e. DI++ with only the implicit CFG reward (Thm 3.4).
  di    Diff-Instruct pre-training (the paper's stage 1): the generator is the *reference* network read at
        sigma_init (--init-sigma, default 2.5 as Diff-Instruct / SiD / DI++: the t whose sigma_VE is nearest),
        g(z) = x0_hat_ref(sigma_VE z at that t) as the author's code does (z scaled by init_sigma); a CFG-4.5
        teacher by default (--cfg-scale not given); no explicit reward (--reward-scale is set to 0).

NFEs (network evaluations) per update, with K = --ta-steps and batch B (every one on B samples, per micro-batch):
  generator step: 1 generator (with grad) + 1 TA + 1 reference (2 with omega != 1: conditional and null) = 3 | 4
  TA steps:       K TA (with grad); the first reuses the generator step's sample x_0 (detached), each further
                  one draws fresh samples, 1 generator call (no grad) each:                           K + (K - 1)
  total 2K + 2 (omega = 1) or 2K + 3 (omega != 1); the default K = 2 with omega = 1 gives 6. This is the
  minimum: no sample or reference prediction is computed twice. The reward model is not counted. log.csv's `nfe`
  is counted by common.CountingDenoiser around the generator and the TA; nfe_per_update states the minimum.

Gradient accumulation (--gradient-accumulation-steps G): one update = one generator optimizer step on G micro-
batches of --batch (accelerate's accumulation), then K TA optimizer steps, each also accumulated over G micro-
batches (the first on the G generator samples of this update, detached), so every optimizer step of either model
sees the global batch B x G, and G micro-batches equal one batch of B x G (up to the per-micro-batch noise streams
step_generator(seed, step, rank, micro)). With G = 1 the random streams are those of an update without accumulation.

Differences from the paper and the author's code (and why):
  * Order inside an update: generator step, then TA steps on the generator's (detached) sample, as DMD2's code
    does; the paper's Alg. 1 and the author's DI loop fit the TA first on fresh samples. Reusing the sample saves
    one generator call per update.
  * K_TA = --ta-steps = 2 TA updates per generator update by default (the author's DI loop and Alg. 1: 1; DMD2: 5):
    the toy TA must track a generator that moves quickly at toy learning rates.
  * pi(t) defaults to uniform on [20, 980] (DMD2 / SiD), not the paper's log-normal; the paper's pairing is
    --weighting snr_inv --time-density lognormal --t-min 0 --t-max 999 (docs/diff_instruct_pp.md compares them).
    The log-normal is truncated to the schedule's range (its sigma_VE from about 0.03 to about 14.6 on the SDXL
    schedule) because a discrete schedule has no noise level outside it; the author's di_loss.py draws sigma
    without bounds (its EDM networks take any sigma). The paper's EDM parametrisation is rewritten in the DDPM
    eps / alpha_bar parametrisation every model here uses.
  * The TA's own loss is the plain eps-MSE (DDPM weighting) at t ~ pi, not EDM's lambda(sigma) weighting.
  * Gradient-norm clip of 10 on each optimizer step (--max-grad-norm; 0 = off): not in the paper; the author's
    loop only replaces NaN/inf gradient entries (nan_to_num). Here a NaN loss stops the run instead.
  * EMA off by default (--ema; the paper: decay 0.95 in alignment). With --ema the metrics of both the raw and the
    EMA generator are reported (`*_tuned`, `*_ema`) and adapter/ holds the EMA generator, as the author ships it.
  * LoRA adapters on generator and TA by default (the paper fine-tunes every weight: --train-full,
    --ta-train-full); the TA as a LoRA on the reference is what makes the reference free in memory.
  * Adam betas (0, 0.999) as the paper; learning rates and batch are scaled for the toy worlds (paper: 5e-6 and
    batch 256 on SD1.5 / PixArt-alpha) and --reward-scale is per world: the IKL term is summed over dimensions
    (the true KL, as di_training_loop.py sums over pixels), so the scale that balances it depends on the data
    dimension (paper: 1-10 on PixArt-alpha, 100-1000 on SD1.5).
  * --ta-warmup optional TA-only updates before alignment (not in the paper, 0 by default).
  * The reward's differentiability is probed once on ONE sample (forward only) before training, or not at all
    when the world declares `reward_is_differentiable = True` (no graph through an expensive decoder); every
    update checks that the reward it back-propagates carries a graph.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

import common
import harness

METHOD = "diff_instruct_pp"
DI_CFG_SCALE = 4.5  # the paper's CFG teacher for Diff-Instruct pre-training (variant di) when --cfg-scale is not given


@dataclass
class Config(harness.RunConfig):
    model: str = harness.arg("toy2d", "toy world: toy2d | flow2d | mnist (options after a colon, e.g. "
                             "toy2d:reward=height), or a model spec / diffusers checkpoint for the full backend")
    variant: str = harness.arg("dipp", "dipp: align the one-step generator; di: Diff-Instruct pre-training from the "
                              "reference network (no reward)", choices=["dipp", "di"])
    steps: int = harness.arg(400, "generator updates")
    batch: int = harness.arg(256, "samples per micro-batch (paper: 256 in alignment)")
    reward_scale: float = harness.arg(0.1, "alpha_rew, weight of the explicit reward (paper: 1-10 PixArt, 100-1000 "
                                     "SD1.5; per-world scale, see docstring)")
    cfg_scale: float = harness.arg(1.0, "omega, CFG scale of the reference = implicit reward at scale omega-1 "
                                  f"(Thm 3.4; paper 1.5-4.5); variant di: {DI_CFG_SCALE} when not given")
    ta_steps: int = harness.arg(2, "K_TA: TA updates per generator update (Alg. 1 and the author's DI loop: 1; "
                               "DMD2: 5)")
    ta_warmup: int = harness.arg(0, "TA-only updates on generator samples before alignment starts (not in the paper)")
    weighting: str = harness.arg("snr_inv", "w(t): snr_inv = sigma^2/alpha^2, weight 1 on x0_hat_psi - x0_hat_ref "
                                "(the author's Diff-Instruct code); unit = 1 on the score difference",
                                choices=["snr_inv", "unit"])
    time_density: str = harness.arg("uniform", "pi(t): uniform on [t_min, t_max] (DMD2 / SiD) or lognormal (paper "
                                   "App. C: ln sigma_VE ~ N(-2, 2^2) truncated to [t_min, t_max]; the paper's "
                                   "pairing: --weighting snr_inv --time-density lognormal --t-min 0 --t-max 999)",
                                   choices=["uniform", "lognormal"])
    t_min: int = harness.arg(20, "pi(t): smallest timestep (0.02 T)")
    t_max: int = harness.arg(980, "pi(t): largest timestep (0.98 T)")
    init_sigma: float = harness.arg(2.5, "variant di: the generator reads the reference at the t whose sigma_VE is "
                                   "nearest to this (Diff-Instruct / SiD / DI++: 2.5)")
    ema: bool = harness.arg(False, "keep an EMA of the generator and evaluate it too (paper: decay 0.95)")
    ema_decay: float = harness.arg(0.95, "EMA decay per generator update (paper: 0.95)")
    lr: float = harness.arg(1e-4, "generator learning rate (paper 5e-6 on full networks; toy LoRA scale)")
    ta_lr: float = harness.arg(3e-3, "TA learning rate (paper 5e-6; the TA must track the generator)")
    adam_beta1: float = harness.arg(0.0, "Adam beta1 for both optimizers (paper 0)")
    adam_beta2: float = harness.arg(0.999, "Adam beta2 for both optimizers (paper 0.999)")
    max_grad_norm: float = harness.arg(10.0, "gradient-norm clip of each optimizer step (0 = off; not in the paper)")
    lora_rank: int = harness.arg(16, "generator LoRA rank")
    ta_lora_rank: int = harness.arg(16, "TA LoRA rank (on the reference network)")
    train_full: bool = harness.arg(False, "fine-tune every generator weight instead of a LoRA (paper)")
    ta_train_full: bool = harness.arg(False, "fine-tune every TA weight (a frozen copy of the reference is then kept)")
    eval_samples: int = harness.arg(2000, "samples for the base vs tuned metrics")


def resolve_variant(cfg: Config) -> Config:
    """Variant di is Diff-Instruct: no explicit reward, and the paper's CFG-4.5 teacher unless --cfg-scale is given."""
    if cfg.variant != "di":
        return cfg
    given, changes = harness.explicit_fields(cfg), {}
    if cfg.reward_scale != 0:
        print(f"[{METHOD}] variant di is Diff-Instruct: --reward-scale {cfg.reward_scale} is ignored (set to 0)")
        changes["reward_scale"] = 0.0
    if "cfg_scale" not in given:
        changes["cfg_scale"] = DI_CFG_SCALE
    new = dataclasses.replace(cfg, **changes)
    new._explicit_fields = given
    return new


def validate(cfg: Config) -> None:
    """Every option's range, naming the flag (before anything is loaded or written)."""
    harness.check_choice(cfg, "variant", ["dipp", "di"])
    harness.check_choice(cfg, "weighting", ["snr_inv", "unit"])
    harness.check_choice(cfg, "time_density", ["uniform", "lognormal"])
    for name in ("steps", "batch", "ta_steps", "eval_samples", "lora_rank", "ta_lora_rank"):
        harness.check_range(cfg, name, 1)
    harness.check_range(cfg, "ta_warmup", 0)
    harness.check_range(cfg, "t_min", 0, common.T - 1)
    harness.check_range(cfg, "t_max", cfg.t_min, common.T - 1)
    for name in ("reward_scale", "cfg_scale", "max_grad_norm"):
        harness.check_range(cfg, name, 0)
    for name in ("lr", "ta_lr"):
        harness.check_range(cfg, name, 0, 1, lo_open=True)
    for name in ("adam_beta1", "adam_beta2", "ema_decay"):
        harness.check_range(cfg, name, 0, 1, hi_open=True)
    harness.check_range(cfg, "init_sigma", 0, lo_open=True)


# ---------------------------------------------------------------------------------------------------
# Losses and the quantities they need
# ---------------------------------------------------------------------------------------------------
def log_sigma_ve(sched: common.Schedule) -> torch.Tensor:
    # ln sigma_VE(t) = ln(sigma_t / alpha_t): the EDM noise level of each discrete t (DDPM: sqrt((1 - a) / a))
    return sched.log_sigma_ve()


def time_density(sched: common.Schedule, kind: str, t_min: int, t_max: int) -> torch.Tensor:
    """pi(t) as probabilities over t = 0..T-1 [T], zero outside [t_min, t_max]."""
    t = torch.arange(common.T)
    inside = (t >= t_min) & (t <= t_max)
    if kind == "uniform":
        # pi(t) = U{t_min, ..., t_max}  (docs/design.md section 6: uniform on [0.02 T, 0.98 T], as DMD2 / SiD)
        pi = inside.double()
    elif kind == "lognormal":
        # paper App. C (EDM, (C.5)): ln sigma ~ N(-2, 2^2), truncated to [sigma(t_min), sigma(t_max)] (rejection:
        # a draw outside is redrawn, so the density is renormalised, not piled onto the end bins), each sigma
        # rounded to the nearest discrete t in log sigma
        ls = log_sigma_ve(sched)[t_min:t_max + 1]
        edges = torch.cat([ls[:1], (ls[1:] + ls[:-1]) / 2, ls[-1:]])
        cdf = torch.distributions.Normal(-2.0, 2.0).cdf(edges)
        pi = torch.zeros(common.T, dtype=torch.float64)
        pi[t_min:t_max + 1] = cdf[1:] - cdf[:-1]
    else:
        raise ValueError(f"unknown time density {kind!r}; choose 'uniform' or 'lognormal'")
    return pi / pi.sum()


def sample_t(n: int, generator: torch.Generator, pi: torch.Tensor) -> torch.Tensor:
    # t ~ pi(t)
    return torch.multinomial(pi, n, replacement=True, generator=generator)


def init_timestep(sched: common.Schedule, sigma: float) -> int:
    """The discrete t whose sigma_VE(t) is nearest to sigma (variant di's sigma_init)."""
    return int((log_sigma_ve(sched).exp() - sigma).abs().argmin())


def ikl_weight(sched: common.Schedule, t: torch.Tensor, kind: str, like: torch.Tensor) -> torch.Tensor:
    """w(t) of the IKL (3.3), broadcast against `like`."""
    alpha, sigma = sched.alpha_sigma(t, like)
    if kind == "snr_inv":
        # w(t) = sigma_t^2 / alpha_t^2: then alpha_t w(t) (s_psi - s_ref) = x0_hat_psi - x0_hat_ref, weight 1 on
        # the clean-sample prediction difference as the author's Diff-Instruct code (di_loss.py, gloss)
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
    # x_0 = g_theta(z, c): the one-step model's clean-sample prediction at its only timestep (dipp: t = 999 from
    # x_t = z; di: the reference at sigma_init from the Euler-ancestral state sigma_init z, i.e. x_t = sigma_t z)
    t = generator.timesteps[0]
    x = kernel.init(z, t)
    return kernel.x0(x, generator(kernel.net_input(x, t), t, cond), t)


@torch.no_grad()
def generate_in_chunks(generator, kernel: common.Kernel, z: torch.Tensor, cond, chunk: int) -> torch.Tensor:
    """Evaluation samples, `chunk` (world.decode_batch) rows per network call."""
    return torch.cat([generate(generator, kernel, z[i:i + chunk], common.cond_index(cond, slice(i, i + chunk)))
                      for i in range(0, len(z), chunk)])


def nfe_per_update(cfg: Config) -> int:
    """The docstring's NFE count per update and micro-batch (K = --ta-steps): 2K + 2, or 2K + 3 with a CFG
    reference. log.csv's `nfe` column is the counted value; tests and benchmarks/report.py compare the two."""
    return 2 * cfg.ta_steps + 2 + (cfg.cfg_scale != 1.0)


NOT_DIFFERENTIABLE = ("the reward is not differentiable in the sample (its result has no grad_fn): DI++ needs "
                      "grad_x r(x_0, c). Use a differentiable reward model (no torch.no_grad / .detach / numpy "
                      "inside), or run with --reward-scale 0 (Diff-Instruct with the CFG reward only).")


def check_reward_is_differentiable(world, x0: torch.Tensor, cond) -> None:
    """DI++ back-propagates through the reward: fail early and clearly if it cannot. A forward pass on ONE sample
    (no backward); skipped when the world declares `reward_is_differentiable = True` (then nothing is decoded)."""
    if getattr(world, "reward_is_differentiable", False) is True:
        return
    probe = x0[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        r = world.reward(probe, common.cond_index(cond, slice(0, 1)))
    if not isinstance(r, torch.Tensor) or r.shape != (1,):
        raise ValueError(f"world.reward must return one value per sample (shape [1] for one sample), got "
                         f"{getattr(r, 'shape', type(r))}")
    if r.grad_fn is None:
        raise ValueError(NOT_DIFFERENTIABLE)


class GeneratorEMA:
    """theta_ema <- decay theta_ema + (1 - decay) theta after every generator update, from theta_ema = the initial
    generator, as the author's loop does (di_training_loop.py: Gema = deepcopy(G); p_ema = p.lerp(p_ema, ema_mu)).
    By hand because diffusers' EMAModel warms its decay up ((1 + n) / (10 + n)) and starts from the weights after
    the first update. Only the trained tensors are averaged (a LoRA: no copy of the frozen network). It is one of
    the run's models for the checkpoint (adapter_state / load_adapter_state)."""

    module = None  # nothing to accumulate gradients over

    def __init__(self, denoiser, decay: float):
        self.params, self.decay = list(denoiser.trainable_parameters()), decay
        names = {id(p): n for n, p in denoiser.module.named_parameters()}
        self.names = [names.get(id(p), f"param{i}") for i, p in enumerate(self.params)]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """The generator with the EMA weights (for evaluation); its own weights are put back afterwards."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {n: s.detach().clone() for n, s in zip(self.names, self.shadow)}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(state[n])


def make_generator(world, cfg: Config):
    """g_theta: the world's one-step model (dipp), or (di) the reference network read at sigma_init."""
    if cfg.variant == "di":
        if world.schedule.prediction != "epsilon":
            raise ValueError(f"--variant di reads the reference from the Euler-ancestral state sigma_init z, a DDPM "
                             f"construction; {world.name} is a {world.schedule.name} world: use --variant dipp")
        t_init = init_timestep(world.schedule, cfg.init_sigma)
        # Euler-ancestral state sigma_VE z at t_init: the network sees x_t = sigma_t z, as the author's G(init_sigma z)
        generator = world.denoiser("teacher", lora_rank=cfg.lora_rank, train_full=cfg.train_full,
                                   sampler="euler_ancestral", timesteps=[t_init])
    else:
        generator = world.denoiser("generator", lora_rank=cfg.lora_rank, train_full=cfg.train_full)
    if len(generator.timesteps) != 1:
        raise ValueError(f"Diff-Instruct++ trains a one-step generator; this one samples on {generator.timesteps}")
    return generator


# ---------------------------------------------------------------------------------------------------
# One update's pieces, under their equations
# ---------------------------------------------------------------------------------------------------
def reference_eps(ta_net, x_t: torch.Tensor, t: torch.Tensor, cond, null_cond, cfg_scale: float) -> torch.Tensor:
    """eps_ref at x_t from the TA with its adapter disabled; with omega != 1 the CFG prediction (3.5), conditional
    and null in one batch (2 NFEs)."""
    with ta_net.frozen():
        if cfg_scale == 1.0:
            return ta_net(x_t, t, cond)
        eps_c, eps_null = ta_net(torch.cat([x_t, x_t]), torch.cat([t, t]), common.cond_cat([cond, null_cond])).chunk(2)
        # eps_cfg = eps_ref(null) + omega (eps_ref(c) - eps_ref(null))   (3.5, Thm 3.4)
        return common.eps_cfg(eps_c, eps_null, cfg_scale)


def generator_step(x0: torch.Tensor, cond, gen: torch.Generator, ta_net, world, cfg: Config, pi: torch.Tensor):
    """(3.7)-(3.9) on one micro-batch: x0 = g_theta(z, c) carries the graph. -> (loss, reward, ikl_grad, t)."""
    sched, dev = world.schedule, x0.device
    t = sample_t(len(x0), gen, pi).to(dev)
    eps = torch.randn(x0.shape, generator=gen).to(dev)
    # x_t = alpha_t g_theta(z, c) + sigma_t eps
    x_t = common.add_noise(sched, x0, eps, t)
    _, sigma = sched.alpha_sigma(t, x_t)
    acc = world.accelerator
    with torch.no_grad(), acc.autocast():
        eps_ta = ta_net(x_t.detach(), t, cond)  # 1 NFE
        null = common.cond_to(world.null_condition(len(x0)), dev) if cfg.cfg_scale != 1.0 else None
        eps_ref = reference_eps(ta_net, x_t.detach(), t, cond, null, cfg.cfg_scale)  # 1 or 2 NFEs
    with acc.autocast():
        if cfg.reward_scale > 0:
            reward = world.reward(x0, cond)
            if not reward.requires_grad:
                raise ValueError(NOT_DIFFERENTIABLE)
        else:
            reward = torch.zeros(len(x0), device=dev)
        # the networks' predictions as eps (a flow world predicts the velocity: eps_hat = x_t + (1 - sigma) v)
        eps_ta, eps_ref = (sched.eps_from_pred(x_t.detach(), e.float(), t) for e in (eps_ta, eps_ref))
        loss, ikl_grad = generator_pseudo_loss(
            x_t, score_from_eps(eps_ta, sigma), score_from_eps(eps_ref, sigma),
            ikl_weight(sched, t, cfg.weighting, x_t), reward, cfg.reward_scale)
    return loss.mean(), reward.detach(), ikl_grad, t


def ta_step_loss(ta_net, x0: torch.Tensor, cond, gen: torch.Generator, sched, pi: torch.Tensor, acc) -> torch.Tensor:
    """Alg. 1 TA step on one micro-batch: t ~ pi, x_t = alpha_t sg(x_0) + sigma_t eps, eps-MSE of eps_psi."""
    t = sample_t(len(x0), gen, pi).to(x0.device)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    with acc.autocast():
        # the regression target is eps (flow world: the velocity eps - x_0): sched.pred_target
        return ta_loss(ta_net(common.add_noise(sched, x0.detach(), eps, t), t, cond), sched.pred_target(x0.detach(), eps, t))


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
CURVES = [("reward", "reward of the generator batch"), ("ikl_pull", "IKL pull |alpha w (s_psi - s_ref)|"),
          ("ta_loss", "TA eps-loss"), ("loss", "pseudo-loss (only its gradient matters)")]


def train(cfg: Config, world=None) -> dict:
    timer = harness.Timer()
    cfg = resolve_variant(cfg)
    validate(cfg)
    run = harness.Run(METHOD, cfg)  # folder + resume rule; writes nothing
    common.seed_everything(cfg.seed)
    world = world or harness.load_world(cfg.model)
    cfg = run.configure(world)
    validate(cfg)
    acc, sched, dev, G = world.accelerator, world.schedule, world.accelerator.device, cfg.gradient_accumulation_steps

    generator = make_generator(world, cfg)
    kernel = common.make_kernel(generator.sampler, sched)
    pi = time_density(sched, cfg.time_density, cfg.t_min, cfg.t_max)
    # TA diffusion eps_psi = a LoRA on the reference; `with ta.frozen():` is the reference eps_ref
    ta = world.denoiser("teacher", lora_rank=cfg.ta_lora_rank, train_full=cfg.ta_train_full)
    # every network call of an update goes through a counter, so log.csv's nfe is measured, not assumed
    g_net, ta_net = common.CountingDenoiser(generator), common.CountingDenoiser(ta)
    adam = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=0.0)
    opt_g = acc.prepare(torch.optim.AdamW(generator.trainable_parameters(), lr=cfg.lr, **adam))
    opt_ta = acc.prepare(torch.optim.AdamW(ta.trainable_parameters(), lr=cfg.ta_lr, **adam))
    ema = GeneratorEMA(generator, cfg.ema_decay) if cfg.ema else None

    # base generator, fixed evaluation seeds (the same noise for base and tuned), decode_batch rows per call
    eval_cond = common.cond_to(world.eval_conditions(cfg.eval_samples), dev)
    eval_z = torch.randn(cfg.eval_samples, *world.shape,
                         generator=torch.Generator().manual_seed(2**31 - 1 - cfg.seed)).to(dev)
    with generator.frozen():
        x0_base = generate_in_chunks(generator, kernel, eval_z, eval_cond, world.decode_batch)
    if cfg.reward_scale > 0:
        check_reward_is_differentiable(world, x0_base, eval_cond)

    models = {"generator": generator, "ta": ta, **({"generator_ema": ema} if ema else {})}
    start = run.start(world, models, {"generator": opt_g, "ta": opt_ta})

    def draw(gen: torch.Generator, grad: bool):
        cond = common.cond_to(world.conditions(cfg.batch, gen), dev)
        z = torch.randn(cfg.batch, *world.shape, generator=gen).to(dev)
        with torch.set_grad_enabled(grad), acc.autocast():
            return generate(g_net, kernel, z, cond), cond

    def ta_update(gens, step: int, samples=None) -> float:
        """One TA optimizer step accumulated over the micro-batches: on `samples` (this update's generator samples,
        detached) or on fresh ones (1 generator NFE each)."""
        losses = []
        for m, gen in enumerate(gens):
            x0, cond = samples[m] if samples is not None else draw(gen, grad=False)
            with run.accumulate():
                loss = ta_step_loss(ta_net, x0, cond, gen, sched, pi, acc)
                run.check_finite(loss, step)
                run.optimizer_step(loss, opt_ta, ta.trainable_parameters(), cfg.max_grad_norm)
            losses.append(loss.item())
        return sum(losses) / len(losses)

    # optional TA warm-up (step index < 0 keeps its random streams apart from the updates')
    if start == 0:
        for step in range(-cfg.ta_warmup, 0):
            ta_update([common.step_generator(cfg.seed, step, acc.process_index, micro=m) for m in range(G)], step)

    for step in run.updates():
        t0 = harness.Timer()
        gens = [common.step_generator(cfg.seed, step, acc.process_index, micro=m) for m in range(G)]
        g_net.rows = ta_net.rows = 0

        # ---- generator step: (3.7)-(3.9), accumulated over the micro-batches -----------------------------
        samples, losses, rewards, pulls = [], [], [], []
        for gen in gens:
            with run.accumulate():
                x0, cond = draw(gen, grad=True)  # 1 NFE, carries the generator graph
                loss, reward, ikl_grad, t = generator_step(x0, cond, gen, ta_net, world, cfg, pi)
                run.check_finite(loss, step)
                run.optimizer_step(loss, opt_g, generator.trainable_parameters(), cfg.max_grad_norm)
            samples.append((x0.detach(), cond))
            # the IKL pull on x_0: alpha_t w(t) (s_psi - s_ref) per sample (x0_hat_psi - x0_hat_ref for snr_inv)
            alpha, _ = sched.alpha_sigma(t, ikl_grad)
            pulls.append((alpha * ikl_grad).flatten(1).norm(dim=1).mean().item())
            losses.append(loss.item())
            rewards.append(reward.float().mean().item())
        if ema is not None:
            ema.update()

        # ---- TA steps: fit eps_psi to the generator's current samples ----------------------------------
        ta_losses = [ta_update(gens, step, samples)]  # reuses this update's samples (detached)
        ta_losses += [ta_update(gens, step) for _ in range(cfg.ta_steps - 1)]  # fresh samples

        nfe = (g_net.rows + ta_net.rows) / (cfg.batch * G)  # measured; nfe_per_update(cfg) states the minimum
        run.log(dict(step=step, loss=sum(losses) / G, reward=sum(rewards) / G, nfe=nfe, seconds=t0(),
                     ta_loss=sum(ta_losses) / len(ta_losses), ikl_pull=sum(pulls) / G))

    # ---- evaluation: base vs tuned (and EMA) from the same seeds -----------------------------------------
    x0_tuned = generate_in_chunks(generator, kernel, eval_z, eval_cond, world.decode_batch)
    evaluated = {"base": x0_base, "tuned": x0_tuned}
    if ema is not None:
        with ema.applied():
            evaluated["ema"] = generate_in_chunks(generator, kernel, eval_z, eval_cond, world.decode_batch)
    metrics = {f"{k}_{name}": v for name, x in evaluated.items() for k, v in world.metrics(x, eval_cond).items()}
    seconds = timer()
    metrics |= dict(seconds=seconds, seconds_per_update=seconds / max(1, cfg.steps - start), updates=cfg.steps,
                    nfe_per_update=nfe_per_update(cfg), alpha_rew=cfg.reward_scale, omega=cfg.cfg_scale,
                    variant=cfg.variant, weighting=cfg.weighting, time_density=cfg.time_density,
                    ema_decay=cfg.ema_decay if ema else None, generator_timestep=generator.timesteps[0])
    base_name, name = ("base generator", "DI++") if cfg.variant == "dipp" else (
        f"reference at t={generator.timesteps[0]}", "DI")
    label = f"{name} (alpha_rew={cfg.reward_scale:g}, omega={cfg.cfg_scale:g})"
    panels = {base_name: (x0_base, eval_cond), label: (x0_tuned, eval_cond)}
    if ema is not None:
        panels[f"{label}, EMA {cfg.ema_decay:g}"] = (evaluated["ema"], eval_cond)
    marks = "reward" if cfg.reward_scale > 0 else None  # the figure marks what the explicit reward prefers
    if ema is not None:  # adapter/ holds the EMA generator, the one the author's code evaluates and saves
        with ema.applied():
            return run.finish(metrics, panels, CURVES, generator, marks=marks)
    return run.finish(metrics, panels, CURVES, generator, marks=marks)


def main(argv=None) -> dict:
    return train(harness.parse_config(Config, argv, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    harness.run_cli(main)
