#!/usr/bin/env bash
# di-pretrain-sd21: diff_instruct_pp.py with sd_turbo_dipp.json. DI++ App. A.3 pre-training stage (Diff-Instruct): batch 1024, CFG 4.5, no reward.
# Usage: bash full/launchers/di_pretrain_sd21.sh [--num-processes N] [--gpu-memory GB] [--rehearse] [--model SPEC] [--dry-run] [-- METHOD ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m full.launch di-pretrain-sd21 "$@"
