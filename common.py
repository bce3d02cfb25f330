"""Shared math and plumbing for pso.py, sharpening.py and diff_instruct_pp.py.

Only what two or more methods use lives here:

* noise schedules -> alpha_bar_t (taken from diffusers' own scheduler so the numbers are the library's),
* the forward process and eps <-> x0 conversions,
* the three Markov-decision-process kernels of DESIGN.md section 3, each returning the Gaussian policy
  (mean, std) of the next state (PSO Eq. 4, PSO Eq. 14 / App. A.2, DDIM with eta),
* Gaussian log-probabilities and a trajectory roll-out that stores every transition,
* the backend interface that toy/ and full/ implement, and the run-directory plumbing of DESIGN.md section 9
  (config parsing, seeding, log.csv, metrics.json, atomic checkpoints).

Notation (DESIGN.md section 3): discrete time t = 0..T-1, alpha_bar_t the cumulative product,
alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), x_t = alpha_t x_0 + sigma_t eps.
The time index t = -1 stands for the clean end of a trajectory (alpha_bar = 1), as diffusers' DDIM
"set_alpha_to_one" does.
"""
from __future__ import annotations

import abc
import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol, Sequence

import numpy as np
import torch

T = 1000  # training timesteps of every model here (DDPM / SDXL convention)

# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------
SCHEDULES = {
    # name: diffusers DDPMScheduler keyword arguments
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),  # SD / SDXL
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),  # DDPM
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),  # improved DDPM
}


class Schedule:
    """alpha_bar_t for t = 0..T-1, with t = -1 meaning alpha_bar = 1 (the clean sample)."""

    def __init__(self, name: str = "scaled_linear"):
        if name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
        from diffusers import DDPMScheduler

        self.name = name
        # float32, exactly as the diffusers schedulers hold it, so kernels can match them bit for bit.
        self.alphas_cumprod = DDPMScheduler(num_train_timesteps=T, **SCHEDULES[name]).alphas_cumprod.clone()

    def alpha_bar(self, t, like: torch.Tensor | None = None) -> torch.Tensor:
        """alpha_bar_t broadcast against `like` (batch first); t is an int or a [B] integer tensor."""
        t = torch.as_tensor(t)
        a = torch.where(t < 0, torch.ones((), dtype=torch.float32), self.alphas_cumprod[t.clamp(min=0).cpu()])
        if like is not None:
            a = a.to(like.device)
            if a.ndim == 1:
                a = a.reshape(-1, *([1] * (like.ndim - 1)))
        return a

    def alpha_sigma(self, t, like: torch.Tensor | None = None):
        a = self.alpha_bar(t, like)
        return a.sqrt(), (1 - a).sqrt()

    prediction = "epsilon"  # the network's output; FlowSchedule's is the velocity

    def log_sigma_ve(self) -> torch.Tensor:
        """ln sigma_VE(t) = ln sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1 (float64): the EDM noise level."""
        return (1 / self.alphas_cumprod.double() - 1).sqrt().log()

    def x0_from_pred(self, x_t, eps, t):
        return x0_from_eps(self, x_t, eps, t)

    def eps_from_pred(self, x_t, eps, t):
        return eps

    def pred_target(self, x0, eps, t):
        """What the network regresses on: eps."""
        return eps


def few_step_timesteps(n: int, t_max: int = T) -> list[int]:
    """t_n = n*T/N - 1 for n = N..1 ("trailing" spacing): N=4 -> [999, 749, 499, 249] (DESIGN section 3)."""
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    return [round(k * t_max / n) - 1 for k in range(n, 0, -1)]


# ---------------------------------------------------------------------------------------------------
# Forward process and conversions
# ---------------------------------------------------------------------------------------------------
def add_noise(sched: Schedule, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """q(x_t | x_0): x_t = alpha_t x_0 + sigma_t eps (PSO Eq. 11's forward-diffused data side)."""
    alpha, sigma = sched.alpha_sigma(t, x0)
    return alpha * x0 + sigma * eps


def x0_from_eps(sched: Schedule, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """Tweedie / DDIM estimate x0_hat = (x_t - sigma_t eps_hat) / alpha_t."""
    alpha, sigma = sched.alpha_sigma(t, x_t)
    return (x_t - sigma * eps) / alpha


def eps_from_x0(sched: Schedule, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
    alpha, sigma = sched.alpha_sigma(t, x_t)
    return (x_t - alpha * x0) / sigma


# ---------------------------------------------------------------------------------------------------
# MDP kernels: the Gaussian policy p(x_{t'} | x_t) = N(mean, std^2 I) of one sampler step
# ---------------------------------------------------------------------------------------------------
class Kernel(abc.ABC):
    """One sampler seen as an MDP. States may live in the kernel's own scale (Euler works in the VE scale
    x / alpha_t as diffusers does); `net_input` maps a state to the x_t the eps-network sees."""

    name = ""

    def __init__(self, sched: Schedule, eta: float = 1.0):
        self.sched, self.eta = sched, eta

    def init(self, noise: torch.Tensor, t: int) -> torch.Tensor:
        return noise

    def net_input(self, x: torch.Tensor, t) -> torch.Tensor:
        return x

    def x0(self, x: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        return x0_from_eps(self.sched, self.net_input(x, t), eps, t)

    @abc.abstractmethod
    def step(self, x: torch.Tensor, eps: torch.Tensor, t, t_next) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the next state x_{t_next} given the state x at t and the prediction eps."""


class X0Renoise(Kernel):
    """DMD2 / LCM multi-step sampling (PSO Eq. 4): x_{t'} = alpha_{t'} f_theta(x_t) + sigma_{t'} z.
    At t' = -1 the std is 0: the last step x_0 = f_theta is deterministic."""

    name = "x0_renoise"

    def step(self, x, eps, t, t_next):
        alpha_n, sigma_n = self.sched.alpha_sigma(t_next, x)
        return alpha_n * self.x0(x, eps, t), sigma_n * torch.ones_like(x)


class EulerAncestral(Kernel):
    """diffusers' EulerAncestralDiscreteScheduler (SDXL-Turbo; PSO Eq. 14, App. A.2), in the VE scale
    x = x_t / alpha_t with sigma = sqrt((1 - alpha_bar) / alpha_bar). The ops follow diffusers' order so a
    step matches it bit for bit given the same noise."""

    name = "euler_ancestral"

    def sigma(self, t) -> torch.Tensor:
        a = self.sched.alpha_bar(t)
        return ((1 - a) / a) ** 0.5

    def init(self, noise, t):
        # diffusers' init_noise_sigma for "trailing" spacing is sigma_max itself (not sqrt(sigma^2 + 1)), so the
        # first network input is sigma_t * noise, 0.2% below unit variance at t = 999; we follow the library.
        return noise * self.sigma(t)

    def net_input(self, x, t):
        s = self.sigma(t).to(x.device)
        s = s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim == 1 else s
        return x / ((s**2 + 1) ** 0.5)  # scale_model_input; equals the DDPM-scale x_t

    def x0(self, x, eps, t):
        s = self._b(self.sigma(t), x)
        return x - s * eps

    def step(self, x, eps, t, t_next):
        s_from, s_to = self._b(self.sigma(t), x), self._b(self.sigma(t_next), x)
        s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
        s_down = (s_to**2 - s_up**2) ** 0.5
        x0 = x - s_from * eps
        derivative = (x - x0) / s_from
        return x + derivative * (s_down - s_from), s_up * torch.ones_like(x)

    @staticmethod
    def _b(s, x):
        s = s.to(x.device)
        return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim == 1 else s


class DDIM(Kernel):
    """DDIM with stochasticity eta (Song et al. 2021 Eq. 12; DDPO's step-with-log-prob):
    std = eta sqrt((1 - a') / (1 - a) (1 - a / a')), mean = alpha' x0_hat + sqrt(1 - a' - std^2) eps_hat."""

    name = "ddim"

    def step(self, x, eps, t, t_next):
        a, a_next = self.sched.alpha_bar(t, x), self.sched.alpha_bar(t_next, x)
        std = self.eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)) ** 0.5
        mean = a_next**0.5 * self.x0(x, eps, t) + (1 - a_next - std**2) ** 0.5 * eps
        return mean, std * torch.ones_like(x)




# ---------------------------------------------------------------------------------------------------
# Flow matching (SD3 / FLUX / SANA-class models; DESIGN.md section 10)
# ---------------------------------------------------------------------------------------------------
class FlowSchedule:
    """x_t = (1 - sigma_t) x_0 + sigma_t eps, the network predicts the velocity v = eps - x_0.

    Integer time t = 0..T-1 is diffusers' FlowMatchEulerDiscreteScheduler training timestep t + 1, so
    sigma_t = shift * s / (1 + (shift - 1) * s) with s = (t + 1) / T (the scheduler's static shift; SD3: 3.0,
    FLUX's resolution-dependent shift is a shift value too); t = -1 is the clean sample (sigma = 0). Conversions
    (for a prediction v at x_t): x0_hat = x_t - sigma v, eps_hat = x_t + (1 - sigma) v, score = -eps_hat / sigma.
    `alpha_sigma` returns (1 - sigma_t, sigma_t), so add_noise and the forward process read the same as DDPM's."""

    prediction = "flow"

    def __init__(self, shift: float = 1.0):
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"flow shift must be a finite number > 0, got {shift!r}")
        self.name, self.shift = f"flow(shift={shift:g})", float(shift)
        s = torch.arange(1, T + 1, dtype=torch.float32) / T  # the scheduler's float32 sigmas before the shift
        self.sigmas = self.shift * s / (1 + (self.shift - 1) * s)

    def sigma(self, t, like: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t)
        s = torch.where(t < 0, torch.zeros((), dtype=torch.float32), self.sigmas[t.clamp(min=0).cpu()])
        if like is not None:
            s = s.to(like.device)
            if s.ndim == 1:
                s = s.reshape(-1, *([1] * (like.ndim - 1)))
        return s

    def alpha_sigma(self, t, like: torch.Tensor | None = None):
        s = self.sigma(t, like)
        return 1 - s, s

    def log_sigma_ve(self) -> torch.Tensor:
        """ln sigma_VE(t) = ln(sigma_t / (1 - sigma_t)) for t = 0..T-1 (float64; +inf at sigma = 1): x_t / alpha_t is
        x_0 + sigma_VE eps, the EDM noise level."""
        s = self.sigmas.double()
        return (s / (1 - s)).log()

    def alpha_bar(self, t, like=None):
        raise TypeError("a flow-matching schedule has no alpha_bar: use alpha_sigma (1 - sigma, sigma) and the "
                        "flow kernels (flow_x0_renoise, flow_sde)")

    # conversions of the network's prediction (velocity) -------------------------------------------------
    def x0_from_pred(self, x_t, v, t):
        return x_t - self.sigma(t, x_t) * v

    def eps_from_pred(self, x_t, v, t):
        return x_t + (1 - self.sigma(t, x_t)) * v

    def pred_target(self, x0, eps, t):
        """What the network regresses on (the flow-matching loss): v = eps - x_0."""
        return eps - x0


class FlowKernel(Kernel):
    """A sampler of a flow model as an MDP; the prediction passed to step / x0 is the velocity."""

    def x0(self, x, v, t):
        return self.sched.x0_from_pred(x, v, t)


class FlowX0Renoise(FlowKernel):
    """Few-step distilled flow models (x0-renoise in the flow parametrisation): mean = (1 - sigma') x0_hat,
    std = sigma'; the last step (sigma' = 0) is deterministic."""

    name = "flow_x0_renoise"

    def step(self, x, v, t, t_next):
        s_next = self.sched.sigma(t_next, x)
        return (1 - s_next) * self.x0(x, v, t), s_next * torch.ones_like(x)


class FlowSDE(FlowKernel):
    """A stochastic Euler step whose marginals are the ODE's (the SDE form Flow-GRPO samples with log-probs):
    dx = [v - g^2/2 * score] dt + g dw, score = -eps_hat / sigma, g = eta sqrt(sigma / (1 - sigma)). With
    dt = sigma' - sigma < 0: mean = x + (v + g^2 / (2 sigma) eps_hat) dt, std = g sqrt(-dt). eta = 0 is
    FlowMatchEulerDiscreteScheduler.step (x + dt v). At sigma = 1 the factor sigma / (1 - sigma) is taken at the
    schedule's largest sigma below 1 (as Flow-GRPO's code does); the last step (sigma' = 0) is deterministic."""

    name = "flow_sde"

    def step(self, x, v, t, t_next):
        s, s_next = self.sched.sigma(t, x), self.sched.sigma(t_next, x)
        dt = s_next - s
        below_one = self.sched.sigmas[self.sched.sigmas < 1].max().to(s.device)
        g2 = self.eta**2 * torch.where(s < 1, s, below_one) / (1 - torch.where(s < 1, s, below_one))
        g2 = torch.where(s_next > 0, g2, torch.zeros_like(g2))
        eps_hat = self.sched.eps_from_pred(x, v, t)
        mean = x + (v + g2 / (2 * s) * eps_hat) * dt
        return mean, (g2 * (-dt)).sqrt() * torch.ones_like(x)


KERNELS = {k.name: k for k in (X0Renoise, EulerAncestral, DDIM, FlowX0Renoise, FlowSDE)}


def make_kernel(name: str, sched: Schedule, eta: float = 1.0) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"unknown sampler / MDP kernel {name!r}; choose one of {sorted(KERNELS)}")
    return KERNELS[name](sched, eta)


# ---------------------------------------------------------------------------------------------------
# Gaussian log-probabilities
# ---------------------------------------------------------------------------------------------------
def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "sum"):
    """log N(x; mean, std^2 I) per batch row. reduce="mean" divides by the dimension count: the official
    PSO / DDPO code averages per pixel, which is what lets beta=50 work at 1024^2."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).expand_as(x)
    lp = -((x - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    if reduce == "sum":
        return lp.sum(1)
    if reduce == "mean":
        return lp.mean(1)
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


def reduce_dims(x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Sum or mean over every dimension but the batch (the squared norms of PSO Eq. 5-7)."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    x = x.flatten(1)
    return x.sum(1) if reduce == "sum" else x.mean(1)


# ---------------------------------------------------------------------------------------------------
# The backend interface (implemented by toy/ and full/)
# ---------------------------------------------------------------------------------------------------
Cond = Any  # a [B] label tensor (toy) or a dict of [B, ...] prompt-embedding tensors (full)


class Denoiser(Protocol):
    """An eps-prediction network with a trainable LoRA adapter.

    `denoiser(x_t, t, cond)` is the adapted model eps_theta; inside `with denoiser.frozen():` the adapter is
    disabled and the same call gives the pre-trained eps_pre, so the reference model costs no memory."""

    sampler: str  # name of its MDP kernel: "x0_renoise" | "euler_ancestral" | "ddim"
    timesteps: list[int]  # its native sampling grid, e.g. [999, 749, 499, 249]
    module: torch.nn.Module  # the trained module (DDP-prepared where it applies): accelerator.accumulate(module)

    def __call__(self, x_t: torch.Tensor, t, cond: Cond) -> torch.Tensor: ...
    def frozen(self) -> ContextManager: ...
    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...
    def adapter_state(self) -> dict[str, torch.Tensor]: ...
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None: ...


class World(Protocol):
    """Everything model- and data-specific: how to load denoisers, draw conditions and data, score samples."""

    name: str
    shape: tuple[int, ...]  # one sample x_0
    schedule: Schedule

    accelerator: Any  # accelerate.Accelerator: backward, clip_grad_norm_, prepare(optimizer), is_main_process
    decode_batch: int  # the most rows one sampling / evaluation / reward-decoding network call may take

    def denoiser(self, role: str, lora_rank: int = 16, train_full: bool = False, sampler: str | None = None,
                 timesteps: list[int] | None = None) -> Denoiser:
        """`sampler` overrides the role's MDP kernel (e.g. "euler_ancestral" for the SDXL-Turbo MDP) and
        `timesteps` its grid; the method reads them back from `denoiser.sampler` / `.timesteps`. Methods call the
        denoiser with an int t or a per-row [B] integer tensor t (several timesteps in one batched call)."""
    def conditions(self, n: int, generator: torch.Generator) -> Cond: ...
    def eval_conditions(self, n: int) -> Cond: ...
    def null_condition(self, n: int) -> Cond: ...
    def data(self, n: int, generator: torch.Generator, split: str = "base") -> tuple[torch.Tensor, Cond]: ...
    def reward(self, x0: torch.Tensor, cond: Cond) -> torch.Tensor: ...
    def metrics(self, x0: torch.Tensor, cond: Cond, split: str = "base") -> dict[str, float]: ...
    def plot_samples(self, panels: dict[str, tuple[torch.Tensor, Cond]], path: str | Path) -> None: ...
    def save_adapter(self, denoiser: Denoiser, path: str | Path) -> None: ...

    def preference_pairs(self, n: int, generator: torch.Generator, path: str | Path | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        """n offline preference pairs (x_win, x_lose, cond) in model space (latents in the full world), the
        preferred image first (PSO Eq. 6, Alg. 3; Pick-a-Pic in the paper). Without `path`, the world's own pairs
        (toys: two real samples of one condition ranked by `reward`; full: its preference dataset). With `path`,
        rows drawn from a stored pairs file of (win, lose, cond) rows; a row with a missing or malformed image or
        label raises ValueError naming the file and the row (the format is the world's; toys: toy/pairs.py)."""

    def concept_images(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, Cond, Cond]:
        """Customization (PSO App. B.3, DreamBooth): (x0 [n, ...] the few concept images in model space, their
        condition, e.g. "a photo of [V] dog", the class condition, e.g. "a photo of a dog", used to sample the
        reference / prior-preservation images from the frozen model)."""


def cond_index(cond: Cond, idx) -> Cond:
    """Select batch rows of a condition (tensor or dict of tensors)."""
    if isinstance(cond, dict):
        return {k: v[idx] for k, v in cond.items()}
    return cond[idx]


def cond_repeat(cond: Cond, n: int) -> Cond:
    """[c1, c2] -> [c1, c1, ..., c2, c2, ...] (each row n times, candidates of one condition adjacent)."""
    if isinstance(cond, dict):
        return {k: v.repeat_interleave(n, 0) for k, v in cond.items()}
    return cond.repeat_interleave(n, 0)


def cond_cat(conds: Sequence[Cond]) -> Cond:
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(list(conds))


def cond_to(cond: Cond, device) -> Cond:
    """Move a condition (tensor or dict of tensors) to a device."""
    if isinstance(cond, dict):
        return {k: v.to(device) for k, v in cond.items()}
    return cond.to(device)


# ---------------------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """A sampled MDP trajectory. states[k] is the state at times[k] (kernel scale; at time -1 it is the clean
    x_0); step k goes from states[k] to states[k+1] under N(means, stds[k]^2) and used the prediction eps[k]."""

    states: list[torch.Tensor]
    eps: list[torch.Tensor]
    stds: list[torch.Tensor]
    times: list[int]
    nfe: int

    @property
    def x0(self) -> torch.Tensor:
        if self.times[-1] >= 0:
            raise ValueError("this trajectory stops before t = 0; it has no clean sample")
        return self.states[-1]


@torch.no_grad()
def rollout(
    denoiser: Callable,
    kernel: Kernel,
    x_start: torch.Tensor,
    cond: Cond,
    times: Sequence[int],
    generator: torch.Generator | None = None,
    cfg_scale: float = 1.0,
    null_cond: Cond | None = None,
    start_is_state: bool = False,
) -> Trajectory:
    """Run a sampler from x_start at times[0] through times[1:] (-1 = clean), storing every state and
    prediction so a loss re-evaluates the policy at them without sampling again. `x_start` is Gaussian noise
    (turned into the kernel's first state) unless `start_is_state`. cfg_scale != 1 uses classifier-free
    guidance (2 network calls per step). Step noise comes from `generator` on the CPU, so a run is the same
    on every device."""
    x = x_start if start_is_state else kernel.init(x_start, times[0])
    states, eps_list, stds, nfe = [x], [], [], 0
    for t, t_next in zip(times[:-1], times[1:]):
        inp = kernel.net_input(x, t)
        eps = denoiser(inp, t, cond)
        nfe += 1
        if cfg_scale != 1.0:
            eps = eps_cfg(eps, denoiser(inp, t, null_cond), cfg_scale)
            nfe += 1
        mean, std = kernel.step(x, eps, t, t_next)
        z = torch.randn(x.shape, generator=generator).to(x.device)
        x = mean + std * z  # std = 0 on a final deterministic step
        states.append(x)
        eps_list.append(eps)
        stds.append(std)
    return Trajectory(states, eps_list, stds, list(times), nfe)


class CountingDenoiser:
    """Wraps a Denoiser and counts the rows it evaluates, so the NFEs a method logs are measured, not assumed:
    nfe(B) = rows / B network evaluations per condition (one call on B rows at one timestep = 1)."""

    def __init__(self, denoiser):
        self.denoiser, self.rows = denoiser, 0

    def __call__(self, x_t, t, cond):
        self.rows += x_t.shape[0]
        return self.denoiser(x_t, t, cond)

    def frozen(self):
        return self.denoiser.frozen()

    def __getattr__(self, name):  # timesteps, sampler, ...: everything else is the wrapped denoiser's
        return getattr(self.__dict__["denoiser"], name)

    def nfe(self, batch: int) -> float:
        return self.rows / batch


def eps_cfg(eps_cond: torch.Tensor, eps_null: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_null + w (eps_cond - eps_null) (w = 1 is the plain conditional model)."""
    return eps_null + scale * (eps_cond - eps_null)


def sample(denoiser, kernel: Kernel, noise, cond, timesteps: Sequence[int], generator=None, **kw) -> torch.Tensor:
    """Few-step sampling on a model's grid, e.g. [999, 749, 499, 249] -> x_0."""
    return rollout(denoiser, kernel, noise, cond, list(timesteps) + [-1], generator, **kw).x0


def _rows(cond: Cond) -> int:
    return len(next(iter(cond.values()))) if isinstance(cond, dict) else len(cond)


@torch.no_grad()
def sample_in_chunks(denoiser, kernel: Kernel, noise, cond, timesteps: Sequence[int], chunk: int, seed: int | None = None,
                     null_cond: Cond | None = None, **kw) -> torch.Tensor:
    """`sample` on at most `chunk` rows at a time (world.decode_batch: evaluation memory is bounded by what the user
    chose, not by the number of samples). Chunk i draws its step noise from seed + i, so the result does not depend
    on the device; the rows' start noise is given. `null_cond` (for CFG) is cut like `cond`."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out = []
    for k, i in enumerate(range(0, len(noise), chunk)):
        rows = slice(i, i + chunk)
        gen = None if seed is None else torch.Generator().manual_seed(seed + k)
        extra = {} if null_cond is None else {"null_cond": cond_index(null_cond, rows)}
        out.append(sample(denoiser, kernel, noise[rows], cond_index(cond, rows), timesteps, gen, **kw, **extra))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------
# Seeding and random streams
# ---------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, rank: int = 0, device="cpu", micro: int = 0) -> torch.Generator:
    """The random stream of one update is a function of (seed, step, rank, micro-batch) alone, so a resumed run draws
    exactly what an uninterrupted one would without saving generator state, each data-parallel rank
    (accelerator.process_index) draws its own batch, and each accumulated micro-batch its own (micro = 0 is the
    stream of an update without gradient accumulation)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step + rank * 7_919_000_003
                                               + micro * 104_729_000_017)


# ---------------------------------------------------------------------------------------------------
# Configs: a dataclass per method, parsed into a CLI; range checks that name the flag
# ---------------------------------------------------------------------------------------------------
def arg(default, help: str, **kw):
    """A dataclass field with a --help line (cleanRL-style configs)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    """The run plumbing every method shares (the harness reads these; each method's Config inherits them)."""

    seed: int = arg(0, "random seed: update k draws from step_generator(seed, k, rank)")
    out: str = arg("", "run folder (default runs/<method>-<variant>-<model>)")
    resume: bool = arg(False, "continue from the run folder's last complete checkpoint (same method and settings)")
    save_every: int = arg(100, "updates between checkpoints (the last update is always saved)")
    keep_checkpoints: int = arg(2, "complete checkpoints kept on disk (the newest ones; >= 1)")
    gradient_accumulation_steps: int = arg(1, "micro-batches of --batch per optimizer update (accelerate's "
                                           "accumulation): the global batch is batch x this x processes")
    report_to: str = arg("", "experiment tracking through accelerate's trackers: tensorboard | wandb | '' (off)")
    progress: bool = arg(True, "a progress bar over the updates")


# settings a resumed run may change: they do not change what the updates compute
RESUMABLE = {"steps", "resume", "out", "save_every", "keep_checkpoints", "report_to", "progress"}


def _parser(cls, description: str | None, suppress: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS if suppress else None)
    base = {f.name for f in dataclasses.fields(RunConfig)}
    fields = dataclasses.fields(cls)  # the method's own options first, the shared plumbing last
    for f in [f for f in fields if f.name not in base] + [f for f in fields if f.name in base]:
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(help=f.metadata.get("help", ""))
        if not suppress:
            kw["default"] = default
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            parser.add_argument(name, nargs="+", type=type(default[0]) if default else str, **kw)
        else:
            parser.add_argument(name, type=type(default) if default is not None else str, **kw)
    return parser


def parse_config(cls, argv: Sequence[str] | None = None, description: str | None = None):
    """Build an argparse CLI from a config dataclass: field `reward_scale` -> `--reward-scale`. The names of the
    options given on the command line are remembered (`explicit_fields`), so a backend's defaults fill only the
    others (apply_world_defaults)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = cls(**vars(_parser(cls, description, suppress=False).parse_args(argv)))
    cfg._explicit_fields = set(vars(_parser(cls, description, suppress=True).parse_args(argv)))
    return cfg


def explicit_fields(cfg) -> set[str]:
    """The fields the user set: those given on the command line, or every field of a config built in code."""
    return getattr(cfg, "_explicit_fields", {f.name for f in dataclasses.fields(cfg)})


class ConfigError(ValueError):
    """A bad option: the message names the flag, what was expected and what was found."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(ok: bool, name: str, expected: str, found) -> None:
    """Raise ConfigError("--name: expected <expected>, got <found>") unless ok."""
    if not ok:
        raise ConfigError(f"{flag(name)}: expected {expected}, got {found!r}")


def check_range(cfg, name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False) -> None:
    """The one range check of every numeric option: finite, and in [lo, hi] (open ends where asked)."""
    v = getattr(cfg, name)
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    expected = "a finite number" + (" " + " and ".join(parts) if parts else "")
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    check(ok, name, expected, v)


def check_choice(cfg, name: str, choices: Sequence) -> None:
    v = getattr(cfg, name)
    check(v in choices, name, f"one of {list(choices)}", v)


def check_run_config(cfg) -> None:
    """The shared plumbing options (RunConfig)."""
    for name in ("save_every", "keep_checkpoints", "gradient_accumulation_steps"):
        check_range(cfg, name, 1)
    check(cfg.report_to in ("", "tensorboard", "wandb"), "report_to", "tensorboard, wandb or '' (off)", cfg.report_to)


def apply_world_defaults(cfg, world, method: str):
    """A backend may supply values for the options the user did not set (the full backend: the paper's learning
    rate, batch and evaluation sizes for a real checkpoint, never the toy defaults). Returns (cfg, {field: value})."""
    defaults = getattr(world, "method_defaults", None)
    if defaults is None:
        return cfg, {}
    given, names = explicit_fields(cfg), {f.name for f in dataclasses.fields(cfg)}
    proposed = defaults(method, getattr(cfg, "variant", ""))
    unknown = sorted(set(proposed) - names)
    if unknown:
        raise ValueError(f"{type(world).__name__}.method_defaults({method!r}) names options {method} does not have: "
                         f"{unknown}")
    used = {k: v for k, v in proposed.items() if k not in given and getattr(cfg, k) != v}
    new = dataclasses.replace(cfg, **used)
    new._explicit_fields = given
    return new, used


# ---------------------------------------------------------------------------------------------------
# World backends register themselves (common.py does not import toy/ or full/)
# ---------------------------------------------------------------------------------------------------
_BACKENDS: dict[str, tuple[int, Callable[[str], bool], Callable[..., Any]]] = {}
ENTRY_POINTS = "fewstep_finetune.worlds"  # pyproject.toml: toy = "toy:register", full = "full:register"


def register_world(name: str, accepts: Callable[[str], bool], load: Callable[..., Any], priority: int = 0) -> None:
    """A backend says which `--model` values it takes; load_world asks the highest priority first."""
    _BACKENDS[name] = (priority, accepts, load)


def _discover_backends() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        if ep.name not in _BACKENDS:
            ep.load()()


def load_world(model: str, **kw) -> World:
    """`--model` of every method script: a toy world name (toy2d, mnist) or a diffusers checkpoint / model spec for
    the full backend; the backends registered under the entry-point group `fewstep_finetune.worlds` decide."""
    _discover_backends()
    if not _BACKENDS:
        raise RuntimeError(f"no world backend is registered (entry-point group {ENTRY_POINTS}); install the project "
                           "first: pip install -e .")
    for name, (_, accepts, load) in sorted(_BACKENDS.items(), key=lambda kv: -kv[1][0]):
        if accepts(model):
            return load(model, **kw)
    raise ValueError(f"--model {model!r}: no registered backend ({sorted(_BACKENDS)}) accepts it")


# ---------------------------------------------------------------------------------------------------
# The experiment harness: one run's life (folder, resume, checkpoints, log, summary, figures)
# ---------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: str | Path, data: bytes) -> None:
    """Write a file so that a reader finds the old or the new content, never a partial one: a temp file in the same
    folder, fsync, os.replace, fsync of the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: data-parallel ranks may write at once
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_durable(path, json.dumps(obj, indent=2, default=str).encode())


def read_json(path: str | Path, what: str = "file") -> Any:
    """json.loads with an error that names the file and the problem (missing, empty, truncated, not UTF-8)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"{what} {path} is empty; expected a JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); it may be "
                         "truncated") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, or not of this run's models); the message names the file."""


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss: training stops and every checkpoint on disk stays as it was."""


class Run:
    """One training run's life, the same for every method (DESIGN.md section 9):

        run = common.Run("pso", cfg, out)                  # checks the folder and the resume rule; writes nothing
        world = common.load_world(cfg.model)
        cfg = run.configure(world)                         # backend defaults for unset options; same-experiment check
        ...build the denoisers and optimizers...
        start = run.start(world, {"student": den}, {"student": opt})   # restore or begin; writes config.json
        for step in run.updates():                         # tqdm over start+1 .. cfg.steps
            for micro in range(cfg.gradient_accumulation_steps):
                with run.accumulate():
                    loss = ...; run.check_finite(loss, step); run.optimizer_step(loss, opt, params, max_norm)
            run.log({"step": step, ...})                   # log.csv (+ trackers), and a checkpoint when due
        run.finish(metrics, panels, curves)                # metrics.json, samples.png, curves.png, adapter/, summary

    Folder: config.json ({"method", **config}), log.csv, metrics.json, samples.png, curves.png, adapter/,
    checkpoint-<step>/ (the newest `keep_checkpoints`). Resume rule: a run folder is resumed only by the same method
    with the same settings (RESUMABLE and the method's `free` fields may change); otherwise a clear error is raised
    before anything is written.

    Checkpoints: one safetensors file per model (its adapter_state()), one torch file per optimizer, and state.json
    with the step and the sha256 of every file. A checkpoint is filled in a temp folder, fsynced, and renamed into
    place; only then are older ones deleted, so at every instant a reader finds a complete checkpoint, the previous
    or the new one. Restoring verifies the hashes (a damaged newest checkpoint falls back to the previous complete
    one with a message; if none is usable it is an error, never a silent restart), checks every model's keys and
    shapes both ways, and loads optimizer state onto this rank's device. accelerate's save_state is not used: it saves
    whole model state dicts (the frozen SDXL weights too) into a folder written in place, with no integrity check;
    what it would add (RNG state) the per-update generators make unnecessary."""

    LOG_FIELDS = ("step", "loss", "reward", "nfe", "seconds")

    def __init__(self, method: str, cfg, out: str | Path | None = None, free: Sequence[str] = ()):
        self.method, self.cfg, self.free = method, cfg, RESUMABLE | set(free)
        name = f"{method}-{getattr(cfg, 'variant', '')}-{Path(cfg.model).stem}".replace("--", "-")
        self.path = Path(out or cfg.out or Path("runs") / name)
        check_run_config(cfg)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file; expected a run folder (a new or an existing one)")
        parent = next((p for p in [self.path, *self.path.parents] if p.exists()), Path("."))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {self.path}: cannot write into {parent} (permission denied)")
        self.saved_config = None
        if (self.path / "config.json").exists():
            self.saved_config = read_json(self.path / "config.json", "run config")
            if not isinstance(self.saved_config, dict):
                raise ValueError(f"run config {self.path / 'config.json'} holds a {type(self.saved_config).__name__}, "
                                 "expected a JSON object")
        if cfg.resume and self.saved_config is not None and self.saved_config.get("method") != method:
            raise ConfigError(f"--resume: {self.path} is a run of {self.saved_config.get('method')!r}, not of "
                              f"{method!r}; use another --out for this run (nothing was written)")
        self.world = self.acc = None
        self.models: dict[str, Any] = {}
        self.optimizers: dict[str, Any] = {}
        self.start_step, self._bar, self._trackers, self._header = 0, None, [], None

    # ------------------------------------------------------------------------------------------- begin
    def configure(self, world):
        """Apply the backend's defaults for options the user did not set (printed), then the resume rule on the
        resolved settings. Returns the resolved config."""
        cfg, used = apply_world_defaults(self.cfg, world, self.method)
        if used:
            self.print(f"[{self.method}] {type(world).__name__} defaults for options not given: "
                       + ", ".join(f"{flag(k)} {v}" for k, v in used.items()))
        if cfg.resume and self.saved_config is not None:
            now = {"method": self.method, **dataclasses.asdict(cfg)}
            diff = {k: (self.saved_config.get(k, "<absent>"), v) for k, v in now.items()
                    if k not in self.free and self.saved_config.get(k, "<absent>") != _jsonable(v)}
            if diff:
                raise ConfigError(f"--resume with settings that differ from the saved run {self.path / 'config.json'}: "
                                  + ", ".join(f"{flag(k)} saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
                                  + ". Use the same settings, or another --out for a new run (nothing was written).")
        self.cfg = cfg
        return cfg

    @property
    def main(self) -> bool:
        return self.acc is None or self.acc.is_main_process

    @property
    def sharded(self) -> bool:
        """Whether the trained models are sharded over the processes (accelerate's FSDP, full/fsdp.py): then every
        forward is a collective of all ranks, so every process runs the evaluations (the main one writes them)."""
        return self.acc is not None and getattr(self.acc, "distributed_type", None) == "FSDP"

    def start(self, world, models: dict[str, Any], optimizers: dict[str, Any]) -> int:
        """Restore the last complete checkpoint (--resume) or begin a fresh run; returns the last finished update."""
        self.world, self.acc, self.models, self.optimizers = world, world.accelerator, models, optimizers
        self.acc.gradient_accumulation_steps = self.cfg.gradient_accumulation_steps
        self.acc.step = 0  # accelerate's micro-batch counter: a run starts (or resumes) at an update boundary
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.path.glob(".tmp-checkpoint-*"):  # a save killed half-way: never a checkpoint
                shutil.rmtree(stale, ignore_errors=True)
        self.acc.wait_for_everyone()
        if self.cfg.resume:
            found = self._restore()
            if found is None:
                self.print(f"[{self.method}] --resume: no checkpoint in {self.path}; starting at update 0")
        elif self.main:  # a fresh run must not append to or resume from an older one's files
            for name in ("log.csv", "metrics.json"):
                (self.path / name).unlink(missing_ok=True)
            for old in self._checkpoints():
                shutil.rmtree(old, ignore_errors=True)
        if self.start_step > self.cfg.steps:
            raise ConfigError(f"--steps {self.cfg.steps}: the checkpoint in {self.path} has already done "
                              f"{self.start_step} updates; expected --steps >= {self.start_step}")
        if self.main:
            write_json_atomic(self.path / "config.json", {"method": self.method, **dataclasses.asdict(self.cfg)})
            self._truncate_log(self.start_step)
            self._open_trackers()
        self.acc.wait_for_everyone()
        return self.start_step

    def updates(self):
        """start+1 .. cfg.steps, with a progress bar on the main process."""
        from tqdm.auto import tqdm

        steps = range(self.start_step + 1, self.cfg.steps + 1)
        self._bar = tqdm(steps, desc=f"{self.method} {getattr(self.cfg, 'variant', '')}".strip(),
                         disable=not (self.main and self.cfg.progress), initial=self.start_step,
                         total=self.cfg.steps, mininterval=1.0, dynamic_ncols=True)
        yield from self._bar
        self._bar.close()

    # ------------------------------------------------------------------------------------------- one update
    def accumulate(self):
        """accelerate's gradient accumulation over the run's trained modules (no DDP sync until the last micro-batch)."""
        modules = [m for m in (getattr(d, "module", None) for d in self.models.values()) if m is not None]
        return self.acc.accumulate(*modules)

    def optimizer_step(self, loss: torch.Tensor, optimizer, params, max_norm: float = 0.0):
        """backward; on the micro-batch that syncs: clip, step, zero_grad (accelerate skips the step otherwise).
        Returns the pre-clip gradient norm on a sync step (else None)."""
        self.acc.backward(loss)
        norm = None
        if self.acc.sync_gradients and max_norm > 0:
            norm = self.acc.clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return None if norm is None else float(norm)

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        """Stop on NaN/inf; the checkpoints on disk are left as they are, and the message says what exists."""
        if torch.isfinite(loss.detach()).all():
            return
        last = self._checkpoints()
        kept = (f"the last checkpoint ({last[0].name}) is kept: --resume continues from it with the same settings"
                if last else "no checkpoint was written yet")
        raise NonFiniteLoss(f"non-finite loss ({float(loss.detach().float().mean())}) at update {step} of {self.path}; "
                            f"{kept}. To change --lr or --beta, start a new run (another --out). Also check the data "
                            "and the reward for NaNs.")

    def log(self, row: dict) -> None:
        """One row of log.csv per update (every row the same columns), trackers, progress bar; a checkpoint when due."""
        step = int(row["step"])
        if self.main:
            self._write_row(row)
            for tracker in self._trackers:
                tracker.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
            if self._bar is not None:
                self._bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "reward") if isinstance(row.get(k), float)},
                                      refresh=False)
        if step % self.cfg.save_every == 0 or step == self.cfg.steps:
            self.save_checkpoint(step)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _checkpoints(self) -> list[Path]:
        """checkpoint-<step> folders, newest first."""
        found = []
        for p in self.path.glob("checkpoint-*"):
            suffix = p.name.split("-", 1)[1]
            if p.is_dir() and suffix.isdigit():
                found.append((int(suffix), p))
        return [p for _, p in sorted(found, reverse=True)]

    def save_checkpoint(self, step: int, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        if self.main:
            final = self.path / f"checkpoint-{step}"
            tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=f".tmp-checkpoint-{step}-"))
            try:
                files = {}
                for name, den in self.models.items():
                    f = tmp / f"model-{name}.safetensors"
                    save_file({k: v.detach().cpu().contiguous() for k, v in den.adapter_state().items()}, str(f))
                    files[f.name] = f
                for name, opt in self.optimizers.items():
                    f = tmp / f"optimizer-{name}.pt"
                    torch.save(opt.state_dict(), f)
                    files[f.name] = f
                for f in files.values():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                state = {"step": step, "method": self.method, "sha256": {n: sha256_file(f) for n, f in files.items()},
                         **(extra or {})}
                write_json_atomic(tmp / "state.json", state)
                _fsync_dir(tmp)
                if final.exists():  # the same update saved again (cannot happen in a straight run): replace it
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _fsync_dir(self.path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            for old in self._checkpoints()[self.cfg.keep_checkpoints:]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _verify(self, ckpt: Path) -> dict:
        """state.json of a complete, undamaged checkpoint, or CheckpointError saying what is wrong with it."""
        try:
            state = read_json(ckpt / "state.json", "checkpoint state")
        except (OSError, ValueError) as e:
            raise CheckpointError(str(e)) from None
        expected = {f"model-{n}.safetensors" for n in self.models} | {f"optimizer-{n}.pt" for n in self.optimizers}
        hashes = state.get("sha256", {}) if isinstance(state, dict) else {}
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or set(hashes) != expected:
            raise CheckpointError(f"checkpoint {ckpt} holds {sorted(hashes)}; expected the files {sorted(expected)} "
                                  f"of this run's models and optimizers")
        for name, digest in hashes.items():
            f = ckpt / name
            if not f.is_file():
                raise CheckpointError(f"checkpoint file {f} is missing")
            if sha256_file(f) != digest:
                raise CheckpointError(f"checkpoint file {f} is damaged: its sha256 differs from the one in state.json")
        return state

    def _restore(self) -> Path | None:
        from safetensors.torch import load_file

        problems, chosen = [], None
        for ckpt in self._checkpoints():
            try:
                state = self._verify(ckpt)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            chosen = ckpt
            break
        if chosen is None:
            if problems:
                raise CheckpointError(f"--resume: no usable checkpoint in {self.path}: " + "; ".join(problems)
                                      + ". Nothing was changed; start a new run (without --resume) to begin again.")
            return None
        if problems:
            self.print(f"[{self.method}] skipped damaged checkpoint(s): {'; '.join(problems)}; resuming from {chosen}")
        for name, den in self.models.items():
            f = chosen / f"model-{name}.safetensors"
            tensors = load_file(str(f))
            expected = den.adapter_state()
            missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            shapes = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
            if missing or unexpected or shapes:
                raise CheckpointError(f"{f} does not fit model {name!r}: missing keys {missing[:3]}, unexpected keys "
                                      f"{unexpected[:3]}, other shapes {shapes[:3]} ({len(missing)}, {len(unexpected)},"
                                      f" {len(shapes)} in all); a different --lora-rank or model?")
            den.load_adapter_state(tensors)
        for name, opt in self.optimizers.items():
            f = chosen / f"optimizer-{name}.pt"
            try:
                # onto this rank's device, whichever saved it (torch names a CPU of a gloo rank "cpu:0", which
                # torch.load does not take as a location: plain "cpu" then)
                dev = self.acc.device
                opt.load_state_dict(torch.load(f, map_location="cpu" if dev.type == "cpu" else dev, weights_only=True))
            except (ValueError, RuntimeError, KeyError) as e:
                raise CheckpointError(f"optimizer state {f} does not fit optimizer {name!r}: {e}") from None
        self.start_step, self.restored = state["step"], state
        self.print(f"[{self.method}] resumed {self.path} from {chosen.name} (update {self.start_step})")
        return chosen

    # ------------------------------------------------------------------------------------------- log.csv
    def read_log(self) -> list[dict]:
        """The complete rows of log.csv (a row cut short by a kill is left out)."""
        path = self.path / "log.csv"
        if not path.exists():
            return []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if None not in r.values() and None not in r and str(r.get("step", "")).isdigit()]
        return rows

    def _truncate_log(self, last_step: int) -> None:
        """Keep the rows up to the restored update (a run killed between a log row and its checkpoint wrote more)."""
        path = self.path / "log.csv"
        rows = [r for r in self.read_log() if int(r["step"]) <= last_step]
        if not rows:
            path.unlink(missing_ok=True)
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        write_bytes_durable(path, buf.getvalue().encode())

    def _write_row(self, row: dict) -> None:
        path = self.path / "log.csv"
        if self._header is None:
            existing = self.read_log()
            self._header = list(existing[0]) if existing else (list(self.LOG_FIELDS) +
                                                               [k for k in row if k not in self.LOG_FIELDS])
        extra = sorted(set(row) - set(self._header))
        if extra:
            raise ValueError(f"log row of update {row['step']} has columns {extra} that log.csv's header lacks: every "
                             "row must have the same columns (use '' for a value not measured in this update)")
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._header)
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            f.flush()

    def _open_trackers(self) -> None:
        """accelerate's tracker for --report-to (tensorboard or wandb), writing under <run>/trackers."""
        if not self.cfg.report_to:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[self.cfg.report_to]
        name = self.path.name
        try:
            tracker = cls(name, str(self.path / "trackers")) if cls.requires_logging_directory else cls(name)
            if hasattr(tracker, "start"):  # accelerate >= 1.x opens the writer lazily
                tracker.start()
        except ImportError as e:
            raise ConfigError(f"--report-to {self.cfg.report_to}: {e}; install it (pip install -e '.[track]' for "
                              "tensorboard, or pip install wandb)") from None
        tracker.store_init_configuration({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                          for k, v in dataclasses.asdict(self.cfg).items()})
        self._trackers = [tracker]

    # ------------------------------------------------------------------------------------------- end
    def finish(self, metrics: dict, panels: dict | None = None, curves: Sequence[tuple[str, str]] = (),
               adapter: Any = None) -> dict:
        """metrics.json, samples.png (world.plot_samples of `panels`), curves.png (`curves`: (log column, title)),
        the adapter export (world.save_adapter), trackers closed, and the summary table printed."""
        if self.main:
            if panels:
                self.world.plot_samples(panels, self.path / "samples.png")
            if curves:
                plot_curves(self.read_log(), self.path / "curves.png", curves)
            if adapter is not None:
                self.world.save_adapter(adapter, self.path / "adapter")
            write_json_atomic(self.path / "metrics.json", metrics)
            for tracker in self._trackers:
                tracker.log({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=self.cfg.steps)
                tracker.finish()
            print(summary(metrics, self.path))
        return metrics

    def print(self, message: str) -> None:
        if self.main:
            print(message, file=sys.stderr)


def _jsonable(v):
    return json.loads(json.dumps(v, default=str))


SUMMARY_ORDER = ("base", "naive", "tuned")


def summary(metrics: dict, path: Path | str | None = None) -> str:
    """The one summary table of every method: one row per evaluated model (base, tuned, and whatever else the run
    scored, e.g. naive or the 1-step samples), reward / quality / distance, then NFEs, seconds, the files."""
    cols = ("reward", "quality", "distance")
    names = []
    for k in metrics:
        for c in cols:
            if k.startswith(c + "_") and isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool):
                name = k[len(c) + 1:]
                if name not in names and not name.endswith("_split") and "on_base" not in name:
                    names.append(name)
    names.sort(key=lambda n: (n.split("_")[0] not in SUMMARY_ORDER, "_" in n,
                              SUMMARY_ORDER.index(n.split("_")[0]) if n.split("_")[0] in SUMMARY_ORDER else 0))
    lines = [f"{'model':16s}" + "".join(f"{c:>11s}" for c in cols)]
    for n in names:
        cells = [metrics.get(f"{c}_{n}") for c in cols]
        lines.append(f"{n:16s}" + "".join(f"{v:11.4f}" if isinstance(v, (int, float)) else f"{'-':>11s}" for v in cells))
    foot = []
    if "nfe_per_update" in metrics:
        foot.append(f"NFE per update {metrics['nfe_per_update']:g}")
    if "seconds" in metrics:
        per = metrics.get("seconds_per_update")
        foot.append(f"{metrics['seconds']:.1f} s" + (f" ({per:.3f} s/update)" if isinstance(per, (int, float)) else ""))
    if path is not None:
        path = Path(path)
        files = [p.name for p in (path / "samples.png", path / "curves.png", path / "adapter") if p.exists()]
        foot.append(f"wrote {path}" + (f" ({', '.join(files)})" if files else ""))
    return "\n".join(lines + ["; ".join(foot)])


def plot_curves(rows: list[dict], path, keys: Sequence[tuple[str, str]]) -> None:
    """Training curves from log.csv: one panel per (column, title); empty cells (not measured that update) skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.5 * len(keys), 2.9), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.9, marker="." if len(pts) < 30 else None)
        ax.set(title=title, xlabel="update")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, CheckpointError, NonFiniteLoss)


def run_cli(main: Callable[[], Any]) -> None:
    """`if __name__ == "__main__"` of every method script: a bad input, a damaged checkpoint or a non-finite loss ends
    with its message (exit status 2), not a traceback; FEWSTEP_TRACEBACK=1 shows the traceback too."""
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("FEWSTEP_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
