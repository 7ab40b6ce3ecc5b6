// Device helpers shared by the intranode kernels (dispatch.cu, combine.cu).
#pragma once

#include <cuda_runtime.h>

#include "common/ptx.cuh"
#include "common/wait.cuh"
#include "intranode/buffer_layout.h"

namespace deepep::intranode {

// Ring of queue (channel, src) inside `buffer` (a rank's NVL buffer): Q slots of `slot_bytes`. The buffer is
// split into one fixed region per source rank (`region_bytes` = num_nvl_bytes / R, independent of the call),
// so that whatever slot size or channel count a call uses, source i only ever writes inside region i. A
// sender's previous call is fully drained before its next one starts, so region i is free for it even while
// this rank is still receiving from slower sources in their regions.
__device__ __forceinline__ uint8_t* queue_base(uint8_t* buffer, int channel, int src, size_t region_bytes,
                                               int queue_tokens, int slot_bytes) {
  return buffer + src * region_bytes + static_cast<size_t>(channel) * queue_tokens * slot_bytes;
}

// Messages per publication round for a ring of `queue_tokens` slots (see kRoundTokens).
__device__ __forceinline__ int round_tokens(int queue_tokens) {
  return min(kRoundTokens, (queue_tokens + 1) / 2);
}

// Bit position of the k-th (0-based) set bit of `mask`; k < popc(mask).
__device__ __forceinline__ int nth_set_bit(unsigned mask, int k) {
  for (int i = 0; i < k; ++i) mask &= mask - 1;
  return __ffs(mask) - 1;
}

// Rows this rank received from `src` on channel c, as [first row, count) of the receive order (source rank, then
// source token): the rows dispatch writes for that stream, and those combine sends back on it. `Args` is
// DispatchArgs or CombineArgs (peers, num_channels and the handle's two prefix matrices).
template <typename Args>
__device__ __forceinline__ void source_channel_rows(const Args& a, int src, int c, int& row0, int& n) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, C = a.num_channels;
  const int src_start = src == 0 ? 0 : a.rank_prefix_matrix[(src - 1) * R + rank];
  const int src_total = a.rank_prefix_matrix[src * R + rank] - src_start;
  const int c_start = a.recv_channel_prefix_matrix[src * C + c];
  const int c_end = c + 1 < C ? a.recv_channel_prefix_matrix[src * C + c + 1] : src_total;
  row0 = src_start + c_start;
  n = c_end - c_start;
}

// Tokens [t0, t1) of channel c when T tokens are split into C channels of ceil(T / C).
__device__ __forceinline__ void channel_tokens(int num_tokens, int num_channels, int c, int& t0, int& t1) {
  const int per_channel = (num_tokens + num_channels - 1) / num_channels;
  t0 = min(c * per_channel, num_tokens);
  t1 = min(t0 + per_channel, num_tokens);
}

// Whole warp: wait until slot `m` of a sender's Q-slot ring is free (the receiver's head has passed m - Q).
// `head` caches the last head this warp saw, so the remote word is read only when the cache says "full".
// Returns false in every lane after a timeout (reported as `what` on peer `dst`, channel `c`).
__device__ __forceinline__ bool wait_ring_slot(const ErrorEnv& env, const uint64_t* head_word, uint64_t m, int Q,
                                               uint64_t& head, int what, int dst, int c) {
  if (head + Q > m) return true;
  const int lane = lane_id();
  bool ok = true;
  if (lane == 0)
    ok = spin_until(
        env, [&] { return ld_acquire_sys(head_word); }, [&](uint64_t h) { return h + Q > m; }, what, dst, c,
        static_cast<int64_t>(m + 1 - Q));
  ok = __shfl_sync(0xffffffffu, ok, 0);
  if (!ok) return false;
  head = __shfl_sync(0xffffffffu, lane == 0 ? ld_acquire_sys(head_word) : 0ull, 0);
  return true;
}

// One thread, a sender's drain: wait (bounded) until `dst` has consumed this rank's stream (c, dst) up to message
// `end`, i.e. head == tail, so the queue is empty for the next call. Returns false after a timeout (reported as
// `what` on peer `dst`, channel `c`) or an abort.
__device__ __forceinline__ bool wait_drained(const ErrorEnv& env, const Header* self, int c, int dst, uint64_t end,
                                             int what) {
  return spin_until(
      env, [&] { return ld_acquire_sys(&self->head[c][dst]); }, [&](uint64_t h) { return h >= end; }, what, dst, c,
      static_cast<int64_t>(end));
}

}  // namespace deepep::intranode
