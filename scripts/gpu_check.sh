#!/usr/bin/env bash
# Validate rlhf-engine on one CUDA GPU in under 9 minutes, with no network (an H200 took 5).
#
#   bash scripts/gpu_check.sh            # run every step, print a summary table last
#   bash scripts/gpu_check.sh --dry-run  # print the plan (works on a CPU machine)
#
# Steps (each under its own time limit; a failing step is reported and the next one still runs):
#   1. the gpu-marked tests (compiled Triton kernels against fp32 oracles, bf16 targets of docs/kernels.md)
#   2. bench_linear_logprob: bf16, N=16384 H=4096 V=128256 -> benchmarks/results/linear_logprob_<gpu>.csv
#      (eager, Liger-Kernel and cut-cross-entropy when importable, ours; TFLOP/s and peak memory), and
#      the launch-config sweep, one- and two-GEMM kernels -> linear_logprob_sweep_<gpu>.csv
#   3. bench_train_step: a bf16 SFT step and a PPO step of a Llama-3.2-1B-shaped model, fused vs eager
#   4. bench_fp8 --compile: a torchao FP8 step against bf16, decoder layers compiled (as precision.fp8 runs them)
#   5. bench_generate: decoding against transformers' generate, eager, static KV cache, and the decode step
#      compiled with CUDA graphs (rollout.decode_mode) -> benchmarks/results/generate_<gpu>.csv
#   6. the summary table (scripts/gpu_summary.py)
# Wheels the machine lacks (pydantic for the engine; liger-kernel, cut-cross-entropy and a torchao that
# matches its torch for the comparisons) are installed with --no-deps from ./wheels/ when that folder
# exists: scripts/fetch_gpu_wheels.sh downloads them; see the README's "Checking a GPU".
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
py=${PYTHON:-python3}
# The engine and the kernels from this tree, installed or not; wheels from ./wheels land in $site.
site=/tmp/rlhf_gpu_site
export PYTHONPATH="$site:$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log_dir=benchmarks/results/gpu_check_logs
shape=(--n 16384 --hidden 4096 --vocab 128256)

steps=(
  "gpu tests|90|$py -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/test_fp8.py"
  "linear_logprob bf16 N=16384 H=4096 V=128256|150|$py benchmarks/bench_linear_logprob.py --device cuda --dtype bfloat16 ${shape[*]} --providers eager,liger,cce,triton,triton+kl --repeats 5 --sweep"
  "train step ~1B bf16 fused vs eager|130|$py benchmarks/bench_train_step.py --steps 10"
  "fp8 torchao vs bf16, layers compiled|90|$py benchmarks/bench_fp8.py --steps 30 --compile"
  "generate eager/static/compiled vs transformers|80|$py benchmarks/bench_generate.py --modes eager,static,compiled --repeats 5"
)

if [ "$dry" = 1 ]; then
  echo "gpu_check plan (about 9 minutes in all on one H100/H200):"
  [ -d wheels ] && echo "  0. pip install --no-deps --no-index --target $site wheels/*.whl" \
                || echo "  0. (no ./wheels folder: Liger-Kernel / cut-cross-entropy rows only if already installed)"
  i=1
  for s in "${steps[@]}"; do
    IFS='|' read -r name limit cmd <<<"$s"
    printf '  %d. %s (limit %ss)\n     %s\n' "$i" "$name" "$limit" "$cmd"
    i=$((i + 1))
  done
  echo "  $i. $py scripts/gpu_summary.py   # the short table"
  exit 0
fi

$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible')" || exit 2
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-deps --no-index --no-compile --target "$site" wheels/*.whl \
    || echo "gpu_check: installing ./wheels failed; continuing"
fi
mkdir -p "$log_dir"
status=()
i=1
for s in "${steps[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  echo "== $i. $name"
  start=$(date +%s)
  timeout "$limit" bash -c "$cmd" > >(tee "$log_dir/step$i.log") 2>&1
  rc=$?
  status+=("$i|$name|$rc|$(( $(date +%s) - start ))")
  i=$((i + 1))
done
$py scripts/gpu_summary.py "${status[@]}"
