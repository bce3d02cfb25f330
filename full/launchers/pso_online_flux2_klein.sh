#!/usr/bin/env bash
# pso-online-flux2-klein: pso.py with flux2_klein.json. PSO App. B.1 online (Eq. 7) on the 4-step FLUX.2-klein 4B (3.9 B transformer, DDP): r=16, beta 5, lr 1e-5, batch 32, 20k steps.
# Usage: bash full/launchers/pso_online_flux2_klein.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch pso-online-flux2-klein "$@"
