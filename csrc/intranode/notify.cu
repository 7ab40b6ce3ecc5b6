// Notify step of a non-cached intranode dispatch (one block, before the dispatch kernel).
//
// Protocol (notify number `seq`, counted by each rank's own kernel in Header::notify_seq, so it stays right
// under CUDA-graph replay; all ranks run the same sequence of notifies):
//   1. count, per destination j and channel c, this rank's tokens of channel c that go to j (a thread per
//      token, shared-memory atomics; channel_prefix_matrix = inclusive prefix over c);
//   2. write the payload {num_tokens_per_rank row [R], channel counts to j [C], expert counts of j's
//      experts [E_loc]} into notify_payload[seq % 2][this rank] of every rank j (itself included);
//   3. __syncthreads, then thread j stores notify_flag[this rank] = seq into rank j with st.release.sys (one
//      warp, so one system fence for all R flags);
//   4. thread i waits (bounded) until its own notify_flag[i] >= seq (acquire), i.e. every source's payload
//      for this notify has landed; __syncthreads_or spreads a timeout to the whole block;
//   5. build rank_prefix_matrix (every column: all ranks' rows are here), recv_channel_prefix_matrix and the
//      per-expert receive counts; publish n_recv and the counts to the host-mapped counters, fence, then the
//      ready word (the host polls it; nothing is written there in num_worst_tokens mode).
// Double buffering of the payload by seq parity is safe: a source writes slot seq % 2 again only at notify
// seq + 2, which it reaches after passing barrier seq + 1, which this rank joins only after its notify seq
// kernel has finished reading.
#include <cuda_runtime.h>

#include "common/wait.cuh"
#include "intranode/api.h"

namespace deepep::intranode {
namespace {

__global__ void __launch_bounds__(kNumThreads, 1) notify_kernel(NotifyArgs a) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, C = a.num_channels, E_loc = a.num_local_experts;
  const int T = a.num_tokens;
  __shared__ int counts[kMaxRanks][kMaxChannels];
  __shared__ uint64_t seq_s;

  // 1. Channel counts: one thread per token (all 1024 threads stride over the tokens, so a token's R flags are
  // loaded in parallel with every other token's), shared-memory atomics per (destination, channel).
  for (int i = threadIdx.x; i < R * C; i += blockDim.x) counts[i / C][i % C] = 0;
  __syncthreads();
  const int per_channel = (T + C - 1) / C;
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const int c = t / per_channel;
    const bool* row = a.is_token_in_rank + static_cast<int64_t>(t) * R;
    for (int j = 0; j < R; ++j)
      if (row[j]) atomicAdd(&counts[j][c], 1);
  }
  Header* self = a.peers.ctrl[rank];
  if (threadIdx.x == 0) seq_s = self->notify_seq + 1;
  __syncthreads();
  const uint64_t seq = seq_s;
  const int parity = static_cast<int>(seq & 1);
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    int acc = 0;
    for (int c = 0; c < C; ++c) a.channel_prefix_matrix[j * C + c] = (acc += counts[j][c]);
  }

  // 2. Payload into every rank's buffer.
  const int payload_ints = R + C + E_loc;
  for (int j = 0; j < R; ++j) {
    int* dst = a.peers.ctrl[j]->notify_payload[parity][rank];
    for (int i = threadIdx.x; i < payload_ints; i += blockDim.x) {
      int v;
      if (i < R) v = a.num_tokens_per_rank[i];
      else if (i < R + C) v = counts[j][i - R];
      else v = a.num_tokens_per_expert[j * E_loc + (i - R - C)];
      dst[i] = v;
    }
  }
  // 3. Publish: thread j releases the flag into rank j. The barrier orders the whole block's payload stores
  // before it, and a release is cumulative, so each flag covers every thread's payload. The R stores come from
  // one warp at once: one system fence in all, not one per rank issued by a single thread.
  __syncthreads();
  if (threadIdx.x < R) st_release_sys(&a.peers.ctrl[threadIdx.x]->notify_flag[rank], seq);
  // 4. Wait for every source.
  bool failed = false;
  if (threadIdx.x < R) {
    const int i = threadIdx.x;
    failed = !spin_until(
        a.env, [&] { return ld_acquire_sys(&self->notify_flag[i]); }, [&](uint64_t v) { return v >= seq; },
        kWaitNotifyBarrier, i, -1, static_cast<int64_t>(seq));
  }
  if (__syncthreads_or(failed)) return;

  // 5. Receiver-side results. Payload words were written by peers: read them at L2 (ld.cg).
  const int* payload = &self->notify_payload[parity][0][0];
  auto at = [&](int src, int idx) { return ld_cg(payload + src * kNotifyInts + idx); };
  for (int q = threadIdx.x; q < R * R; q += blockDim.x) {
    const int i = q / R, j = q % R;
    int acc = 0;
    for (int k = 0; k <= i; ++k) acc += at(k, j);
    a.rank_prefix_matrix[i * R + j] = acc;
  }
  for (int i = threadIdx.x; i < R; i += blockDim.x) {
    int acc = 0;
    for (int c = 0; c < C; ++c) {
      a.recv_channel_prefix_matrix[i * C + c] = acc;
      acc += at(i, R + c);
    }
  }
  if (a.host_counters != nullptr) {
    for (int e = threadIdx.x; e < E_loc; e += blockDim.x) {
      int64_t n = 0;
      for (int i = 0; i < R; ++i) n += at(i, R + C + e);
      const int64_t align = a.expert_alignment;
      a.host_counters[2 + e] = (n + align - 1) / align * align;
    }
    if (threadIdx.x == 0) {
      int64_t n_recv = 0;
      for (int i = 0; i < R; ++i) n_recv += at(i, rank);
      a.host_counters[1] = n_recv;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (a.host_counters != nullptr) {
      __threadfence_system();
      *reinterpret_cast<volatile int64_t*>(a.host_counters) = 1;
    }
    self->notify_seq = seq;
  }
}

}  // namespace

cudaError_t launch_notify(const NotifyArgs& a, cudaStream_t stream) {
  notify_kernel<<<1, kNumThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace deepep::intranode
