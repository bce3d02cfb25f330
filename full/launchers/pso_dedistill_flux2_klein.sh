#!/usr/bin/env bash
# pso-dedistill-flux2-klein: pso.py with flux2_klein.json. practitioners' de-distill adapter at Eq. 5's budget: A (3k updates on klein's own samples) merged, then the LoRA.
# Usage: bash full/launchers/pso_dedistill_flux2_klein.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch pso-dedistill-flux2-klein "$@"
