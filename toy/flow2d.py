"""flow2d: toy2d's data and rewards under a flow-matching model (docs/design.md section 10).

The same eight-mode conditional ring, target split and rewards as toy2d, but every base model is a flow model in the
SD3 / FLUX parametrisation: x_t = (1 - sigma_t) x_0 + sigma_t eps with diffusers' shifted sigmas (shift 3, SD3's),
and the network predicts the velocity v = eps - x_0. The teacher samples with the marginal-preserving stochastic
Euler step (common.FlowSDE; eta = 0 is the scheduler's Euler step), the 4-step student and the one-step generator
with the flow x0-renoise kernel (a few-step distilled flow model, FLUX-schnell / SANA-Sprint style). The method
scripts run on it unchanged with `--model flow2d`: they read the prediction only through the schedule's conversions
and the kernels."""
from __future__ import annotations

import common

from .toy2d import Toy2D


class Flow2D(Toy2D):
    name = "flow2d"  # toy2d's target split ("half") and rewards
    # its own command-line defaults, measured by benchmarks/world_defaults.py (docs/toys.md, "World defaults"):
    # toy2d's Eq. 5 beta 7 saturates its loss here; DI++'s alpha_rew is the smallest with a visible reward gain
    cli_defaults = {("pso", "pso"): {"beta": 2.0, "train_steps": 16},
                    ("diff_instruct_pp", "dipp"): {"reward_scale": 0.05}}
    shift = 3.0
    ode_sampler = "flow_sde"
    roles = {  # role -> (sampler, timesteps)
        "teacher": ("flow_sde", common.few_step_timesteps(25)),
        "student": ("flow_x0_renoise", common.few_step_timesteps(4)),
        "generator": ("flow_x0_renoise", common.few_step_timesteps(1)),
    }

    def __init__(self, weights=None, **kw):
        super().__init__(weights, **kw)
        self.schedule = common.FlowSchedule(self.shift)
