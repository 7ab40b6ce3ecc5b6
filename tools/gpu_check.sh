#!/usr/bin/env bash
# Everything GPU in one device call, as named stages. Logs and results land in $OUT when set.
#   bash tools/gpu_check.sh                                  # default: build tests recipe bench
#   bash tools/gpu_check.sh build tests                      # only these stages (or STAGES="build tests")
#   TESTS=tests/gpu/test_intranode.py bash tools/gpu_check.sh unpack tests
#   MPS=1 INTRANODE_ARGS="--tokens 4096 --sms 24" bash tools/gpu_check.sh build intranode-bench
# Stages (they run in this order, whatever order they are named in):
#   build              build the extensions (DEEPEP_PLUGIN_EXTENSIONS=intranode or low_latency builds one), run
#                      the doctor, and hand the built .so files back as $OUT/ext.tar.gz
#   unpack             install the extensions of an earlier call instead: its ext.tar.gz put in .ext/ (ignored)
#                      and named in the device tool's `carry`
#   tests              the GPU tests: pytest -m gpu on $TESTS (default: tests) $TEST_ARGS   ("test" also works)
#   recipe             the main job (examples.deepseek_v3.train --preset tiny) on the CUDA backend
#   compare            deepep_plugin beside DeepEP V1 when `import deep_ep` works (tools/gpu_compare.sh builds it),
#                      else beside the reference backend; the benchmark starts and stops the MPS daemon itself;
#                      then `bench timeline` on the step timelines it traced ($OUT/timeline.txt, timeline.json)
#   intranode-bench    the intranode kernels beside NCCL ($INTRANODE_ARGS); appends to benchmarks/RESULTS.md;
#                      MPS=1 runs ranks that share a GPU concurrently under MPS (started and stopped here)
#   low-latency-bench  the low-latency kernels ($LOW_LATENCY_ARGS; ranks time their kernels in turns on one GPU)
#   internode-bench    the internode kernels on emulated nodes (2 of 2 ranks sharing the GPUs there are)
#   fuzz               random cases through the kernels against the reference ($FUZZ_ARGS, default 1000 cases over
#                      2, 4 and 8 ranks); writes $OUT/fuzz.json (copy it to benchmarks/results/fuzz.json); the kernels'
#                      tunings come from the environment (DEEPEP_PLUGIN_EARLY_DISPATCH=1 fuzzes the split launch)
#   graph-moe          the sync-free MoE layer's step replayed from a CUDA graph against eager, at 256 and 1024
#                      tokens per rank ($GRAPH_MOE_ARGS); writes $OUT/cuda_graph_moe.json (copy it to
#                      benchmarks/results/) and $OUT/RESULTS_graph_moe.md; starts and stops the MPS daemon itself
#   sm-rates           per-SM rates of the intranode kernels with 1 rank beside plain bulk and register copies, and the
#                      two-GPU prediction they give; writes $OUT/sm_rates.json (copy it to benchmarks/results/)
#   tuning-ab          the intranode kernels' tunings in one run (default; DEEPEP_PLUGIN_DISPATCH_LOCAL_SPLIT=0;
#                      DEEPEP_PLUGIN_COPY_DEPTH=4; DEEPEP_PLUGIN_EARLY_DISPATCH=1; DEEPEP_PLUGIN_COMBINE_SHARE=0;
#                      DEEPEP_PLUGIN_COMBINE_SMALL_ROUNDS=0),
#                      compare without DeepEP
#                      ($TUNING_ARGS, default 256, 1024 and 4096 tokens, 12 and 24 SMs, 2 and 4 ranks); writes
#                      $OUT/tuning_<variant>.json
#   sanitize           compute-sanitizer racecheck and synccheck over intranode GPU tests ($SANITIZE_K, default the
#                      2-rank odd-hidden and 4-rank one-channel cases: every kernel, rings that wrap), ranks
#                      time-sliced (no MPS), kernel waits given DEEPEP_PLUGIN_TEST_TIMEOUT_S (default here 300 s);
#                      logs $OUT/sanitize_<tool>.log; the stage fails on any reported hazard
#   bench              compare intranode-bench low-latency-bench internode-bench
# Works with one GPU (2-4 processes share it) and with several (one process per GPU). Build failure stops the
# script at once; any other failing stage makes it exit 1 after the rest have run.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
# Never use NVLink multicast on shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
INTRANODE_ARGS=${INTRANODE_ARGS:-"--tokens 512,4096 --sms 8,24 --warmup 2 --iters 5"}
LOW_LATENCY_ARGS=${LOW_LATENCY_ARGS:-"--tokens 1 8 32 128 256 --iters 8 --warmup 2"}
TUNING_ARGS=${TUNING_ARGS:-"--ranks 2,4 --tokens 256,1024,4096 --sms 12,24 --iters 10 --synced-iters 1 --warmup 2"}

ALL="build unpack tests recipe fuzz compare intranode-bench low-latency-bench internode-bench graph-moe sm-rates tuning-ab sanitize"
requested=${*:-${STAGES:-"build tests recipe bench"}}
STAGES=" "
for s in $requested; do
  case $s in
    test) STAGES+="tests " ;;
    bench) STAGES+="compare intranode-bench low-latency-bench internode-bench " ;;
    *) if [[ " $ALL " == *" $s "* ]]; then STAGES+="$s "; else
         echo "gpu_check.sh: unknown stage '$s' (stages: $ALL, bench)" >&2; exit 2; fi ;;
  esac
done
stage() { [[ "$STAGES" == *" $1 "* ]]; }
echo "stages:$STAGES"
rc=0
nvidia-smi -L 2>&1 | tee "$OUT/device.txt"

if stage build; then
  echo "== build"
  start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED"; grep -E "error|Error" "$OUT/build.log" | head -40; exit 1; }
  grep -E "spill" "$OUT/build.log" | sort | uniq -c | head -20
  echo "build ok in $(( $(date +%s) - start )) s"
  python3 -m deepep_plugin.cli doctor 2>&1 | tee "$OUT/doctor.txt"
  # Hand the built extensions back (the device tool returns $OUT), so a later call can carry them (stage unpack).
  tar czf "$OUT/ext.tar.gz" deepep_plugin/*.so && ls -la "$OUT/ext.tar.gz"
fi

if stage unpack; then
  echo "== unpack"
  tar xzf .ext/ext.tar.gz && ls deepep_plugin/*.so && python3 -m deepep_plugin.cli doctor 2>&1 | tail -5
fi

if stage tests; then
  echo "== tests"
  # shellcheck disable=SC2086  # TESTS and TEST_ARGS are word lists
  timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -q -rs -m gpu ${TESTS:-tests} ${TEST_ARGS:-} 2>&1 \
    | tee "$OUT/tests.log" | tail -40 || rc=1
fi

if stage recipe; then
  echo "== main job on the CUDA backend"
  timeout 240 python3 -m examples.deepseek_v3.train --preset tiny --backend cuda --no-progress \
    --out-dir "$OUT/recipe" 2>&1 | tail -8 | tee "$OUT/recipe.log" || rc=1
fi

if stage fuzz; then
  echo "== fuzz: the kernels against the reference backend"
  # shellcheck disable=SC2086
  timeout "${FUZZ_TIMEOUT:-300}" python3 -m deepep_plugin.bench fuzz ${FUZZ_ARGS:-} --out "$OUT/fuzz.json" 2>&1 \
    | tee "$OUT/fuzz.log" | grep -E "^\[fuzz\] [a-z].*(mismatched|STOPPED)|FAIL|^\[fuzz\] seed" || rc=1
fi

if stage compare; then
  echo "== benchmark: beside DeepEP V1 (or the reference backend)"
  rm -rf /tmp/timelines  # a warm machine keeps an earlier call's files
  timeout "${BENCH_TIMEOUT:-200}" python3 -m deepep_plugin.bench compare --ranks 2 --tokens 256,4096 --sms 24 \
    --json "$OUT/intranode_vs_deepep.json" --plot "$OUT/intranode_vs_deepep.png" --trace-dir /tmp/timelines \
    --results "$OUT/RESULTS_compare.md" 2>&1 | grep -E "^R=|compare:|rror" || rc=1
  # Where each forward step's time goes, per library (host calls, kernels, the count gap, the ranks' notify skew).
  python3 -m deepep_plugin.bench timeline /tmp/timelines --json "$OUT/timeline.json" 2>&1 | tee "$OUT/timeline.txt" \
    || rc=1
fi

if stage intranode-bench; then
  echo "== benchmark: intranode kernels"
  if [[ -n "${MPS:-}" ]]; then
    # Processes sharing one GPU run concurrently under MPS instead of time-sliced.
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d && echo "MPS daemon started"
  fi
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-240}" python3 -m deepep_plugin.bench intranode $INTRANODE_ARGS \
    --plot "$OUT/intranode.png" --results benchmarks/RESULTS.md 2>&1 | tee "$OUT/intranode_bench.log" || rc=1
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null || true
  if [[ -n "${MPS:-}" ]]; then
    echo quit | nvidia-cuda-mps-control
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi

if stage low-latency-bench; then
  echo "== benchmark: low-latency kernels"
  python3 -c "import importlib.metadata as m; print('nvshmem wheel', m.version('nvidia-nvshmem-cu13'))" || true
  ll_args=$LOW_LATENCY_ARGS
  # Ranks sharing one GPU are time-sliced between their processes: time each rank's kernels in turns instead.
  if (( $(nvidia-smi -L | wc -l) < 2 )); then ll_args="$ll_args --turns"; fi
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-100}" python3 -m deepep_plugin.bench low-latency $ll_args \
    --json "$OUT/low_latency.json" 2>&1 | tee "$OUT/low_latency_bench.log" || rc=1
fi

if stage internode-bench; then
  echo "== benchmark: internode kernels on emulated nodes"
  # 2 nodes of 2 ranks sharing the GPUs there are: correctness-level numbers, labelled EMULATED in RESULTS.md.
  timeout "${BENCH_TIMEOUT:-200}" python3 -m deepep_plugin.bench internode --tokens 512,4096 --sms 8,24 --iters 10 \
    --results "$OUT/RESULTS_internode.md" 2>&1 | tail -8 || rc=1
fi

if stage graph-moe; then
  echo "== benchmark: sync-free MoE layer, CUDA-graph replay against eager"
  # Its own run timeout (ranks killed, MPS stopped) comes before the stage's.
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-300}" python3 -m deepep_plugin.bench graph-moe --tokens 256,1024 --run-timeout 270 \
    ${GRAPH_MOE_ARGS:-} \
    --json "$OUT/cuda_graph_moe.json" --results "$OUT/RESULTS_graph_moe.md" 2>&1 | tee "$OUT/graph_moe.log" \
    | tail -25 || rc=1
fi
if stage sm-rates; then
  echo "== benchmark: per-SM rates (1 rank) and the two-GPU prediction"
  timeout "${BENCH_TIMEOUT:-120}" python3 -m deepep_plugin.bench sm-rates --json "$OUT/sm_rates.json" 2>&1 \
    | tee "$OUT/sm_rates.log" | tail -8 || rc=1
fi
if stage tuning-ab; then
  echo "== benchmark: kernel tunings, same run"
  for variant in default local-split-0 copy-depth-4 early-dispatch-1 combine-share-0 combine-small-rounds-0; do
    case $variant in
      default) tune=() ;;
      local-split-0) tune=(DEEPEP_PLUGIN_DISPATCH_LOCAL_SPLIT=0) ;;
      copy-depth-4) tune=(DEEPEP_PLUGIN_COPY_DEPTH=4) ;;
      early-dispatch-1) tune=(DEEPEP_PLUGIN_EARLY_DISPATCH=1) ;;
      combine-share-0) tune=(DEEPEP_PLUGIN_COMBINE_SHARE=0) ;;
      combine-small-rounds-0) tune=(DEEPEP_PLUGIN_COMBINE_SMALL_ROUNDS=0) ;;
    esac
    # shellcheck disable=SC2086  # TUNING_ARGS is a word list
    env "${tune[@]}" timeout "${BENCH_TIMEOUT:-110}" python3 -m deepep_plugin.bench compare --no-deepep --no-profile \
      $TUNING_ARGS \
      --json "$OUT/tuning_$variant.json" --plot "/tmp/tuning_$variant.png" --results '' 2>&1 \
      | grep -E "^R=|rror|needs" | sed "s/^/$variant: /" || rc=1
  done
fi
if stage sanitize; then
  echo "== compute-sanitizer: racecheck and synccheck on the intranode kernels"
  for tool in racecheck synccheck; do
    DEEPEP_PLUGIN_TEST_TIMEOUT_S=${DEEPEP_PLUGIN_TEST_TIMEOUT_S:-300} timeout "${SANITIZE_TIMEOUT:-280}" \
      compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 9 \
      python3 -m pytest -q -m gpu tests/gpu/test_intranode.py \
      -k "${SANITIZE_K:-odd_hidden_topk16 or one_channel_four_ranks}" > "$OUT/sanitize_$tool.log" 2>&1 \
      || { rc=1; echo "sanitize: $tool failed or reported (see $OUT/sanitize_$tool.log)"; }
    grep -E "ERROR SUMMARY|passed|failed|Error" "$OUT/sanitize_$tool.log" | tail -4 | sed "s/^/$tool: /"
  done
fi
exit $rc
