#!/usr/bin/env bash
# sharpening-rlhf-sd35-medium: sharpening.py with sd35_medium.json. Sharpening App. A.3 RLHF on SD3.5-medium (2.2 B transformer, DDP like SDXL): beta 2500, batch 8, n=m=3, full transformer; CFG 4.5 (the model card's).
# Usage: bash full/launchers/sharpening_rlhf_sd35_medium.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch sharpening-rlhf-sd35-medium "$@"
