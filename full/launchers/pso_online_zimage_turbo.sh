#!/usr/bin/env bash
# pso-online-zimage-turbo: pso.py with zimage_turbo.json. PSO App. B.1 online (Eq. 7) on the 8-step Z-Image-Turbo (6.15 B): r=16, beta 5, lr 1e-5, batch 32, 20k steps; FSDP2.
# Usage: bash full/launchers/pso_online_zimage_turbo.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch pso-online-zimage-turbo "$@"
