#!/usr/bin/env bash
# dipp-sd-turbo: diff_instruct_pp.py with sd_turbo_dipp.json. DI++ Sec. 5 / App. A.3: alpha_rew 100 (SD1.5 range 100-1000), CFG reward 4.5, lr 5e-6, Adam (0, 0.999), batch 256; TA as a LoRA (docs/design.md section 6).
# Usage: bash full/launchers/dipp_sd_turbo.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch dipp-sd-turbo "$@"
