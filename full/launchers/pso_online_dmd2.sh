#!/usr/bin/env bash
# pso-online-dmd2: pso.py with sdxl_dmd2.json. PSO App. B.1: LoRA r=16 (DMD2, Turbo) / 32 (LCM), N=4, beta 50 offline / 5 online, lr 1e-5, batch 32, 20k steps.
# Usage: bash full/launchers/pso_online_dmd2.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch pso-online-dmd2 "$@"
