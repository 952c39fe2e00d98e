#!/usr/bin/env bash
# One command that proves the GPU path on a CUDA machine (under 8 minutes on one GPU):
#
#     bash benchmarks/gpu_check.sh
#
# 1. the machine: GPU name, driver and memory (nvidia-smi), torch version, CUDA version, compute capability;
# 2. tests/test_cuda.py: bf16/fp16 training that resumes exactly, flash attention, cached generation and its
#    CUDA-graph replay, the scripts on a GPU checkpoint, two-GPU torchrun where there are two GPUs (limit 300 s);
# 3. benchmarks/bench_model.py --quick --device cuda --gen_tokens 512: ours against x-transformers on the GPU, and one-row
#    generation replayed from a CUDA graph, plain and compiled (goal 3,000 tokens/s on an H200) (limit 240 s);
# 4. benchmarks/bench_model.py --mfu --quick --device cuda: training FLOP/s at batch 32 x 1,024 against the
#    matmul anchor, the default model and config/quick_gpu.py's, eager and torch.compile'd (limit 200 s).
#
# Assumes the repo's requirements are installed (requirements-bench.txt; x-transformers is installed if missing).
# Every part runs even when an earlier one fails; the summary at the end gives each part's exit code, and the
# script exits non-zero when any part failed. The full output is kept in ${OUT:-/tmp}/gpu_check/gpu_check.log.
# On a machine without CUDA it still runs end to end: the GPU tests are skipped and the benchmark is CPU-only.

set -u
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python}
LOG_DIR="${OUT:-/tmp}/gpu_check"
mkdir -p "$LOG_DIR" || exit 1
LOG="$LOG_DIR/gpu_check.log"
TESTS_LOG="$LOG_DIR/test_cuda.log"
BENCH_LOG="$LOG_DIR/bench_model.log"
MFU_LOG="$LOG_DIR/bench_mfu.log"
: > "$LOG"
export PYTHONUNBUFFERED=1  # progress appears as it happens, not when a pipe's buffer fills
START=$SECONDS

say() { echo "$@" | tee -a "$LOG"; }

# run NAME LOGFILE COMMAND...: the command's output to the screen, the main log and its own log; exit code in RC_NAME
part() {
    local name=$1 part_log=$2
    shift 2
    say ""
    say "=== $name: $* ($(date '+%H:%M:%S'))"
    "$@" 2>&1 | tee "$part_log" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && say "=== $name: stopped by its time limit"
    say "=== $name: exit $rc after $((SECONDS - START)) s in all"
    printf -v "RC_$name" '%s' "$rc"
}

say "=== gpu_check.sh in $(pwd), $(date '+%Y-%m-%d %H:%M:%S'), log $LOG"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
else
    say "nvidia-smi: not found (no NVIDIA driver on this machine)"
fi
"$PYTHON" - 2>&1 <<'EOF' | tee -a "$LOG"
import torch
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}, '
      f'{torch.cuda.device_count()} GPU(s)')
for i in range(torch.cuda.device_count()):
    print(f'cuda:{i} {torch.cuda.get_device_name(i)}, capability {torch.cuda.get_device_capability(i)}, '
          f'native bf16: {torch.cuda.is_bf16_supported(including_emulation=False)}')
EOF
RC_torch=${PIPESTATUS[0]}

# the benchmark compares against x-transformers (requirements-bench.txt); a bare GPU machine may lack it
if ! "$PYTHON" -c 'import x_transformers' 2> /dev/null; then
    say "x_transformers is not installed: pip install -q x-transformers"
    "$PYTHON" -m pip install -q x-transformers 2>&1 | tee -a "$LOG"
fi

part tests "$TESTS_LOG" timeout -k 10 300 "$PYTHON" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider
part bench "$BENCH_LOG" timeout -k 10 240 "$PYTHON" benchmarks/bench_model.py --quick --device cuda --gen_tokens 512
part mfu "$MFU_LOG" timeout -k 10 200 "$PYTHON" benchmarks/bench_model.py --mfu --quick --device cuda

# ----------------------------------------------------------------------------------------------------------
say ""
say "=== summary ($((SECONDS - START)) s; full output in $LOG)"
say "tests/test_cuda.py: $(grep -v '^\s*$' "$TESTS_LOG" | tail -n 1)"
# the GPU sections of the benchmark: each heading, its table (from the 'tokens/s' header) and its ratio lines
CUDA_LINES=$(awk '
    /^## /         { gpu = ($0 ~ /^## (Training step|Generation|MFU) \(cuda/); table = 0; if (gpu) print; next }
    !gpu           { next }
    /tokens\/s/    { table = 1 }
    /^ratio/       { print; next }
    /^$/           { table = 0 }
    table          { print }
 ' "$BENCH_LOG" "$MFU_LOG")
if [ -n "$CUDA_LINES" ]; then
    say "$CUDA_LINES"
else
    say "bench_model.py: no cuda sections (torch sees no GPU, or the benchmark stopped before them)"
fi
say "exit codes: torch info $RC_torch, tests $RC_tests, bench $RC_bench, mfu $RC_mfu (124 = time limit)"
if [ "$RC_torch" -ne 0 ] || [ "$RC_tests" -ne 0 ] || [ "$RC_bench" -ne 0 ] || [ "$RC_mfu" -ne 0 ]; then
    say "gpu_check: FAILED"
    exit 1
fi
say "gpu_check: all parts passed"
