#!/usr/bin/env bash
# One device call for the low-latency (NVSHMEM) kernels: build the extension, run the GPU tests (2 and 4
# processes; they may share one GPU), run the benchmark. Logs go to $OUT (the device tool's output folder).
#   bash tools/gpu_low_latency.sh
#   STAGES="build bench" BENCH_ARGS="--tokens 128 --iters 50" bash tools/gpu_low_latency.sh
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_low_latency_out}
mkdir -p "$OUT"
# Never use NVLink multicast on shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
STAGES=${STAGES:-"build test bench"}
BENCH_ARGS=${BENCH_ARGS:-"--tokens 1 8 32 128 256 --iters 8 --warmup 2"}
rc=0
nvidia-smi -L 2>&1 | tee "$OUT/device.txt"
python3 -c "import nvidia.nvshmem, importlib.metadata as m; print('nvshmem wheel', m.version('nvidia-nvshmem-cu13'))"

if [[ " $STAGES " == *" build "* ]]; then
  echo "== build"
  start=$(date +%s)
  DEEPEP_PLUGIN_EXTENSIONS=low_latency MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; grep -E "error|Error" "$OUT/build.log" | head -40; exit 1; }
  grep -E "spill" "$OUT/build.log" | sort | uniq -c | head -20
  echo "build ok in $(( $(date +%s) - start )) s"
fi

if [[ " $STAGES " == *" test "* ]]; then
  echo "== tests"
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest tests/gpu/test_low_latency.py -q -rs --durations=0 ${TEST_ARGS:-} \
    2>&1 | tee "$OUT/tests.log" | tail -60 || rc=1
fi

if [[ " $STAGES " == *" bench "* ]]; then
  echo "== benchmark"
  # Ranks sharing one GPU are time-sliced between their processes: time each rank's kernels in turns instead.
  if (( $(nvidia-smi -L | wc -l) < 2 )); then BENCH_ARGS="$BENCH_ARGS --turns"; fi
  timeout ${BENCH_TIMEOUT:-100} python3 -c "import sys; from deepep_plugin.bench.low_latency import main; main(sys.argv[1:])" \
    $BENCH_ARGS --json "$OUT/low_latency.json" 2>&1 | tee "$OUT/bench.log" || rc=1
fi
exit $rc
