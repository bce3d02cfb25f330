#!/usr/bin/env bash
# dipp-sd35-large-turbo: diff_instruct_pp.py with sd35_large_turbo_dipp.json. DI++ hyperparameters: SD3.5-large-turbo at 1 step as the generator, SD3.5-large (the model it is distilled from, same 8 B transformer and latents) as the reference + TA, LoRA r=64 both; FSDP2.
# Usage: bash full/launchers/dipp_sd35_large_turbo.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch dipp-sd35-large-turbo "$@"
