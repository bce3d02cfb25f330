"""Launchers: one named setting per method and paper experiment -> `accelerate launch <method>.py --model <spec> ...`.

    python -m full.launch --list
    python -m full.launch pso-offline-dmd2 --num-processes 8             # 8 GPUs, DDP, the paper's global batch 64
    python -m full.launch pso-online-turbo --model my_spec.json --dry-run  # print the command only
    python -m full.launch dipp-sd-turbo -- --steps 100 --out runs/try     # anything after -- goes to the method
    bash full/launchers/pso_offline_dmd2.sh --num-processes 8             # the same, one script per setting

Each setting names the method script, its model spec (full/specs/*.json; `--model` replaces it) and the paper's
hyperparameters. The paper's batch is global: `--batch` of every method is per process (each rank drawing its own
rows from `common.step_generator(seed, step, rank)`) and is the per-GPU batch estimated to fit a `--gpu-memory`
24 or 80 GB card (full/defaults.py MICRO_BATCH: estimates, run `python -m full.bench` to measure); the rest of the
global batch comes from `--gradient-accumulation-steps` = global / (per-GPU batch x processes). The number of
processes must divide the global batch. `--launcher torchrun` runs the same command with torchrun (what the CPU multi-process test uses;
accelerate's CPU mode cannot start several processes on one machine). Settings of models with 4 B parameters and
more (FLUX.1, SD3.5-large) launch with several processes under accelerate's FSDP2 (`--config_file
full/accelerate/fsdp.yaml`, full/fsdp.py): the frozen weights sharded over the GPUs, the LoRA whole on each.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = Path(__file__).resolve().parent / "specs"


@dataclass
class Setting:
    script: str  # method script at the repository root
    spec: str  # model spec in full/specs
    args: list[str]  # the paper's hyperparameters
    batch: int  # global batch (split over processes)
    source: str  # where the numbers come from
    extra: list[str] = field(default_factory=list)
    fsdp: bool = False  # >= 4 B parameters: with several processes, accelerate's FSDP2 (full/accelerate/fsdp.yaml)


PSO_APP_B1 = "PSO App. B.1: LoRA r=16 (DMD2, Turbo) / 32 (LCM), N=4, beta 50 offline / 5 online, lr 1e-5"
SETTINGS = {
    # --- PSO (pso.py): human preference tuning, Pick-a-Pic v2 (offline, Eq. 6) / PickScore-labelled pairs (online, Eq. 7)
    "pso-offline-dmd2": Setting("pso.py", "sdxl_dmd2.json", ["--variant", "offline", "--beta", "50", "--lr", "1e-5",
                                "--lora-rank", "16", "--steps", "5000"], 64, PSO_APP_B1 + ", batch 64, 5k steps"),
    "pso-online-dmd2": Setting("pso.py", "sdxl_dmd2.json", ["--variant", "online", "--beta", "5", "--lr", "1e-5",
                               "--lora-rank", "16", "--steps", "20000"], 32, PSO_APP_B1 + ", batch 32, 20k steps"),
    "pso-offline-turbo": Setting("pso.py", "sdxl_turbo.json", ["--variant", "offline", "--beta", "50", "--lr", "1e-5",
                                 "--lora-rank", "16", "--steps", "5000", "--sampler", "euler_ancestral"], 64,
                                 PSO_APP_B1 + ", batch 64, 5k steps"),
    "pso-online-turbo": Setting("pso.py", "sdxl_turbo.json", ["--variant", "online", "--beta", "5", "--lr", "1e-5",
                                "--lora-rank", "16", "--steps", "20000", "--sampler", "euler_ancestral"], 32,
                                PSO_APP_B1 + ", batch 32, 20k steps"),
    "pso-offline-lcm": Setting("pso.py", "sdxl_lcm.json", ["--variant", "offline", "--beta", "50", "--lr", "1e-5",
                               "--lora-rank", "32", "--steps", "5000"], 64, PSO_APP_B1 + ", batch 64, 5k steps"),
    "pso-online-lcm": Setting("pso.py", "sdxl_lcm.json", ["--variant", "online", "--beta", "5", "--lr", "1e-5",
                              "--lora-rank", "32", "--steps", "20000"], 32, PSO_APP_B1 + ", batch 32, 20k steps"),
    # style transfer (Pokemon) and concept customization (DreamBooth) on SDXL-Turbo
    "pso-style-turbo": Setting("pso.py", "sdxl_turbo.json", ["--variant", "pso", "--beta", "50", "--lr", "1e-5",
                               "--lora-rank", "16", "--steps", "3000", "--sampler", "euler_ancestral"], 8,
                               "PSO App. B.2: Eq. 5 on Pokemon, r=16, beta 50, batch 8, lr 1e-5, 3k steps"),
    "pso-customize-turbo": Setting("pso.py", "sdxl_turbo.json", ["--variant", "customize", "--beta", "5", "--lr", "5e-5",
                                   "--lora-rank", "16", "--steps", "1000", "--sampler", "euler_ancestral"], 4,
                                   "PSO App. B.3: Eq. 6 variant + prior preservation, r=16, beta 5, lr 5e-5, batch 4, "
                                   "1k steps"),
    # --- Diffusion-Sharpening (sharpening.py) on SDXL: full UNet as in the paper, AdamW betas (0, 0.99)
    "sharpening-sft-sdxl": Setting("sharpening.py", "sdxl_base.json", ["--variant", "sft", "--n", "3", "--m", "3",
                                   "--lr", "5e-6", "--adam-beta1", "0", "--adam-beta2", "0.99", "--full-finetune",
                                   "--eval-cfg", "5", "--recompute", "--data-top", "1"], 8,
                                   "Sharpening App. A.3: lr 5e-6, AdamW (0, 0.99), batch 8, n=m=3, CFG 5 at eval; "
                                   "--data-top 1: the data set is already curated (the 0.5 default is the toys'); "
                                   "--recompute keeps graphs for the chosen trajectory only (SDXL memory)"),
    "sharpening-rlhf-sdxl": Setting("sharpening.py", "sdxl_base.json", ["--variant", "rlhf", "--n", "3", "--m", "3",
                                    "--lr", "5e-6", "--adam-beta1", "0", "--adam-beta2", "0.99", "--full-finetune",
                                    "--beta", "2500", "--eval-cfg", "5", "--recompute"], 8,
                                    "Sharpening App. A.3 + official code: beta 2500, batch 8, n=m=3"),
    # --- Diff-Instruct++ (diff_instruct_pp.py): one-step generators, ImageReward, Adam (0, 0.999), lr 5e-6
    "dipp-sd-turbo": Setting("diff_instruct_pp.py", "sd_turbo_dipp.json", ["--variant", "dipp", "--reward-scale", "100",
                             "--cfg-scale", "4.5", "--lr", "5e-6", "--ta-lr", "5e-6", "--adam-beta1", "0",
                             "--adam-beta2", "0.999", "--train-full", "--ta-lora-rank", "64"], 256,
                             "DI++ Sec. 5 / App. A.3: alpha_rew 100 (SD1.5 range 100-1000), CFG reward 4.5, lr 5e-6, "
                             "Adam (0, 0.999), batch 256; TA as a LoRA (docs/design.md section 6)"),
    "dipp-sdxl-dmd2": Setting("diff_instruct_pp.py", "sdxl_dmd2_dipp.json", ["--variant", "dipp", "--reward-scale", "100",
                              "--cfg-scale", "4.5", "--lr", "5e-6", "--ta-lr", "5e-6", "--adam-beta1", "0",
                              "--adam-beta2", "0.999", "--lora-rank", "64", "--ta-lora-rank", "64"], 256,
                              "DI++ hyperparameters on the DMD2 1-step SDXL generator, LoRA generator"),
    "di-pretrain-sd21": Setting("diff_instruct_pp.py", "sd_turbo_dipp.json", ["--variant", "di", "--reward-scale", "0",
                                "--cfg-scale", "4.5", "--lr", "5e-6", "--ta-lr", "5e-6", "--adam-beta1", "0",
                                "--adam-beta2", "0.999", "--train-full"], 1024,
                                "DI++ App. A.3 pre-training stage (Diff-Instruct): batch 1024, CFG 4.5, no reward"),
    # --- flow-matching few-step models (issue 16): the papers' hyperparameters on SD3.5 / FLUX.1 (their specs:
    # full/specs/flux_schnell.json, sd35_medium.json, sd35_large_turbo_dipp.json; LoRA only under FSDP)
    "pso-online-flux-schnell": Setting("pso.py", "flux_schnell.json", ["--variant", "online", "--beta", "5", "--lr",
                                       "1e-5", "--lora-rank", "16", "--steps", "20000"], 32,
                                       "PSO App. B.1 online (Eq. 7) on the 4-step FLUX.1-schnell (12 B): r=16, beta 5, "
                                       "lr 1e-5, batch 32, 20k steps; FSDP2", fsdp=True),
    "sharpening-rlhf-sd35-medium": Setting("sharpening.py", "sd35_medium.json", ["--variant", "rlhf", "--n", "3", "--m",
                                           "3", "--lr", "5e-6", "--adam-beta1", "0", "--adam-beta2", "0.99",
                                           "--full-finetune", "--beta", "2500", "--eval-cfg", "4.5", "--recompute"], 8,
                                           "Sharpening App. A.3 RLHF on SD3.5-medium (2.2 B transformer, DDP like "
                                           "SDXL): beta 2500, batch 8, n=m=3, full transformer; CFG 4.5 (the model "
                                           "card's)"),
    "dipp-sd35-large-turbo": Setting("diff_instruct_pp.py", "sd35_large_turbo_dipp.json", ["--variant", "dipp",
                                     "--reward-scale", "100", "--cfg-scale", "4.5", "--lr", "5e-6", "--ta-lr", "5e-6",
                                     "--adam-beta1", "0", "--adam-beta2", "0.999", "--lora-rank", "64",
                                     "--ta-lora-rank", "64"], 256,
                                     "DI++ hyperparameters: SD3.5-large-turbo at 1 step as the generator, SD3.5-large "
                                     "(the model it is distilled from, same 8 B transformer and latents) as the "
                                     "reference + TA, LoRA r=64 both; FSDP2", fsdp=True),
}

ACCELERATE_FSDP = Path(__file__).resolve().parent / "accelerate" / "fsdp.yaml"


# Not paper hyperparameters: evaluation sizes and checkpoint cadence scaled for 1024^2 sampling (the methods' defaults
# are sized for the toys). The paper metrics of a finished run come from full/evaluate.py.
RUNTIME = {"pso.py": ["--eval-samples", "256", "--eval-every", "500", "--save-every", "250"],
           "sharpening.py": ["--eval-samples", "64", "--eval-every", "200", "--final-samples", "256",
                             "--save-every", "250"],
           "diff_instruct_pp.py": ["--eval-samples", "256", "--save-every", "250"]}


GPU_MEMORY = {24: 0, 80: 1}  # --gpu-memory GB -> the column of full.defaults.MICRO_BATCH


def method_variant(setting: Setting) -> tuple[str, str]:
    return Path(setting.script).stem, setting.args[setting.args.index("--variant") + 1]


def per_process_batch(setting: Setting, num_processes: int, gpu_memory: int = 80) -> tuple[int, int]:
    """(per-GPU batch, gradient-accumulation steps) reaching the setting's global batch on `num_processes` GPUs of
    `gpu_memory` GB. The per-GPU batches are estimates (full/defaults.py MICRO_BATCH), not measurements."""
    from . import defaults

    if num_processes < 1 or setting.batch % num_processes:
        raise ValueError(f"{num_processes} processes do not divide the global batch {setting.batch}; choose a divisor "
                         "(or pass --batch to the method after --)")
    if gpu_memory not in GPU_MEMORY:
        raise ValueError(f"--gpu-memory must be one of {sorted(GPU_MEMORY)} (GB), got {gpu_memory}")
    method, variant = method_variant(setting)
    micro = min(defaults.MICRO_BATCH[(method, variant)][GPU_MEMORY[gpu_memory]], setting.batch // num_processes)
    while (setting.batch // num_processes) % micro:
        micro -= 1
    return micro, setting.batch // (num_processes * micro)


def has_accumulation(script: str) -> bool:
    """Whether the method's Config has gradient_accumulation_steps yet (the methods gain it with the harness)."""
    from .defaults import config_fields

    return "gradient_accumulation_steps" in config_fields(Path(script).stem)


def method_argv(name: str, model: str | None = None, num_processes: int = 1, extra: list[str] = (),
                gpu_memory: int = 80) -> tuple[Path, list[str]]:
    """(script path, argv) of a setting: --model, the paper's arguments, the per-GPU batch and the accumulation
    that reach the paper's global batch, then `extra` (later flags win in argparse, so `extra` overrides anything).
    A method without --gradient-accumulation-steps yet gets the per-GPU batch only (a smaller global batch)."""
    if name not in SETTINGS:
        raise ValueError(f"unknown launcher setting {name!r}; choose one of {sorted(SETTINGS)}")
    s = SETTINGS[name]
    model = model or str(SPECS / s.spec)
    batch = []
    if "--batch" not in extra:
        micro, steps = per_process_batch(s, num_processes, gpu_memory)
        batch = ["--batch", str(micro)]
        if steps > 1 and has_accumulation(s.script) and "--gradient-accumulation-steps" not in extra:
            batch += ["--gradient-accumulation-steps", str(steps)]
    argv = ["--model", model, *RUNTIME[s.script], *s.args, *batch, "--out", f"runs/{name}", *extra]
    return ROOT / s.script, argv


def mixed_precision_of(model: str) -> str:
    """accelerate's --mixed_precision: the spec's dtype, or bf16 for a checkpoint / spec that names none (the
    settings are GPU runs of SDXL-class models; fp32 would not fit the per-GPU batches)."""
    from .spec import load_spec

    try:
        return load_spec(model).mixed_precision or "bf16"
    except (OSError, ValueError, ImportError):
        return "bf16"


def command(name: str, num_processes: int = 1, launcher: str = "accelerate", model: str | None = None,
            extra: list[str] = (), port: int = 29500, gpu_memory: int = 80) -> list[str]:
    script, argv = method_argv(name, model, num_processes, list(extra), gpu_memory)
    model = argv[1]
    fsdp = SETTINGS[name].fsdp and num_processes > 1
    if launcher == "accelerate":
        head = ["accelerate", "launch", *(["--config_file", str(ACCELERATE_FSDP)] if fsdp else []),
                "--num_processes", str(num_processes), "--num_machines", "1",
                "--mixed_precision", mixed_precision_of(model), "--dynamo_backend", "no",
                "--main_process_port", str(port)]
        if num_processes > 1 and not fsdp:  # the FSDP config names its distributed type (--multi_gpu would clash)
            head.append("--multi_gpu")
    elif launcher == "torchrun":  # DDP only (the FSDP settings need accelerate launch for their config)
        head = ["torchrun", "--nproc_per_node", str(num_processes), "--master_port", str(port)]
    elif launcher == "python":
        if num_processes != 1:
            raise ValueError("--launcher python runs one process; use accelerate or torchrun for more")
        head = [sys.executable]
    else:
        raise ValueError(f"unknown launcher {launcher!r}; choose accelerate, torchrun or python")
    return [*head, str(script), *argv]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    import harness

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("setting", nargs="?", help="a paper setting (see --list)")
    p.add_argument("--list", action="store_true", help="list the settings and their sources")
    p.add_argument("--model", help="a model spec or checkpoint replacing the setting's spec")
    p.add_argument("--num-processes", type=harness.bounded(int, 1), default=1,
                   help="processes (GPUs); the global batch is split over them")
    p.add_argument("--launcher", default="accelerate", choices=["accelerate", "torchrun", "python"])
    p.add_argument("--port", type=harness.bounded(int, 1, 65535), default=29500, help="rendezvous port")
    p.add_argument("--gpu-memory", type=int, default=80, choices=sorted(GPU_MEMORY),
                   help="GB per GPU: picks the per-GPU batch (an estimate); accumulation reaches the global batch")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    a = p.parse_args(argv)
    if a.list or not a.setting:
        for name, s in SETTINGS.items():
            b24, b80 = (per_process_batch(s, 1, g)[0] for g in (24, 80))
            print(f"{name:22s} {s.script:20s} {s.spec:22s} global batch {s.batch:4d}, per GPU {b24} (24 GB) / "
                  f"{b80} (80 GB)  {s.source}")
        return 0
    try:
        cmd = command(a.setting, a.num_processes, a.launcher, a.model, extra, a.port, a.gpu_memory)
    except ValueError as e:
        p.error(str(e))
    print(shlex.join(cmd), flush=True)
    s = SETTINGS[a.setting]
    if "--batch" not in extra and not has_accumulation(s.script):
        micro, steps = per_process_batch(s, a.num_processes, a.gpu_memory)
        if steps > 1:
            print(f"note: {s.script} has no --gradient-accumulation-steps yet: each update uses {micro * a.num_processes} "
                  f"rows, not the paper's {s.batch}", flush=True)
    if a.dry_run:
        return 0
    env = {**os.environ}
    if a.launcher == "torchrun" and not _has_cuda():
        env["ACCELERATE_USE_CPU"] = "1"
    return subprocess.call(cmd, cwd=ROOT, env=env)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    import harness

    harness.run_cli(main)
