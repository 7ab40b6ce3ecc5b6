#!/usr/bin/env bash
# One device call for everything GPU: build both extensions, run every GPU test (tests/gpu, plus the GPU-marked
# tests elsewhere), the main job on the CUDA backend, and quick benchmarks. Logs land in $OUT when set.
#   bash tools/gpu_check.sh                       # all stages
#   STAGES="build test" bash tools/gpu_check.sh   # a subset
# Works with one GPU (2-4 processes share it) and with several (one process per GPU).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
STAGES=${STAGES:-"build test recipe bench"}
rc=0
nvidia-smi -L 2>&1 | tee "$OUT/device.txt"
if [[ " $STAGES " == *" build "* ]]; then
  echo "== build"
  MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED"; grep -E "error" "$OUT/build.log" | head -40; exit 1; }
  python3 -m deepep_plugin.cli doctor 2>&1 | tee "$OUT/doctor.txt"
  # Hand the built extensions back (the device tool returns $OUT), so a later call can carry them: put them in
  # .ext/ (ignored), name it in `carry`, and run with STAGES without "build" (the "unpack" stage installs them).
  tar czf "$OUT/ext.tar.gz" deepep_plugin/*.so && ls -la "$OUT/ext.tar.gz"
fi
if [[ " $STAGES " == *" unpack "* ]]; then
  tar xzf .ext/ext.tar.gz && ls deepep_plugin/*.so && python3 -m deepep_plugin.cli doctor 2>&1 | tail -5
fi
if [[ " $STAGES " == *" test "* ]]; then
  echo "== tests"
  timeout ${TEST_TIMEOUT:-540} python3 -m pytest -q -rs -m gpu tests ${TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" \
    | tail -40 || rc=1
fi
if [[ " $STAGES " == *" recipe "* ]]; then
  echo "== main job on the CUDA backend"
  timeout 240 python3 -m examples.deepseek_v3.train --preset tiny --backend cuda --no-progress \
    --out-dir "$OUT/recipe" 2>&1 | tail -8 | tee "$OUT/recipe.log" || rc=1
fi
if [[ " $STAGES " == *" bench "* ]]; then
  echo "== benchmarks"
  # deepep_plugin beside DeepEP V1 when `import deep_ep` works (tools/gpu_compare.sh builds it), else against the
  # reference backend; the MPS daemon is started by the benchmark itself.
  timeout ${BENCH_TIMEOUT:-200} python3 -m deepep_plugin.bench compare --ranks 2 --tokens 256,4096 --sms 24 \
    --json "$OUT/intranode_vs_deepep.json" --plot "$OUT/intranode_vs_deepep.png" \
    --results "$OUT/RESULTS_compare.md" 2>&1 | grep -E "^R=|compare:|rror" || rc=1
  STAGES=bench bash tools/gpu_intranode.sh || rc=1
  STAGES=bench bash tools/gpu_low_latency.sh || rc=1
  # Internode kernels on emulated nodes (2 nodes of 2 ranks; the ranks share the GPUs there are): correctness-level
  # numbers, labelled EMULATED in RESULTS.md.
  timeout ${BENCH_TIMEOUT:-200} python3 -m deepep_plugin.bench internode --tokens 512,4096 --sms 8,24 --iters 10 \
    --results "$OUT/RESULTS_internode.md" 2>&1 | tail -8 || rc=1
fi
exit $rc
