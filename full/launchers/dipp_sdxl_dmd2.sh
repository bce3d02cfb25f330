#!/usr/bin/env bash
# dipp-sdxl-dmd2: diff_instruct_pp.py with sdxl_dmd2_dipp.json. DI++ hyperparameters on the DMD2 1-step SDXL generator, LoRA generator.
# Usage: bash full/launchers/dipp_sdxl_dmd2.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch dipp-sdxl-dmd2 "$@"
