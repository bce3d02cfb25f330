#!/usr/bin/env bash
# sharpening-rlhf-zimage: sharpening.py with zimage_turbo.json. Sharpening App. A.3 RLHF on the Z-Image base (the teacher role): beta 2500, batch 8, n=m=3, LoRA r=16; CFG 5 (the card's guidance_scale 4 is w in pos + w (pos - neg)); FSDP2.
# Usage: bash full/launchers/sharpening_rlhf_zimage.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch sharpening-rlhf-zimage "$@"
