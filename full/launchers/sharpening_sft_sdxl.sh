#!/usr/bin/env bash
# sharpening-sft-sdxl: sharpening.py with sdxl_base.json. Sharpening App. A.3: lr 5e-6, AdamW (0, 0.99), batch 8, n=m=3, CFG 5 at eval; --data-top 1: the data set is already curated (the 0.5 default is the toys'); --recompute keeps graphs for the chosen trajectory only (SDXL memory).
# Usage: bash full/launchers/sharpening_sft_sdxl.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch sharpening-sft-sdxl "$@"
