#!/usr/bin/env bash
# pso-online-flux-schnell: pso.py with flux_schnell.json. PSO App. B.1 online (Eq. 7) on the 4-step FLUX.1-schnell (12 B): r=16, beta 5, lr 1e-5, batch 32, 20k steps; FSDP2.
# Usage: bash full/launchers/pso_online_flux_schnell.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch pso-online-flux-schnell "$@"
