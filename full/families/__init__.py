"""What differs between the model families the full backend supports, one module per family.

Each module holds, as plain functions and constants, what its diffusers pipeline does and the rest of the backend
must do the same way: the denoiser's call (latent packing, position ids, timestep convention, guidance input), the
prompt encoding through the pipeline's own `encode_prompt`, the sampling grid and shift the pipeline gives its
scheduler, the VAE latent convention, the LoRA targets of diffusers' own training script and the pipeline's CFG
convention. Tests compare each function with the pipeline it comes from (tests/test_full_families.py).

* `zimage`: ZImagePipeline (Z-Image-Turbo, Z-Image).
* `flux2`: Flux2KleinPipeline (FLUX.2-klein 4B / 9B and their bases).
"""
from __future__ import annotations

import math


def pipeline_shift(config, mu: float) -> float:
    """The static shift s (sigma' = s sigma / (1 + (s - 1) sigma)) of a FlowMatchEulerDiscreteScheduler once a
    pipeline called `set_timesteps(..., mu=mu)`: config.shift, or with use_dynamic_shifting exp(mu) (time_shift_type
    "exponential": exp(mu) / (exp(mu) + 1/sigma - 1) is that map) or mu ("linear")."""
    if not config.get("use_dynamic_shifting"):
        return float(config.get("shift", 1.0))
    kind = config.get("time_shift_type", "exponential")
    if kind == "exponential":
        return math.exp(mu)
    if kind == "linear":
        return float(mu)
    raise ValueError(f"scheduler time_shift_type {kind!r} is neither 'exponential' nor 'linear'")


def grid_from_sigmas(sigmas) -> list[int]:
    """The integer times t of common.FlowSchedule ((t + 1) / 1000 = the unshifted sigma) of a pipeline's unshifted
    sigmas, e.g. linspace(1, 1/8, 8) -> [999, 874, ..., 124]; an error if one is not on the 1000-step grid."""
    out = []
    for s in sigmas:
        t = round(float(s) * 1000) - 1
        if abs((t + 1) / 1000 - float(s)) > 1e-6:
            raise ValueError(f"sigma {float(s)!r} is not on the 1000-step training grid (t + 1) / 1000")
        out.append(t)
    return out
