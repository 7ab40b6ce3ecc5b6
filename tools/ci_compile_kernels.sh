#!/usr/bin/env bash
# Compile every CUDA kernel file (csrc/**/*.cu) to an object for sm_90 with nvcc; no GPU needed.
# CI runs this so that kernel code that does not compile cannot land. Exit status: non-zero on any failure.
#
# Include paths: csrc/ (our headers), $CUDA_HOME/include/cccl (CUB/libcu++ of CUDA 13), and NVSHMEM's
# headers from the nvidia-nvshmem-cu13 wheel (or $NVSHMEM_DIR). The files of the NVSHMEM extension (csrc/nvshmem,
# csrc/internode, csrc/low_latency) use NVSHMEM and are compiled as relocatable device code (-rdc=true), as setup.py
# builds them. The torch glue (.cpp) is not compiled here: it needs a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" ]]; then
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  NVCC="$CUDA_HOME/bin/nvcc"
fi
[[ -x "$NVCC" ]] || { echo "ci_compile_kernels: nvcc not found (set NVCC or CUDA_HOME)" >&2; exit 2; }
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}

NVSHMEM_DIR=${NVSHMEM_DIR:-$(python3 -c 'import nvidia.nvshmem as m; print(list(m.__path__)[0])' 2>/dev/null || true)}
includes=(-Icsrc -I"$CUDA_HOME/include/cccl")
[[ -n "$NVSHMEM_DIR" && -d "$NVSHMEM_DIR/include" ]] && includes+=(-I"$NVSHMEM_DIR/include")

flags=(-arch=sm_90 -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -Xptxas=-warn-spills)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

mapfile -t files < <(find csrc -name '*.cu' | sort)
if [[ ${#files[@]} -eq 0 ]]; then echo "ci_compile_kernels: no .cu files under csrc/"; exit 0; fi

jobs=${CI_COMPILE_JOBS:-2}
fail=0
pids=()
names=()
for f in "${files[@]}"; do
  extra=()
  [[ "$f" == csrc/nvshmem/* || "$f" == csrc/low_latency/* || "$f" == csrc/internode/* ]] && extra=(-rdc=true)
  obj="$out/$(echo "$f" | tr '/' '_').o"
  ( "$NVCC" "${flags[@]}" "${extra[@]}" "${includes[@]}" -c "$f" -o "$obj" > "$obj.log" 2>&1 ) &
  pids+=($!)
  names+=("$f")
  if (( ${#pids[@]} >= jobs )); then
    if ! wait "${pids[0]}"; then echo "FAILED: ${names[0]}"; cat "$out/$(echo "${names[0]}" | tr '/' '_').o.log"; fail=1;
    else echo "ok: ${names[0]}"; fi
    pids=("${pids[@]:1}"); names=("${names[@]:1}")
  fi
done
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then echo "FAILED: ${names[$i]}"; cat "$out/$(echo "${names[$i]}" | tr '/' '_').o.log"; fail=1;
  else echo "ok: ${names[$i]}"; fi
done
if (( fail )); then echo "ci_compile_kernels: some kernels failed to compile" >&2; exit 1; fi
echo "ci_compile_kernels: ${#files[@]} kernel files compiled for sm_90"
