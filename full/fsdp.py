"""LoRA training under accelerate's FSDP2 (`accelerate launch --config_file full/accelerate/fsdp.yaml ...`).

What is sharded: the frozen weights of the UNet / transformer, one FSDP unit per block (the shipped config's
TRANSFORMER_BASED_WRAP takes the model's own `_no_split_modules`: FluxTransformerBlock + FluxSingleTransformerBlock,
JointTransformerBlock, the UNet's transformer / resnet blocks). What is not: the LoRA. Its parameters are FSDP2
`ignored_params`: every rank holds the whole LoRA and its AdamW states, as plain tensors. That keeps the harness's
checkpoints as they are (rank 0 saves `adapter_state()` and the optimizer's state_dict, every rank restores the same
files; a sharded LoRA would need a collective gather on every rank for each save) and costs little (a rank-16 LoRA
of FLUX.1 is ~19 M parameters: 0.3 GB with its fp32 AdamW states per GPU).

FSDP2 does not reduce the gradients of ignored parameters, and DDP cannot wrap a part of an FSDP module, so each
LoRA parameter gets a post-accumulate-grad hook that averages its gradient over the ranks (all_reduce SUM / world
size; gloo has no AVG). With gradient accumulation the hook runs on every micro-batch; averaging the already
averaged part again leaves it unchanged, so the result is the mean over ranks of the summed micro-batch gradients,
as DDP gives.

accelerate's FSDP2 prepares a model only together with its optimizer, one model per `prepare` call, while the
methods prepare the UNet when the denoiser is built and the optimizer later (`acc.prepare(AdamW(...))`).
`prepare_module` therefore leaves the module pending and `prepare` (called from FullAccelerator.prepare)
passes it to accelerate together with the optimizer of its parameters. Every FSDP unit, the root included,
reshards after each forward: rank 0 alone calls `state_dict()` (checkpoints, LoRA export), which would otherwise
reshard a unit only there and the ranks' next all-gathers would differ (a gloo "collective mismatch" abort in the
2-process test, before this). fully_shard works in place: the denoiser's
plain module and its prepared module stay one object, so no-grad and adapter-disabled calls also go through FSDP's
all-gather (a plain module outside FSDP would see only this rank's shards).

Start-up (accelerate's cpu-ram-efficient loading, turned on for the denoiser's preparation only): process 0
alone reads the network's checkpoint into host RAM (`reads_no_weights`: the others build its architecture on the
meta device from its config, full/models.py `load_unet(empty=True)`), the network stays off the GPU until it is
sharded (FullDenoiser does not move it), and accelerate's `fsdp2_prepare_model` shards the meta network and
broadcasts process 0's weights one parameter at a time into the shards: no process holds the whole network on its
GPU, and one holds it in host RAM. The shipped config leaves `fsdp_cpu_ram_efficient_loading: false` because the
environment variable it exports makes transformers' `from_pretrained` load empty models on the processes > 0,
which would leave the text encoders (not sharded) without weights there; `shard_with` sets it on accelerate's
plugin for the denoiser alone. The LoRA's gradient hooks are registered after the sharding (accelerate assigns
new parameter objects when it loads the broadcast weights).

Not supported (clear errors): FSDP1 (`fsdp_version: 1`: it flattens parameters, so the plain-module calls would be
wrong), and training every weight (`train_full`: the trained weights would be sharded, and the harness saves
state on rank 0 only). accelerate enables FSDP only on GPU-class devices: on a CPU (`cpu=True`) the state stays
MULTI_CPU and the run is DDP (the 2-process CPU test forces accelerate's FSDP state to exercise this path on gloo).
"""
from __future__ import annotations

import torch

PENDING = "_fewstep_fsdp_pending"


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def reads_no_weights(accelerator) -> bool:
    """Under FSDP, the processes other than process 0 build the networks empty (meta) and receive process 0's
    weights when they are sharded (cpu-ram-efficient loading, see the module docstring)."""
    return is_fsdp(accelerator) and not accelerator.is_main_process


def prepare_module(accelerator, module: torch.nn.Module, train_full: bool) -> torch.nn.Module:
    """accelerator.prepare(module), or under FSDP the module itself, registered to be sharded when the optimizer of
    its LoRA is prepared (see the module docstring)."""
    if not is_fsdp(accelerator):
        return accelerator.prepare(module)
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(f"FSDP version {plugin.fsdp_version}: the full backend trains under FSDP2 only; set "
                         "fsdp_version: 2 in the accelerate config (full/accelerate/fsdp.yaml)")
    if train_full:
        raise ValueError("training every weight (--train-full / --full-finetune) is not supported under FSDP: the "
                         "harness checkpoints trained weights from rank 0 only; train a LoRA, or launch without FSDP")
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError("FSDP: the module has no trainable (LoRA) parameters to train")
    getattr(accelerator, PENDING, None) or setattr(accelerator, PENDING, [])
    getattr(accelerator, PENDING).append(module)
    return module


def keep_parameters(module: torch.nn.Module, optimizer, own: dict[str, torch.nn.Parameter]) -> None:
    """Loading the broadcast weights assigns new parameter objects (load_state_dict(assign=True)); the methods hold
    the LoRA's parameters from before `prepare` (gradient clipping, their optimizer's list), so each LoRA parameter
    object is put back into its module with the broadcast value, and the optimizer's list points at it again. The
    LoRA is not sharded (FSDP2 ignored parameters): FSDP holds no reference to it."""
    swapped = {}
    for name, old in own.items():
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        new = sub._parameters[leaf]
        if new is not old:  # (old may be on the meta device, new on the GPU: .data cannot cross that)
            torch.utils.swap_tensors(old, new)  # `old` now holds the broadcast value, `new` the stale one
            sub._parameters[leaf] = old
            swapped[id(new)] = old
    for group in optimizer.param_groups:
        group["params"] = [swapped.get(id(p), p) for p in group["params"]]


def _average_grad(p: torch.Tensor, world: int) -> None:
    if world > 1 and p.grad is not None:
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(world)


def prepare(accelerator, accelerate_prepare, args: tuple, kw: dict):
    """FullAccelerator.prepare: accelerate's prepare, except that under FSDP an optimizer whose parameters belong to
    a pending module is prepared together with that module (sharded then, its LoRA left out of the sharding)."""
    pending = getattr(accelerator, PENDING, None)
    if not pending or not is_fsdp(accelerator):
        return accelerate_prepare(*args, **kw)
    out: list = [None] * len(args)
    rest = []
    for i, obj in enumerate(args):
        owner = None
        if isinstance(obj, torch.optim.Optimizer):
            ids = {id(p) for g in obj.param_groups for p in g["params"]}
            owner = next((m for m in pending if ids <= {id(p) for p in m.parameters() if p.requires_grad}), None)
        if owner is None:
            rest.append(i)
            continue
        pending.remove(owner)
        out[i] = shard_with(accelerator, accelerate_prepare, owner, obj, kw)[1]
    if rest:
        done = accelerate_prepare(*[args[i] for i in rest], **kw)
        for i, obj in zip(rest, done if len(rest) > 1 else [done]):
            out[i] = obj
    return out[0] if len(out) == 1 else tuple(out)


def shard_with(accelerator, prepare, module: torch.nn.Module, optimizer, kw: dict | None = None) -> tuple:
    """accelerate's prepare(module, optimizer) with the module's trainable parameters as FSDP2 ignored parameters and
    process 0's weights broadcast into the shards (cpu-ram-efficient loading); then the LoRA's own parameter objects
    are put back (with the broadcast values) and get their gradient-averaging hooks."""
    plugin = accelerator.state.fsdp_plugin
    lora = [m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    own = {name: p for name, p in module.named_parameters() if p.requires_grad}
    saved = plugin.ignored_modules, plugin.cpu_ram_efficient_loading
    plugin.ignored_modules, plugin.cpu_ram_efficient_loading = lora, True
    try:
        out = prepare(module, optimizer, **(kw or {}))
    finally:
        plugin.ignored_modules, plugin.cpu_ram_efficient_loading = saved
    if out[0] is not module:  # fully_shard is in place; the denoiser keeps `module` as both its nets
        raise RuntimeError("FSDP2 preparation returned another module than it was given")
    keep_parameters(module, out[1], own)
    world = accelerator.num_processes
    for p in own.values():
        p.register_post_accumulate_grad_hook(lambda p, world=world: _average_grad(p, world))
    # the root too (accelerate leaves it unsharded after a forward): rank 0 alone calls state_dict() (checkpoints,
    # LoRA export), which reshards an unsharded unit, and the ranks' next all-gathers would no longer match
    module.set_reshard_after_forward(True)
    return out
