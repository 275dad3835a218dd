#!/usr/bin/env bash
# One device call (at most 8 minutes, no carry) that checks and measures the GPU path:
#   1. the kernel tests with compiled Triton kernels (test_kernels.py, test_kernels_fused.py,
#      test_loop_state.py: on CUDA they run compiled, not interpreted; the sm_90 AOT compile test
#      needs no GPU and runs in the CPU suite);
#   2. the engine's CUDA tests (bf16 engine vs the fp32 reference: CUDA graphs, eager, decode loop);
#   3. one steady decode tick of MoR-4 at B = 256, context 1024, against its roofline
#      (benchmarks/decode_tick.py; --bandwidth-gbs 4300, the copy bandwidth measured on this
#      workplace's H200s, see /work/.library/device/KINDS.md);
#   4. the throughput table (benchmarks/throughput.py, the paper's decode workload, shortened).
# Every step writes its log under $OUT as it runs (tee), and each has its own time limit, so a
# step that hangs or a call cut short still returns what the others measured. $OUT ends up with
# at most 8 files, at most one folder down (the device tool's limits):
#   gpu_check.log, pytest_kernels.log, pytest_engine_cuda.log, tick/tick.md, tick/tick.json,
#   throughput/throughput.md, throughput/throughput.json (the .png is removed).
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)     # on the device machine
#   bash benchmarks/gpu_check.sh --dry-run                          # CPU: the same steps, tiny
#
# --dry-run (CPU, a few minutes on an idle machine): the kernel tests under the Triton interpreter, the CUDA tests
# (they skip without a GPU), decode_tick.py --quick and throughput.py --quick, into $OUT or a
# temporary folder; it checks the script's wiring, not the GPU.
set -u

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
fi
OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_check.log"
START=$(date +%s)

note() {
    echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"
}

# step NAME LIMIT_SECONDS LOGFILE COMMAND...: run with a time limit, its output into LOGFILE
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    note "start $name (limit ${limit}s)"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    note "end $name: exit $rc"
    echo "$name: exit $rc" >> "$OUT/.status"
}

{
    date -u
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} 2>&1 | tee -a "$LOG"

if [ "$DRY" = 1 ]; then
    step kernels 240 "$OUT/pytest_kernels.log" "$PY" -m pytest -q tests/test_kernels_fused.py tests/test_loop_state.py
    step engine_cuda 240 "$OUT/pytest_engine_cuda.log" "$PY" -m pytest -q -rs tests/test_engine_cuda.py
    step decode_tick 240 "$OUT/decode_tick.log" "$PY" benchmarks/decode_tick.py --quick --out "$OUT/tick"
    step throughput 600 "$OUT/throughput.log" "$PY" benchmarks/throughput.py --quick --out "$OUT/throughput"
else
    # budget (seconds): 100 + 110 + 120 + 130 = 460, under 8 minutes with the set-up above
    step kernels 100 "$OUT/pytest_kernels.log" "$PY" -m pytest -q tests/test_kernels.py tests/test_kernels_fused.py tests/test_loop_state.py
    step engine_cuda 110 "$OUT/pytest_engine_cuda.log" "$PY" -m pytest -q -rs tests/test_engine_cuda.py
    step decode_tick 120 "$OUT/decode_tick.log" \
        "$PY" benchmarks/decode_tick.py --batch 256 --context 1024 --loop-steps 16 --ticks 20 --repeats 10 \
        --bandwidth-gbs 4300 --out "$OUT/tick"
    step throughput 130 "$OUT/throughput.log" \
        "$PY" benchmarks/throughput.py --device cuda --dtype bfloat16 --models vanilla-34,mor-4 --settings fixed,relative \
        --num-requests 64 --hf-requests 32 --num-scheduler-steps 16 --time-budget 90 --out "$OUT/throughput"
fi

# stay inside the device tool's 8 files: the two benchmark logs go into gpu_check.log, no plot
for f in decode_tick throughput; do
    if [ -f "$OUT/$f.log" ]; then
        { echo "==== $f.log (last 60 lines)"; tail -n 60 "$OUT/$f.log"; } >> "$LOG"
        rm -f "$OUT/$f.log"
    fi
done
rm -f "$OUT"/throughput/*.png
note "summary:"
cat "$OUT/.status" | tee -a "$LOG"
rm -f "$OUT/.status"
for table in "$OUT/tick/tick.md" "$OUT/throughput/throughput.md"; do
    if [ -f "$table" ]; then
        { echo "==== $table"; cat "$table"; } >> "$LOG"
    fi
done
tail -n 40 "$LOG"
