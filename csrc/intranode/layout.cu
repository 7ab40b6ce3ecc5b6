// get_dispatch_layout on the GPU: from topk_idx [T, K] (global expert ids; anything outside [0, E) means "no
// selection"), count (token, k) entries per expert, mark which ranks each token goes to, and count tokens
// per rank. Integer atomics make the counts exact and independent of scheduling.
//
// One thread per token: it walks its K entries, builds a bitmask of destination ranks (R <= 8), writes its
// is_token_in_rank row and adds into block-local counters in shared memory, which each block flushes to the
// zero-initialised outputs with one atomic per non-zero counter.
#include <cuda_runtime.h>

#include "intranode/api.h"

namespace deepep::intranode {
namespace {

constexpr int kLayoutThreads = 256;

__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(LayoutArgs a) {
  extern __shared__ int smem[];  // [E] expert counts, then [R] rank counts
  int* expert_counts = smem;
  int* rank_counts = smem + a.num_experts;
  for (int i = threadIdx.x; i < a.num_experts + a.num_ranks; i += blockDim.x) smem[i] = 0;
  __syncthreads();

  const int experts_per_rank = a.num_experts / a.num_ranks;
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < a.num_tokens) {
    unsigned mask = 0;
    const int64_t* row = a.topk_idx + static_cast<int64_t>(t) * a.num_topk;
    for (int k = 0; k < a.num_topk; ++k) {
      const int64_t e = row[k];
      if (e < 0 || e >= a.num_experts) continue;
      atomicAdd(&expert_counts[e], 1);
      mask |= 1u << (static_cast<int>(e) / experts_per_rank);
    }
    bool* out = a.is_token_in_rank + static_cast<int64_t>(t) * a.num_ranks;
    for (int r = 0; r < a.num_ranks; ++r) {
      const bool in = (mask >> r) & 1u;
      out[r] = in;
      if (in) atomicAdd(&rank_counts[r], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < a.num_experts; i += blockDim.x)
    if (expert_counts[i] != 0) atomicAdd(&a.num_tokens_per_expert[i], expert_counts[i]);
  for (int r = threadIdx.x; r < a.num_ranks; r += blockDim.x)
    if (rank_counts[r] != 0) atomicAdd(&a.num_tokens_per_rank[r], rank_counts[r]);
}

}  // namespace

cudaError_t launch_layout(const LayoutArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  const int blocks = (a.num_tokens + kLayoutThreads - 1) / kLayoutThreads;
  const size_t smem = sizeof(int) * static_cast<size_t>(a.num_experts + a.num_ranks);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(layout_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  layout_kernel<<<blocks, kLayoutThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace deepep::intranode
