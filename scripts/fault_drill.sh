#!/usr/bin/env bash
# Kill -9 drill on SFT and GRPO: N random kills, each followed by a rerun of the same command; prints
# trials, killed, resumed, bit_exact and corrupt per stage (scripts/fault_drill.py).
#   scripts/fault_drill.sh [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/fault_drill.py --trials "${1:-10}"
