"""The flow SDE kernel (common.FlowSDE, Flow-GRPO's sde_step_with_logprob) against the rule it replaced, on SD3's own
grids at shift 3 (FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(N)) in a 1-D Gaussian world whose exact
velocity is known (x_0 ~ N(1.5, 0.4^2)): the first step's factor sigma / (1 - sigma) and std, and the end
distribution of 200,000 chains from N(0, 1) with eta 0 (the ODE: Euler) and eta 0.7.

    OMP_NUM_THREADS=1 python benchmarks/flow_sde.py

Writes benchmarks/results/flow_sde.md. "before" is the previous rule: at sigma = 1 the factor taken at the largest
training sigma below 1 (the schedule's table), which Flow-GRPO's code does not do."""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import common

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MU, S, ETA, N = 1.5, 0.4, 0.7, 200_000


def velocity(x, sig):
    """E[eps - x_0 | x_t] for x_0 ~ N(MU, S^2), x_t = (1 - sig) x_0 + sig eps."""
    var = (1 - sig) ** 2 * S**2 + sig**2
    r = x - (1 - sig) * MU
    return sig / var * r - (MU + (1 - sig) * S**2 / var * r)


class Before(common.FlowSDE):
    """The replaced rule: sigma / (1 - sigma) at sigma = 1 taken at the largest training sigma below 1."""

    def step(self, x, v, t, t_next):
        s, s_next = self.sched.sigma(t, x), self.sched.sigma(t_next, x)
        below = self.sched.sigmas[self.sched.sigmas < 1].max()
        g2 = self.eta**2 * torch.where(s < 1, s, below) / (1 - torch.where(s < 1, s, below))
        g2 = torch.where(s_next > 0, g2, torch.zeros_like(g2))
        return x + (v + g2 / (2 * s) * self.sched.eps_from_pred(x, v, t)) * (s_next - s), \
            (g2 * (s - s_next)).sqrt() * torch.ones_like(x)


def end(kernel, sched, times):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 1, generator=g)
    for t, t_next in zip(times[:-1], times[1:]):
        mean, std = kernel.step(x, velocity(x, sched.sigma(t, x)), t, t_next)
        x = mean + std * torch.randn(x.shape, generator=g)
    return float(x.mean()), float(x.std())


def main():
    t0 = time.perf_counter()
    rows = []
    for steps in (4, 10, 25):
        sched = common.FlowSchedule(3.0)
        ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
        ref.set_timesteps(steps)
        times = sched.grid_times(ref.sigmas[:-1].tolist()) + [-1]
        x = torch.zeros(1, 1)
        first = {}
        for name, k in (("now", common.make_kernel("flow_sde", sched, ETA)), ("before", Before(sched, ETA))):
            _, std = k.step(x, x, times[0], times[1])
            s1 = float(sched.sigma(times[1]))
            first[name] = (float(std) ** 2 / ETA**2 / (1 - s1), float(std))  # factor = g^2 / eta^2
        ends = {name: end(k, sched, times) for name, k in (
            ("ode", common.make_kernel("flow_sde", sched, 0.0)), ("now", common.make_kernel("flow_sde", sched, ETA)),
            ("before", Before(sched, ETA)))}
        rows.append((steps, float(sched.sigma(times[1])), first, ends))
    lines = [f"Command: `OMP_NUM_THREADS=1 python benchmarks/flow_sde.py` ({time.strftime('%Y-%m-%d')}; "
             f"{platform.machine()}, torch {torch.__version__}; {time.perf_counter() - t0:.0f} s). SD3's grid "
             f"(FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(N)), eta {ETA} (Flow-GRPO's noise_level); "
             f"x_0 ~ N({MU}, {S}^2), {N:,} chains from N(0, 1) with the exact velocity. First step: the factor "
             "sigma / (1 - sigma) the step uses and its std; end: mean and std of x_0.", "",
             "| steps | grid's 2nd sigma | first-step factor now / before | first-step std now / before | end: ODE "
             "(eta 0) | end: SDE now | end: SDE before |", "|---|---|---|---|---|---|---|"]
    for steps, s1, first, ends in rows:
        f = lambda m: f"{m[0]:.3f} ± {m[1]:.3f}"  # noqa: E731
        lines.append(f"| {steps} | {s1:.4f} | {first['now'][0]:.1f} / {first['before'][0]:.0f} | "
                     f"{first['now'][1]:.3f} / {first['before'][1]:.3f} | {f(ends['ode'])} | {f(ends['now'])} | "
                     f"{f(ends['before'])} |")
    (RESULTS / "flow_sde.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
