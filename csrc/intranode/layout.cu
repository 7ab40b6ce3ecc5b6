// get_dispatch_layout on the GPU: from topk_idx [T, K] (global expert ids; anything outside [0, E) means "no
// selection"), count (token, k) entries per expert, mark which ranks each token goes to, and count tokens
// per rank. Integer atomics make the counts exact and independent of scheduling.
//
// One launch, no memset before it: one thread per token walks its K entries, builds a bitmask of destination
// ranks (R <= 8), writes its is_token_in_rank row and adds into block-local counters in shared memory. Each
// block adds its non-zero counters into the runtime's LayoutWork scratch, and the last block to finish (a
// ticket taken after a fence, the threadFenceReduction pattern) moves the totals into the outputs and zeroes
// the scratch for the next call. The range check of topk_idx rides along: entries outside [-1, E) are
// ignored, and the smallest flat index of such an entry is reported through the mailbox by the last block, so
// the host learns of a bad id without reading the GPU (Python raises it at the dispatch's count read or at
// the next call).
#include <cuda_runtime.h>

#include "common/wait.cuh"
#include "intranode/api.h"

namespace deepep::intranode {
namespace {

constexpr int kLayoutThreads = 256;
constexpr unsigned long long kNoBadEntry = ~0ull;

__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(LayoutArgs a) {
  extern __shared__ int smem[];  // [E] expert counts, then [R] rank counts
  __shared__ bool is_last;
  const int E = a.num_experts, R = a.num_ranks, K = a.num_topk;
  int* expert_counts = smem;
  int* rank_counts = smem + E;
  for (int i = threadIdx.x; i < E + R; i += blockDim.x) smem[i] = 0;
  __syncthreads();

  const int experts_per_rank = E / R;
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < a.num_tokens) {
    unsigned mask = 0;
    const int64_t* row = a.topk_idx + static_cast<int64_t>(t) * K;
    for (int k = 0; k < K; ++k) {
      const int64_t e = row[k];
      if (e < 0 || e >= E) {
        if (e != -1) atomicMin(&a.work->first_bad, static_cast<unsigned long long>(t) * K + k);
        continue;
      }
      atomicAdd(&expert_counts[e], 1);
      mask |= 1u << (static_cast<int>(e) / experts_per_rank);
    }
    bool* out = a.is_token_in_rank + static_cast<int64_t>(t) * R;
    for (int r = 0; r < R; ++r) {
      const bool in = (mask >> r) & 1u;
      out[r] = in;
      if (in) atomicAdd(&rank_counts[r], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < E + R; i += blockDim.x)
    if (smem[i] != 0) atomicAdd(&a.work->counts[i], smem[i]);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&a.work->ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < E; i += blockDim.x) a.num_tokens_per_expert[i] = atomicExch(&a.work->counts[i], 0);
  for (int r = threadIdx.x; r < R; r += blockDim.x) a.num_tokens_per_rank[r] = atomicExch(&a.work->counts[E + r], 0);
  if (threadIdx.x == 0) {
    a.work->ticket = 0;  // the next layout kernel starts after this one ends (stream order)
    const unsigned long long bad = atomicExch(&a.work->first_bad, kNoBadEntry);
    if (bad != kNoBadEntry)
      report_error(a.env, kMailboxBadInput, kWaitBadExpertId, static_cast<int>(bad / K), static_cast<int>(bad % K),
                   a.topk_idx[bad], E);
  }
}

}  // namespace

cudaError_t launch_layout(const LayoutArgs& a, cudaStream_t stream) {
  const int blocks = a.num_tokens > 0 ? (a.num_tokens + kLayoutThreads - 1) / kLayoutThreads : 1;
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
