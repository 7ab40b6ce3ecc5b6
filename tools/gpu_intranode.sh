#!/usr/bin/env bash
# One device call for the intranode kernels: build the extension, run the GPU tests (2 and 4 processes; they
# may share one GPU), run the benchmark. Logs go to $OUT (the device tool's output folder) when set.
#   bash tools/gpu_intranode.sh            # build + tests + quick benchmark
#   STAGES="build bench" BENCH_ARGS="--tokens 4096 --sms 24" bash tools/gpu_intranode.sh
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_intranode_out}
mkdir -p "$OUT"
# Never use NVLink multicast on shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
STAGES=${STAGES:-"build test bench"}
BENCH_ARGS=${BENCH_ARGS:-"--tokens 512,4096 --sms 8,24 --warmup 2 --iters 5"}
rc=0
nvidia-smi -L 2>&1 | tee "$OUT/device.txt"

if [[ " $STAGES " == *" build "* ]]; then
  echo "== build"
  start=$(date +%s)
  DEEPEP_PLUGIN_EXTENSIONS=intranode MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; grep -E "error|Error" "$OUT/build.log" | head -40; exit 1; }
  grep -E "registers|spill" "$OUT/build.log" | sort | uniq | head -20
  echo "build ok in $(( $(date +%s) - start )) s"
fi

if [[ " $STAGES " == *" test "* ]]; then
  echo "== tests"
  timeout ${TEST_TIMEOUT:-420} python3 -m pytest tests/gpu/test_intranode.py -q -rs --durations=0 ${TEST_ARGS:-} \
    2>&1 | tee "$OUT/tests.log" | tail -40 || rc=1
fi

if [[ " $STAGES " == *" bench "* ]]; then
  echo "== benchmark"
  if [[ -n "${MPS:-}" ]]; then
    # Processes sharing one GPU run concurrently under MPS instead of time-sliced.
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
    nvidia-cuda-mps-control -d && echo "MPS daemon started"
  fi
  timeout ${BENCH_TIMEOUT:-240} python3 -c "import sys; from deepep_plugin.bench.intranode import main; main(sys.argv[1:])" \
    $BENCH_ARGS --plot "$OUT/intranode.png" --results benchmarks/RESULTS.md 2>&1 | tee "$OUT/bench.log" || rc=1
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null || true
  [[ -n "${MPS:-}" ]] && echo quit | nvidia-cuda-mps-control
fi
exit $rc
