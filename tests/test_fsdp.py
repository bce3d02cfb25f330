"""LoRA under accelerate's FSDP2 (full/fsdp.py, full/accelerate/fsdp.yaml) in 2-process CPU runs (torchrun, gloo).

accelerate enables FSDP only on GPU-class devices: on a CPU its state stays MULTI_CPU (DDP) even with
ACCELERATE_USE_FSDP=true (checked below, so the day it changes this test says so). The FSDP runs therefore take the
environment `accelerate launch --config_file full/accelerate/fsdp.yaml` makes (accelerate's own launch code builds
it from the shipped file) and set the state accelerate would set on a GPU (DistributedType.FSDP + the plugin built
from that environment); from there on everything is accelerate's and torch's FSDP2 code (fully_shard on gloo).

One Sharpening RLHF run of 3 updates on the tiny SDXL pipeline: under DDP, under FSDP2, and under FSDP2 stopped
after 2 updates and resumed to 3. The frozen UNet weights are sharded DTensors (half on each rank), the LoRA whole
and plain; both FSDP ranks end with the same adapter, it moved, the resumed run equals the straight one (to float rounding),
and the FSDP adapter equals the DDP one within float tolerance (another all-reduce order; see the bounds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from full import tiny

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "full" / "accelerate" / "fsdp.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")

DRIVER = """
import sys, json
sys.path.insert(0, {root!r})
import torch
from safetensors.torch import save_file
import full
import full.world as fw
torch.set_num_threads(1)
if {force!r}:
    make = fw._accelerator_class

    def forced():
        cls = make()

        class FSDPOnCPU(cls):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                from accelerate.state import PartialState
                from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

                assert self.distributed_type == DistributedType.MULTI_CPU, self.distributed_type  # see the docstring
                # what AcceleratorState.__init__ sets on a GPU: its own and PartialState's type, and the plugin
                self.state.distributed_type = DistributedType.FSDP
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment

        return FSDPOnCPU

    fw._accelerator_class = forced
import full.fsdp as ff
import full.models as fm
seen = {{"empty": [], "devices": []}}
load_unet, prepare_module = fm.load_unet, ff.prepare_module

def recording_load(*a, empty=False, **k):  # which processes read the network's weights
    seen["empty"].append(empty)
    return load_unet(*a, empty=empty, **k)

def recording_prepare(accelerator, module, train_full):  # where the frozen weights are before the sharding
    seen["devices"] = sorted({{p.device.type for p in module.parameters() if not p.requires_grad}})
    return prepare_module(accelerator, module, train_full)

fm.load_unet, ff.prepare_module = recording_load, recording_prepare
worlds = []
load = full.load_world

def capture(model, **kw):
    world = load(model, **kw)
    worlds.append(world)
    return world

full.load_world = capture
import sharpening
sharpening.main({argv!r})
world = worlds[0]
den = world.denoisers[0]
rank = world.accelerator.process_index
assert world.accelerator.num_processes == 2
info = {{"fsdp2": world.accelerator.is_fsdp2, **seen}}
if {force!r}:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    frozen = [p for p in den.unet.parameters() if not p.requires_grad]
    info.update(root=isinstance(den.unet, FSDPModule), same=den.unet is den.module,
                units=sum(isinstance(m, FSDPModule) for m in den.unet.modules()),
                frozen_sharded=all(isinstance(p, DTensor) for p in frozen),
                local=sum(p.to_local().numel() for p in frozen), total=sum(p.numel() for p in frozen),
                lora_plain=not any(isinstance(p, DTensor) for p in den.trainable_parameters()))
save_file(den.adapter_state(), {out!r} + f"/rank{{rank}}.safetensors")
json.dump(info, open({out!r} + f"/info{{rank}}.json", "w"))
"""


def fsdp_environment() -> dict:
    """The FSDP_* / ACCELERATE_USE_FSDP variables `accelerate launch --config_file fsdp.yaml` gives the processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIG), "--num_processes", "2", "x.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def test_the_shipped_config_asks_accelerate_for_fsdp2_with_block_wrapping():
    env = fsdp_environment()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false" and env["FSDP_OFFLOAD_PARAMS"] == "false"


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return tiny.save_tiny_setup(tmp_path_factory.mktemp("tiny") / "xl", "sdxl", "lcm")


def _run(spec, out: Path, steps: int, fsdp: bool, *extra) -> tuple[list[dict], list[dict]]:
    small = ["--steps", str(steps), "--batch", "2", "--eval-samples", "2", "--final-samples", "2", "--eval-every",
             "100", "--save-every", "1"]
    argv = ["--model", str(spec), "--variant", "rlhf", *small, "--n", "2", "--m", "2", "--lr", "1e-3",
            "--out", str(out / "run"), *extra]
    out.mkdir(parents=True, exist_ok=True)
    driver = out / f"driver-{steps}{''.join(extra)}.py"
    driver.write_text(DRIVER.format(root=str(ROOT), argv=argv, out=str(out), force=fsdp))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if fsdp:
        env.update(fsdp_environment())
    port = str(29100 + (os.getpid() + 13 * steps + 7 * fsdp + len(extra)) % 300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, str(driver)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ([load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)],
            [json.loads((out / f"info{r}.json").read_text()) for r in (0, 1)])


@pytest.mark.slow  # four 2-process runs: ~8 minutes on 2 shared cores
def test_lora_under_fsdp2_trains_resumes_and_matches_ddp(spec, tmp_path):
    (ddp, _), _ = _run(spec, tmp_path / "ddp", 3, fsdp=False)
    (a0, a1), infos = _run(spec, tmp_path / "fsdp", 3, fsdp=True)
    for rank, info in enumerate(infos):
        assert info["fsdp2"] and info["root"] and info["same"] and info["lora_plain"] and info["frozen_sharded"]
        # cpu-ram-efficient start-up: process 0 alone read the weights; the others held an empty (meta) network
        # until accelerate sharded it and broadcast process 0's weights (the devices: where the frozen weights
        # were when the network was handed to FSDP: nowhere near an accelerator)
        assert info["empty"] == [rank > 0] and info["devices"] == (["meta"] if rank else ["cpu"]), info
        assert info["units"] > 1  # the UNet's blocks are their own FSDP units, under the root
        assert info["local"] < 0.6 * info["total"]  # each rank holds about half of the frozen weights
    assert a0.keys() == a1.keys() == ddp.keys()
    assert all(torch.equal(a0[k], a1[k]) for k in a0)  # the ranks' LoRAs agree: gradients were averaged
    assert any(a0[k].abs().sum() > 0 for k in a0 if "lora_B" in k)  # it trained (B starts at 0)
    # the same training as DDP, up to the summation order of the gradient all-reduce. AdamW normalises each entry,
    # so where a gradient is ~0 that noise can flip an update's sign: no entry may differ by more than 3 updates x
    # 2 lr (1e-3), and the trained part as a whole must agree: lora_B (0 at the start) within 1e-3 relative (seen:
    # max 3e-4, relative 1.6e-4)
    worst = max(float((a0[k] - ddp[k]).abs().max()) for k in a0)
    b = [k for k in a0 if "lora_B" in k]
    rel = float(torch.cat([(a0[k] - ddp[k]).flatten() for k in b]).norm() / torch.cat([ddp[k].flatten() for k in b]).norm())
    (tmp_path.parent / "fsdp_vs_ddp.txt").write_text(f"max abs {worst:.3g}, lora_B relative {rel:.3g}\n")
    assert worst <= 3 * 2 * 1e-3 and rel <= 1e-3, (worst, rel)
    _run(spec, tmp_path / "resumed", 2, fsdp=True)
    (r0, r1), _ = _run(spec, tmp_path / "resumed", 3, True, "--resume")
    for k in a0:  # both ranks equal; equal to the straight run up to float rounding (seen: 9e-8; DDP: bitwise)
        assert torch.equal(r0[k], r1[k]) and torch.allclose(r0[k], a0[k], rtol=0, atol=1e-6), k
