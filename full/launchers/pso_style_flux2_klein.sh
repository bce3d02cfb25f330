#!/usr/bin/env bash
# pso-style-flux2-klein: pso.py with flux2_klein.json. PSO App. B.2: Eq. 5 on Pokemon on FLUX.2-klein 4B, r=16, beta 50, batch 8, lr 1e-5, 3k steps.
# Usage: bash full/launchers/pso_style_flux2_klein.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch pso-style-flux2-klein "$@"
