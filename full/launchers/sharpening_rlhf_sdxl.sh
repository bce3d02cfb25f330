#!/usr/bin/env bash
# sharpening-rlhf-sdxl: sharpening.py with sdxl_base.json. Sharpening App. A.3 + official code: beta 2500, batch 8, n=m=3.
# Usage: bash full/launchers/sharpening_rlhf_sdxl.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch sharpening-rlhf-sdxl "$@"
