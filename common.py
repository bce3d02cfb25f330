"""The shared math of pso.py, sharpening.py and diff_instruct_pp.py (docs/design.md sections 3 and 10).

Only what two or more methods use lives here:

* noise schedules -> alpha_bar_t (taken from diffusers' own scheduler so the numbers are the library's), and the
  flow-matching schedule of SD3 / FLUX-class models,
* the forward process and eps <-> x0 conversions,
* the Markov-decision-process kernels, each returning the Gaussian policy (mean, std) of the next state (PSO Eq. 4,
  PSO Eq. 14 / App. A.2, DDIM with eta, and their flow-matching forms),
* Gaussian log-probabilities, a trajectory roll-out that stores every transition, few-step sampling,
* the backend interface (`World`, `Denoiser`) that toy/ and full/ implement, and the per-update random streams.

The run plumbing (config parsing, the run folder, checkpoints, log.csv, the summary) is in harness.py.

Notation (docs/design.md section 3): discrete time t = 0..T-1, alpha_bar_t the cumulative product,
alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), x_t = alpha_t x_0 + sigma_t eps.
The time index t = -1 stands for the clean end of a trajectory (alpha_bar = 1), as diffusers' DDIM
"set_alpha_to_one" does.
"""
from __future__ import annotations

import abc
import math
import random
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
    """t_n = n*T/N - 1 for n = N..1 ("trailing" spacing): N=4 -> [999, 749, 499, 249] (docs/design.md section 3)."""
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
# Flow matching (SD3 / FLUX / SANA-class models; docs/design.md section 10)
# ---------------------------------------------------------------------------------------------------
class FlowSchedule:
    """x_t = (1 - sigma_t) x_0 + sigma_t eps, the network predicts the velocity v = eps - x_0.

    Integer time t = 0..T-1 is diffusers' FlowMatchEulerDiscreteScheduler training timestep t + 1, so
    sigma_t = shift * s / (1 + (shift - 1) * s) with s = (t + 1) / T (the scheduler's static shift; SD3: 3.0);
    t = -1 is the clean sample (sigma = 0). `sigmas` replaces that table by one a scheduler computed (FLUX's
    resolution-dependent shift: full/models.py builds it through the scheduler's own set_timesteps(mu=...));
    `shift` is then the static shift that table equals (read off at s = 1/2). Conversions (for a prediction v at
    x_t): x0_hat = x_t - sigma v, eps_hat = x_t + (1 - sigma) v, score = -eps_hat / sigma. `alpha_sigma` returns
    (1 - sigma_t, sigma_t), so add_noise and the forward process read the same as DDPM's.

    A pipeline samples on sigmas of its own (SD3's `set_timesteps(4)`: [1.0, 0.858, 0.602, 0.009] at shift 3) that
    lie between the integer times' sigmas. `grid_times(sigmas)` gives each of them an integer time whose table
    entry becomes that sigma exactly (the nearest time; docs/full.md "Sampling grids"), so a role's grid is a list
    of integer times as everywhere else and sigma(t) at those times is the pipeline's value bit for bit."""

    prediction = "flow"

    def __init__(self, shift: float = 1.0, sigmas: torch.Tensor | None = None):
        if sigmas is None:
            if not (math.isfinite(shift) and shift > 0):
                raise ValueError(f"flow shift must be a finite number > 0, got {shift!r}")
            s = torch.arange(1, T + 1, dtype=torch.float32) / T  # the scheduler's float32 sigmas before the shift
            sigmas = shift * s / (1 + (shift - 1) * s)
        else:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float32).clone()
            if sigmas.shape != (T,) or not bool((sigmas[1:] > sigmas[:-1]).all()) or float(sigmas[0]) <= 0 \
                    or float(sigmas[-1]) != 1.0:
                raise ValueError(f"a flow schedule's sigma table must hold {T} increasing values in (0, 1] ending at "
                                 f"1, got shape {tuple(sigmas.shape)} from {float(sigmas[0]):g} to "
                                 f"{float(sigmas[-1]):g}")
            mid = float(sigmas[T // 2 - 1])  # s = 1/2: sigma = shift / (1 + shift)
            shift = mid / (1 - mid)
        self.shift, self.sigmas = float(shift), sigmas
        self.name = f"flow(shift={self.shift:g})"
        self._base = sigmas.clone()  # the table before any grid was placed on it
        self._placed: dict[int, float] = {}  # t -> a pipeline sigma that replaced the table's value there

    def grid_times(self, sigmas: Sequence[float], where: str = "sampling grid") -> list[int]:
        """Integer times carrying a sampler's sigmas (decreasing, in (0, 1], without the final 0) exactly: each sigma
        takes the time whose table sigma is nearest (or the next one where that time already carries another grid's
        different sigma), and that time's table entry becomes the sigma. The table stays strictly increasing, so
        every other time keeps its meaning; a grid too fine for T times is an error naming `where`."""
        sig = torch.as_tensor(list(sigmas), dtype=torch.float32)
        if sig.ndim != 1 or len(sig) == 0 or bool((sig <= 0).any()) or bool((sig > 1).any()) or \
                bool((sig[1:] >= sig[:-1]).any()):
            raise ValueError(f"{where}: sigmas {sig.tolist()} must be strictly decreasing within (0, 1]")
        times = []
        for s in sig.tolist():
            nearest = int((self._base - s).abs().argmin())
            for t in sorted((nearest - 1, nearest, nearest + 1), key=lambda u: (abs(u - nearest), u)):
                if self._fits(t, s) and (not times or t < times[-1]):
                    break
            else:
                raise ValueError(f"{where}: sigma {s:.7g} has no free integer time near t = {nearest} (the grid is "
                                 f"finer than the {T} training times, or another role's grid took them)")
            if float(self.sigmas[t]) != s:
                self.sigmas[t], self._placed[t] = s, s
            times.append(t)
        return times

    def _fits(self, t: int, s: float) -> bool:
        if not 0 <= t < T or (t in self._placed and self._placed[t] != s):
            return False
        below = float(self.sigmas[t - 1]) if t > 0 else 0.0
        above = float(self.sigmas[t + 1]) if t < T - 1 else math.inf
        return below < s < above or float(self.sigmas[t]) == s

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
    """A stochastic Euler step whose marginals are the ODE's: Flow-GRPO's `sde_step_with_logprob` (Liu et al. 2025,
    arXiv 2505.05470; its sampler github.com/yifan123/flow_grpo, flow_grpo/diffusers_patch/
    sd3_sde_with_logprob.py), written from the formula, not from that code:
    dx = [v - g^2/2 * score] dt + g dw with score = -eps_hat / sigma and g^2 = eta^2 sigma / (1 - sigma). With
    dt = sigma' - sigma < 0: mean = x + (v + g^2 / (2 sigma) eps_hat) dt, std = g sqrt(-dt). eta = 0 is
    FlowMatchEulerDiscreteScheduler.step (x + dt v).

    Conventions (as ddpo-pytorch states its own; docs/full.md "The flow SDE"):
    * eta here is Flow-GRPO's `noise_level` (its default 0.7).
    * At sigma = 1, sigma / (1 - sigma) is infinite. Flow-GRPO divides by 1 - sigmas[1] there, the sampling
      grid's second sigma: the next sigma of the only step that starts at 1, i.e. this step's sigma' (= sigma of
      t_next). The numerator stays sigma = 1: g^2 = eta^2 / (1 - sigma'). (The largest training sigma below 1, used
      before, gave ~100x that factor at shift 3 and a first step ~10x too noisy.)
    * The last step (sigma' = 0) is deterministic here (x_0 = x0_hat, excluded from likelihoods as every kernel's
      last step); Flow-GRPO samples it with std g sqrt(sigma) and scores it.
    * Log-probabilities: Flow-GRPO averages over dimensions (gaussian_log_prob(..., reduce="mean"))."""

    name = "flow_sde"

    def step(self, x, v, t, t_next):
        s, s_next = self.sched.sigma(t, x), self.sched.sigma(t_next, x)
        dt = s_next - s
        g2 = self.eta**2 * s / (1 - torch.where(s < 1, s, s_next))  # at sigma = 1: 1 / (1 - sigma')
        g2 = torch.where(s_next > 0, g2, torch.zeros_like(g2))  # the last step is deterministic
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
                 timesteps: list[int] | None = None, merged_adapter: dict[str, torch.Tensor] | None = None
                 ) -> Denoiser:
        """`sampler` overrides the role's MDP kernel (e.g. "euler_ancestral" for the SDXL-Turbo MDP) and
        `timesteps` its grid; the method reads them back from `denoiser.sampler` / `.timesteps`. Methods call the
        denoiser with an int t or a per-row [B] integer tensor t (several timesteps in one batched call).
        `merged_adapter`: a LoRA (the adapter_state() of a denoiser of this role's network) merged into the weights
        before the trainable LoRA goes on: it is part of the frozen model (PSO's de-distill baseline)."""
    def conditions(self, n: int, generator: torch.Generator) -> Cond: ...
    def eval_conditions(self, n: int) -> Cond: ...
    def null_condition(self, n: int) -> Cond: ...
    def data(self, n: int, generator: torch.Generator, split: str = "base") -> tuple[torch.Tensor, Cond]: ...
    def reward(self, x0: torch.Tensor, cond: Cond) -> torch.Tensor: ...
    def metrics(self, x0: torch.Tensor, cond: Cond, split: str = "base") -> dict[str, float]: ...
    def plot_samples(self, panels: dict[str, tuple[torch.Tensor, Cond]], path: str | Path,
                     marks: str | None = None) -> None:
        """One figure of the panels {title: (x0, cond)}; `marks` = "target" (mark the target split) or "reward"
        (mark what the reward prefers), what the run aims at; None marks neither."""
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
