"""Base models of the toy worlds, built on first use and cached (docs/design.md section 7).

1. teacher: a 1000-step eps-prediction diffusion model (classifier-free-guidance dropout 10%, EMA weights).
2. student: a 4-step x0-renoise model distilled by regression on the teacher's DDIM-ODE end points: for each
   t_n in [999, 749, 499, 249], x_{t_n} (pure noise at 999, forward-diffused data below) is carried to x_0 by
   the teacher's deterministic DDIM, once, and the student (initialised from the teacher) learns
   x0_hat(x_{t_n}) = ODE(x_{t_n}). Precomputing the pairs once is what keeps this inside the time budget.
3. generator: the student fine-tuned on the t = 999 pairs only: a one-step generator g(z, c) = x0_hat(z, 999).
4. (mnist) the digit / bold-style classifier behind the reward and the metrics.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common


@dataclass(frozen=True)
class Budget:
    teacher_steps: int
    batch: int
    lr: float
    pairs: int  # teacher ODE pairs per student timestep
    ode_steps: int  # DDIM steps of the teacher ODE
    distill_steps: int
    generator_steps: int
    classifier_steps: int = 0
    ode_cfg: float = 1.0  # guidance of the teacher ODE the student copies
    ema: float = 0.999


def _ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), net.parameters()):
            e.lerp_(p, 1 - decay)


def _fit(net, loss_fn, steps, lr, desc, ema_decay=None, progress=True):
    """Adam with cosine decay; returns the EMA copy when ema_decay is set."""
    net.train().requires_grad_(True)
    ema = copy.deepcopy(net).requires_grad_(False) if ema_decay else None
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=1.0)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        if ema is not None:
            _ema_update(ema, net, min(ema_decay, (1 + step) / (10 + step)))
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return (ema if ema is not None else net).eval().requires_grad_(False)


def train_teacher(world, budget: Budget, gen: torch.Generator, progress=True):
    sched, net = world.schedule, world.make_net()

    def loss_fn(step):
        x0, c = world.data(budget.batch, gen)
        c = torch.where(torch.rand(len(c), generator=gen) < 0.1, world.null_condition(len(c)), c)  # CFG dropout
        t = torch.randint(0, common.T, (len(c),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        # DDPM eps-loss, or the flow-matching loss (target v = eps - x_0) in a flow world: sched.pred_target
        return F.mse_loss(net(common.add_noise(sched, x0, eps, t), t, c), sched.pred_target(x0, eps, t))

    return _fit(net, loss_fn, budget.teacher_steps, budget.lr, f"{world.name}: teacher", budget.ema, progress)


@torch.no_grad()
def teacher_ode_pairs(world, teacher, times, budget: Budget, gen, progress=True, chunk=1000):
    """{t_n: (x_{t_n}, c, x_0 = DDIM-ODE_teacher(x_{t_n}))}."""
    sched = world.schedule
    kernel = common.make_kernel(world.ode_sampler, sched, eta=0.0)  # deterministic DDIM / flow Euler
    call = lambda x, t, c: teacher(x, torch.as_tensor(t).expand(len(x)), c)
    pairs = {}
    for t_n in tqdm(times, desc=f"{world.name}: teacher ODE pairs", disable=not progress):
        x0, c = world.data(budget.pairs, gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = noise if t_n == common.T - 1 else common.add_noise(sched, x0, noise, t_n)
        ode_times = [int(round(v)) for v in np.linspace(t_n, 0, budget.ode_steps + 1)[:-1]] + [-1]
        out = []
        for i in range(0, len(x_t), chunk):
            traj = common.rollout(call, kernel, x_t[i:i + chunk], c[i:i + chunk], ode_times, start_is_state=True,
                                  cfg_scale=budget.ode_cfg, null_cond=world.null_condition(len(c[i:i + chunk])))
            out.append(traj.x0)
        pairs[t_n] = (x_t, c, torch.cat(out))
    return pairs


def distill(world, init, pairs, steps, budget: Budget, gen, desc, progress=True):
    """Regress x0_hat(x_{t_n}) on the teacher's ODE end points, all t_n mixed in each batch."""
    sched, net = world.schedule, copy.deepcopy(init)
    x_t = torch.cat([p[0] for p in pairs.values()])
    c = torch.cat([p[1] for p in pairs.values()])
    x0 = torch.cat([p[2] for p in pairs.values()])
    t = torch.cat([torch.full((len(p[1]),), t_n) for t_n, p in pairs.items()])

    def loss_fn(step):
        i = torch.randint(0, len(c), (budget.batch,), generator=gen)
        eps = net(x_t[i], t[i], c[i])  # the prediction: eps, or the velocity in a flow world
        return F.mse_loss(sched.x0_from_pred(x_t[i], eps, t[i]), x0[i])

    return _fit(net, loss_fn, steps, budget.lr * 0.5, desc, budget.ema, progress)


def train_classifier(world, budget: Budget, gen, progress=True):
    """MNIST: digit and bold-style heads on regular and bold real digits (the reward and quality model)."""
    from .mnist import embolden

    net = type(world.classifier)()

    def loss_fn(step):
        i = torch.randint(0, len(world.labels), (budget.batch,), generator=gen)
        x, y = world.images[i], world.labels[i]
        bold = torch.rand(len(i), generator=gen) < 0.5
        x = torch.where(bold[:, None, None, None], embolden(x), x)
        x = x + 0.05 * torch.randn(x.shape, generator=gen)  # robustness to slightly noisy samples
        logits, bold_logit, _ = net(x)
        return F.cross_entropy(logits, y) + F.binary_cross_entropy_with_logits(bold_logit, bold.float())

    return _fit(net, loss_fn, budget.classifier_steps, 2e-3, f"{world.name}: classifier", None, progress)


def build_base_models(world, budget: Budget, seed: int = 0, progress=True) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    weights = {}
    if budget.classifier_steps:
        world.classifier.load_state_dict(train_classifier(world, budget, gen, progress).state_dict())
        weights["classifier"] = world.classifier.state_dict()
    teacher = train_teacher(world, budget, gen, progress)
    weights["teacher"] = teacher.state_dict()
    pairs = teacher_ode_pairs(world, teacher, common.few_step_timesteps(4), budget, gen, progress)
    student = distill(world, teacher, pairs, budget.distill_steps, budget, gen, f"{world.name}: 4-step student",
                      progress)
    weights["student"] = student.state_dict()
    generator = distill(world, student, {common.T - 1: pairs[common.T - 1]}, budget.generator_steps, budget, gen,
                        f"{world.name}: one-step generator", progress)
    weights["generator"] = generator.state_dict()
    return {role: {k: v.detach().clone().contiguous() for k, v in sd.items()} for role, sd in weights.items()}
