"""Launchers: one named setting per method and paper experiment -> `accelerate launch <method>.py --model <spec> ...`.

    python -m full.launch --list
    python -m full.launch pso-online-turbo --gpu-memory 24 --rehearse    # rehearse the first run (no download)
    python -m full.launch pso-offline-dmd2 --num-processes 8             # 8 GPUs, DDP, the paper's global batch 64
    python -m full.launch pso-online-turbo --model my_spec.json --dry-run  # print the command only
    python -m full.launch dipp-sd-turbo -- --steps 100 --out runs/try     # anything after -- goes to the method
    bash full/launchers/pso_offline_dmd2.sh --num-processes 8             # the same, one script per setting

Each setting names the method script, its model spec (full/specs/*.json; `--model` replaces it) and the paper's
hyperparameters. The paper's batch is global: `--batch` of every method is per process (each rank drawing its own
rows from `common.step_generator(seed, step, rank)`) and is the largest per-GPU batch the memory plan says fits a
`--gpu-memory` GB card (full/memory_plan.py, computed from the setting's own architectures: full/defaults.py
PLANNED_PEAK_GIB; not measured, `python -m full.bench` measures); a setting that does not fit even at batch 1 is
refused with the smallest settings that do (FSDP over more GPUs, a LoRA instead of every weight, a larger card).
The rest of the global batch comes from `--gradient-accumulation-steps` = global / (per-GPU batch x processes); the
number of processes must divide the global batch. `--launcher torchrun` runs the same command with torchrun: on a
machine without CUDA several processes need it (accelerate's CPU mode does not honour --num_processes in every
configuration, CPU_MODE; the launcher refuses, and a run that finds fewer processes than asked stops). Settings of
models with 4 B parameters and more (FLUX.1, SD3.5-large) launch with several processes under accelerate's FSDP2
(`--config_file full/accelerate/fsdp.yaml`, full/fsdp.py): the frozen weights sharded over the GPUs, the LoRA
whole on each. `--rehearse` runs full/rehearse.py instead of the command.
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
    # --- the 2026 few-step models (issue 26): Z-Image-Turbo (8 steps; its base Z-Image is the teacher role) and
    # FLUX.2-klein 4B (4 steps; klein-base 4B the teacher). PSO online (Eq. 7) and Eq. 5 with the papers'
    # hyperparameters, the practitioners' baselines at Eq. 5's budget (pso.py; docs/design.md section 11), Sharpening
    # on the base model; LoRA throughout (every weight of a 4-6 B transformer with AdamW needs > 80 GB). Z-Image's
    # 6.15 B transformer launches under FSDP2 with several processes, as the other models of 4 B and more
    "pso-online-zimage-turbo": Setting("pso.py", "zimage_turbo.json", ["--variant", "online", "--beta", "5", "--lr",
                                       "1e-5", "--lora-rank", "16", "--steps", "20000"], 32,
                                       "PSO App. B.1 online (Eq. 7) on the 8-step Z-Image-Turbo (6.15 B): r=16, beta 5, "
                                       "lr 1e-5, batch 32, 20k steps; FSDP2", fsdp=True),
    "pso-style-zimage-turbo": Setting("pso.py", "zimage_turbo.json", ["--variant", "pso", "--beta", "50", "--lr", "1e-5",
                                      "--lora-rank", "16", "--steps", "3000"], 8,
                                      "PSO App. B.2: Eq. 5 on Pokemon on Z-Image-Turbo, r=16, beta 50, batch 8, lr 1e-5, "
                                      "3k steps; FSDP2", fsdp=True),
    "pso-base-transfer-zimage-turbo": Setting("pso.py", "zimage_turbo.json", ["--variant", "base-transfer", "--lr",
                                              "1e-5", "--lora-rank", "16", "--steps", "3000"], 8,
                                              "practitioners' base transfer at Eq. 5's budget (data, batch 8, r=16, "
                                              "lr 1e-5, 3k steps): the LoRA trained on Z-Image, used on the Turbo; "
                                              "FSDP2", fsdp=True),
    "pso-dedistill-zimage-turbo": Setting("pso.py", "zimage_turbo.json", ["--variant", "dedistill", "--lr", "1e-5",
                                          "--lora-rank", "16", "--steps", "3000", "--adapter-steps", "3000",
                                          "--adapter-lr", "1e-5"], 8,
                                          "practitioners' de-distill adapter at Eq. 5's budget: A (3k updates on the "
                                          "Turbo's own samples, lr 1e-5) merged, then the LoRA; FSDP2", fsdp=True),
    "sharpening-rlhf-zimage": Setting("sharpening.py", "zimage_turbo.json", ["--variant", "rlhf", "--n", "3", "--m",
                                      "3", "--lr", "5e-6", "--adam-beta1", "0", "--adam-beta2", "0.99", "--beta", "2500",
                                      "--lora-rank", "16", "--eval-cfg", "5", "--recompute"], 8,
                                      "Sharpening App. A.3 RLHF on the Z-Image base (the teacher role): beta 2500, batch "
                                      "8, n=m=3, LoRA r=16; CFG 5 (the card's guidance_scale 4 is w in pos + w (pos - "
                                      "neg)); FSDP2", fsdp=True),
    "pso-online-flux2-klein": Setting("pso.py", "flux2_klein.json", ["--variant", "online", "--beta", "5", "--lr",
                                      "1e-5", "--lora-rank", "16", "--steps", "20000"], 32,
                                      "PSO App. B.1 online (Eq. 7) on the 4-step FLUX.2-klein 4B (3.9 B transformer, "
                                      "DDP): r=16, beta 5, lr 1e-5, batch 32, 20k steps"),
    "pso-style-flux2-klein": Setting("pso.py", "flux2_klein.json", ["--variant", "pso", "--beta", "50", "--lr", "1e-5",
                                     "--lora-rank", "16", "--steps", "3000"], 8,
                                     "PSO App. B.2: Eq. 5 on Pokemon on FLUX.2-klein 4B, r=16, beta 50, batch 8, lr 1e-5, "
                                     "3k steps"),
    "pso-base-transfer-flux2-klein": Setting("pso.py", "flux2_klein.json", ["--variant", "base-transfer", "--lr",
                                             "1e-5", "--lora-rank", "16", "--steps", "3000"], 8,
                                             "practitioners' base transfer at Eq. 5's budget: the LoRA trained on "
                                             "klein-base 4B, used on klein 4B"),
    "pso-dedistill-flux2-klein": Setting("pso.py", "flux2_klein.json", ["--variant", "dedistill", "--lr", "1e-5",
                                         "--lora-rank", "16", "--steps", "3000", "--adapter-steps", "3000",
                                         "--adapter-lr", "1e-5"], 8,
                                         "practitioners' de-distill adapter at Eq. 5's budget: A (3k updates on klein's "
                                         "own samples) merged, then the LoRA"),
    "sharpening-rlhf-flux2-klein-base": Setting("sharpening.py", "flux2_klein.json", ["--variant", "rlhf", "--n", "3",
                                                "--m", "3", "--lr", "5e-6", "--adam-beta1", "0", "--adam-beta2", "0.99",
                                                "--beta", "2500", "--lora-rank", "16", "--eval-cfg", "4", "--recompute"],
                                                8, "Sharpening App. A.3 RLHF on klein-base 4B (the teacher role): beta "
                                                "2500, batch 8, n=m=3, LoRA r=16; CFG 4 (the card's)"),
}

ACCELERATE_FSDP = Path(__file__).resolve().parent / "accelerate" / "fsdp.yaml"

# A short run's method flags (full.bench, full.rehearse): evaluation on 2 samples, no quick evaluations, few
# reference images, so the time is the update's
SMALL_RUN = {"pso.py": ["--eval-samples", "2", "--eval-every", "100000", "--reference-images", "4"],
             "sharpening.py": ["--eval-samples", "2", "--final-samples", "2", "--eval-every", "100000"],
             "diff_instruct_pp.py": ["--eval-samples", "2"]}


def small_run(name: str) -> list[str]:
    """SMALL_RUN for a setting, and one update of a stage it trains before its own updates (the de-distill settings'
    adapter A: 3000 updates in the setting)."""
    s = SETTINGS[name]
    return [*SMALL_RUN[s.script], *(["--adapter-steps", "1"] if "--adapter-steps" in s.args else [])]


# Not paper hyperparameters: evaluation sizes and checkpoint cadence scaled for 1024^2 sampling (the methods' defaults
# are sized for the toys). The paper metrics of a finished run come from full/evaluate.py.
RUNTIME = {"pso.py": ["--eval-samples", "256", "--eval-every", "500", "--save-every", "250"],
           "sharpening.py": ["--eval-samples", "64", "--eval-every", "200", "--final-samples", "256",
                             "--save-every", "250"],
           "diff_instruct_pp.py": ["--eval-samples", "256", "--save-every", "250"]}


PROCESSES_ENV = "FEWSTEP_NUM_PROCESSES"  # what the launcher asked for; checked at run start (check_processes)
FULL_FLAGS = ("--full-finetune", "--train-full")  # a setting that trains every weight (the plan's "own" mode)


class DoesNotFit(ValueError):
    """A launcher setting the memory plan says does not fit the GPUs asked for; the message names what does."""


def method_variant(setting: Setting) -> tuple[str, str]:
    return Path(setting.script).stem, setting.args[setting.args.index("--variant") + 1]


def training_of(name: str, extra: list[str] = ()) -> str | None:
    """The memory plan's training mode of a setting with the method flags `extra`: "own" (the setting's), "lora"
    (a full fine-tuning setting with --no-full-finetune / --no-train-full: the LoRA alternative the plan has), or
    None (another mode the plan does not cover, e.g. --train-full added to a LoRA setting)."""
    s = SETTINGS[name]
    full = any(f in s.args for f in FULL_FLAGS)
    last = {f: max((i for i, a in enumerate(extra) if a in (f, "--no-" + f[2:])), default=-1) for f in FULL_FLAGS}
    wants = {f: extra[i] == f for f, i in last.items() if i >= 0}
    if not wants:
        return "own"
    if full and not any(wants.values()):
        return "lora"
    return "own" if full and all(wants.values()) else None


def fit_advice(name: str, gpu_memory: float, num_processes: int, training: str) -> list[str]:
    """The smallest changes that make a setting fit, by the memory plan: FSDP over more GPUs of this size, a LoRA
    instead of every weight, a larger card (for this process count and, for an FSDP setting, for 8 GPUs)."""
    from . import defaults

    s, out = SETTINGS[name], []
    cmd = f"python -m full.launch {name}"
    if s.fsdp and training == "own":
        for n in (2, 4, 8):
            if n > num_processes and s.batch % n == 0 and defaults.planned_batch(name, gpu_memory, n, s.batch // n):
                out.append(f"FSDP over {n} GPUs of {gpu_memory:g} GB: {cmd} --gpu-memory {gpu_memory:g} "
                           f"--num-processes {n}")
                break
    if training == "own" and any(f in s.args for f in FULL_FLAGS):  # on this card, else the smallest that fits
        flag = next(f for f in FULL_FLAGS if f in s.args)
        for card in [gpu_memory, *(c for c in defaults.CARDS if c > gpu_memory)]:
            b = defaults.planned_batch(name, card, num_processes, s.batch // num_processes, "lora")
            if b:
                out.append(f"a LoRA (r=16) instead of every weight{f' on {card:g} GB' if card != gpu_memory else ''}"
                           f", batch {b} per GPU: {cmd} --gpu-memory {card:g}"
                           f"{f' --num-processes {num_processes}' if num_processes > 1 else ''} -- --no-{flag[2:]}")
                break
    for n in sorted({num_processes, 8} if s.fsdp and training == "own" else {num_processes}):
        if s.batch % n:
            continue
        card = next((c for c in defaults.CARDS if c > gpu_memory and defaults.planned_batch(
            name, c, n, s.batch // n, training)), None)
        if card:
            out.append(f"{n} GPU{'s' if n > 1 else ''} of {card} GB{' (FSDP)' if n > 1 and s.fsdp else ''}: {cmd} "
                       f"--gpu-memory {card}{f' --num-processes {n}' if n > 1 else ''}")
    return out


def per_process_batch(name: str, num_processes: int, gpu_memory: float = 80, training: str = "own",
                      batch: int | None = None) -> tuple[int, int]:
    """(per-GPU batch, gradient-accumulation steps) reaching the setting's global batch on `num_processes` GPUs of
    `gpu_memory` GB: the largest batch the memory plan says fits (full/defaults.py PLANNED_PEAK_GIB, computed from
    the setting's own architectures; not measured), or `batch` if given and it fits. DoesNotFit names the
    smallest settings that fit when even batch 1 does not."""
    from . import defaults

    s = SETTINGS[name]
    if num_processes < 1 or (batch is None and s.batch % num_processes):
        raise ValueError(f"{num_processes} processes do not divide the global batch {s.batch}; choose a divisor "
                         "(or pass --batch to the method after --)")
    if not gpu_memory > 0:
        raise ValueError(f"--gpu-memory must be the GB of one GPU (> 0), got {gpu_memory}")
    share = s.batch // num_processes
    if batch is None:
        micro = defaults.planned_batch(name, gpu_memory, num_processes, share, training)
    else:
        peak = defaults.planned_peak(name, batch, num_processes, training)
        micro = batch if peak is None or defaults.fits(peak, gpu_memory) else None
    if micro is None:
        b = batch or 1
        peak = defaults.planned_peak(name, b, num_processes, training)
        if peak is None:
            raise DoesNotFit(f"{name} ({training}) has no memory-plan rows in full/defaults.py PLANNED_PEAK_GIB: "
                             "regenerate them with python -m full.memory_plan --write-docs")
        where = f"{num_processes} GPUs of {gpu_memory:g} GB{' (FSDP)' if s.fsdp and num_processes > 1 else ''}" if (
            num_processes > 1) else f"one {gpu_memory:g} GB GPU"
        advice = fit_advice(name, gpu_memory, num_processes, training) if batch is None else [
            f"per-GPU batch {defaults.planned_batch(name, gpu_memory, num_processes, share, training)} (the "
            "largest planned that fits; drop --batch to get it)"]
        raise DoesNotFit(
            f"{name} does not fit {where}: the memory plan puts batch {b} per GPU at {peak:.1f} GiB "
            f"(+{defaults.MARGIN - 1:.0%} margin = {peak * defaults.MARGIN * defaults.GiB / 1e9:.1f} GB; "
            "python -m full.memory_plan shows the rows). What fits:\n  "
            + ("\n  ".join(advice) if advice else "nothing planned: a larger card than "
               f"{defaults.CARDS[-1]} GB or a smaller resolution (a spec of your own)"))
    return micro, max(1, share // micro)


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
    batch = []
    if "--batch" not in extra:
        micro, steps = planned(name, num_processes, gpu_memory, model, extra)
        batch = ["--batch", str(micro)]
        if steps > 1 and has_accumulation(s.script) and "--gradient-accumulation-steps" not in extra:
            batch += ["--gradient-accumulation-steps", str(steps)]
    else:
        planned(name, num_processes, gpu_memory, model, extra)  # a --batch the plan says does not fit is refused
    argv = ["--model", model or str(SPECS / s.spec), *RUNTIME[s.script], *s.args, *batch, "--out", f"runs/{name}",
            *extra]
    return ROOT / s.script, argv


def planned(name: str, num_processes: int, gpu_memory: float, model: str | None, extra: list[str]) -> tuple[int, int]:
    """per_process_batch for the launcher's command: the shipped spec's plan in the training mode `extra` asks for
    (a --batch in `extra` is checked against it); another --model or a mode the plan does not cover gets batch 1
    (nothing is planned for it; `python -m full.memory_plan` or full.bench measure it)."""
    s = SETTINGS[name]
    training = training_of(name, extra)
    batch = int(extra[len(extra) - 1 - extra[::-1].index("--batch") + 1]) if "--batch" in extra else None
    if model is not None or training is None:
        if num_processes < 1 or (batch is None and s.batch % num_processes):
            raise ValueError(f"{num_processes} processes do not divide the global batch {s.batch}; choose a divisor "
                             "(or pass --batch to the method after --)")
        b = batch or 1
        return b, max(1, s.batch // (num_processes * b))
    return per_process_batch(name, num_processes, gpu_memory, training, batch)


def mixed_precision_of(model: str) -> str:
    """accelerate's --mixed_precision: the spec's dtype, or bf16 for a checkpoint / spec that names none (the
    settings are GPU runs of SDXL-class models; fp32 would not fit the per-GPU batches)."""
    from .spec import load_spec

    try:
        return load_spec(model).mixed_precision or "bf16"
    except (OSError, ValueError, ImportError):
        return "bf16"


CPU_MODE = ("accelerate launch runs in its CPU mode on a machine without CUDA, where --num_processes is not "
            "honoured by every configuration (with --cpu, or use_cpu in its config without --multi_gpu, it starts ONE "
            "process; an FSDP config becomes DDP)")


def command(name: str, num_processes: int = 1, launcher: str = "accelerate", model: str | None = None,
            extra: list[str] = (), port: int = 29500, gpu_memory: float = 80, cuda: bool | None = None) -> list[str]:
    """The launch command of a setting. Several processes under accelerate on a machine without CUDA are refused
    (CPU_MODE): --launcher torchrun starts them (gloo)."""
    cuda = _has_cuda() if cuda is None else cuda
    if launcher == "accelerate" and num_processes > 1 and not cuda:
        raise ValueError(f"{num_processes} processes requested, but {CPU_MODE}: use --launcher torchrun for several "
                         "CPU processes (gloo), or run on a machine with CUDA")
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


def check_processes(accelerator) -> None:
    """At run start (FullWorld): the processes that started must be the processes asked for. Two ways of asking
    are seen: full.launch's --num-processes (PROCESSES_ENV in the environment), and a direct `accelerate launch
    --num_processes N` that accelerate's CPU mode ran as one plain process (its simple launcher sets MASTER_ADDR
    for N > 1 but starts one process without WORLD_SIZE)."""
    import os

    asked = os.environ.get(PROCESSES_ENV)
    got = accelerator.num_processes
    if asked is not None and int(asked) != got:
        raise RuntimeError(f"{asked} processes were requested (python -m full.launch --num-processes {asked}) but "
                           f"{got} started: {CPU_MODE}. Use --launcher torchrun for several CPU processes")
    if (got == 1 and os.environ.get("ACCELERATE_USE_CPU") is not None and "MASTER_ADDR" in os.environ
            and "WORLD_SIZE" not in os.environ):
        raise RuntimeError(f"accelerate launch was asked for several processes but started one: {CPU_MODE}. Use "
                           "`torchrun --nproc_per_node N` (or python -m full.launch ... --launcher torchrun) for "
                           "several CPU processes")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    import harness

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("setting", nargs="?", help="a paper setting (see --list)")
    p.add_argument("--list", action="store_true", help="list the settings and their sources")
    p.add_argument("--model", help="a model spec or checkpoint replacing the setting's spec (the memory plan "
                                   "covers the shipped spec only: another gets per-GPU batch 1)")
    p.add_argument("--num-processes", type=harness.bounded(int, 1), default=1,
                   help="processes (GPUs); the global batch is split over them")
    p.add_argument("--launcher", default="accelerate", choices=["accelerate", "torchrun", "python"])
    p.add_argument("--port", type=harness.bounded(int, 1, 65535), default=29500, help="rendezvous port")
    p.add_argument("--gpu-memory", type=harness.bounded(float, 1), default=80,
                   help="GB per GPU: the per-GPU batch is the largest the memory plan says fits (a setting that does "
                        "not fit is refused, naming what does); accumulation reaches the global batch")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("--rehearse", action="store_true",
                   help="rehearse the first real run without downloading weights (full/rehearse.py): real "
                        "configs, schedulers and data layout, the memory plan for --gpu-memory / --num-processes, "
                        "the downloads, one update on the CPU")
    a = p.parse_args(argv)
    if a.list or not a.setting:
        from . import defaults

        for name, s in SETTINGS.items():
            per = []
            for g in defaults.CARDS:
                b = defaults.planned_batch(name, g, 1, s.batch)
                per.append(f"{b if b else '-'} ({g})")
            print(f"{name:28s} {s.script:20s} {s.spec:26s} global batch {s.batch:4d}, per GPU (GB): {' '.join(per)}"
                  f"{', FSDP' if s.fsdp else ''}  {s.source}")
        return 0
    if a.setting not in SETTINGS:
        p.error(f"unknown launcher setting {a.setting!r}; choose one of {sorted(SETTINGS)}")
    if a.rehearse:
        from . import rehearse

        return rehearse.main_from_launcher(a.setting, a.gpu_memory, a.num_processes, a.model, extra, a.launcher)
    try:
        cmd = command(a.setting, a.num_processes, a.launcher, a.model, extra, a.port, a.gpu_memory)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(shlex.join(cmd), flush=True)
    if a.model is not None or training_of(a.setting, extra) is None:
        print("note: the memory plan covers the setting's shipped spec and training mode: this run gets per-GPU batch "
              f"{cmd[cmd.index('--batch') + 1]} unchecked (python -m full.bench measures it)", flush=True)
    if a.dry_run:
        return 0
    env = {**os.environ, PROCESSES_ENV: str(a.num_processes)}
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
