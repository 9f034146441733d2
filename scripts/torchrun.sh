#!/usr/bin/env bash
# Launch an rlhf-engine command on one node: NPROC processes (one per GPU, or CPU processes on gloo).
#
#   scripts/torchrun.sh NPROC COMMAND [ARGS...]
#   scripts/torchrun.sh 8 sft --config configs/sft_tiny.yaml parallel.tp=2 parallel.dp_shard=4
#
# The layout comes from the config's parallel section; tp * pp * dp_shard * dp_replicate must equal
# NPROC (dp_shard=-1 fills). Many nodes: scripts/slurm/rlhf.sbatch.
set -euo pipefail
nproc=${1:?usage: scripts/torchrun.sh NPROC COMMAND [ARGS...]}
shift
exec torchrun --standalone --nproc_per_node="$nproc" -m rlhf_engine "$@"
