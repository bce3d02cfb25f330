"""Pairwise Sample Optimization (PSO) for few-step (timestep-distilled) diffusion models.

Paper: Miao, Yang, Lin, Wang, Liu, Wang, Qiu, "Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample
Optimization" (2024), `shared/papers/pso_paper.txt`. Official code: ZichenMiao/Pairwise_Sample_Optimization.

PSO fine-tunes a distilled model (SDXL-DMD2 / LCM with the x0-renoise sampler, SDXL-Turbo with Euler ancestral)
by raising the trajectory likelihood of a *target* sample over a *reference* sample of the same condition, both
measured against the frozen pre-trained model (a DPO objective on trajectories, Eq. 1-3). The reference keeps the
model close to its own few-step trajectories, so it does not blur the way plain diffusion-loss fine-tuning does.

Variants (`--variant`):
  pso        Eq. 5 / Alg. 1: target forward-diffused from data (Eq. 11), reference trajectory sampled from the
             current model's own MDP (Eq. 12). Style transfer in the paper (App. B.2).
  offline    Eq. 6 / Alg. 3: both sides forward-diffused from stored images: reward-ranked preference pairs
             (Pick-a-Pic in the paper; `world.preference_pairs`, or a `--pairs` file), or `--offline-pairs target`:
             target data vs. a reference drawn from the frozen model for the same condition.
             With `--one-timestep` it is Diffusion-DPO (one random timestep per pair instead of the sum).
  online     Eq. 7 / Alg. 2: two trajectories of the current model per condition, ranked by the reward.
  customize  App. B.3: Eq. 6 with the target = a few concept images, the reference = images sampled once from the
             frozen model, the eps_pre terms dropped, plus lambda * prior preservation (eps-MSE on the references).
  naive      Fig. 1b baseline: plain eps-MSE fine-tuning of the distilled model on the target data, at t ~ U[0, T)
             as Ho et al. (`--naive-t uniform`, default) or at the training grid's times (`--naive-t grid`).

Equation <-> code:
  Eq. 11 (data side, omega = 1)   eps_log_ratio        -(||eps - eps_theta||^2 - ||eps - eps_pre||^2)
  Eq. 12 (model side)             transition_log_ratio -(||x' - mu_theta||^2 - ||x' - mu_pre||^2) / (2 sigma^2)
  Eq. 1/3 -> 5, 6, 7              pso_loss             -log sigmoid(beta * sum_n (r^target_n - r^reference_n))
  Eq. 2 / Alg. 1 l.5, Alg. 2 l.2  sample_trajectory    the policy's MDP roll-out (kernel from the backend's sampler)
  Eq. 4 / Eq. 14                  common.make_kernel   x0_renoise / euler_ancestral (chosen by the backend, never here)
  Alg. 2 l.3-5                    online_log_ratios    winner = the higher reward
  App. B.3                        customize_log_ratios + prior preservation in train()
  Fig. 1b                         naive_loss

Transitions n = N..2 are trained; the last one (t_1 -> 0) is deterministic and dropped (Sec. 2.1). "N" is the
training grid: the model's own grid by default (N = 4: [999, 749, 499, 249]), or a denser `--train-steps` grid
(e.g. 8 steps, 7 transitions) while evaluation always samples on the model's own grid.

NFEs per update, counted by `CountingDenoiser` in network evaluations per pair (one call on B conditions at one
timestep = 1; a call on 2B rows = 2) and logged as `nfe`; tests check measured == stated. S = training grid length.
  pso        4(S-1) = 12:  roll-out S-1 (policy, graph kept) + frozen on its states S-1
                           + policy and frozen on the forward-diffused target S-1 each
  offline    4(S-1) = 12:  policy + frozen on 2(S-1) forward-diffused states (4 with --one-timestep);
                           --offline-pairs target adds the model's 4 frozen sampling calls (no grad) = 16
  online     4S-2   = 14:  two roll-outs of S steps (2(S-1) policy calls keep their graph, the last step runs
                           without grad) + frozen on the 2(S-1) stored states
  customize  2(S-1) = 6:   policy on 2(S-1) states, no reference model (2 with --one-timestep); plus, once,
                           4 (the model's grid) per reference image, sampled from the frozen model (setup_nfe)
  naive      S      = 4:   policy on S noised copies of the target: t ~ U[0, T), or every grid time (t_1 included)
These are the minimum: nothing is evaluated twice. In particular the policy predictions on the model's own
trajectories are not recomputed: the roll-out runs with grad on detached states, and the same predictions give
mu_theta in Eq. 12 (the usual DDPO-style code samples without grad and calls the policy again: 5(S-1) for pso,
6S-4 for online, with the same peak memory).

Where this differs from the paper / the official code (and why):
  1. Dimension reduction: `--reduce mean` (default) averages squared norms and log-probs over dimensions, as the
     official code does (this is what makes beta = 50 work at 1024^2); `--reduce sum` is the paper's Eq. 5-7.
  2. The data-side term is the paper's eps-MSE surrogate with omega_{t_n} = 1 (Eq. 11, "constant in practice").
     For the x0-renoise kernel it is not the exact transition KL; we keep the paper's form.
  3. Online, official code: the loss is applied per transition (-log sigmoid per step, averaged: `--per-step-loss`),
     the per-step likelihood ratio is clamped to [1 - c, 1 + c] with c = 0.1 (D3PO's trick: `--clamp-ratio 0.1`),
     beta = 50 for online too (paper: 5), sampling and training alternate in epochs over stored pairs with the
     timestep order shuffled (here: one fresh batch of pairs per update, all transitions summed, as Alg. 2 reads).
     Ties in the reward: the official code gives them no gradient; here the first sample wins (continuous rewards
     make ties measure-zero).
  4. Offline: the official repository has no offline trainer; Eq. 6 is implemented as written (sum over the
     N-1 stochastic transitions, same noise eps_n for target and reference: Diffusion-DPO's variance reduction).
     Diffusion-DPO writes the logit with a factor 1/2: its beta equals 2 x ours.
  5. Customize: the official DreamBooth script weights the eps-error by sigma^-2 (an x0-space error), draws one
     grid timestep per pair, and uses a hinge loss relu(1 - beta * logit) when eps_pre is dropped; we follow the
     paper by default (Eq. 6 form, log-sigmoid, sum over steps); `--hinge` and `--one-timestep` give the official
     choices.
  6. Eq. 5 has no official trainer either. The training grid can be denser than the sampling grid
     (`--train-steps 8`): with the model's own 4-step grid the deterministic last step (t_1 = 249 -> x_0) is never
     trained, and on a sharp toy that step snaps samples back to the old modes (DESIGN.md section 7).
  7. Learning rate, steps and batch are scaled for CPU toys (see Config); the paper's values are in the help.

Run `python pso.py --help` for every option; `docs/pso.md` has usage, metrics and results.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import common

VARIANTS = ("pso", "offline", "online", "customize", "naive")
SAMPLERS = ("", "x0_renoise", "euler_ancestral")
PAPER_BETA = {"pso": 50.0, "offline": 50.0, "online": 5.0, "customize": 5.0, "naive": 0.0}


@dataclasses.dataclass
class Config:
    model: str = common.arg("toy2d", "toy world (toy2d | mnist) or a diffusers checkpoint for the full backend")
    variant: str = common.arg("pso", "objective: pso (Eq. 5), offline (Eq. 6), online (Eq. 7), customize (App. B.3), "
                              "naive (Fig. 1b baseline)", choices=list(VARIANTS))
    sampler: str = common.arg("", "MDP of the distilled model, passed to the backend: x0_renoise (DMD2/LCM, Eq. 4) or "
                              "euler_ancestral (SDXL-Turbo, Eq. 14); empty = the backend's default",
                              choices=list(SAMPLERS))
    steps: int = common.arg(300, "updates (paper: 5k offline, 20k online, 3k style transfer, 1k customize)")
    batch: int = common.arg(64, "pairs (conditions) per update (paper: 64; customize 4)")
    lr: float = common.arg(1e-3, "AdamW learning rate (paper: 1e-5 on SDXL; the toys' LoRA needs ~100x more)")
    weight_decay: float = common.arg(1e-6, "AdamW weight decay (official code: 1e-6)")
    beta: float = common.arg(0.0, "DPO regularisation beta; 0 = the paper's value: 50 (pso, offline), 5 (online, "
                             "customize)")
    reduce: str = common.arg("mean", "reduce squared norms / log-probs over dimensions: mean (official code, what "
                             "beta = 50 is tuned for) or sum (the paper's equations)", choices=["mean", "sum"])
    train_steps: int = common.arg(0, "length S of the training grid (trailing spacing); 0 = the model's own grid "
                                  "(N = 4 in the paper). E.g. 8 trains 7 transitions incl. t = 249, evaluation stays "
                                  "on the model's grid")
    lora_rank: int = common.arg(16, "LoRA rank (paper: 16 for DMD2 / Turbo, 32 for LCM)")
    train_full: bool = common.arg(False, "fine-tune every weight instead of a LoRA")
    grad_clip: float = common.arg(1.0, "max gradient norm (official code: 1.0)")
    per_step_loss: bool = common.arg(False, "official online code: -log sigmoid per transition, averaged, instead "
                                     "of the sum over transitions inside one sigmoid")
    clamp_ratio: float = common.arg(0.0, "official code / D3PO: clamp each per-step likelihood ratio to "
                                    "[1 - c, 1 + c] (official: 0.1); 0 = off")
    one_timestep: bool = common.arg(False, "offline / customize: one random grid transition per pair instead of the "
                                    "sum (offline then equals Diffusion-DPO)")
    offline_pairs: str = common.arg("preference", "offline pairs: preference (world.preference_pairs: reward-ranked, "
                                    "Pick-a-Pic-like) or target (target data vs. a frozen-model sample)",
                                    choices=["preference", "target"])
    pairs: str = common.arg("", "offline: a stored pairs file (.jsonl / .safetensors / .pt rows of win, lose, cond); "
                            "overrides --offline-pairs")
    hinge: bool = common.arg(False, "relu(1 - beta * margin) instead of -log sigmoid: the official customization "
                             "script's loss when eps_pre is dropped (bounded: no push past margin 1 / beta)")
    concept_images: int = common.arg(5, "customize: number of concept images (DreamBooth: 3-5)")
    reference_images: int = common.arg(64, "customize: reference images sampled once from the frozen model")
    prior_weight: float = common.arg(1.0, "customize: lambda of the prior-preservation eps-MSE on the references")
    naive_t: str = common.arg("uniform", "naive baseline's timesteps: uniform (t ~ U[0, T), Ho et al., the paper's "
                              "baseline) or grid (the training grid's times, t_1 included)", choices=["uniform", "grid"])
    naive_baseline: bool = common.arg(True, "for target-data variants (pso, offline --offline-pairs target): also "
                                      "fine-tune the naive baseline with the same budget, for the figure and metrics")
    eval_samples: int = common.arg(1000, "samples for the final evaluation (same seeds for every model)")
    eval_every: int = common.arg(25, "updates between quick evaluations (256 samples) logged in log.csv")
    seed: int = common.arg(0, "random seed: update k draws from step_generator(seed, k, rank)")
    out: str = common.arg("", "run folder (default runs/pso-<variant>-<model>)")
    resume: bool = common.arg(False, "continue from the run folder's last checkpoint")
    save_every: int = common.arg(100, "updates between checkpoints (the final one is always saved)")


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------
def transition_log_ratio(x_next, mean_theta, mean_pre, std, reduce="mean"):
    """Eq. 12: log p_theta(x'|x) / p_pre(x'|x) for two Gaussian policies with the same std (the kernel's)."""
    # log ratio = -(||x' - mu_theta||^2 - ||x' - mu_pre||^2) / (2 sigma_n^2)
    return -common.reduce_dims(((x_next - mean_theta) ** 2 - (x_next - mean_pre) ** 2) / (2 * std**2), reduce)


def eps_log_ratio(eps, eps_theta, eps_pre, reduce="mean"):
    """Eq. 11 (omega = 1): the data-side log-ratio surrogate; eps_pre = None drops the reference (App. B.3)."""
    # -(||eps - eps_theta||^2 - ||eps - eps_pre||^2)
    err = (eps - eps_theta) ** 2
    if eps_pre is not None:
        err = err - (eps - eps_pre) ** 2
    return -common.reduce_dims(err, reduce)


def pso_loss(log_ratio_target, log_ratio_reference, beta, per_step=False, clamp=0.0, hinge=False):
    """Eq. 1 on trajectories (Eq. 3, 5, 6, 7): -log sigmoid(beta sum_n (r^target_n - r^reference_n)).

    Inputs are [B, S-1] per-transition log-ratios log p_theta / p_pre. `per_step`: the official online code's
    mean_n -log sigmoid(beta (r^target_n - r^reference_n)); `clamp`: D3PO's ratio clamp to [1 - c, 1 + c];
    `hinge`: relu(1 - beta margin), the official customization script's loss (no push past margin 1 / beta).
    Returns (loss, margin [B]) with margin = sum_n (r^target_n - r^reference_n), the implicit reward gap / beta."""
    if clamp:
        lo, hi = math.log(1 - clamp), math.log(1 + clamp)
        log_ratio_target, log_ratio_reference = log_ratio_target.clamp(lo, hi), log_ratio_reference.clamp(lo, hi)
    margin = log_ratio_target - log_ratio_reference
    if hinge:
        return F.relu(1 - beta * margin.sum(1)).mean(), margin.sum(1)
    if per_step:
        return -F.logsigmoid(beta * margin).mean(1).mean(), margin.sum(1)
    # L = -E log sigmoid(beta sum_n [log p_theta/p_pre (target_n) - log p_theta/p_pre (reference_n)])
    return -F.logsigmoid(beta * margin.sum(1)).mean(), margin.sum(1)


def naive_loss(eps, eps_theta, reduce="mean"):
    """Fig. 1b / Ho et al.: ||eps - eps_theta(x_t)||^2 on the target data, averaged over batch and grid times."""
    return common.reduce_dims((eps - eps_theta) ** 2, reduce).mean()


# ---------------------------------------------------------------------------------------------------
# Network calls (counted) and the MDP roll-out
# ---------------------------------------------------------------------------------------------------
CountingDenoiser = common.CountingDenoiser  # counts rows evaluated: nfe(B) = rows / B


def predict(net, xs, times, cond):
    """eps at S states in one network call: xs = S tensors [B, ...] (the net's input scale) at `times`; -> [S, B, ...]
    (the time enters per row, so one call serves every transition)."""
    b = xs[0].shape[0]
    x = torch.cat(xs)
    t = torch.cat([torch.full((b,), int(t_), dtype=torch.long, device=x.device) for t_ in times])
    return net(x, t, common.cond_cat([cond] * len(xs))).reshape(len(xs), *xs[0].shape)


def sample_trajectory(net, kernel, noise, cond, times, generator, grad_steps: int) -> common.Trajectory:
    """Roll the policy's MDP from `noise` through `times` (Eq. 2; Alg. 1 line 5, Alg. 2 line 2), storing states,
    predictions and stds. The first `grad_steps` predictions keep their graph: they are mu_theta(x_{t_n}) of Eq. 12 at
    the very states they produced, so the loss needs no second policy call. States are detached samples."""
    x = kernel.init(noise, times[0])
    states, eps_list, stds = [x], [], []
    for k, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        with torch.set_grad_enabled(torch.is_grad_enabled() and k < grad_steps):
            eps = net(kernel.net_input(x, t), t, cond)
        with torch.no_grad():
            mean, std = kernel.step(x, eps, t, t_next)
            x = mean + std * torch.randn(x.shape, generator=generator).to(x.device)
        states.append(x)
        eps_list.append(eps)
        stds.append(std)
    return common.Trajectory(states, eps_list, stds, list(times), nfe=len(times) - 1)


def trajectory_log_ratios(net, kernel, traj: common.Trajectory, cond, n_steps: int, reduce: str):
    """Eq. 12 for the first n_steps transitions of a stored trajectory -> [B, n_steps]. The policy side reuses the
    roll-out's predictions; the frozen model is called once on all n_steps states."""
    times = traj.times[:n_steps]
    with torch.no_grad(), net.frozen():
        eps_pre = predict(net, [kernel.net_input(traj.states[k], t) for k, t in enumerate(times)], times, cond)
    out = []
    for k, (t, t_next) in enumerate(zip(traj.times[:n_steps], traj.times[1:n_steps + 1])):
        mean_theta, std = kernel.step(traj.states[k], traj.eps[k], t, t_next)
        mean_pre, _ = kernel.step(traj.states[k], eps_pre[k], t, t_next)
        out.append(transition_log_ratio(traj.states[k + 1], mean_theta, mean_pre, std, reduce))
    return torch.stack(out, 1)


def forward_log_ratios(net, sched, x0, cond, times, generator, reduce, use_reference=True, eps=None):
    """Eq. 11 on forward-diffused states x_{t_n} = alpha x_0 + sigma eps_n (one call for every t_n, plus one frozen
    call unless `use_reference` is False) -> ([B, S'] log-ratios, eps, eps_theta). `times` may differ per row
    ([B] tensor) for --one-timestep."""
    if eps is None:
        eps = torch.randn((len(times), *x0.shape), generator=generator).to(x0.device)
    x_t = [common.add_noise(sched, x0, eps[k], t) for k, t in enumerate(times)]
    if all(isinstance(t, int) for t in times):
        eps_theta = predict(net, x_t, times, cond)
        ref = (lambda: predict(net, x_t, times, cond))
    else:  # one tensor of per-row times
        eps_theta = net(x_t[0], times[0], cond)[None]
        ref = (lambda: net(x_t[0], times[0], cond)[None])
    eps_pre = None
    if use_reference:
        with torch.no_grad(), net.frozen():
            eps_pre = ref()
    return torch.stack([eps_log_ratio(eps[k], eps_theta[k], None if eps_pre is None else eps_pre[k], reduce)
                        for k in range(len(times))], 1), eps, eps_theta


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def validate(cfg: Config) -> None:
    """Bad configurations fail before anything is loaded or written, naming the problem."""
    checks = [
        (cfg.variant in VARIANTS, f"unknown --variant {cfg.variant!r}; choose one of {list(VARIANTS)}"),
        (cfg.sampler in SAMPLERS, f"unknown --sampler {cfg.sampler!r}; choose x0_renoise or euler_ancestral"),
        (cfg.reduce in ("mean", "sum"), f"--reduce must be mean or sum, got {cfg.reduce!r}"),
        (cfg.offline_pairs in ("preference", "target"), f"unknown --offline-pairs {cfg.offline_pairs!r}"),
        (cfg.naive_t in ("uniform", "grid"), f"--naive-t must be uniform or grid, got {cfg.naive_t!r}"),
        (cfg.steps >= 0, f"--steps must be >= 0, got {cfg.steps}"),
        (cfg.batch >= 1, f"--batch must be >= 1, got {cfg.batch}"),
        (cfg.beta >= 0, f"--beta must be > 0 (0 = the paper's value), got {cfg.beta}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.train_steps == 0 or cfg.train_steps >= 2,
         f"--train-steps must be 0 (the model's grid) or >= 2 (one stochastic transition), got {cfg.train_steps}"),
        (0 <= cfg.clamp_ratio < 1, f"--clamp-ratio must be in [0, 1), got {cfg.clamp_ratio}"),
        (not (cfg.hinge and cfg.per_step_loss), "--hinge and --per-step-loss are two different losses; pick one"),
        (not cfg.pairs or cfg.variant == "offline", "--pairs is a file of offline pairs: use it with --variant offline"),
        (not cfg.pairs or Path(cfg.pairs).is_file(), f"--pairs file {cfg.pairs!r} does not exist"),
        (not cfg.one_timestep or cfg.variant in ("offline", "customize"),
         "--one-timestep applies to the forward-diffused objectives: --variant offline or customize"),
        (cfg.concept_images >= 1 and cfg.reference_images >= 1, "--concept-images and --reference-images must be >= 1"),
        (cfg.save_every >= 1 and cfg.eval_every >= 1, "--save-every and --eval-every must be >= 1"),
        (cfg.eval_samples >= 1, f"--eval-samples must be >= 1, got {cfg.eval_samples}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def eval_split(cfg: Config) -> str:
    """Which data split the samples are scored against: the target for transfer, the base data for rewards."""
    if cfg.variant == "online" or (cfg.variant == "offline" and (cfg.pairs or cfg.offline_pairs == "preference")):
        return "base"
    return "target"


@torch.no_grad()
def draw(den, kernel, world, cond, times, seed, frozen=False):
    """Samples on `times` from fixed seeds (the same for every model compared)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(_rows(cond), *world.shape, generator=gen).to(world.accelerator.device)
    with den.frozen() if frozen else contextlib.nullcontext():
        return common.sample(den, kernel, noise, cond, times, gen)


def train(cfg: Config, world=None) -> dict:
    """Fine-tune, evaluate, write runs/<name>/ (DESIGN.md section 9); returns the metrics. `world`: an already
    loaded world (default: common.load_world(cfg.model))."""
    return _train(cfg, world)[0]


def _train(cfg: Config, world=None):
    validate(cfg)
    timer = common.Timer()
    beta = cfg.beta or PAPER_BETA[cfg.variant]
    world = world or common.load_world(cfg.model)
    acc = world.accelerator
    dev, main = acc.device, acc.is_main_process
    common.seed_everything(cfg.seed)  # LoRA's A matrices are drawn from the global generator
    den = world.denoiser("student", lora_rank=cfg.lora_rank, train_full=cfg.train_full, sampler=cfg.sampler or None)
    kernel = common.make_kernel(den.sampler, world.schedule)  # the backend's sampler decides the MDP (Eq. 4 / 14)
    grid = common.few_step_timesteps(cfg.train_steps) if cfg.train_steps else list(den.timesteps)
    S = len(grid)
    if S < 2 and cfg.variant in ("pso", "offline", "online", "customize"):
        raise ValueError(f"the model samples in {S} step: PSO needs >= 2 (one stochastic transition); "
                         "pass --train-steps 4 or more")
    split = eval_split(cfg)
    out = Path(cfg.out or f"runs/pso-{cfg.variant}-{Path(cfg.model).name}")
    if cfg.resume:
        _check_resume_config(out, cfg)
    run = common.RunDir(out, cfg, resume=cfg.resume or not main)
    params = den.trainable_parameters()
    opt = acc.prepare(torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    start, tensors, _ = run.load_checkpoint(opt) if cfg.resume else (0, None, {})
    if tensors is not None:
        den.load_adapter_state({k: v.to(dev) for k, v in tensors.items()})
        run.truncate_log(start)
        print(f"[pso] resumed {out} at update {start}", file=sys.stderr)
    elif cfg.resume:
        print(f"[pso] --resume: no checkpoint in {out}; starting from update 0", file=sys.stderr)
    net = CountingDenoiser(den)
    setup_nfe = 0.0

    # Fixed inputs drawn once (deterministic in the seed, so a resumed run rebuilds the same ones).
    if cfg.variant == "customize":
        # App. B.3: a few concept images; references sampled once from the frozen model with the class condition.
        g = torch.Generator().manual_seed(cfg.seed + 1)
        concept, concept_cond, class_cond = world.concept_images(cfg.concept_images, g)
        concept, concept_cond = concept.to(dev), common.cond_to(concept_cond, dev)
        ref_cond = common.cond_to(common.cond_repeat(common.cond_index(class_cond, slice(0, 1)),
                                                     cfg.reference_images), dev)
        references = draw(net, kernel, world, ref_cond, den.timesteps, cfg.seed + 2, frozen=True)
        setup_nfe = net.nfe(1)
    eval_cond = common.cond_to(world.eval_conditions(cfg.eval_samples) if cfg.variant != "customize" else
                               common.cond_repeat(common.cond_index(concept_cond, slice(0, 1)), cfg.eval_samples), dev)
    quick_cond = common.cond_index(eval_cond, slice(0, 256))

    train_seconds = 0.0
    for step in range(start, cfg.steps):
        tick = common.Timer()
        gen = common.step_generator(cfg.seed, step, acc.process_index)
        net.rows, info = 0, {}
        with acc.autocast():
            if cfg.variant == "naive":
                # Fig. 1b: ||eps - eps_theta(x^target_t)||^2, no reference; S noised copies per pair (NFE S), at
                # t ~ U[0, T) as Ho et al. (--naive-t uniform) or at every grid time (--naive-t grid)
                x0, cond = world.data(cfg.batch, gen, split="target")
                x0, cond = x0.to(dev), common.cond_to(cond, dev)
                eps = torch.randn((S, *x0.shape), generator=gen).to(dev)
                if cfg.naive_t == "grid":
                    eps_theta = predict(net, [common.add_noise(world.schedule, x0, eps[k], t)
                                              for k, t in enumerate(grid)], grid, cond)
                else:
                    t = torch.randint(0, common.T, (S, cfg.batch), generator=gen).to(dev)
                    x_t = torch.cat([common.add_noise(world.schedule, x0, eps[k], t[k]) for k in range(S)])
                    eps_theta = net(x_t, t.flatten(), common.cond_cat([cond] * S)).reshape(eps.shape)
                loss = naive_loss(eps.flatten(0, 1), eps_theta.flatten(0, 1), cfg.reduce)
            else:
                if cfg.variant == "pso":
                    # Alg. 1: x^target_0 ~ p_data (forward-diffused, Eq. 11); reference trajectory ~ p_theta (Eq. 12)
                    x0, cond = world.data(cfg.batch, gen, split="target")
                    x0, cond = x0.to(dev), common.cond_to(cond, dev)
                    noise = torch.randn(x0.shape, generator=gen).to(dev)
                    reference = sample_trajectory(net, kernel, noise, cond, grid, gen, grad_steps=S - 1)
                    lr_reference = trajectory_log_ratios(net, kernel, reference, cond, S - 1, cfg.reduce)
                    lr_target, _, _ = forward_log_ratios(net, world.schedule, x0, cond, grid[:-1], gen, cfg.reduce)
                elif cfg.variant == "online":
                    # Alg. 2: two trajectories of the current model per condition, ranked by the reward
                    cond = common.cond_to(world.conditions(cfg.batch, gen), dev)
                    cond2 = common.cond_cat([cond, cond])
                    noise = torch.randn(2 * cfg.batch, *world.shape, generator=gen).to(dev)
                    traj = sample_trajectory(net, kernel, noise, cond2, grid + [-1], gen, grad_steps=S - 1)
                    with torch.no_grad():
                        reward = world.reward(traj.x0, cond2).float()
                    lr_both = trajectory_log_ratios(net, kernel, traj, cond2, S - 1, cfg.reduce)
                    first_wins = (reward[: cfg.batch] >= reward[cfg.batch:])[:, None]
                    lr_a, lr_b = lr_both[: cfg.batch], lr_both[cfg.batch:]
                    lr_target, lr_reference = torch.where(first_wins, lr_a, lr_b), torch.where(first_wins, lr_b, lr_a)
                    info["reward"] = float(reward.mean())
                else:  # offline (Eq. 6 / Alg. 3) and customize (App. B.3): both sides forward-diffused
                    if cfg.variant == "offline" and (cfg.pairs or cfg.offline_pairs == "preference"):
                        x_win, x_lose, cond = world.preference_pairs(cfg.batch, gen, path=cfg.pairs or None)
                        x_win, x_lose, cond = x_win.to(dev), x_lose.to(dev), common.cond_to(cond, dev)
                    elif cfg.variant == "offline":  # target data vs. a reference drawn from the frozen model
                        x_win, cond = world.data(cfg.batch, gen, split="target")
                        x_win, cond = x_win.to(dev), common.cond_to(cond, dev)
                        noise = torch.randn(x_win.shape, generator=gen).to(dev)
                        with torch.no_grad(), net.frozen():
                            x_lose = common.sample(net, kernel, noise, cond, den.timesteps, gen)
                    else:
                        i = torch.randint(0, cfg.concept_images, (cfg.batch,), generator=gen).to(dev)
                        j = torch.randint(0, cfg.reference_images, (cfg.batch,), generator=gen).to(dev)
                        x_win, x_lose = concept[i], references[j]
                        cond = common.cond_index(concept_cond, i)
                    times = grid[:-1]
                    if cfg.one_timestep:  # one random stochastic transition per pair: Diffusion-DPO
                        pick = torch.randint(0, S - 1, (cfg.batch,), generator=gen)
                        times = [torch.tensor(grid[:-1])[pick].to(dev)]
                    # same-noise pairing: target and reference share eps_n at each t_n
                    eps = torch.randn((len(times), *x_win.shape), generator=gen).to(dev)
                    both = torch.cat([x_win, x_lose])
                    times2 = times if not cfg.one_timestep else [torch.cat([times[0], times[0]])]
                    lr_both, _, _ = forward_log_ratios(net, world.schedule, both, common.cond_cat([cond, cond]),
                                                       times2, gen, cfg.reduce,
                                                       use_reference=cfg.variant != "customize",
                                                       eps=torch.cat([eps, eps], 1))
                    lr_target, lr_reference = lr_both[: cfg.batch], lr_both[cfg.batch:]
                loss, margin = pso_loss(lr_target, lr_reference, beta, cfg.per_step_loss, cfg.clamp_ratio, cfg.hinge)
                if cfg.variant == "customize":
                    # App. B.3: + lambda * prior preservation, the eps-MSE on the reference images (= -r^reference)
                    prior = -lr_reference.mean()
                    loss = loss + cfg.prior_weight * prior
                    info["prior"] = float(prior.detach())
                margin, lr_target, lr_reference = margin.detach(), lr_target.detach(), lr_reference.detach()
                info.update(margin=float(margin.mean()), accuracy=float((margin > 0).float().mean()),
                            log_ratio_target=float(lr_target.sum(1).mean()),
                            log_ratio_reference=float(lr_reference.sum(1).mean()))
        common.check_finite(loss, step + 1, run)
        acc.backward(loss)
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = tick()
        train_seconds += seconds
        row = {"step": step + 1, "loss": float(loss.detach()), "reward": info.pop("reward", ""), "nfe": net.nfe(cfg.batch),
               "seconds": seconds, **{k: info.get(k, "") for k in ("margin", "accuracy", "log_ratio_target",
                                                                    "log_ratio_reference", "prior")},
               "eval_reward": "", "eval_quality": ""}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            m = world.metrics(draw(den, kernel, world, quick_cond, den.timesteps, cfg.seed + 3), quick_cond, split)
            row.update(eval_reward=m["reward"], eval_quality=m["quality"])
            if row["reward"] == "":
                row["reward"] = m["reward"]
        if main:
            run.log(row)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                run.save_checkpoint(step + 1, den.adapter_state(), opt)

    # ---- evaluation: base vs tuned (and naive) from the same seeds, at the model's own grid and at one step ----
    seed = cfg.seed + 10_000
    one_step = common.few_step_timesteps(1)
    x_base = draw(den, kernel, world, eval_cond, den.timesteps, seed, frozen=True)
    x_tuned = draw(den, kernel, world, eval_cond, den.timesteps, seed)
    metrics = {"variant": cfg.variant, "model": cfg.model, "sampler": den.sampler, "eval_split": split,
               "beta": beta, "updates": cfg.steps, "train_grid": grid, "sample_grid": list(den.timesteps),
               "nfe_per_update": nfe_per_update(cfg, S, len(den.timesteps)), "setup_nfe": setup_nfe,
               "eval_samples": cfg.eval_samples}
    for name, x in (("base", x_base), ("tuned", x_tuned)):
        metrics.update({f"{k}_{name}": v for k, v in world.metrics(x, eval_cond, split).items()})
    x1_tuned = draw(den, kernel, world, eval_cond, one_step, seed)
    for name, x1 in (("base", draw(den, kernel, world, eval_cond, one_step, seed, frozen=True)), ("tuned", x1_tuned)):
        metrics.update({f"{k}_{name}_1step": v for k, v in world.metrics(x1, eval_cond, split).items()})
    if split == "target":  # quality against the old data too: the base model's own quality is the reference, and
        # (toy2d) a sample near a mode of either split is sharp, so the two shares add up to a sharpness score
        for name, x in (("base", x_base), ("tuned", x_tuned)):
            metrics[f"quality_{name}_on_base_split"] = world.metrics(x, eval_cond, "base")["quality"]
    panels = {}
    if split == "target" and cfg.variant != "customize":
        x_data, c_data = world.data(min(cfg.eval_samples, 1000), torch.Generator().manual_seed(seed), split="target")
        panels["target data"] = (x_data, c_data)
    if cfg.variant == "customize":
        panels["concept images"] = (concept, concept_cond)
    panels[f"base, {len(den.timesteps)} steps"] = (x_base, eval_cond)
    if cfg.naive_baseline and split == "target" and cfg.variant in ("pso", "offline"):
        naive_cfg = dataclasses.replace(cfg, variant="naive", out=str(out / "naive"), naive_baseline=False)
        naive_metrics, naive_den = _train(naive_cfg, world)
        x_naive = draw(naive_den, kernel, world, eval_cond, den.timesteps, seed)
        for k, v in naive_metrics.items():  # reward_tuned -> reward_naive, quality_tuned_1step -> quality_naive_1step
            if "_tuned" in k:
                metrics[k.replace("_tuned", "_naive")] = v
        metrics["seconds_naive"] = naive_metrics["seconds"]
        metrics["quality_naive_on_base_split"] = world.metrics(x_naive, eval_cond, "base")["quality"]
        panels[f"naive, {len(den.timesteps)} steps"] = (x_naive, eval_cond)
    panels[f"{cfg.variant}, {len(den.timesteps)} steps"] = (x_tuned, eval_cond)
    panels[f"{cfg.variant}, 1 step"] = (x1_tuned, eval_cond)
    metrics.update(seconds_train=train_seconds, seconds=timer(),
                   seconds_per_update=train_seconds / max(1, cfg.steps - start))
    if main:
        world.plot_samples(panels, run.path / "samples.png")
        plot_curves(run.read_log(), run.path / "curves.png", cfg.variant)
        world.save_adapter(den, run.path / "adapter")
        run.metrics(metrics)
    return metrics, den


def nfe_per_update(cfg: Config, S: int, model_steps: int) -> int:
    """The docstring's NFE table (per pair, per update; S = training grid, model_steps = the model's own grid);
    tests compare it with the counted value."""
    k = 1 if cfg.one_timestep else S - 1
    if cfg.variant == "pso":
        return 4 * (S - 1)
    if cfg.variant == "offline":
        return 4 * k + (0 if (cfg.pairs or cfg.offline_pairs == "preference") else model_steps)
    if cfg.variant == "online":
        return 4 * S - 2
    if cfg.variant == "customize":
        return 2 * k
    return S


def _rows(cond) -> int:
    return len(next(iter(cond.values()))) if isinstance(cond, dict) else len(cond)


def _check_resume_config(out: Path, cfg: Config) -> None:
    """A resumed run must keep the settings that shape the result (steps may grow)."""
    path = out / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    free = {"steps", "resume", "save_every", "eval_every", "out", "naive_baseline", "eval_samples"}
    diff = {k: (old.get(k), v) for k, v in dataclasses.asdict(cfg).items() if k not in free and old.get(k, v) != v}
    if diff:
        raise ValueError(f"--resume with settings that differ from the saved run {path}: "
                         + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
                         + ". Use the same settings, or a new --out.")


def plot_curves(rows: list[dict], path, variant: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return zip(*pts) if pts else ([], [])

    keys = ["loss", "margin", "eval_reward", "eval_quality"] if variant != "naive" else ["loss", "eval_reward",
                                                                                         "eval_quality"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 2.8))
    for ax, key in zip(axes, keys):
        x, y = series(key)
        ax.plot(list(x), list(y), lw=1)
        ax.set(title=key, xlabel="update")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    cfg = common.parse_config(Config, argv, description=__doc__.split("\n\n")[0])
    metrics = train(cfg)
    keys = ["reward", "quality", "distance"] + [k for k in ("transfer", "sharpness") if f"{k}_base" in metrics]
    split = metrics["eval_split"]
    print(f"scored against the {split} split" + (" (last column: quality against the base data)"
                                                 if split == "target" else ""))
    print(f"{'model':14s}" + "".join(f"{k:>10s}" for k in keys) + ("   q(base)" if split == "target" else ""))
    for name in ("base", "naive", "tuned", "base_1step", "naive_1step", "tuned_1step"):
        if f"quality_{name}" in metrics:
            extra = metrics.get(f"quality_{name}_on_base_split")
            print(f"{name:14s}" + "".join(f"{metrics[f'{k}_{name}']:10.3f}" for k in keys)
                  + (f"{extra:10.3f}" if extra is not None else ""))
    print(f"{metrics['seconds']:.1f} s, {metrics['nfe_per_update']:g} NFE per update; wrote "
          f"{cfg.out or f'runs/pso-{cfg.variant}-{Path(cfg.model).name}'}")
    return metrics


if __name__ == "__main__":
    main()
