"""Diffusion-Sharpening: fine-tuning a multi-step diffusion model on its best denoising trajectories.

Paper: Y. Tian et al., "Diffusion-Sharpening: Fine-tuning Diffusion Models with Denoising Trajectory
Sharpening", arXiv 2502.12146 (2025); official code: github.com/Gen-Verse/Diffusion-Sharpening.
The equations used here, with the paper's numbers, are written out in docs/design.md section 5.
Measured results: docs/sharpening.md (made by benchmarks/sharpening.py).

    python sharpening.py                               # SFT sharpening on toy2d
    python sharpening.py --variant rlhf                # RLHF sharpening on toy2d
    python sharpening.py --variant sft --n 1 --m 1     # baseline: standard fine-tuning
    python sharpening.py --variant sft --choose random # control: a random candidate instead of the best
    python sharpening.py --variant rlhf --n 2 --m 1    # baseline: Diffusion-DPO
    python sharpening.py --model mnist --variant rlhf --steps 100 --batch 16   # real MNIST digits

What is implemented. A multi-step eps-model (the world's "teacher": DDIM on a K = 25-step trailing grid
t_1 > ... > t_K) is rolled out from a start time t = t_i on that grid: for each condition c, n candidate
noises eps^1..eps^n give x^j_t = alpha_t x_0 + sigma_t eps^j, and each candidate is carried m - 1 DDIM steps
down the grid with the current model, visiting the m states x^j_{t_i}, ..., x^j_{t_{i+m-1}}. Every state is
scored by the reward of its one-step estimate x0_hat(x_{t_k}) = (x_{t_k} - sigma eps_theta) / alpha, the
trajectory by the sum of its m scores (Eq. 8), and the best trajectory (and, for RLHF, the worst) is chosen per
condition. Then
  * --variant sft  (Alg. 1): (x_0, c) are data pairs; the loss (Eq. 9) is the eps-MSE of the chosen trajectory's
    m states against its own noise eps^best. --choose random / worst are controls (not in the paper): all n
    candidates re-noise the same x_0, so their score differences are the model's own denoising errors, and the
    argmax picks the candidate whose error points up the reward; Eq. 9 then removes exactly that error (a
    winner's curse). The controls separate that selection effect from the m-state loss.
  * --variant rlhf (Alg. 2): only conditions; the candidates are n samples x^j_0 of the current model per
    condition (no grad, K DDIM steps), re-noised to t with one eps shared by the n samples (--same-noise); the
    loss (Eq. 11) is Diffusion-DPO between the best (w) and worst (l) trajectory on the same m states for policy
    and reference, with the reward gap read one of three ways (--reward-gap, below).

Equation -> code
  Eq. 6   state score R(x0_hat(x_{t_k}), c)           sharpening_rollout (the one-step Tweedie estimate)
  Eq. 8   trajectory score sum_k R, argmax per c     trajectory_scores, choose, choose_best_worst
  Eq. 9   SFT loss sum_k ||eps_theta - eps^best||^2   sft_loss (called by sft_update)
  Eq. 10  M(x) = sum_k ||eps(x_{t_k}) - eps^x||^2     trajectory_mse (--m-reduce mean divides by m)
  Eq. 11  -log sigma(beta [(M_ref(w) - M_theta(w)) - (M_ref(l) - M_theta(l))] - (R_w - R_l))   rlhf_loss
          (called by rlhf_update)
  Alg. 1 / Alg. 2                                    candidates -> sharpening_rollout -> sft/rlhf_update, in train

Eq. 11's reward gap (--reward-gap; R_w - R_l is the per-state mean score difference times --reward-gap-scale):
  inside         (default; the paper's text, "reward-modulated DPO", Gao et al. 2024): -log sigma(beta D - gap).
                 The gap is a per-pair margin: a pair with a larger reward gap needs a larger implicit-reward
                 margin beta D before its loss saturates, so it keeps more gradient weight sigma(gap - beta D).
                 It changes the gradient. Scale: D = 0 at the start, so the first weights are sigma(gap); the gap
                 is in reward units and is used per state (the official code's mean score), not summed over m,
                 so it does not grow with m; --reward-gap-scale rescales it for a reward of another range.
  outside-minus  -log sigma(beta D) - gap: the gap of detached samples does not depend on theta, so it shifts the
                 logged loss and leaves the gradient as plain DPO's.
  outside-plus   -log sigma(beta D) + gap: the official RLHF script's form; same gradient as outside-minus.
  (D = (M_ref(w) - M_theta(w)) - (M_ref(l) - M_theta(l)); log.csv's `margin` is beta D.)

NFEs per update (network evaluations per condition; K = sampler grid length = 25 on the toys):
  sft     n*m                  paper n = m = 3: 9.   The roll-out's predictions carry autograd, so the loss
                               reuses them: the chosen trajectory's m predictions are not evaluated again.
  rlhf    n*K + n*m + 2m       paper n = m = 3: 75 + 9 + 6 = 90. n samples of K steps, the scored roll-outs
                               (with autograd, reused by the policy side of Eq. 11), and the frozen reference at
                               the winner's and loser's m states.
  --recompute adds m (sft) / 2m (rlhf): the roll-outs then run without autograd and only the chosen
  trajectories are evaluated again with it (activation memory for B or 2B rows instead of n*B; for SDXL).
  These are the minimum: every state must be predicted once to be scored, and the reference once per state
  it is compared at. log.csv's `nfe` column is counted by the code (CountingDenoiser), not assumed; with
  --gradient-accumulation-steps G it is per condition of one micro-batch (the same number).

Where this differs from the paper or the official code, and why
  1. Best/worst per condition. The official scripts take one argmax over the pooled batch (all prompts and
     candidates) and train on that single trajectory; Alg. 1/2 choose per prompt, and pooling mixes reward
     scales of different prompts. We choose per condition (choose, choose_best_worst; tested).
  2. Start time on the sampler grid. The official code draws t uniformly in [0, T) and steps by T/K; we draw
     the start index on the K-step grid so every state is one the sampler visits (--start-t fixes it).
     One start time per (micro-)batch, shared by its rows (as the official code does when it runs on several GPUs).
  3. Same m states for policy and reference. The official RLHF script takes the reference MSE at the first
     state only but the policy MSE over m states; Eq. 11 compares the same quantity, so both use all m.
  4. M over the m states: --m-reduce mean (default, the official code) averages, so beta means the same for every
     m and the m-ablation does not also scale the effective beta by m; --m-reduce sum is Eq. 9-10 as printed.
     The trajectory score for the choice is the sum (Eq. 8); the official code averages (the same argmax).
  5. Eq. 11's reward gap: the paper's text puts it inside log sigma, the official code outside with a + sign;
     both are offered (--reward-gap), with the paper's as the default.
  6. States are detached between steps (no back-propagation through the roll-out, as Alg. 1 trains each
     state's denoising loss); the official SFT script keeps the graph through the DDIM steps.
  7. n > 1 works: the official SFT script crashes in diffusers' DDIMScheduler.step with a per-row timestep
     tensor; here a step is common.DDIM with one time per batch.
  8. RLHF candidates: the official script samples n images per prompt and re-noises each with the very noise
     that generated it. We sample n per condition too (docs/design.md's "generate x_0" read per candidate: with one
     shared x_0 the candidates differ only by noise and Eq. 11 has no reward signal about samples), and re-noise
     them with one eps shared within the condition (--same-noise, Diffusion-DPO's pairing of winner and loser):
     the ranking then reflects the samples, not the noise, and the pair difference has less variance.
     --no-same-noise draws one eps per sample (docs/sharpening.md has the measurement).
  9. LoRA (rank 16) by default, full fine-tuning with --full-finetune (the official code trains the full UNet).
  10. The paper's Eq. 6 writes the state score with an ODE solve to x_0; like the official code we use the
     one-step estimate (it costs no extra NFE).
  11. Toy scaling (paper: SDXL, batch 8, lr 5e-6, beta 2500 on per-pixel means): batch 64 conditions, lr 1e-3
     for the LoRA of a small MLP, beta 100 (a toy choice), 300 updates.
  12. SFT data: the toy data sets hold what the base model already produces, so SFT on them changes nothing;
     --data-top keeps the top fraction of each drawn data batch by reward (a reward-curated set, the role
     JourneyDB plays in the paper). --data-top 1 is plain data (use it for a curated data set of your own).
  13. --target x0 (off by default, not in the paper): regress state k on the eps that takes it back to x_0
     instead of the candidate's eps, which below the start no longer points from the state to x_0.
  14. --choose random / worst are controls, not in the paper (SFT: train on a random / the worst candidate; RLHF:
     the winner-loser pair in a random order / swapped). The gradient clip (--max-grad-norm 1) is this
     project's choice; 0 turns it off.

Outputs (docs/design.md section 9, harness.Run): runs/sharpening-<variant>-<model>/ config.json, log.csv (step, loss,
reward, nfe, seconds, ...), metrics.json, samples.png (base vs tuned, same seeds), curves.png, adapter/,
checkpoint-<step>/.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

import common
import harness


@dataclasses.dataclass
class Config(harness.RunConfig):
    model: str = harness.arg("toy2d", "toy world: toy2d | flow2d | mnist (options after a colon, e.g. "
                             "toy2d:reward=height), or a model spec / diffusers checkpoint for the full backend")
    variant: str = harness.arg("sft", "sft = Alg. 1 (data pairs), rlhf = Alg. 2 (prompts only)",
                              choices=["sft", "rlhf"])
    n: int = harness.arg(3, "candidate noises per condition (paper Table 2: 3); sft n=1 with m=1 is standard "
                           "fine-tuning; rlhf needs n >= 2 (n=2, m=1 is Diffusion-DPO)")
    m: int = harness.arg(3, "states per trajectory, i.e. m-1 DDIM steps (paper Table 3: 3)")
    choose: str = harness.arg("best", "sft: which candidate of each condition Eq. 9 trains on: best (Alg. 1), or the "
                                     "controls random / worst (not in the paper; the winner's-curse check); rlhf: "
                                     "best = Alg. 2's winner best, loser worst; worst = the pair swapped; random = "
                                     "the pair in a random order per condition (controls)",
                             choices=["best", "random", "worst"])
    start_t: int = harness.arg(-1, "start time of the roll-outs, a time on the sampler grid; -1 draws a grid "
                                  "time with m-1 grid times below it, uniformly, each update")
    eta: float = harness.arg(0.0, "DDIM eta of the roll-outs and of RLHF's samples (0: deterministic, diffusers' "
                                 "default)")
    same_noise: bool = harness.arg(True, "rlhf: re-noise the n samples of a condition with one shared eps (the "
                                         "Diffusion-DPO pairing) instead of one eps each")
    target: str = harness.arg("noise", "what the m states regress on: noise = the candidate's eps at every state "
                                      "(Eq. 9-10, official code); x0 = the eps that maps each state back to x_0 "
                                      "(not in the paper; see docs)", choices=["noise", "x0"])
    beta: float = harness.arg(100.0, "DPO beta of Eq. 11 (official 2500 on SDXL per-pixel means; toy 100)")
    reward_gap: str = harness.arg("inside", "rlhf: Eq. 11's reward gap: inside log sigma as a per-pair margin (the "
                                           "paper's text), outside-minus (shifts the logged loss only), "
                                           "outside-plus (the official code; shifts the logged loss only)",
                                 choices=["inside", "outside-minus", "outside-plus"])
    reward_gap_scale: float = harness.arg(1.0, "rlhf: factor on the reward gap R_w - R_l (per-state mean score)")
    m_reduce: str = harness.arg("mean", "how Eq. 9-10 combine the m states: mean (official code; beta and the loss "
                                       "scale do not change with m) or sum (as printed)", choices=["mean", "sum"])
    reduce: str = harness.arg("mean", "eps-MSE over dimensions: mean (diffusers / official) or sum",
                             choices=["mean", "sum"])
    data_top: float = harness.arg(0.5, "sft: keep this top fraction of each drawn data batch by reward "
                                      "(1 = the data as is)")
    batch: int = harness.arg(64, "conditions per update (per micro-batch; paper 8 on SDXL; toy 64)")
    steps: int = harness.arg(300, "updates")
    lr: float = harness.arg(1e-3, "AdamW learning rate (paper 5e-6 full UNet on SDXL; toy LoRA 1e-3)")
    adam_beta1: float = harness.arg(0.0, "AdamW beta1 (paper App. A.3: 0)")
    adam_beta2: float = harness.arg(0.99, "AdamW beta2 (paper App. A.3: 0.99)")
    weight_decay: float = harness.arg(0.0, "AdamW weight decay")
    max_grad_norm: float = harness.arg(1.0, "gradient clipping (0: off)")
    lora_rank: int = harness.arg(16, "LoRA rank")
    full_finetune: bool = harness.arg(False, "train every weight instead of a LoRA (the official code's choice)")
    recompute: bool = harness.arg(False, "roll out without autograd and re-evaluate the chosen trajectories "
                                        "with it: +m (sft) / +2m (rlhf) NFEs, activation memory for B / 2B rows "
                                        "instead of n*B")
    eval_every: int = harness.arg(10, "updates between fixed-seed reward evaluations (the reward curve)")
    eval_samples: int = harness.arg(256, "samples per curve evaluation")
    final_samples: int = harness.arg(1000, "samples for the base vs tuned metrics")
    eval_cfg: float = harness.arg(1.0, "classifier-free guidance of evaluation samples (paper: 5 on SDXL)")


# options a resumed run may change: they do not change what the updates compute
FREE = ("eval_every", "eval_samples", "final_samples")


def validate(cfg: Config) -> None:
    """Every option, named by its flag; raises harness.ConfigError before anything is written."""
    harness.check_choice(cfg, "variant", ["sft", "rlhf"])
    harness.check_range(cfg, "n", 2 if cfg.variant == "rlhf" else 1)  # rlhf: a winner and a loser per condition
    harness.check_range(cfg, "m", 1)
    harness.check_choice(cfg, "choose", ["best", "random", "worst"])
    harness.check_range(cfg, "start_t", -1, common.T - 1)
    harness.check_range(cfg, "eta", 0)
    harness.check_choice(cfg, "target", ["noise", "x0"])
    harness.check_range(cfg, "beta", 0, lo_open=True)
    harness.check_choice(cfg, "reward_gap", ["inside", "outside-minus", "outside-plus"])
    harness.check_range(cfg, "reward_gap_scale", 0)
    harness.check_choice(cfg, "m_reduce", ["mean", "sum"])
    harness.check_choice(cfg, "reduce", ["mean", "sum"])
    harness.check_range(cfg, "data_top", 0, 1, lo_open=True)
    for name in ("batch", "steps", "eval_every", "eval_samples", "final_samples", "lora_rank"):
        harness.check_range(cfg, name, 1)
    harness.check_range(cfg, "lr", 0, 1, lo_open=True)
    harness.check_range(cfg, "adam_beta1", 0, 1, hi_open=True)
    harness.check_range(cfg, "adam_beta2", 0, 1, hi_open=True)
    harness.check_range(cfg, "weight_decay", 0)
    harness.check_range(cfg, "max_grad_norm", 0)
    harness.check_range(cfg, "eval_cfg", 0)


# ---------------------------------------------------------------------------------------------------
# Roll-outs, scores and choices (Eq. 6, 8)
# ---------------------------------------------------------------------------------------------------
CountingDenoiser = common.CountingDenoiser  # counts rows evaluated, so log.csv's NFEs are measured


def sharpening_rollout(denoiser, kernel, x_t, cond, times, reward, generator, grad=True):
    """m-state roll-out from x_t at times[0] through times[1:] (m = len(times), m - 1 kernel steps).

    Returns (states, eps_pred, rewards): states[k] the (detached) state at times[k], eps_pred[k] the prediction
    there (carrying autograd when `grad`), rewards [m, R] the score of each state (Eq. 6)."""
    x, states, eps_pred, rewards = x_t, [], [], []
    for k, t in enumerate(times):
        with torch.set_grad_enabled(grad):
            eps = denoiser(x, t, cond)
        with torch.no_grad():
            # Eq. 6 with the one-step estimate: x0_hat = (x_t - sigma_t eps_theta(x_t)) / alpha_t
            x0_hat = kernel.x0(x, eps, t)
            rewards.append(reward(x0_hat, cond).float())
            states.append(x)
            eps_pred.append(eps)
            if k + 1 < len(times):
                mean, std = kernel.step(x, eps.detach(), t, times[k + 1])
                x = mean + std * torch.randn(x.shape, generator=generator).to(x.device)
    return states, eps_pred, torch.stack(rewards)


def trajectory_scores(rewards: torch.Tensor) -> torch.Tensor:
    """Eq. 8: the score of a trajectory is the sum of its states' rewards. rewards [m, R] -> [R]."""
    return rewards.sum(0)


def choose(scores: torch.Tensor, n: int, how: str = "best", generator: torch.Generator | None = None) -> torch.Tensor:
    """Rows are condition-major (the n candidates of one condition adjacent, as common.cond_repeat lays them).
    -> row indices [B], one per condition: its argmax (Alg. 1/2), argmin, or a uniformly random candidate."""
    s = scores.view(-1, n)  # [B, n]
    first = torch.arange(s.shape[0], device=scores.device) * n
    if how == "best":
        return first + s.argmax(1)
    if how == "worst":
        return first + s.argmin(1)
    if how == "random":
        return first + torch.randint(n, (s.shape[0],), generator=generator).to(scores.device)
    raise ValueError(f"choose: expected best, worst or random, got {how!r}")


def choose_best_worst(scores: torch.Tensor, n: int, how: str = "best",
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best and the worst candidate of each condition (Alg. 2's winner and loser), row indices [B] each.
    Controls (not in the paper): how="worst" swaps them (the preference reversed), "random" orders each condition's
    pair by a coin (no preference)."""
    best, worst = choose(scores, n, "best"), choose(scores, n, "worst")
    if how == "best":
        return best, worst
    swap = torch.ones_like(best, dtype=torch.bool) if how == "worst" else \
        (torch.rand(best.shape, generator=generator) < 0.5).to(best.device)
    return torch.where(swap, worst, best), torch.where(swap, best, worst)


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------
def eps_targets(sched, states: list[torch.Tensor], times: list[int], x0: torch.Tensor, eps: torch.Tensor,
                target: str = "noise") -> list[torch.Tensor]:
    """What each of a trajectory's m states is regressed on. "noise": the candidate's eps at every state (Eq. 9,
    10 and the official code). "x0" (not in the paper): eps_k = (x_{t_k} - alpha_k x_0) / sigma_k, the noise that
    takes state k back to the trajectory's x_0; the same at k = 0, different below, where the DDIM step moved the
    state off the line from x_0 along eps. Returned as what the network predicts (sched.pred_target: eps itself,
    or the velocity eps - x_0 in a flow world)."""
    if target == "noise":
        return [sched.pred_target(x0, eps, t) for t in times]
    return [sched.pred_target(x0, common.eps_from_x0(sched, s, x0, t), t) for s, t in zip(states, times)]


def trajectory_mse(eps_pred: list[torch.Tensor], target, reduce: str = "mean", m_reduce: str = "sum") -> torch.Tensor:
    """Eq. 10: M = sum_k ||eps_pred(x_{t_k}) - eps_k||^2 over a trajectory's m states, per row -> [B]; m_reduce
    "mean" divides by m (the official code). `target` is one eps for every state (the paper) or a list of m."""
    target = target if isinstance(target, (list, tuple)) else [target] * len(eps_pred)
    mse = sum(common.reduce_dims((e.float() - g.float()) ** 2, reduce) for e, g in zip(eps_pred, target))
    return mse / len(eps_pred) if m_reduce == "mean" else mse


def sft_loss(eps_pred_best: list[torch.Tensor], eps_best, reduce: str = "mean", m_reduce: str = "sum"):
    """Eq. 9: L_SFT = E_c sum_k ||eps_theta(x^best_{t_k}, t_k, c) - eps^best||^2 (m_reduce "mean": / m)."""
    return trajectory_mse(eps_pred_best, eps_best, reduce, m_reduce).mean()


def rlhf_loss(mse_w, mse_l, mse_ref_w, mse_ref_l, reward_gap, beta: float, where: str = "inside"):
    """Eq. 11 -> (loss, margin). mse_* are Eq. 10's M per row; reward_gap = R_w - R_l per row (detached here);
    margin = beta [(M_ref(w) - M_theta(w)) - (M_ref(l) - M_theta(l))], Diffusion-DPO's implicit reward margin."""
    margin = beta * ((mse_ref_w - mse_ref_l) - (mse_w - mse_l))
    gap = reward_gap.detach()  # rewards of sampled, detached states: no gradient w.r.t. theta in any reading
    if where == "inside":  # the paper's text: the reward gap is a per-pair margin inside log sigma
        return -F.logsigmoid(margin - gap).mean(), margin
    dpo = -F.logsigmoid(margin)
    if where == "outside-minus":  # a constant w.r.t. theta: shifts the value, not the gradient
        return (dpo - gap).mean(), margin
    if where == "outside-plus":  # the official RLHF script's sign; the same gradient as outside-minus
        return (dpo + gap).mean(), margin
    raise ValueError(f"rlhf_loss: expected where = inside, outside-minus or outside-plus, got {where!r}")


# ---------------------------------------------------------------------------------------------------
# One update of each variant: candidates, roll-out, choice, loss
# ---------------------------------------------------------------------------------------------------
def rollout_times(grid: list[int], m: int, start_t: int) -> list[int]:
    """Grid times a start time may take: those with m - 1 grid times below. Raises ConfigError on bad input."""
    harness.check(m <= len(grid), "m", f"at most the sampler grid's {len(grid)} times ({grid[0]}..{grid[-1]})", m)
    if start_t == -1:
        return grid[: len(grid) - m + 1]
    harness.check(start_t in grid, "start_t", f"a time of the sampler grid {grid} or -1", start_t)
    left = len(grid) - 1 - grid.index(start_t)
    harness.check(m - 1 <= left, "m", f"at most {left + 1} states: only {left} grid times lie below --start-t "
                 f"{start_t} (lower --m or raise --start-t)", m)
    return [start_t]


def sft_data(world, cfg: Config, generator: torch.Generator):
    """(x_0, c) pairs; with --data-top q < 1 the top q of ceil(B/q) drawn pairs by reward (a curated set)."""
    x0, cond = world.data(math.ceil(cfg.batch / cfg.data_top), generator)
    if cfg.data_top < 1:
        with torch.no_grad():
            keep = world.reward(x0, cond).topk(cfg.batch).indices.sort().values
        x0, cond = x0[keep], common.cond_index(cond, keep)
    return x0, cond


def candidates(world, net, kernel, cfg: Config, grid, gen, device):
    """Alg. 1 / 2, the candidates: x^j_t = alpha_t x_0 + sigma_t eps^j, rows condition-major [B*n].
    -> (x0, cond, eps, x_t)."""
    B, n = cfg.batch, cfg.n
    if cfg.variant == "sft":  # Alg. 1: data pairs, every candidate re-noises the same x_0
        x0, cond = sft_data(world, cfg, gen)
        x0, cond = x0.repeat_interleave(n, 0), common.cond_repeat(cond, n)
    else:  # Alg. 2: n samples of the current model per condition (no grad)
        cond = common.cond_repeat(world.conditions(B, gen), n)
        z = torch.randn(B * n, *world.shape, generator=gen).to(device)
        x0 = common.sample(net, kernel, z, cond, grid, gen)
    x0 = x0.to(device)
    if cfg.variant == "rlhf" and cfg.same_noise:  # one eps per condition, shared by its n samples
        eps = torch.randn(B, *x0.shape[1:], generator=gen).to(device).repeat_interleave(n, 0)
    else:
        eps = torch.randn(x0.shape, generator=gen).to(device)
    return x0, cond, eps


def policy_eps(net, cfg: Config, rows, eps_pred, states, times, cond):
    """eps_theta at the chosen rows' m states: the roll-out's own predictions (they carry autograd), or, with
    --recompute, evaluated again with autograd (the roll-out ran without)."""
    if not cfg.recompute:
        return [e[rows] for e in eps_pred]
    return [net(s[rows], t, common.cond_index(cond, rows)) for s, t in zip(states, times)]


def sft_update(net, world, cfg: Config, roll, gen):
    """Eq. 9 on the chosen candidate of each condition (Alg. 1; --choose: the controls) -> (loss, logs)."""
    x0, cond, eps, states, eps_pred, rewards, scores, times = roll
    chosen = choose(scores, cfg.n, cfg.choose, gen)
    targets = eps_targets(world.schedule, [s[chosen] for s in states], times, x0[chosen], eps[chosen], cfg.target)
    loss = sft_loss(policy_eps(net, cfg, chosen, eps_pred, states, times, cond), targets, cfg.reduce, cfg.m_reduce)
    return loss, {"reward": float(rewards[:, chosen].mean()), "score_chosen": float(scores[chosen].mean())}


def rlhf_update(net, world, cfg: Config, roll, gen):
    """Eq. 11 between the best (w) and the worst (l) trajectory of each condition (Alg. 2) -> (loss, logs)."""
    x0, cond, eps, states, eps_pred, rewards, scores, times = roll
    B = cfg.batch
    best, worst = choose_best_worst(scores, cfg.n, cfg.choose, gen)  # --choose worst / random: the controls
    rows = torch.cat([best, worst])  # [2B]: winners, then losers
    eps_theta = policy_eps(net, cfg, rows, eps_pred, states, times, cond)
    with torch.no_grad(), net.frozen():  # the frozen reference at the same m states (2m NFEs)
        eps_ref = [net(s[rows], t, common.cond_index(cond, rows)) for s, t in zip(states, times)]
    targets = eps_targets(world.schedule, [s[rows] for s in states], times, x0[rows], eps[rows], cfg.target)
    mse = trajectory_mse(eps_theta, targets, cfg.reduce, cfg.m_reduce)  # Eq. 10, policy
    mse_ref = trajectory_mse(eps_ref, targets, cfg.reduce, cfg.m_reduce)  # Eq. 10, reference
    # R_w - R_l: per-state mean score (the official code's trajectory score), so the gap does not grow with m
    gap = cfg.reward_gap_scale * (rewards[:, best] - rewards[:, worst]).mean(0)
    loss, margin = rlhf_loss(mse[:B], mse[B:], mse_ref[:B], mse_ref[B:], gap, cfg.beta, cfg.reward_gap)  # Eq. 11
    margin = margin.detach()
    return loss, {"reward": float(world.reward(x0, cond).mean()),  # the current model's samples
                  "score_chosen": float(scores[best].mean()), "reward_gap": float(gap.mean()),
                  "dpo_loss": float(-F.logsigmoid(margin).mean()),  # Eq. 11 without the reward gap
                  "margin": float(margin.mean()), "accuracy": float((margin > 0).float().mean())}


UPDATES = {"sft": sft_update, "rlhf": rlhf_update}


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------
def nfe_per_update(cfg: Config, K: int) -> int:
    """The docstring's NFE count per condition and update (K = the sampler grid). log.csv's `nfe` column is the
    counted value; tests and benchmarks/report.py compare the two."""
    n, m, extra = cfg.n, cfg.m, cfg.m if cfg.recompute else 0
    if cfg.variant == "sft":
        return n * m + extra
    return n * K + n * m + 2 * m + 2 * extra


@torch.no_grad()
def evaluate(world, denoiser, kernel, grid, noise, cond, cfg_scale: float, split: str = "base"):
    """Deterministic DDIM samples on the full grid (same noise for base and tuned), in chunks of
    world.decode_batch rows, and the world's metrics."""
    null = world.null_condition(len(noise)) if cfg_scale != 1 else None
    x0 = common.sample_in_chunks(denoiser, kernel, noise, cond, grid, world.decode_batch, seed=0, null_cond=null,
                                 cfg_scale=cfg_scale)
    return x0, world.metrics(x0, cond, split)


# ---------------------------------------------------------------------------------------------------
# Training (Alg. 1 and Alg. 2)
# ---------------------------------------------------------------------------------------------------
def train(cfg: Config, world=None) -> dict:
    timer = harness.Timer()
    validate(cfg)
    run = harness.Run("sharpening", cfg, free=FREE)  # folder and resume checks; writes nothing
    common.seed_everything(cfg.seed)
    world = world or harness.load_world(cfg.model)
    cfg = run.configure(world)
    validate(cfg)  # the backend's defaults too
    acc = world.accelerator
    den = world.denoiser("teacher", lora_rank=cfg.lora_rank, train_full=cfg.full_finetune)
    grid = list(den.timesteps)  # the K-step DDIM grid, e.g. [999, 959, ..., 39]
    starts = rollout_times(grid, cfg.m, cfg.start_t)  # validates m against the grid before anything is written
    # the teacher's sampler with stochasticity eta: DDIM, or the flow SDE step in a flow world (eta 0 = the ODE)
    kernel = common.make_kernel(den.sampler, world.schedule, cfg.eta)
    eval_kernel = common.make_kernel(den.sampler, world.schedule, 0.0)
    net = CountingDenoiser(den)
    params = den.trainable_parameters()
    opt = acc.prepare(torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                        weight_decay=cfg.weight_decay))
    run.start(world, {"model": den}, {"model": opt})

    # fixed evaluation noise and conditions: base and tuned samples come from the same seeds
    eval_gen = torch.Generator().manual_seed(12_345)  # the same evaluation samples for every run and seed
    final_cond = world.eval_conditions(cfg.final_samples)
    final_noise = torch.randn(cfg.final_samples, *world.shape, generator=eval_gen)
    curve_cond = common.cond_index(final_cond, slice(0, cfg.eval_samples))
    curve_noise = final_noise[: cfg.eval_samples]
    with den.frozen():
        x_base, m_base = evaluate(world, den, eval_kernel, grid, final_noise, final_cond, cfg.eval_cfg)
    B, G, update = cfg.batch, cfg.gradient_accumulation_steps, UPDATES[cfg.variant]

    for step in run.updates():
        t0 = harness.Timer()
        net.rows, losses, logs, grad_norm = 0, [], [], None
        for micro in range(G):
            gen = common.step_generator(cfg.seed, step, acc.process_index, micro=micro)
            with run.accumulate():
                t_start = starts[int(torch.randint(len(starts), (1,), generator=gen))]
                times = grid[grid.index(t_start): grid.index(t_start) + cfg.m]  # t_i > t_{i+1} > ... (m grid times)
                x0, cond, eps = candidates(world, net, kernel, cfg, grid, gen, acc.device)
                x_t = common.add_noise(world.schedule, x0, eps, t_start)
                # roll out m states with the current model, score each (Eq. 6) and each trajectory (Eq. 8)
                states, eps_pred, rewards = sharpening_rollout(net, kernel, x_t, cond, times, world.reward, gen,
                                                               grad=not cfg.recompute)
                scores = trajectory_scores(rewards)
                try:
                    run.check_finite(scores, step)
                except harness.NonFiniteLoss as e:
                    raise harness.NonFiniteLoss(f"the reward returned non-finite scores: {e}") from None
                loss, row = update(net, world, cfg, (x0, cond, eps, states, eps_pred, rewards, scores, times), gen)
                run.check_finite(loss, step)
                norm = run.optimizer_step(loss, opt, params, cfg.max_grad_norm)
                grad_norm = norm if norm is not None else grad_norm
            losses.append(float(loss.detach()))
            logs.append({**row, "t_start": t_start})
        row = {k: sum(r[k] for r in logs) / G for k in logs[0]}  # means over the micro-batches
        row = {"step": step, "loss": sum(losses) / G, **row, "nfe": net.rows / (B * G), "seconds": t0(),
               "grad_norm": "" if grad_norm is None else grad_norm, "eval_reward": ""}  # every row, every column
        if (run.main or run.sharded) and (step % cfg.eval_every == 0 or step == cfg.steps):
            row["eval_reward"] = evaluate(world, den, eval_kernel, grid, curve_noise, curve_cond,
                                          cfg.eval_cfg)[1]["reward"]
        run.log(row)

    # ---- base vs tuned from the same seeds ----
    result = {}
    if run.main or run.sharded:  # under FSDP every rank takes part in each forward
        x_tuned, m_tuned = evaluate(world, den, eval_kernel, grid, final_noise, final_cond, cfg.eval_cfg)
    if run.main:
        log = run.read_log()
        result = {f"{k}_{which}": v for which, mm in (("base", m_base), ("tuned", m_tuned)) for k, v in mm.items()}
        result.update(steps=cfg.steps, nfe_per_update=nfe_per_update(cfg, len(grid)),
                      seconds_per_update=sum(float(r["seconds"]) for r in log) / max(len(log), 1),
                      seconds=timer())
        panels = {"base (25 DDIM steps)": (x_base, final_cond),
                  f"sharpening {cfg.variant}, n={cfg.n} m={cfg.m}": (x_tuned, final_cond)}
        curves = [("loss", "loss"), ("reward", "reward of the training trajectories / samples"),
                  ("eval_reward", "reward of fixed-seed samples")]
        run.finish(result, panels, curves, den, marks="reward")
    return result


def main(argv=None) -> dict:
    return train(harness.parse_config(Config, argv, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    harness.run_cli(main)
