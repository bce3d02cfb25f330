#!/usr/bin/env bash
# pso-base-transfer-zimage-turbo: pso.py with zimage_turbo.json. practitioners' base transfer at Eq. 5's budget (data, batch 8, r=16, lr 1e-5, 3k steps): the LoRA trained on Z-Image, used on the Turbo; FSDP2.
# Usage: bash full/launchers/pso_base_transfer_zimage_turbo.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch pso-base-transfer-zimage-turbo "$@"
