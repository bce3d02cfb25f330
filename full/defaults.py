"""The paper's settings for a run on a real checkpoint, and the per-GPU batch that fits (INTERFACE: method_defaults).

The methods' own defaults are sized for the toy worlds (lr 1e-3, batch 64, 1000 evaluation samples); on an SDXL
checkpoint they would be wrong and run out of memory. `FullWorld.method_defaults(method, variant)` returns, for the
fields the user did not set, the paper's hyperparameters (docs/design.md sections 4-6, the launcher table in
full/launch.py), evaluation sizes and cadence scaled for 1024^2 sampling, and a per-process batch from MICRO_BATCH.

Flow-matching models (SD3 / SD3.5, FLUX): the same paper hyperparameters (the papers publish none for flow models;
the methods read the velocity only through the schedule), with one difference: on a guidance-distilled FLUX
(FLUX.1-dev, a spec with embedded guidance) the CFG defaults (Sharpening's eval_cfg, DI++'s cfg_scale) are 1 (off),
as the embedded guidance already is the model's CFG. The MICRO_BATCH rows are SDXL estimates; full/memory_plan.py
sizes the transformers.

MICRO_BATCH holds estimates, not measurements: the largest per-GPU batch expected to fit a 24 GB and an 80 GB card
at 1024^2 (SDXL) with the shipped specs' bf16 weights, gradient checkpointing and a LoRA, counted from the fixed
memory table in docs/full.md plus the graph-carrying UNet rows of each method. `python -m full.bench` measures the
real peak on the GPU you have. The paper's global batch is reached by the launchers (full/launch.py) with
`--gradient-accumulation-steps`; a plain `python pso.py --model CKPT` trains on batch x processes rows per update.
"""
from __future__ import annotations

import dataclasses
import importlib

# (method, variant) -> the paper's global batch (per optimizer update, all processes and accumulation steps)
GLOBAL_BATCH = {
    ("pso", "offline"): 64, ("pso", "online"): 32, ("pso", "pso"): 8, ("pso", "naive"): 8, ("pso", "customize"): 4,
    ("pso", "base-transfer"): 8, ("pso", "dedistill"): 8, ("pso", "dedistill-adapter"): 8,  # naive's budget
    ("sharpening", "sft"): 8, ("sharpening", "rlhf"): 8,
    ("diff_instruct_pp", "dipp"): 256, ("diff_instruct_pp", "di"): 1024,
}

# (method, variant) -> (per-GPU batch on a 24 GB card, on an 80 GB card): estimates, see the module docstring
MICRO_BATCH = {
    ("pso", "offline"): (1, 4),  # 2(S-1) = 6 graph-carrying UNet rows per pair, data latents cached
    ("pso", "online"): (1, 2),  # + the roll-outs' graphs and PickScore on 1024^2 decodes
    ("pso", "pso"): (1, 4), ("pso", "naive"): (2, 8), ("pso", "customize"): (1, 4),
    ("pso", "base-transfer"): (2, 8), ("pso", "dedistill"): (2, 8),  # naive's rows, on another network
    ("pso", "dedistill-adapter"): (2, 8),  # + the frozen student's 4 sampling steps, without a graph
    ("sharpening", "sft"): (1, 4),  # m = 3 rows per condition with --recompute
    ("sharpening", "rlhf"): (1, 2),  # 2m = 6 rows per condition + n roll-outs
    ("diff_instruct_pp", "dipp"): (1, 4),  # the reward gradient goes through the VAE decoder at 1024^2
    ("diff_instruct_pp", "di"): (1, 4),
}

# Not paper hyperparameters: evaluation sizes and checkpoint cadence for 1024^2 sampling
RUNTIME = {
    "pso": dict(eval_samples=256, eval_every=500, save_every=250, naive_baseline=False),
    "sharpening": dict(eval_samples=64, eval_every=200, final_samples=256, save_every=250),
    "diff_instruct_pp": dict(eval_samples=256, save_every=250),
}

# The papers' hyperparameters (PSO App. B.1-B.3, Sharpening App. A.3 + official code, DI++ Sec. 5 / App. A.3)
PAPER = {
    ("pso", "offline"): dict(beta=50.0, lr=1e-5, lora_rank=16, steps=5000, grad_clip=1.0),
    ("pso", "online"): dict(beta=5.0, lr=1e-5, lora_rank=16, steps=20000, grad_clip=1.0),
    ("pso", "pso"): dict(beta=50.0, lr=1e-5, lora_rank=16, steps=3000, grad_clip=1.0),
    ("pso", "naive"): dict(lr=1e-5, lora_rank=16, steps=3000, grad_clip=1.0),
    ("pso", "customize"): dict(beta=5.0, lr=5e-5, lora_rank=16, steps=1000, grad_clip=1.0),
    # the practitioners' baselines at naive's (Eq. 5's style-transfer) budget; the de-distill adapter A at ostris'
    # learning rate (1e-5) for as many updates, when dedistill trains it first (pso.py, docs/design.md section 11)
    ("pso", "base-transfer"): dict(lr=1e-5, lora_rank=16, steps=3000, grad_clip=1.0),
    ("pso", "dedistill"): dict(lr=1e-5, lora_rank=16, steps=3000, grad_clip=1.0, adapter_lr=1e-5, adapter_steps=3000),
    ("pso", "dedistill-adapter"): dict(lr=1e-5, lora_rank=16, steps=3000, grad_clip=1.0),
    ("sharpening", "sft"): dict(n=3, m=3, lr=5e-6, adam_beta1=0.0, adam_beta2=0.99, eval_cfg=5.0, data_top=1.0,
                                recompute=True),
    ("sharpening", "rlhf"): dict(n=3, m=3, lr=5e-6, adam_beta1=0.0, adam_beta2=0.99, eval_cfg=5.0, beta=2500.0,
                                 recompute=True),
    ("diff_instruct_pp", "dipp"): dict(reward_scale=100.0, cfg_scale=4.5, lr=5e-6, ta_lr=5e-6, adam_beta1=0.0,
                                       adam_beta2=0.999, lora_rank=64, ta_lora_rank=64),
    ("diff_instruct_pp", "di"): dict(reward_scale=0.0, cfg_scale=4.5, lr=5e-6, ta_lr=5e-6, adam_beta1=0.0,
                                     adam_beta2=0.999, lora_rank=64, ta_lora_rank=64),
}


def gpu_class(device=None) -> int:
    """0: a card of about 24 GB (or no GPU), 1: about 80 GB (>= 60 GiB)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    index = device.index if device is not None and getattr(device, "index", None) is not None else 0
    return int(torch.cuda.get_device_properties(index).total_memory >= 60 * 2**30)


def micro_batch(method: str, variant: str, num_processes: int = 1, card: int = 0) -> int:
    """The per-process batch: the MICRO_BATCH estimate, lowered to a divisor of the per-process share of the
    paper's global batch so that accumulation reaches the global batch exactly."""
    key = (method, variant)
    if key not in MICRO_BATCH:
        raise ValueError(f"no full-backend defaults for method {method!r} variant {variant!r}; known: "
                         f"{sorted(MICRO_BATCH)}")
    share = max(1, GLOBAL_BATCH[key] // max(1, num_processes))
    m = min(MICRO_BATCH[key][card], share)
    while share % m:
        m -= 1
    return m


def accumulation_steps(method: str, variant: str, batch: int, num_processes: int = 1) -> int:
    """--gradient-accumulation-steps that reach the paper's global batch from `batch` rows on each process."""
    return max(1, GLOBAL_BATCH[(method, variant)] // (batch * max(1, num_processes)))


def config_fields(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(importlib.import_module(method).Config)}


def method_defaults(method: str, variant: str, world=None) -> dict:
    """Paper settings of `method` / `variant` for a full-backend world, restricted to the fields the method's Config
    has. batch is the per-GPU estimate for this card (MICRO_BATCH); the launchers add the accumulation."""
    key = (method, variant)
    if key not in PAPER:
        return {}
    procs = world.accelerator.num_processes if world is not None else 1
    card = gpu_class(getattr(world, "device", None))
    out = {**PAPER[key], **RUNTIME[method], "batch": micro_batch(method, variant, procs, card)}
    student = getattr(getattr(world, "spec", None), "roles", {}).get("student")
    if method == "pso" and student is not None and student.lora:  # LCM-LoRA students: r = 32 (PSO App. B.1)
        out["lora_rank"] = 32
    if getattr(world, "guidance", None) is not None:
        # a guidance-distilled FLUX (FLUX.1-dev) has CFG built in (its embedded guidance, spec "guidance"): the
        # papers' CFG on top of it (Sharpening's eval 5, DI++'s reference 4.5) would guide twice, so it is off
        out.update({"eval_cfg": 1.0, "cfg_scale": 1.0})
    fields = config_fields(method)
    return {k: v for k, v in out.items() if k in fields}
