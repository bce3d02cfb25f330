#!/usr/bin/env bash
# pso-style-zimage-turbo: pso.py with zimage_turbo.json. PSO App. B.2: Eq. 5 on Pokemon on Z-Image-Turbo, r=16, beta 50, batch 8, lr 1e-5, 3k steps; FSDP2.
# Usage: bash full/launchers/pso_style_zimage_turbo.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch pso-style-zimage-turbo "$@"
