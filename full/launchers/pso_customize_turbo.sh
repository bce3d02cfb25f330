#!/usr/bin/env bash
# pso-customize-turbo: pso.py with sdxl_turbo.json. PSO App. B.3: Eq. 6 variant + prior preservation, r=16, beta 5, lr 5e-5, batch 4, 1k steps.
# Usage: bash full/launchers/pso_customize_turbo.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch pso-customize-turbo "$@"
