"""Pairwise Sample Optimization (PSO) for few-step (timestep-distilled) diffusion models.

Paper: Miao, Yang, Lin, Wang, Liu, Wang, Qiu, "Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample
Optimization", arXiv 2410.03190 (ICLR 2025); equations as this project states them: docs/design.md section 4.
Official code: ZichenMiao/Pairwise_Sample_Optimization.

PSO fine-tunes a distilled model (SDXL-DMD2 / LCM with the x0-renoise sampler, SDXL-Turbo with Euler ancestral)
by raising the trajectory likelihood of a *target* sample over a *reference* sample of the same condition, both
measured against the frozen pre-trained model (a DPO objective on trajectories, Eq. 1-3). The reference keeps the
model close to its own few-step trajectories, so it does not blur the way plain diffusion-loss fine-tuning does.

Variants (`--variant`), each one update function under its equation number, called by the one loop in `train`:
  pso        Eq. 5 / Alg. 1 (`pso_update`): target forward-diffused from data (Eq. 11), reference trajectory sampled
             from the current model's own MDP (Eq. 12). Style transfer in the paper (App. B.2).
  offline    Eq. 6 / Alg. 3 (`offline_update`): both sides forward-diffused from stored images: reward-ranked
             preference pairs (Pick-a-Pic in the paper; `world.preference_pairs`, or a `--pairs` file), or
             `--offline-pairs target`: target data vs. a reference drawn from the frozen model for the same condition.
             `--one-timestep --one-timestep-from uniform` is Diffusion-DPO (one t ~ U[0, T) per pair).
  online     Eq. 7 / Alg. 2 (`online_update`): two trajectories of the current model per condition, ranked by reward.
  customize  App. B.3 (`customize_update`): Eq. 6 with the target = a few concept images, the reference = images
             sampled once from the frozen model, the eps_pre terms dropped, plus lambda * prior preservation.
  naive      Fig. 1b baseline (`naive_update`): plain eps-MSE fine-tuning of the distilled model on the target data,
             t ~ U[0, T) as Ho et al. (`--naive-t uniform`) or at the training grid's times (`--naive-t grid`).
What practitioners do instead of PSO (docs/design.md section 11), with naive's loss, data, budget and evaluation:
  base-transfer      (`base_transfer_update`): the LoRA is trained with the ordinary loss on the world's base model
                     (the teacher role: FLUX.1-dev for FLUX.1-schnell, Z-Image for Z-Image-Turbo) and delivered on
                     the distilled model: evaluation loads it into the student.
  dedistill          (`dedistill_update`): a de-distill training adapter A (`--variant dedistill-adapter`, or a
                     finished one from `--dedistill-adapter RUN`) is merged into the student, the user's LoRA B is
                     trained over it with the ordinary loss; A is dropped: evaluation and the delivered adapter
                     are the student with B only. A is saved in its own run folder with its own cost.
  dedistill-adapter  (`dedistill_adapter_update`): A alone: the ordinary loss on samples the frozen student draws
                     on its own grid.
`python pso.py` (`experiment`) trains, for the target-data variants, the baselines first (naive by default;
`--baselines all` adds base-transfer and dedistill) into <out>/<baseline> with the same budget, then the chosen
variant, and reports them in one summary table and one samples figure, plus the world's further read-outs
(`readouts`: toy2d's transfer and sharpness, the Fig. 1 contrast) at the model's grid and at one step.

Equation <-> code:
  Eq. 11 (data side, omega = 1)   eps_log_ratio        -(||eps - eps_theta||^2 - ||eps - eps_pre||^2)
  Eq. 12 (model side)             transition_log_ratio -(||x' - mu_theta||^2 - ||x' - mu_pre||^2) / (2 sigma^2)
  Eq. 1/3 -> 5, 6, 7              pso_loss             -log sigmoid(beta * sum_n (r^target_n - r^reference_n))
  Eq. 2 / Alg. 1 l.5, Alg. 2 l.2  sample_trajectory    the policy's MDP roll-out (kernel from the backend's sampler)
  Eq. 4 / Eq. 14                  common.make_kernel   x0_renoise / euler_ancestral (chosen by the backend, never here)
  Eq. 5                           pso_update
  Eq. 6                           offline_update
  Eq. 7, Alg. 2 l.3-5             online_update        winner = the higher reward, per condition
  App. B.3                        customize_update     + prior preservation
  Fig. 1b                         naive_update, naive_loss
  the practitioners' baselines    base_transfer_update, dedistill_update, dedistill_adapter_update (naive_loss)

Transitions n = N..2 are trained; the last one (t_1 -> 0) is deterministic and dropped (Sec. 2.1). "N" is the
training grid: the model's own grid by default (N = 4: [999, 749, 499, 249]), or a denser `--train-steps` grid
(e.g. 8 steps, 7 transitions) while evaluation always samples on the model's own grid.

NFEs per update, counted by `CountingDenoiser` in network evaluations per pair (one call on B conditions at one
timestep = 1; a call on 2B rows = 2) and logged as `nfe` (per pair of one micro-batch); tests check measured ==
stated. S = training grid length.
  pso        4(S-1) = 12:  roll-out S-1 (policy, graph kept) + frozen on its states S-1
                           + policy and frozen on the forward-diffused target S-1 each
  offline    4(S-1) = 12:  policy + frozen on 2(S-1) forward-diffused states (4 with --one-timestep);
                           --offline-pairs target adds the model's 4 frozen sampling calls (no grad) = 16
  online     4S-2   = 14:  two roll-outs of S steps (2(S-1) policy calls keep their graph, the last step runs
                           without grad) + frozen on the 2(S-1) stored states
  customize  2(S-1) = 6:   policy on 2(S-1) states, no reference model (2 with --one-timestep); plus, once,
                           4 (the model's grid) per reference image, sampled from the frozen model (setup_nfe)
  naive      S      = 4:   policy on S noised copies of each target sample (t ~ U[0, T), or the S grid times)
  base-transfer  S  = 4:   naive's, on the base (teacher) network instead of the student's
  dedistill      S  = 4:   naive's, on the student with A merged; A's own cost is reported apart (adapter_*)
  dedistill-adapter S + M = 8: naive's S on a sample the frozen student draws in its M = 4 grid steps (no grad)
These are the minimum: nothing is evaluated twice. In particular the policy predictions on the model's own
trajectories are not recomputed: the roll-out runs with grad on detached states, and the same predictions give
mu_theta in Eq. 12 (the usual DDPO-style code samples without grad and calls the policy again: 5(S-1) for pso,
6S-4 for online, with the same peak memory).

Where this differs from the paper / the official code (and why):
  1. Dimension reduction: `--reduce mean` (default) averages squared norms and log-probs over dimensions, as the
     official code does (this is what makes beta = 50 work at 1024^2); `--reduce sum` is the paper's Eq. 5-7.
  2. The data-side term is the paper's eps-MSE surrogate with omega_{t_n} = 1 (Eq. 11, "constant in practice").
     For the x0-renoise kernel it is not the exact transition KL; we keep the paper's form.
  3. Eq. 14 as printed swaps the two Euler-ancestral noise levels: its drift uses the formula of diffusers'
     sigma_up and its noise std sqrt(sigma_{n-1}^2 - sigma_n^2) (negative under the root). The kernel follows
     diffusers' EulerAncestralDiscreteScheduler, which SDXL-Turbo samples with: std = sigma_up, drift to
     sigma_down = sqrt(sigma_to^2 - sigma_up^2) (tested bit for bit against diffusers).
  4. Online, official code (DMD2 run): the loss is applied per transition (-log sigmoid per step, averaged:
     `--per-step-loss`), the per-step ratio is clamped to [1 - c, 1 + c] with c = 0.1 (D3PO's trick:
     `--clamp-ratio 0.1`), beta = 50 for online too (paper: 5), and it samples 8 steps and trains 7 transitions
     (`--train-steps 8`; evaluation here stays on the model's 4-step grid). Sampling and training alternate in epochs
     over stored pairs with the timestep order shuffled (here: one fresh batch of pairs per update, all transitions
     summed, as Alg. 2 reads). Ties in the reward: the official code gives them no gradient; here the first sample
     wins (continuous rewards make ties measure-zero). The official form is thus
     `--variant online --beta 50 --per-step-loss --clamp-ratio 0.1 --train-steps 8`.
  5. `--clamp-ratio` clamps the per-transition terms r_n that enter the sigmoid. On the Eq. 12 side r_n is the
     transition log-ratio (per dimension under `--reduce mean`, as the official code's log-probs), so the clamp is
     D3PO's. On the Eq. 11 side (pso target, offline, customize) r_n is the eps-MSE surrogate, not a likelihood
     ratio: there the clamp only bounds the surrogate; it is offered for every variant but is D3PO's only online.
  6. Offline: the official repository has no offline trainer; Eq. 6 is implemented as written (sum over the
     N-1 stochastic transitions, same noise eps_n for target and reference: Diffusion-DPO's variance reduction).
     `--one-timestep` draws one t per pair from the grid's stochastic transitions {t_N..t_2} ({999, 749, 499}) by
     default; Diffusion-DPO draws t ~ U[0, T) (`--one-timestep-from uniform`). Diffusion-DPO writes the logit with a
     factor 1/2: its beta equals 2 x ours.
  7. Customize: the paper's form by default (Eq. 6 without eps_pre, log-sigmoid, sum over steps, lambda = 1). The
     official DreamBooth script (SDXL-Turbo) differs in five ways, each an option: the hinge relu(1 - beta margin)
     (`--hinge`), the reference term scaled by 0.1 (`--reference-scale 0.1`), one timestep per pair drawn from
     {750, 500, 250, 0} (diffusers' "leading" spacing: `--one-timestep --one-timestep-from leading`), prior weight
     0.5 (`--prior-weight 0.5`), and lr 2e-4 for 600 updates of batch 1 x 4 accumulation with beta 5 and 20
     reference images (`--lr 2e-4 --steps 600 --batch 1 --gradient-accumulation-steps 4 --reference-images 20`).
     Its sigma^-2-weighted x0-space error equals the eps-MSE used here.
  8. Eq. 5 has no official trainer either. The training grid can be denser than the sampling grid
     (`--train-steps 8`): with the model's own 4-step grid the deterministic last step (t_1 = 249 -> x_0) is never
     trained (docs/design.md section 7).
  9. Naive baseline: t ~ U[0, T) by default (Ho et al., the paper's Fig. 1b baseline); `--naive-t grid` trains at
     the S training-grid times instead (t_1 included, which no PSO variant trains).
 10. Learning rate, steps and batch are scaled for CPU toys (see Config); the paper's values are in the help.
 11. A world may supply values for options the command line does not set (`method_defaults`, printed at the start):
     toy2d gives `--variant pso` beta 7 on a 16-step training grid (`Toy2D.cli_defaults`; at the paper's beta 50
     and N = 4 the 2-D toy does not move, docs/pso.md "Fig. 1 on toy2d"). `--beta 0 --train-steps 0` restores the
     paper's values; a Config built in Python sets every field and gets no world defaults.
 12. The practitioners' baselines on the toys. The toy teacher is the base the student was made from, as FLUX.1-dev
     for schnell, but the toy student was distilled differently: initialised from the teacher, every weight
     regressed on the teacher's deterministic DDIM (flow: Euler) end points x_0 = ODE(x_{t_n}) at its 4 grid times
     (toy/pretrain.py), with no adversarial or distribution-matching loss, so its weights stay closer to the
     teacher's than an adversarially distilled model's may. The de-distill adapter's data: ostris' training
     adapters for FLUX.1-schnell and Z-Image-Turbo were trained on a fixed set of thousands of images the
     distilled model generated, at a low learning rate (1e-5); here each update draws fresh samples of the
     frozen student (an unlimited set; their NFEs are counted per update) with `--adapter-lr` 10x below `--lr`.

Run `python pso.py --help` for every option; `docs/pso.md` has usage, metrics and measured results.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import common
import harness

VARIANTS = ("pso", "offline", "online", "customize", "naive", "base-transfer", "dedistill", "dedistill-adapter")
BASELINES = ("naive", "base-transfer", "dedistill")  # what `experiment` can train first, with the variant's budget
PLAIN_LOSS = ("naive", "base-transfer", "dedistill", "dedistill-adapter")  # the ordinary loss, no beta
SAMPLERS = ("", "x0_renoise", "euler_ancestral")
PAPER_BETA = {"pso": 50.0, "offline": 50.0, "online": 5.0, "customize": 5.0, **{v: 0.0 for v in PLAIN_LOSS}}
# a resumed run may change these: they do not change updates
FREE = ("eval_every", "eval_samples", "naive_baseline", "baselines")


@dataclasses.dataclass
class Config(harness.RunConfig):
    model: str = harness.arg("toy2d", "toy world: toy2d | flow2d | mnist (options after a colon, e.g. "
                             "toy2d:reward=height), or a model spec / diffusers checkpoint for the full backend")
    variant: str = harness.arg("pso", "objective: pso (Eq. 5), offline (Eq. 6), online (Eq. 7), customize (App. B.3), "
                              "naive (Fig. 1b baseline); the practitioners' baselines: base-transfer (LoRA trained on "
                              "the base / teacher, used on the student), dedistill (LoRA trained over a merged "
                              "de-distill adapter, used without it), dedistill-adapter (that adapter alone)",
                              choices=list(VARIANTS))
    sampler: str = harness.arg("", "MDP of the distilled model, passed to the backend: x0_renoise (DMD2/LCM, Eq. 4) or "
                              "euler_ancestral (SDXL-Turbo, Eq. 14); empty = the backend's default",
                              choices=list(SAMPLERS))
    steps: int = harness.arg(300, "updates (paper: 5k offline, 20k online, 3k style transfer, 1k customize)")
    batch: int = harness.arg(64, "pairs (conditions) per micro-batch (paper: 64; customize 4)")
    lr: float = harness.arg(1e-3, "AdamW learning rate (paper: 1e-5 on SDXL; the toys' LoRA needs ~100x more)")
    weight_decay: float = harness.arg(1e-6, "AdamW weight decay (official code: 1e-6)")
    beta: float = harness.arg(0.0, "DPO regularisation beta; 0 = the paper's value: 50 (pso, offline), 5 (online, "
                             "customize)")
    reduce: str = harness.arg("mean", "reduce squared norms / log-probs over dimensions: mean (official code, what "
                             "beta = 50 is tuned for) or sum (the paper's equations)", choices=["mean", "sum"])
    train_steps: int = harness.arg(0, "length S of the training grid (trailing spacing); 0 = the model's own grid "
                                  "(N = 4 in the paper). E.g. 8 trains 7 transitions incl. t = 249 (the official "
                                  "online DMD2 run), evaluation stays on the model's grid")
    lora_rank: int = harness.arg(16, "LoRA rank (paper: 16 for DMD2 / Turbo, 32 for LCM)")
    train_full: bool = harness.arg(False, "fine-tune every weight instead of a LoRA")
    grad_clip: float = harness.arg(1.0, "max gradient norm (official code: 1.0); 0 = off")
    per_step_loss: bool = harness.arg(False, "official online code: -log sigmoid per transition, averaged, instead "
                                     "of the sum over transitions inside one sigmoid")
    clamp_ratio: float = harness.arg(0.0, "official online code / D3PO: clamp each per-step ratio exp(r_n) to "
                                    "[1 - c, 1 + c] (official: 0.1; on Eq. 11 terms a bound on the surrogate); 0 = off")
    one_timestep: bool = harness.arg(False, "offline / customize: one random timestep per pair instead of the sum over "
                                    "the grid's transitions (see --one-timestep-from)")
    one_timestep_from: str = harness.arg("grid", "--one-timestep draws t from: grid (the training grid's stochastic "
                                        "transitions t_N..t_2), uniform (U[0, T): Diffusion-DPO), leading (T - n T/S, "
                                        "n = 1..S: {750, 500, 250, 0}, the official DreamBooth script's)",
                                        choices=["grid", "uniform", "leading"])
    offline_pairs: str = harness.arg("preference", "offline pairs: preference (world.preference_pairs: reward-ranked, "
                                    "Pick-a-Pic-like) or target (target data vs. a frozen-model sample)",
                                    choices=["preference", "target"])
    pairs: str = harness.arg("", "offline: a stored pairs file (.jsonl / .safetensors / .pt rows of win, lose, cond); "
                            "overrides --offline-pairs")
    hinge: bool = harness.arg(False, "relu(1 - beta * margin) instead of -log sigmoid: the official customization "
                             "script's loss when eps_pre is dropped (bounded: no push past margin 1 / beta)")
    reference_scale: float = harness.arg(1.0, "customize: weight of the reference term in the margin (official "
                                        "DreamBooth script: 0.1)")
    concept_images: int = harness.arg(5, "customize: number of concept images (DreamBooth: 3-5)")
    reference_images: int = harness.arg(64, "customize: reference images sampled once from the frozen model "
                                       "(official: 20)")
    prior_weight: float = harness.arg(1.0, "customize: lambda of the prior-preservation eps-MSE on the references "
                                     "(official DreamBooth script: 0.5)")
    naive_t: str = harness.arg("uniform", "naive baseline's timesteps: uniform (t ~ U[0, T), Ho et al., the paper's "
                              "baseline) or grid (the training grid's times, t_1 included)",
                              choices=["uniform", "grid"])
    naive_baseline: bool = harness.arg(True, "for target-data variants (pso, offline --offline-pairs target): also "
                                      "fine-tune the naive baseline with the same budget, for the figure and metrics")
    baselines: str = harness.arg("", "for target-data variants: further baselines trained first with the same budget "
                                "and reported beside naive: a comma list of base-transfer, dedistill, or all (these "
                                "two and naive; --no-naive-baseline still drops naive)")
    dedistill_adapter: str = harness.arg("", "dedistill: a finished `--variant dedistill-adapter` run folder whose "
                                        "adapter A to merge (trained once, reused); empty = train A first into "
                                        "<out>/dedistill-adapter with --adapter-steps and --adapter-lr")
    adapter_steps: int = harness.arg(300, "dedistill: updates of the de-distill adapter A when it is trained first")
    adapter_lr: float = harness.arg(1e-4, "dedistill: learning rate of A when it is trained first (ostris' training "
                                   "adapters: 1e-5, a tenth of the usual LoRA rate)")
    eval_samples: int = harness.arg(1000, "samples for the final evaluation (same seeds for every model)")
    eval_every: int = harness.arg(25, "updates between quick evaluations (256 samples) logged in log.csv")


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


def pso_loss(log_ratio_target, log_ratio_reference, beta, per_step=False, clamp=0.0, hinge=False,
             reference_scale=1.0):
    """Eq. 1 on trajectories (Eq. 3, 5, 6, 7): -log sigmoid(beta sum_n (r^target_n - r^reference_n)).

    Inputs are [B, S-1] per-transition log-ratios log p_theta / p_pre. `per_step`: the official online code's
    mean_n -log sigmoid(beta (r^target_n - r^reference_n)); `clamp`: D3PO's ratio clamp to [1 - c, 1 + c];
    `hinge`: relu(1 - beta margin), the official customization script's loss (no push past margin 1 / beta);
    `reference_scale`: the official customization script's weight on the reference term (0.1 there).
    Returns (loss, margin [B]) with margin = sum_n (r^target_n - c r^reference_n), the implicit reward gap / beta."""
    if clamp:
        lo, hi = math.log(1 - clamp), math.log(1 + clamp)
        log_ratio_target, log_ratio_reference = log_ratio_target.clamp(lo, hi), log_ratio_reference.clamp(lo, hi)
    margin = log_ratio_target - reference_scale * log_ratio_reference
    if hinge:
        return F.relu(1 - beta * margin.sum(1)).mean(), margin.sum(1)
    if per_step:
        return -F.logsigmoid(beta * margin).mean(1).mean(), margin.sum(1)
    # L = -E log sigmoid(beta sum_n [log p_theta/p_pre (target_n) - log p_theta/p_pre (reference_n)])
    return -F.logsigmoid(beta * margin.sum(1)).mean(), margin.sum(1)


def naive_loss(eps, eps_theta, reduce="mean"):
    """Fig. 1b / Ho et al.: ||eps - eps_theta(x_t)||^2 on the target data, averaged over batch and noised copies."""
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
    # the regression target is eps, or the velocity eps - x_0 in a flow world (sched.pred_target)
    target = [sched.pred_target(x0, eps[k], t) for k, t in enumerate(times)]
    return torch.stack([eps_log_ratio(target[k], eps_theta[k], None if eps_pre is None else eps_pre[k], reduce)
                        for k in range(len(times))], 1), eps, eps_theta


# ---------------------------------------------------------------------------------------------------
# One update per variant: its pairs and log-ratios under its equation number -> (loss, info)
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    """What an update reads: the resolved options, the world, the counted policy (its `frozen()` is the pre-trained
    model), the MDP kernel, the training grid t_N..t_1 and beta; customize's fixed images."""

    cfg: Config
    world: Any
    net: CountingDenoiser
    kernel: common.Kernel
    grid: list[int]
    beta: float
    concept: tuple | None = None  # customize: (images [K, ...], their condition)
    references: torch.Tensor | None = None  # customize: frozen-model samples of the class condition

    @property
    def device(self):
        return self.world.accelerator.device

    @property
    def n(self) -> int:
        """Stochastic transitions t_N -> ... -> t_1 (the last, deterministic one to x_0 is not trained)."""
        return len(self.grid) - 1


def target_batch(s: Setup, gen):
    """Alg. 1 line 3: x^target_0 ~ p_data (the world's target split) with its conditions."""
    x0, cond = s.world.data(s.cfg.batch, gen, split="target")
    return x0.to(s.device), common.cond_to(cond, s.device)


def dpo(s: Setup, lr_target, lr_reference, reference_scale: float = 1.0):
    """Eq. 1/3 on the [B, S'] per-transition log-ratios of the two sides; info = what log.csv shows of the pairs."""
    loss, margin = pso_loss(lr_target, lr_reference, s.beta, s.cfg.per_step_loss, s.cfg.clamp_ratio, s.cfg.hinge,
                            reference_scale)
    margin = margin.detach()
    return loss, {"margin": float(margin.mean()), "accuracy": float((margin > 0).float().mean()),
                  "log_ratio_target": float(lr_target.detach().sum(1).mean()),
                  "log_ratio_reference": float(lr_reference.detach().sum(1).mean())}


def one_timestep(s: Setup, gen) -> torch.Tensor:
    """--one-timestep: one t per pair [B] from the grid's stochastic transitions, U[0, T) (Diffusion-DPO) or the
    'leading' set T - n T/S (the official DreamBooth script's {750, 500, 250, 0} for S = 4)."""
    b, S = s.cfg.batch, len(s.grid)
    if s.cfg.one_timestep_from == "uniform":
        return torch.randint(0, common.T, (b,), generator=gen).to(s.device)
    leading = [common.T - n * common.T // S for n in range(1, S + 1)]
    table = s.grid[:-1] if s.cfg.one_timestep_from == "grid" else leading
    pick = torch.randint(0, len(table), (b,), generator=gen)
    return torch.tensor(table)[pick].to(s.device)


def pair_log_ratios(s: Setup, x_win, x_lose, cond, gen, use_reference: bool = True):
    """Eq. 11 on both images of each pair, forward-diffused at the same t_n with the same eps_n (Diffusion-DPO's
    variance reduction), in one policy call (+ one frozen call) -> ([B, S'], [B, S'])."""
    times = [one_timestep(s, gen)] if s.cfg.one_timestep else s.grid[:-1]
    eps = torch.randn((len(times), *x_win.shape), generator=gen).to(s.device)
    times2 = [torch.cat([times[0], times[0]])] if s.cfg.one_timestep else times
    lr_both, _, _ = forward_log_ratios(s.net, s.world.schedule, torch.cat([x_win, x_lose]),
                                       common.cond_cat([cond, cond]), times2, gen, s.cfg.reduce,
                                       use_reference=use_reference, eps=torch.cat([eps, eps], 1))
    b = x_win.shape[0]
    return lr_both[:b], lr_both[b:]


def pso_update(s: Setup, gen):
    """Eq. 5 / Alg. 1: the target forward-diffused from data (Eq. 11) against a reference trajectory the current model
    samples itself (Eq. 12); logit = -beta sum_n [D^target_n - R^reference_n / (2 sigma_n^2)]."""
    x0, cond = target_batch(s, gen)
    noise = torch.randn(x0.shape, generator=gen).to(s.device)
    reference = sample_trajectory(s.net, s.kernel, noise, cond, s.grid, gen, grad_steps=s.n)
    lr_reference = trajectory_log_ratios(s.net, s.kernel, reference, cond, s.n, s.cfg.reduce)  # mu_theta reused
    lr_target, _, _ = forward_log_ratios(s.net, s.world.schedule, x0, cond, s.grid[:-1], gen, s.cfg.reduce)
    return dpo(s, lr_target, lr_reference)


def offline_update(s: Setup, gen):
    """Eq. 6 / Alg. 3: both sides forward-diffused from stored images; logit = -beta sum_n [D^target_n - D^ref_n]."""
    cfg = s.cfg
    if cfg.pairs or cfg.offline_pairs == "preference":  # reward-ranked pairs (Pick-a-Pic-like) or a pairs file
        x_win, x_lose, cond = s.world.preference_pairs(cfg.batch, gen, path=cfg.pairs or None)
        x_win, x_lose, cond = x_win.to(s.device), x_lose.to(s.device), common.cond_to(cond, s.device)
    else:  # target data vs. a reference drawn from the frozen model for the same condition
        x_win, cond = target_batch(s, gen)
        noise = torch.randn(x_win.shape, generator=gen).to(s.device)
        with torch.no_grad(), s.net.frozen():
            x_lose = common.sample(s.net, s.kernel, noise, cond, s.net.timesteps, gen)
    return dpo(s, *pair_log_ratios(s, x_win, x_lose, cond, gen))


def online_update(s: Setup, gen):
    """Eq. 7 / Alg. 2: two trajectories of the current model per condition, the higher reward the target (per
    condition); logit = -beta sum_n [R^win_n - R^lose_n] / (2 sigma_n^2)."""
    b = s.cfg.batch
    cond = common.cond_to(s.world.conditions(b, gen), s.device)
    cond2 = common.cond_cat([cond, cond])  # rows i and b + i share condition i
    noise = torch.randn(2 * b, *s.world.shape, generator=gen).to(s.device)
    traj = sample_trajectory(s.net, s.kernel, noise, cond2, s.grid + [-1], gen, grad_steps=s.n)
    with torch.no_grad():
        reward = s.world.reward(traj.x0, cond2).float()
    lr_both = trajectory_log_ratios(s.net, s.kernel, traj, cond2, s.n, s.cfg.reduce)  # mu_theta from the roll-out
    first_wins = (reward[:b] >= reward[b:])[:, None]
    lr_a, lr_b = lr_both[:b], lr_both[b:]
    loss, info = dpo(s, torch.where(first_wins, lr_a, lr_b), torch.where(first_wins, lr_b, lr_a))
    info["reward"] = float(reward.mean())
    return loss, info


def customize_update(s: Setup, gen):
    """App. B.3: Eq. 6 with the concept images as targets and the frozen model's class samples as references, eps_pre
    dropped (r = -||eps - eps_theta||^2), plus lambda * prior preservation (the eps-MSE on the references)."""
    cfg = s.cfg
    concept, concept_cond = s.concept
    i = torch.randint(0, cfg.concept_images, (cfg.batch,), generator=gen).to(s.device)
    j = torch.randint(0, cfg.reference_images, (cfg.batch,), generator=gen).to(s.device)
    cond = common.cond_index(concept_cond, i)
    lr_concept, lr_reference = pair_log_ratios(s, concept[i], s.references[j], cond, gen, use_reference=False)
    loss, info = dpo(s, lr_concept, lr_reference, cfg.reference_scale)
    prior = -lr_reference.mean()  # ||eps - eps_theta(x^reference_t)||^2 (reduced), averaged
    info["prior"] = float(prior.detach())
    return loss + cfg.prior_weight * prior, info


def naive_update(s: Setup, gen):
    """Fig. 1b: ||eps - eps_theta(x^target_t)||^2, no reference; S noised copies per sample, at t ~ U[0, T) as Ho et
    al. (--naive-t uniform) or at the S training-grid times (--naive-t grid)."""
    return ordinary_loss(s, *target_batch(s, gen), gen)


def ordinary_loss(s: Setup, x0, cond, gen):
    """The diffusion / flow-matching loss of s.net on the clean samples x0: S noised copies per sample (naive_loss)."""
    S = len(s.grid)
    eps = torch.randn((S, *x0.shape), generator=gen).to(s.device)
    if s.cfg.naive_t == "grid":
        x_t = [common.add_noise(s.world.schedule, x0, eps[k], t) for k, t in enumerate(s.grid)]
        eps_theta = predict(s.net, x_t, s.grid, cond)
        t = torch.tensor(s.grid, device=s.device)[:, None].expand(S, s.cfg.batch)
    else:
        t = torch.randint(0, common.T, (S, s.cfg.batch), generator=gen).to(s.device)
        x_t = torch.cat([common.add_noise(s.world.schedule, x0, eps[k], t[k]) for k in range(S)])
        eps_theta = s.net(x_t, t.flatten(), common.cond_cat([cond] * S)).reshape(eps.shape)
    sched = s.world.schedule  # the regression target: eps, or the velocity eps - x_0 in a flow world
    target = torch.stack([sched.pred_target(x0, eps[k], t[k]) for k in range(S)])
    return naive_loss(target.flatten(0, 1), eps_theta.flatten(0, 1), s.cfg.reduce), {}


# Base transfer: train the LoRA on the undistilled base, use it on the distilled model. diffusers' Z-Image DreamBooth
# LoRA recipe (examples/dreambooth/README_z_image.md, train_dreambooth_lora_z_image.py) trains on Tongyi-MAI/Z-Image,
# the base of Z-Image-Turbo (unsloth issue #8270 asks its trainer to do the same for Z-Image-Turbo and FLUX.2-klein);
# FLUX.1-dev LoRAs are loaded into FLUX.1-schnell the same way.
def base_transfer_update(s: Setup, gen):
    """naive's loss on the target data, with s.net the base (teacher role) network and its LoRA (`train` builds it
    from TRAINED_ROLE); the adapter is then evaluated and delivered on the student (`deliver` in `train`)."""
    return ordinary_loss(s, *target_batch(s, gen), gen)


# De-distill training adapter: ostris' FLUX.1-schnell-training-adapter and zimage_turbo_training_adapter (model cards
# on the Hugging Face hub, made for ostris/ai-toolkit): a LoRA trained on thousands of images the distilled model
# generated (ai-toolkit issue #104), with the plain flow-matching loss (DiffSynth-Studio issue #1486), merged while
# the user's LoRA trains and removed at inference (the Z-Image-Turbo card; SceneWorks PR #126 and diffusion-pipe
# issue #462 add it to their trainers).
def dedistill_adapter_update(s: Setup, gen):
    """The adapter A: naive's loss on a batch the frozen student samples on its own grid (no gradient), for random
    conditions. The student + A learns to denoise its own samples at every t, as a multi-step model would."""
    cond = common.cond_to(s.world.conditions(s.cfg.batch, gen), s.device)
    noise = torch.randn(s.cfg.batch, *s.world.shape, generator=gen).to(s.device)
    with torch.no_grad(), s.net.frozen():
        x0 = common.sample(s.net, s.kernel, noise, cond, s.net.timesteps, gen)
    return ordinary_loss(s, x0, cond, gen)


def dedistill_update(s: Setup, gen):
    """The user's LoRA B: naive's loss on the target data, with s.net the student whose weights hold the merged
    adapter A (`train` merges it); B alone is evaluated and delivered on the student (`deliver` in `train`)."""
    return ordinary_loss(s, *target_batch(s, gen), gen)


UPDATES = {"pso": pso_update, "offline": offline_update, "online": online_update, "customize": customize_update,
           "naive": naive_update, "base-transfer": base_transfer_update, "dedistill": dedistill_update,
           "dedistill-adapter": dedistill_adapter_update}
TRAINED_ROLE = {"base-transfer": "teacher"}  # the base the practice trains on; every other variant tunes the student


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def validate(cfg: Config) -> None:
    """Bad options fail before anything is loaded or written, naming the flag, what was expected and what was found."""
    for name, choices in (("variant", VARIANTS), ("sampler", SAMPLERS), ("reduce", ("mean", "sum")),
                          ("offline_pairs", ("preference", "target")), ("naive_t", ("uniform", "grid")),
                          ("one_timestep_from", ("grid", "uniform", "leading"))):
        harness.check_choice(cfg, name, choices)
    for name, lo in (("steps", 0), ("batch", 1), ("weight_decay", 0), ("beta", 0), ("lora_rank", 1),
                     ("grad_clip", 0), ("reference_scale", 0), ("concept_images", 1), ("reference_images", 1),
                     ("prior_weight", 0), ("eval_samples", 1), ("eval_every", 1)):
        harness.check_range(cfg, name, lo)
    harness.check_range(cfg, "lr", 0, 1, lo_open=True)
    harness.check_range(cfg, "clamp_ratio", 0, 1, hi_open=True)
    harness.check_range(cfg, "train_steps", 0, common.T)
    harness.check(cfg.train_steps != 1, "train_steps", "0 (the model's grid) or >= 2 (one stochastic transition)", 1)
    harness.check(not (cfg.hinge and cfg.per_step_loss), "hinge", "not with --per-step-loss (two different losses)",
                 "--hinge --per-step-loss")
    harness.check(not cfg.pairs or cfg.variant == "offline", "pairs", "a file of offline pairs, with --variant offline",
                 f"--variant {cfg.variant}")
    harness.check(not cfg.pairs or Path(cfg.pairs).is_file(), "pairs", "an existing file", cfg.pairs)
    harness.check(not cfg.one_timestep or cfg.variant in ("offline", "customize"), "one_timestep",
                 "--variant offline or customize (the forward-diffused objectives)", f"--variant {cfg.variant}")
    harness.check(cfg.reference_scale == 1.0 or cfg.variant == "customize", "reference_scale",
                 "1 unless --variant customize", cfg.reference_scale)
    harness.check_range(cfg, "adapter_steps", 1)
    harness.check_range(cfg, "adapter_lr", 0, 1, lo_open=True)
    harness.check(not cfg.train_full or cfg.variant not in PLAIN_LOSS[1:], "train_full",
                 "a LoRA for base-transfer / dedistill / dedistill-adapter (the practices move an adapter between "
                 "models)", f"--train-full --variant {cfg.variant}")
    chosen = [b.strip() for b in cfg.baselines.split(",") if b.strip()]
    bad = [b for b in chosen if b not in (*BASELINES, "all")]
    harness.check(not bad, "baselines", f"a comma list of {', '.join(BASELINES)} or all", cfg.baselines)
    if cfg.dedistill_adapter:
        harness.check(cfg.variant == "dedistill" or "dedistill" in chosen or "all" in chosen, "dedistill_adapter",
                     "a de-distill adapter for --variant dedistill (or --baselines with dedistill)",
                     f"--variant {cfg.variant}")
        folder = Path(cfg.dedistill_adapter)
        harness.check((folder / ADAPTER_A).is_file() and (folder / "metrics.json").is_file(), "dedistill_adapter",
                     f"a finished `--variant dedistill-adapter` run folder (with {ADAPTER_A} and metrics.json)",
                     cfg.dedistill_adapter)


def eval_split(cfg: Config) -> str:
    """Which data split the samples are scored against: the target for transfer, the base data for rewards."""
    if cfg.variant in ("online", "dedistill-adapter") or (cfg.variant == "offline" and (
            cfg.pairs or cfg.offline_pairs == "preference")):
        return "base"
    return "target"


def _rows(cond) -> int:
    return len(next(iter(cond.values()))) if isinstance(cond, dict) else len(cond)


def draw(den, kernel, world, cond, times, seed, frozen=False):
    """Samples on `times` from fixed seeds (the same for every model compared), world.decode_batch rows per call."""
    noise = torch.randn(_rows(cond), *world.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(world.accelerator.device)
    with den.frozen() if frozen else torch.no_grad():
        return common.sample_in_chunks(den, kernel, noise, cond, times, world.decode_batch, seed=seed + 1)


def customize_images(s: Setup):
    """App. B.3's fixed inputs, drawn once and deterministic in the seed (a resumed run rebuilds the same ones): a
    few concept images, and references sampled from the frozen model with the class condition. -> setup NFE."""
    cfg, dev = s.cfg, s.device
    g = torch.Generator().manual_seed(cfg.seed + 1)
    concept, concept_cond, class_cond = s.world.concept_images(cfg.concept_images, g)
    s.concept = (concept.to(dev), common.cond_to(concept_cond, dev))
    ref_cond = common.cond_to(common.cond_repeat(common.cond_index(class_cond, slice(0, 1)), cfg.reference_images), dev)
    s.references = draw(s.net, s.kernel, s.world, ref_cond, s.net.timesteps, cfg.seed + 2, frozen=True)
    return s.net.nfe(1)


ADAPTER_A = "dedistill_adapter.safetensors"  # a dedistill-adapter run's A (adapter_state), apart from adapter/


def dedistill_adapter(cfg: Config, world, path: Path) -> tuple[dict, dict]:
    """The de-distill adapter A that --variant dedistill merges: from --dedistill-adapter RUN, or trained first into
    <path>/dedistill-adapter (the run's settings with --adapter-steps and --adapter-lr). -> (A's adapter_state, its
    cost: updates, NFE per update, NFE in all (one sample at one timestep = 1), training seconds)."""
    from safetensors.torch import load_file

    folder = Path(cfg.dedistill_adapter) if cfg.dedistill_adapter else path / "dedistill-adapter"
    if not cfg.dedistill_adapter:
        train(dataclasses.replace(cfg, variant="dedistill-adapter", steps=cfg.adapter_steps, lr=cfg.adapter_lr,
                                  out=str(folder), baselines="", naive_baseline=False), world, quiet=True)
    saved = harness.read_json(folder / "config.json", "dedistill-adapter run config")
    harness.check(saved.get("variant") == "dedistill-adapter" and saved.get("model") == cfg.model, "dedistill_adapter",
                  f"a --variant dedistill-adapter run of --model {cfg.model}",
                  f"{folder}: --variant {saved.get('variant')} --model {saved.get('model')}")
    m = harness.read_json(folder / "metrics.json", "dedistill-adapter metrics")
    rows = saved["batch"] * saved["gradient_accumulation_steps"] * m["updates"]
    cost = {"adapter_updates": m["updates"], "adapter_nfe_per_update": m["nfe_per_update"],
            "adapter_nfe": rows * m["nfe_per_update"], "adapter_seconds": m["seconds_train"],
            "adapter_run": str(folder)}
    return load_file(str(folder / ADAPTER_A)), cost


def train(cfg: Config, world=None, baselines=None, quiet=False):
    """One run of cfg.variant: fine-tune, evaluate, write the run folder (docs/design.md section 9). `world`: an already
    loaded world (default harness.load_world(cfg.model)); `baselines`: {name: (metrics, denoiser)} of baseline runs
    with the same settings (see `experiment`), whose samples and metrics join this run's; `quiet`: print no tables
    (a baseline's run). Returns (metrics, the delivered denoiser: the student with the trained adapter)."""
    validate(cfg)
    timer = harness.Timer()
    run = harness.Run("pso", cfg, free=FREE)  # folder and resume checks; writes nothing
    world = world or harness.load_world(cfg.model)
    cfg = run.configure(world)  # the backend's defaults for options not given; the same-experiment rule
    validate(cfg)
    beta = cfg.beta or PAPER_BETA[cfg.variant]
    acc = world.accelerator
    adapter_a, adapter_cost = dedistill_adapter(cfg, world, run.path) if cfg.variant == "dedistill" else (None, {})
    common.seed_everything(cfg.seed)  # LoRA's A matrices are drawn from the global generator
    # the delivered model: the student with the trained adapter, evaluated and saved
    student = world.denoiser("student", lora_rank=cfg.lora_rank, train_full=cfg.train_full, sampler=cfg.sampler or None)
    role = TRAINED_ROLE.get(cfg.variant, "student")
    den = student  # the trained model: the student itself, except for the two practices that train elsewhere
    if cfg.variant in ("base-transfer", "dedistill"):  # base transfer: the base (teacher role); dedistill: the
        # student with A merged into its weights, the LoRA (B) over it
        den = world.denoiser(role, lora_rank=cfg.lora_rank, merged_adapter=adapter_a)

    def deliver():  # the trained LoRA into the student (base-transfer's from the base, dedistill's B without A)
        if den is not student:
            student.load_adapter_state(den.adapter_state())
        return student

    kernel = common.make_kernel(student.sampler, world.schedule)  # the backend's sampler decides the MDP (Eq. 4 / 14)
    grid = common.few_step_timesteps(cfg.train_steps) if cfg.train_steps else list(student.timesteps)
    harness.check(len(grid) >= 2 or cfg.variant in PLAIN_LOSS, "train_steps",
                 f">= 2 training steps (one stochastic transition; the model samples in {len(grid)})", cfg.train_steps)
    params = den.trainable_parameters()
    opt = acc.prepare(torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    start = run.start(world, {role: den}, {role: opt})
    s = Setup(cfg, world, CountingDenoiser(den), kernel, grid, beta)
    setup_nfe = customize_images(s) if cfg.variant == "customize" else 0.0
    dev, split = acc.device, eval_split(cfg)
    eval_cond = common.cond_to(world.eval_conditions(cfg.eval_samples) if cfg.variant != "customize" else
                               common.cond_repeat(common.cond_index(s.concept[1], slice(0, 1)), cfg.eval_samples), dev)
    quick_cond = common.cond_index(eval_cond, slice(0, 256))

    update, accumulation, train_seconds = UPDATES[cfg.variant], cfg.gradient_accumulation_steps, 0.0
    for step in run.updates():
        tick = harness.Timer()
        s.net.rows, losses, infos = 0, [], []
        for micro in range(accumulation):
            # update k (from 1) draws the stream that index k - 1 drew before the harness: results stay the same
            gen = common.step_generator(cfg.seed, step - 1, acc.process_index, micro=micro)
            with run.accumulate():
                with acc.autocast():
                    loss, info = update(s, gen)
                run.check_finite(loss, step)
                run.optimizer_step(loss, opt, params, cfg.grad_clip)
            losses.append(float(loss.detach()))
            infos.append(info)
        seconds = tick()
        train_seconds += seconds
        info = {k: sum(i[k] for i in infos) / len(infos) for k in infos[0]}
        row = {"step": step, "loss": sum(losses) / len(losses), "reward": info.get("reward", ""),
               "nfe": s.net.nfe(cfg.batch * accumulation), "seconds": seconds,
               **{k: info.get(k, "") for k in ("margin", "accuracy", "log_ratio_target", "log_ratio_reference",
                                               "prior")}, "eval_reward": "", "eval_quality": ""}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            m = world.metrics(draw(deliver(), kernel, world, quick_cond, student.timesteps, cfg.seed + 3), quick_cond,
                              split)
            row.update(eval_reward=m["reward"], eval_quality=m["quality"])
            if row["reward"] == "":
                row["reward"] = m["reward"]
        run.log(row)  # log.csv, trackers, progress bar; a checkpoint when due

    # ---- evaluation on the student: base vs tuned (and the baselines) from the same seeds, at the model's own grid
    # and at one step
    tuned, times = deliver(), student.timesteps
    seed = cfg.seed + 10_000
    one_step = common.few_step_timesteps(1)
    x_base = draw(tuned, kernel, world, eval_cond, times, seed, frozen=True)
    x_tuned = draw(tuned, kernel, world, eval_cond, times, seed)
    metrics = {"variant": cfg.variant, "model": cfg.model, "sampler": tuned.sampler, "eval_split": split,
               "trained_role": role, "beta": beta, "updates": cfg.steps, "train_grid": grid, "sample_grid": list(times),
               "nfe_per_update": nfe_per_update(cfg, len(grid), len(times)), "setup_nfe": setup_nfe,
               "eval_samples": cfg.eval_samples, **adapter_cost}
    for name, x in (("base", x_base), ("tuned", x_tuned)):
        metrics.update({f"{k}_{name}": v for k, v in world.metrics(x, eval_cond, split).items()})
    x1_tuned = draw(tuned, kernel, world, eval_cond, one_step, seed)
    for name, x1 in (("base", draw(tuned, kernel, world, eval_cond, one_step, seed, frozen=True)), ("tuned", x1_tuned)):
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
        panels["concept images"] = s.concept
    steps = f"{len(times)} steps"
    panels[f"base, {steps}"] = (x_base, eval_cond)
    for name, (base_metrics, base_den) in (baselines or {}).items():  # a baseline scored the same seeds: its
        # "_tuned" metrics are this run's "_<name>"
        metrics.update({k.replace("_tuned", f"_{name}"): v for k, v in base_metrics.items() if "_tuned" in k})
        metrics[f"seconds_{name}"] = base_metrics["seconds"]
        metrics[f"nfe_per_update_{name}"] = base_metrics["nfe_per_update"]
        metrics.update({f"{k}_{name}": v for k, v in base_metrics.items() if k.startswith("adapter_")})
        panels[f"{name}, {steps}"] = (draw(base_den, kernel, world, eval_cond, times, seed), eval_cond)
    panels[f"{cfg.variant}, {steps}"] = (x_tuned, eval_cond)
    for name, (_, base_den) in (baselines or {}).items():
        panels[f"{name}, 1 step"] = (draw(base_den, kernel, world, eval_cond, one_step, seed), eval_cond)
    panels[f"{cfg.variant}, 1 step"] = (x1_tuned, eval_cond)
    metrics.update(seconds_train=train_seconds, seconds=timer(),
                   seconds_per_update=train_seconds / max(1, cfg.steps - start))
    curves = [("loss", "loss"), ("margin", "margin: sum_n r^target_n - r^reference_n"),
              ("eval_reward", "reward (eval)"), ("eval_quality", "quality (eval)")]
    names = {"base": "base", **{b: b for b in baselines or {}}, "tuned": cfg.variant}
    run.finish(metrics, panels, [c for c in curves if cfg.variant not in PLAIN_LOSS or c[0] != "margin"],
               adapter=tuned, names=names, quiet=quiet,
               marks="target" if split == "target" else "reward")
    if cfg.variant == "dedistill-adapter" and run.main:  # A, kept apart: --dedistill-adapter merges it from here
        from safetensors.torch import save_file

        save_file(den.adapter_state(), str(run.path / ADAPTER_A))
    table = readouts(metrics)
    if table and run.main and not quiet:
        print(table)
    return metrics, tuned


SUMMARY_COLUMNS = ("reward", "quality", "distance")  # what harness.summary prints; the rest are the world's read-outs


def readouts(metrics: dict) -> str:
    """The world's further read-outs (toy2d: transfer and sharpness, the Fig. 1 contrast) as one table: a row per
    model (base, naive, the tuned variant), a column per read-out at the model's grid and at one step. '' when the
    world has none beyond reward / quality / distance."""
    models = [m for m in ("base", *BASELINES, "tuned") if f"reward_{m}" in metrics]
    names = [k[: -len("_base")] for k in metrics if k.endswith("_base") and k[: -len("_base")] not in SUMMARY_COLUMNS
             and isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool)]
    if not names:
        return ""
    steps = len(metrics.get("sample_grid", [])) or "grid"
    cols = [(f"{n}_{{}}{s}", f"{n} ({label})") for s, label in (("", f"{steps} steps"), ("_1step", "1 step"))
            for n in names]
    width = max(len(c[1]) for c in cols) + 2
    lines = [f"{'model':16s}" + "".join(f"{c[1]:>{width}s}" for c in cols)]
    for m in models:
        cells = [metrics.get(key.format(m)) for key, _ in cols]
        lines.append(f"{(metrics['variant'] if m == 'tuned' else m):16s}" + "".join(
            f"{v:{width}.4f}" if isinstance(v, (int, float)) else f"{'-':>{width}s}" for v in cells))
    return "\n".join(lines)


def baseline_names(cfg: Config) -> list[str]:
    """The baselines `experiment` trains before a target-data variant (pso, offline --offline-pairs target): naive
    unless --no-naive-baseline, and those of --baselines (all = every one of BASELINES), in BASELINES' order."""
    if cfg.variant not in ("pso", "offline") or eval_split(cfg) != "target":
        return []
    chosen = {b.strip() for b in cfg.baselines.split(",") if b.strip()}
    chosen = set(BASELINES) if "all" in chosen else chosen
    chosen = chosen | {"naive"} if cfg.naive_baseline else chosen - {"naive"}
    return [b for b in BASELINES if b in chosen]


def experiment(cfg: Config, world=None) -> dict:
    """`python pso.py`: for the target-data variants first the baselines (`baseline_names`) with the same resolved
    settings and budget into <out>/<baseline>, then cfg.variant, whose metrics, summary table and samples include
    the baselines'. Returns the metrics."""
    validate(cfg)
    names, baselines = baseline_names(cfg), {}
    if names:
        run = harness.Run("pso", cfg, free=FREE)  # the main run's folder and resume checks come first (write nothing)
        world = world or harness.load_world(cfg.model)
        cfg = run.configure(world)  # resolved once: the main run below finds nothing left to fill in
        for name in names:
            sub = dataclasses.replace(cfg, variant=name, out=str(run.path / name), naive_baseline=False, baselines="",
                                      one_timestep=False, one_timestep_from="grid")
            baselines[name] = train(sub, world, quiet=True)
    return train(cfg, world, baselines)[0]


def nfe_per_update(cfg: Config, S: int, model_steps: int) -> int:
    """The docstring's NFE table (per pair, per micro-batch; S = training grid, model_steps = the model's own grid);
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
    if cfg.variant == "dedistill-adapter":
        return S + model_steps
    return S


def main(argv=None) -> dict:
    cfg = harness.parse_config(Config, argv, description=__doc__.split("\n\n")[0])
    return experiment(cfg)


if __name__ == "__main__":
    harness.run_cli(main)
