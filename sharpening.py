"""Diffusion-Sharpening: fine-tuning a multi-step diffusion model on its best denoising trajectories.

Paper: Y. Tian et al., "Diffusion-Sharpening: Fine-tuning Diffusion Models with Denoising Trajectory
Sharpening", arXiv 2502.12146 (2025); official code: github.com/Gen-Verse/Diffusion-Sharpening.
The paper copy in shared/papers/ lost its equations; DESIGN.md section 5 restores the ones used here.

    python sharpening.py                               # SFT sharpening on toy2d (about 15 CPU s)
    python sharpening.py --variant rlhf                # RLHF sharpening on toy2d (about 30 CPU s)
    python sharpening.py --variant sft --n 1 --m 1     # baseline: standard fine-tuning
    python sharpening.py --variant rlhf --n 2 --m 1    # baseline: Diffusion-DPO
    python sharpening.py --model mnist --variant rlhf --steps 100 --batch 16   # real MNIST digits

Measured on the toys (docs/sharpening.md, benchmarks/sharpening.py): both variants raise the reward over the
base model, but at equal updates sharpening does not beat its baselines there; the docs say why.

What is implemented. A multi-step eps-model (the world's "teacher": DDIM on a K = 25-step trailing grid
t_1 > ... > t_K) is rolled out from a start time t = t_i on that grid: for each condition c, n candidate
noises eps^1..eps^n give x^j_t = alpha_t x_0 + sigma_t eps^j, and each candidate is carried m - 1 DDIM steps
down the grid with the current model, visiting the m states x^j_{t_i}, ..., x^j_{t_{i+m-1}}. Every state is
scored by the reward of its one-step estimate x0_hat(x_{t_k}) = (x_{t_k} - sigma eps_theta) / alpha, the
trajectory by the sum of its m scores (Eq. 8), and the best trajectory (and, for RLHF, the worst) is chosen per
condition. Then
  * --variant sft  (Alg. 1): (x_0, c) are data pairs; the loss (Eq. 9) is the eps-MSE of the best trajectory's
    m states against its own noise eps^best;
  * --variant rlhf (Alg. 2): only conditions; the candidates are n samples x^j_0 of the current model per
    condition (no grad, K DDIM steps), re-noised to t with one eps shared by the n samples (--same-noise); the
    loss (Eq. 11) is Diffusion-DPO between the best (w) and worst (l) trajectory on the same m states for policy
    and reference, with the paper's reward-gap term, which carries no gradient.

Equation -> code
  Eq. 6   state score R(x0_hat(x_{t_k}), c)           sharpening_rollout (the one-step Tweedie estimate)
  Eq. 8   trajectory score sum_k R, argmax per c     trajectory_scores, choose_best_worst
  Eq. 9   SFT loss sum_k ||eps_theta - eps^best||^2   sft_loss
  Eq. 10  M(x) = sum_k ||eps(x_{t_k}) - eps^x||^2     trajectory_mse
  Eq. 11  -log sigma(beta [(M_ref(w) - M_theta(w)) - (M_ref(l) - M_theta(l))]) - (R_w - R_l)   rlhf_loss
  Alg. 1 / Alg. 2                                    train (one flat loop)

NFEs per update (network evaluations per condition; K = sampler grid length = 25 on the toys):
  sft     n*m                  paper n = m = 3: 9.   The roll-out's predictions carry autograd, so the loss
                               reuses them: the best trajectory's m predictions are not evaluated again.
  rlhf    n*K + n*m + 2m       paper n = m = 3: 75 + 9 + 6 = 90. n samples of K steps, the scored roll-outs
                               (with autograd, reused by the policy side of Eq. 11), and the frozen reference at
                               the winner's and loser's m states.
  --recompute adds m (sft) / 2m (rlhf): the roll-outs then run without autograd and only the chosen
  trajectories are evaluated again with it (activation memory for B or 2B rows instead of n*B; for SDXL).
  These are the minimum: every state must be predicted once to be scored, and the reference once per state
  it is compared at. log.csv's `nfe` column is counted by the code (CountingDenoiser), not assumed.

Where this differs from the paper or the official code, and why
  1. Best/worst per condition. The official scripts take one argmax over the pooled batch (all prompts and
     candidates) and train on that single trajectory; Alg. 1/2 choose per prompt, and pooling mixes reward
     scales of different prompts. We choose per condition (choose_best_worst; tested).
  2. Start time on the sampler grid. The official code draws t uniformly in [0, T) and steps by T/K; we draw
     the start index on the K-step grid so every state is one the sampler visits (--start-t fixes it).
     One start time per update, shared by the batch (as the official code does when it runs on several GPUs).
  3. Same m states for policy and reference. The official RLHF script takes the reference MSE at the first
     state only but the policy MSE over m states; Eq. 11 compares the same quantity, so both use all m.
  4. Trajectory score = sum over states (Eq. 8); the official code averages (same argmax; R_w - R_l in the
     logged loss is m times the official one). The official RLHF loss adds +(R_w - R_l) (a sign slip); we
     follow Eq. 11's minus sign. Neither changes the gradient.
  5. States are detached between steps (no back-propagation through the roll-out, as Alg. 1 trains each
     state's denoising loss); the official SFT script keeps the graph through the DDIM steps.
  6. n > 1 works: the official SFT script crashes in diffusers' DDIMScheduler.step with a per-row timestep
     tensor; here a step is common.DDIM with one time per batch.
  7. RLHF candidates: the official script samples n images per prompt and re-noises each with the very noise
     that generated it. We sample n per condition too (DESIGN.md's "generate x_0" read per candidate: with one
     shared x_0 the candidates differ only by noise and Eq. 11 has no reward signal about samples), and re-noise
     them with one eps shared within the condition (--same-noise, Diffusion-DPO's pairing of winner and loser):
     the ranking then reflects the samples, not the noise, and the pair difference has less variance. On toy2d
     without it the reward did not move in 300 updates (-0.017 +- 0.006 over 3 seeds; base model -0.004).
     --no-same-noise draws one eps per sample.
  8. LoRA (rank 16) by default, full fine-tuning with --full-finetune (the official code trains the full UNet).
  9. The paper's Eq. 6 writes the state score with an ODE solve to x_0; like the official code we use the
     one-step estimate (it costs no extra NFE).
  10. Toy scaling (paper: SDXL, batch 8, lr 5e-6, beta 2500 on per-pixel means): batch 64 conditions, lr 1e-3
     for the LoRA of a small MLP, beta 100 (the toy's per-dimension eps-MSE gaps are larger than SDXL's; beta 10
     let Eq. 11 push the samples off the data, beta 1000 barely moved), 300 updates.
  11. SFT data: the toy data sets hold what the base model already produces, so SFT on them changes nothing;
     --data-top keeps the top fraction of each drawn data batch by reward (a reward-curated set, the role
     JourneyDB plays in the paper). --data-top 1 is plain data (use it for a curated data set of your own).
  12. --target x0 (off by default, not in the paper): regress state k on the eps that takes it back to x_0
     instead of the candidate's eps, which below the start no longer points from the state to x_0.

Outputs (DESIGN.md section 9): runs/<name>/ config.json, log.csv (step, loss, reward, nfe, seconds, ...),
metrics.json, samples.png (base vs tuned, same seeds), curves.png, adapter/, checkpoint/.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import common


@dataclasses.dataclass
class Config:
    model: str = common.arg("toy2d", "toy world (toy2d, mnist) or a diffusers checkpoint for the full backend")
    variant: str = common.arg("sft", "sft = Alg. 1 (data pairs), rlhf = Alg. 2 (prompts only)",
                              choices=["sft", "rlhf"])
    n: int = common.arg(3, "candidate noises per condition (paper Table 2: 3); sft n=1 with m=1 is standard "
                           "fine-tuning; rlhf needs n >= 2 (n=2, m=1 is Diffusion-DPO)")
    m: int = common.arg(3, "states per trajectory, i.e. m-1 DDIM steps (paper Table 3: 3)")
    start_t: int = common.arg(-1, "start time of the roll-outs, a time on the sampler grid; -1 draws a grid "
                                  "time with m-1 grid times below it, uniformly, each update")
    eta: float = common.arg(0.0, "DDIM eta of the roll-outs and of RLHF's samples (0: deterministic, diffusers' "
                                 "default)")
    same_noise: bool = common.arg(True, "rlhf: re-noise the n samples of a condition with one shared eps (the "
                                         "Diffusion-DPO pairing) instead of one eps each")
    target: str = common.arg("noise", "what the m states regress on: noise = the candidate's eps at every state "
                                      "(Eq. 9-10, official code); x0 = the eps that maps each state back to x_0 "
                                      "(not in the paper; see docs)", choices=["noise", "x0"])
    beta: float = common.arg(100.0, "DPO beta of Eq. 11 (official 2500 on SDXL per-pixel means; toy 100)")
    reduce: str = common.arg("mean", "eps-MSE over dimensions: mean (diffusers / official) or sum",
                             choices=["mean", "sum"])
    data_top: float = common.arg(0.5, "sft: keep this top fraction of each drawn data batch by reward "
                                      "(1 = the data as is)")
    batch: int = common.arg(64, "conditions per update (paper 8 on SDXL; toy 64)")
    steps: int = common.arg(300, "updates")
    lr: float = common.arg(1e-3, "AdamW learning rate (paper 5e-6 full UNet on SDXL; toy LoRA 1e-3)")
    adam_beta1: float = common.arg(0.0, "AdamW beta1 (paper App. A.3: 0)")
    adam_beta2: float = common.arg(0.99, "AdamW beta2 (paper App. A.3: 0.99)")
    weight_decay: float = common.arg(0.0, "AdamW weight decay")
    max_grad_norm: float = common.arg(1.0, "gradient clipping")
    lora_rank: int = common.arg(16, "LoRA rank")
    full_finetune: bool = common.arg(False, "train every weight instead of a LoRA (the official code's choice)")
    recompute: bool = common.arg(False, "roll out without autograd and re-evaluate the chosen trajectories "
                                        "with it: +m (sft) / +2m (rlhf) NFEs, activation memory for B / 2B rows "
                                        "instead of n*B")
    eval_every: int = common.arg(10, "updates between fixed-seed reward evaluations (the reward curve)")
    eval_samples: int = common.arg(256, "samples per curve evaluation")
    final_samples: int = common.arg(1000, "samples for the base vs tuned metrics")
    eval_cfg: float = common.arg(1.0, "classifier-free guidance of evaluation samples (paper: 5 on SDXL)")
    save_every: int = common.arg(100, "updates between checkpoints")
    seed: int = common.arg(0, "random seed")
    out: str = common.arg("", "output folder (default runs/sharpening-<variant>-<model>)")
    resume: bool = common.arg(False, "continue from the checkpoint in --out")


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


def choose_best_worst(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows are condition-major (the n candidates of one condition adjacent, as common.cond_repeat lays them).
    -> row indices [B] of the best and the worst candidate of each condition (argmax / argmin per condition)."""
    s = scores.view(-1, n)  # [B, n]
    first = torch.arange(s.shape[0], device=scores.device) * n
    return first + s.argmax(1), first + s.argmin(1)


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------
def eps_targets(sched, states: list[torch.Tensor], times: list[int], x0: torch.Tensor, eps: torch.Tensor,
                target: str = "noise") -> list[torch.Tensor]:
    """What each of a trajectory's m states is regressed on. "noise": the candidate's eps at every state (Eq. 9,
    10 and the official code). "x0" (not in the paper): eps_k = (x_{t_k} - alpha_k x_0) / sigma_k, the noise that
    takes state k back to the trajectory's x_0; the same at k = 0, different below, where the DDIM step moved the
    state off the line from x_0 along eps (docs/sharpening.md: the toy measures what that costs)."""
    if target == "noise":
        return [eps] * len(states)
    return [common.eps_from_x0(sched, s, x0, t) for s, t in zip(states, times)]


def trajectory_mse(eps_pred: list[torch.Tensor], target, reduce: str = "mean") -> torch.Tensor:
    """Eq. 10: M = sum_k ||eps_pred(x_{t_k}) - eps_k||^2 over a trajectory's m states, per row -> [B].
    `target` is one eps for every state (the paper) or a list of m (eps_targets)."""
    target = target if isinstance(target, (list, tuple)) else [target] * len(eps_pred)
    return sum(common.reduce_dims((e.float() - g.float()) ** 2, reduce) for e, g in zip(eps_pred, target))


def sft_loss(eps_pred_best: list[torch.Tensor], eps_best, reduce: str = "mean") -> torch.Tensor:
    """Eq. 9: L_SFT = E_c sum_k ||eps_theta(x^best_{t_k}, t_k, c) - eps^best||^2."""
    return trajectory_mse(eps_pred_best, eps_best, reduce).mean()


def rlhf_loss(mse_w, mse_l, mse_ref_w, mse_ref_l, r_w, r_l, beta: float):
    """Eq. 11 -> (loss, logit). mse_* are Eq. 10's M per row; r_w, r_l the trajectory scores (Eq. 8)."""
    # beta [(M_ref(w) - M_theta(w)) - (M_ref(l) - M_theta(l))]: Diffusion-DPO's implicit reward margin
    logit = beta * ((mse_ref_w - mse_w) - (mse_ref_l - mse_l))
    # -(R_w - R_l): rewards of sampled, detached states do not depend on theta, so this term shifts the loss
    # value and leaves its gradient alone. It is kept (detached) so the logged loss is the paper's Eq. 11.
    reward_gap = (r_w - r_l).detach()
    return (-F.logsigmoid(logit) - reward_gap).mean(), logit


# ---------------------------------------------------------------------------------------------------
# Plumbing: checks, data, evaluation, figures
# ---------------------------------------------------------------------------------------------------
def rollout_times(grid: list[int], m: int, start_t: int) -> list[int]:
    """Grid times a start time may take: those with m - 1 grid times below. Raises on bad input."""
    if m < 1:
        raise ValueError(f"--m must be >= 1 (states per trajectory), got {m}")
    if m > len(grid):
        raise ValueError(f"--m {m} needs {m} grid times but the sampler grid has only {len(grid)} "
                         f"({grid[0]}..{grid[-1]})")
    if start_t == -1:
        return grid[: len(grid) - m + 1]
    if start_t not in grid:
        raise ValueError(f"--start-t {start_t} is not a time of the sampler grid {grid}")
    left = len(grid) - 1 - grid.index(start_t)
    if m - 1 > left:
        raise ValueError(f"--m {m} states need {m - 1} sampler steps below --start-t {start_t}, but only {left} "
                         f"grid times lie below it; lower --m or raise --start-t")
    return [start_t]


def check_config(cfg: Config) -> None:
    if cfg.n < 1:
        raise ValueError(f"--n must be >= 1 (candidate noises per condition), got {cfg.n}")
    if cfg.variant == "rlhf" and cfg.n < 2:
        raise ValueError(f"--variant rlhf needs --n >= 2 to have a winner and a loser per condition, got n={cfg.n} "
                         "(n=2, m=1 is the Diffusion-DPO baseline)")
    if not 0 < cfg.data_top <= 1:
        raise ValueError(f"--data-top must be in (0, 1], got {cfg.data_top}")
    for name in ("batch", "steps", "eval_every", "eval_samples", "final_samples", "save_every", "lora_rank"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.beta > 0 or not cfg.lr > 0:
        raise ValueError(f"--beta and --lr must be positive, got beta={cfg.beta}, lr={cfg.lr}")
    if cfg.eta < 0:
        raise ValueError(f"--eta must be >= 0, got {cfg.eta}")


# a resumed run must be the same experiment; these may change between the interrupted and the resumed call
RESUMABLE_CHANGES = {"steps", "resume", "out", "save_every", "final_samples", "eval_every"}


def check_resume(cfg: Config, out: Path) -> None:
    import json

    path = out / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    diff = {k: (old[k], v) for k, v in dataclasses.asdict(cfg).items()
            if k in old and k not in RESUMABLE_CHANGES and old[k] != v}
    if diff:
        raise ValueError(f"--resume with a different experiment than the one in {out}: "
                         + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
                         + ". Use another --out for a new run.")


def sft_data(world, cfg: Config, generator: torch.Generator):
    """(x_0, c) pairs; with --data-top q < 1 the top q of ceil(B/q) drawn pairs by reward (a curated set)."""
    x0, cond = world.data(math.ceil(cfg.batch / cfg.data_top), generator)
    if cfg.data_top < 1:
        with torch.no_grad():
            keep = world.reward(x0, cond).topk(cfg.batch).indices.sort().values
        x0, cond = x0[keep], common.cond_index(cond, keep)
    return x0, cond


def nfe_per_update(cfg: Config, K: int) -> int:
    """The docstring's NFE count per condition and update (K = the sampler grid). log.csv's `nfe` column is the
    counted value; tests and benchmarks/report.py compare the two."""
    n, m, extra = cfg.n, cfg.m, cfg.m if cfg.recompute else 0
    if cfg.variant == "sft":
        return n * m + extra
    return n * K + n * m + 2 * m + 2 * extra


@torch.no_grad()
def evaluate(world, denoiser, kernel, grid, noise, cond, cfg_scale: float, split: str = "base"):
    """Deterministic DDIM samples on the full grid (same noise for base and tuned) and the world's metrics."""
    x0 = common.sample(denoiser, kernel, noise, cond, grid, None, cfg_scale=cfg_scale,
                       null_cond=world.null_condition(len(noise)) if cfg_scale != 1 else None)
    return x0, world.metrics(x0, cond, split)


def plot_curves(rows: list[dict], reward_base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    ax[0].plot(step, [float(r["loss"]) for r in rows], lw=0.8)
    ax[0].set(title="loss", xlabel="update")
    ax[1].plot(step, [float(r["reward"]) for r in rows], lw=0.8)
    ax[1].set(title="reward of the training trajectories / samples", xlabel="update")
    ev = [(int(r["step"]), float(r["eval_reward"])) for r in rows if r.get("eval_reward")]
    ax[2].plot([0] + [s for s, _ in ev], [reward_base] + [v for _, v in ev], marker=".")
    ax[2].set(title="reward of fixed-seed samples", xlabel="update")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Training (Alg. 1 and Alg. 2)
# ---------------------------------------------------------------------------------------------------
def train(cfg: Config) -> dict:
    timer = common.Timer()
    check_config(cfg)
    out = Path(cfg.out or f"runs/sharpening-{cfg.variant}-{Path(cfg.model).name}")
    if cfg.resume:
        check_resume(cfg, out)
    common.seed_everything(cfg.seed)
    world = common.load_world(cfg.model)
    acc = world.accelerator
    den = world.denoiser("teacher", lora_rank=cfg.lora_rank, train_full=cfg.full_finetune)
    grid = list(den.timesteps)  # the K-step DDIM grid, e.g. [999, 959, ..., 39]
    starts = rollout_times(grid, cfg.m, cfg.start_t)  # validates m against the grid before anything is written
    kernel = common.make_kernel("ddim", world.schedule, cfg.eta)
    eval_kernel = common.make_kernel("ddim", world.schedule, 0.0)
    net = CountingDenoiser(den)
    params = den.trainable_parameters()
    opt = acc.prepare(torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                        weight_decay=cfg.weight_decay))
    main_process = acc.is_main_process
    run = common.RunDir(out, cfg, resume=cfg.resume) if main_process else None  # only the main process writes
    acc.wait_for_everyone()

    start_step = 0
    if cfg.resume:  # every process reads the checkpoint: adapter, optimizer state, and the update it ended at
        start_step, tensors, _ = common.RunDir.load_checkpoint(run or SimpleNamespace(ckpt=out / "checkpoint"), opt)
        if tensors is not None:
            den.load_adapter_state(tensors)
        if run is not None:
            run.truncate_log(start_step)
        print(f"[sharpening] resuming {out} at update {start_step}", file=sys.stderr)

    # fixed evaluation noise and conditions: base and tuned samples come from the same seeds
    eval_gen = torch.Generator().manual_seed(12_345)  # the same evaluation samples for every run and seed
    final_cond = world.eval_conditions(cfg.final_samples)
    final_noise = torch.randn(cfg.final_samples, *world.shape, generator=eval_gen)
    curve_cond = common.cond_index(final_cond, slice(0, cfg.eval_samples))
    curve_noise = final_noise[: cfg.eval_samples]
    with den.frozen():
        x_base, m_base = evaluate(world, den, eval_kernel, grid, final_noise, final_cond, cfg.eval_cfg)
    B, n, m = cfg.batch, cfg.n, cfg.m

    for step in range(start_step + 1, cfg.steps + 1):
        t0 = common.Timer()
        gen = common.step_generator(cfg.seed, step, acc.process_index)
        net.rows = 0
        t_start = starts[int(torch.randint(len(starts), (1,), generator=gen))]
        times = grid[grid.index(t_start): grid.index(t_start) + m]  # t_i > t_{i+1} > ... (m grid times)

        # ---- candidates: x^j_t = alpha_t x_0 + sigma_t eps^j, rows condition-major [B*n] ----
        if cfg.variant == "sft":  # Alg. 1: data pairs, every candidate re-noises the same x_0
            x0, cond = sft_data(world, cfg, gen)
            x0, cond = x0.repeat_interleave(n, 0), common.cond_repeat(cond, n)
        else:  # Alg. 2: n samples of the current model per condition (no grad)
            cond = common.cond_repeat(world.conditions(B, gen), n)
            z = torch.randn(B * n, *world.shape, generator=gen).to(acc.device)
            x0 = common.sample(net, kernel, z, cond, grid, gen)
        x0 = x0.to(acc.device)
        if cfg.variant == "rlhf" and cfg.same_noise:  # one eps per condition, shared by its n samples
            eps = torch.randn(B, *x0.shape[1:], generator=gen).to(x0.device).repeat_interleave(n, 0)
        else:
            eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        x_t = common.add_noise(world.schedule, x0, eps, t_start)

        # ---- roll out m states with the current model, score each (Eq. 6) and each trajectory (Eq. 8) ----
        states, eps_pred, rewards = sharpening_rollout(net, kernel, x_t, cond, times, world.reward, gen,
                                                       grad=not cfg.recompute)
        scores = trajectory_scores(rewards)
        if not torch.isfinite(scores).all():
            raise common.NonFiniteLoss(f"the reward returned non-finite values at update {step}; the last good "
                                       f"checkpoint is kept in {out / 'checkpoint'}")
        best, worst = choose_best_worst(scores, n)

        def policy_eps(rows):  # eps_theta at the chosen rows' m states, reused from the roll-out when possible
            if not cfg.recompute:
                return [e[rows] for e in eps_pred]
            return [net(s[rows], t, common.cond_index(cond, rows)) for s, t in zip(states, times)]

        if cfg.variant == "sft":
            targets = eps_targets(world.schedule, [s[best] for s in states], times, x0[best], eps[best], cfg.target)
            loss = sft_loss(policy_eps(best), targets, cfg.reduce)  # Eq. 9
            logs = {"reward": float(rewards[:, best].mean())}
        else:
            rows = torch.cat([best, worst])
            eps_theta = policy_eps(rows)
            with torch.no_grad(), net.frozen():  # the frozen reference at the same m states (2m NFEs)
                eps_ref = [net(s[rows], t, common.cond_index(cond, rows)) for s, t in zip(states, times)]
            targets = eps_targets(world.schedule, [s[rows] for s in states], times, x0[rows], eps[rows], cfg.target)
            mse = trajectory_mse(eps_theta, targets, cfg.reduce)  # Eq. 10, policy
            mse_ref = trajectory_mse(eps_ref, targets, cfg.reduce)  # Eq. 10, reference
            loss, logit = rlhf_loss(mse[:B], mse[B:], mse_ref[:B], mse_ref[B:], scores[best], scores[worst],
                                    cfg.beta)  # Eq. 11
            logs = {"reward": float(world.reward(x0, cond).mean()),  # the current model's samples
                    "reward_gap": float((scores[best] - scores[worst]).mean()),
                    "dpo_loss": float(-F.logsigmoid(logit.detach()).mean()),  # Eq. 11 without the reward gap
                    "logit": float(logit.detach().mean()), "accuracy": float((logit > 0).float().mean())}
        common.check_finite(loss, step, run)

        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

        row = {"step": step, "loss": float(loss.detach()), **logs, "nfe": net.rows / B, "seconds": t0(),
               "score_best": float(scores[best].mean()), "t_start": t_start, "grad_norm": float(grad_norm),
               "eval_reward": ""}  # every row has every column: log.csv's header is written with the first row
        if main_process:
            if step % cfg.eval_every == 0 or step == cfg.steps:
                row["eval_reward"] = evaluate(world, den, eval_kernel, grid, curve_noise, curve_cond,
                                              cfg.eval_cfg)[1]["reward"]
            run.log(row)
            if step % cfg.save_every == 0 or step == cfg.steps:
                run.save_checkpoint(step, den.adapter_state(), opt)

    # ---- base vs tuned from the same seeds ----
    result = {}
    if main_process:
        x_tuned, m_tuned = evaluate(world, den, eval_kernel, grid, final_noise, final_cond, cfg.eval_cfg)
        log = run.read_log()
        result = {f"{k}_{which}": v for which, mm in (("base", m_base), ("tuned", m_tuned)) for k, v in mm.items()}
        result.update(steps=cfg.steps, nfe_per_update=nfe_per_update(cfg, len(grid)),
                      seconds_per_update=sum(float(r["seconds"]) for r in log) / max(len(log), 1),
                      seconds=timer())
        world.plot_samples({"base (25 DDIM steps)": (x_base, final_cond),
                            f"sharpening {cfg.variant}, n={n} m={m}": (x_tuned, final_cond)},
                           run.path / "samples.png")
        plot_curves(log, m_base["reward"], run.path / "curves.png")
        world.save_adapter(den, run.path / "adapter")
        run.metrics(result)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
        print(f"wrote {run.path}")
    return result


def main(argv=None) -> dict:
    return train(common.parse_config(Config, argv, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    main()
