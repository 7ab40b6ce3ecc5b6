#!/usr/bin/env bash
# One device call for the side-by-side benchmark: deepep_plugin's kernels and DeepEP V1 built (or unpacked from
# earlier calls' outputs), then `python -m deepep_plugin.bench compare`. Logs and results land in $OUT.
#   bash tools/gpu_compare.sh                                    # everything, default sweep
#   RANKS="2" BENCH_ARGS="--tokens 4096 --sms 24" bash tools/gpu_compare.sh
# Reuse: put a previous $OUT/ext.tar.gz in .ext/ and $OUT/deepep.tar.gz in .anchors/ (both ignored) and carry them.
# .anchors/ holds the comparator, DeepEP V1 (deepseek-ai/DeepEP at commit 29d31c0, the last V1 release, MIT): its
# source archive DeepEP-29d31c0.tar.gz and build_deepep.sh, which builds it and prints the folder for PYTHONPATH.
# They are a build input of this benchmark only, not part of the repository: before the call, copy them in from the
# project's anchors folder beside the checkout (cp ../shared/anchors/* .anchors/) and name .anchors in `carry`.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_compare_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
start=$(date +%s)
if [[ -f .ext/ext.tar.gz && -z "${REBUILD:-}" ]]; then
  tar xzf .ext/ext.tar.gz && echo "deepep_plugin: unpacked $(ls deepep_plugin/*.so | tr '\n' ' ')"
else
  MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED"; grep -E "error" "$OUT/build.log" | head -40; exit 1; }
  tar czf "$OUT/ext.tar.gz" deepep_plugin/*.so && echo "deepep_plugin: built in $(( $(date +%s) - start )) s"
fi
if [[ -z "${NO_DEEPEP:-}" ]]; then
  if [[ -f .anchors/deepep.tar.gz ]]; then
    mkdir -p /tmp/deepep_anchor && tar xzf .anchors/deepep.tar.gz -C /tmp/deepep_anchor
    src=/tmp/deepep_anchor/DeepEP-29d31c0
  else
    src=$(bash .anchors/build_deepep.sh .anchors/DeepEP-29d31c0.tar.gz) || exit 1
    tar czf "$OUT/deepep.tar.gz" -C /tmp/deepep_anchor DeepEP-29d31c0/deep_ep $(cd /tmp/deepep_anchor && ls DeepEP-29d31c0/deep_ep_cpp*.so)
  fi
  export PYTHONPATH=$src:${PYTHONPATH:-}
  python3 -c "import deep_ep; print('deep_ep from', deep_ep.__file__)" || exit 1
fi
echo "setup done in $(( $(date +%s) - start )) s"
if [[ -n "${PRE_CMD:-}" ]]; then eval "$PRE_CMD"; fi
# One run per EP size (RANKS, default "2 4 8"), each writing its own files, so a run cut short keeps the others.
for R in ${RANKS:-2 4 8}; do
  timeout ${BENCH_TIMEOUT:-300} python3 -m deepep_plugin.bench compare --ranks $R ${BENCH_ARGS:-} \
    --json "$OUT/intranode_vs_deepep_R$R.json" --plot "/tmp/intranode_vs_deepep_R$R.png" \
    --results "/tmp/RESULTS_compare_R$R.md" --command "python -m deepep_plugin.bench compare --ranks $R ${BENCH_ARGS:-}" \
    2>&1 | tee "$OUT/compare_R$R.log" | grep -E "^R=|^notify-trace|compare:|Error|error" | tail -40
done
