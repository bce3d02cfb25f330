#!/usr/bin/env bash
# pso-base-transfer-flux2-klein: pso.py with flux2_klein.json. practitioners' base transfer at Eq. 5's budget: the LoRA trained on klein-base 4B, used on klein 4B.
# Usage: bash full/launchers/pso_base_transfer_flux2_klein.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch pso-base-transfer-flux2-klein "$@"
