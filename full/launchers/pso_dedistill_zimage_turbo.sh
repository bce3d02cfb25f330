#!/usr/bin/env bash
# pso-dedistill-zimage-turbo: pso.py with zimage_turbo.json. practitioners' de-distill adapter at Eq. 5's budget: A (3k updates on the Turbo's own samples, lr 1e-5) merged, then the LoRA; FSDP2.
# Usage: bash full/launchers/pso_dedistill_zimage_turbo.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch pso-dedistill-zimage-turbo "$@"
