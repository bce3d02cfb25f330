#!/usr/bin/env bash
# sharpening-rlhf-flux2-klein-base: sharpening.py with flux2_klein.json. Sharpening App. A.3 RLHF on klein-base 4B (the teacher role): beta 2500, batch 8, n=m=3, LoRA r=16; CFG 4 (the card's).
# Usage: bash full/launchers/sharpening_rlhf_flux2_klein_base.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch sharpening-rlhf-flux2-klein-base "$@"
