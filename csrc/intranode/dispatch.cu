// Intranode dispatch: every token goes once to every rank that owns one of its experts, over NVLink,
// pushed by the sender (remote stores reach NVLink bandwidth with far fewer SMs than remote loads).
//
// Grid: 2 blocks per channel (C = num_sms / 2 channels; channel c owns source tokens
// [c * ceil(T/C), (c + 1) * ceil(T/C))), 32 warps each.
//   even block = sender of channel c: one warp group per *remote* destination j. The group scans its
//       channel 32 tokens at a time (ballot over is_token_in_rank[:, j]), gives the k-th message of the
//       round to warp k % G, and each warp pushes whole messages {row, scales, local top-k ids, weights,
//       source index} into slot m % Q of queue (c, this rank) in j's buffer (16-byte stores over NVLink).
//       Before writing message m it waits until head > m - Q (free slot). After each round the group meets at
//       a named barrier and its leader publishes tail = m_end with st.release.sys into j's buffer.
//   odd block = receiver of channel c: one warp group per *source* i != this rank: warps wait (lane 0,
//       acquire) until tail > m, copy message m from the local queue to the output rows (ld.cg: the data came
//       from another GPU), and after each round the leader publishes head into i's buffer (st.release.sys),
//       which frees the slots.
//   This rank's own tokens need no queue: a "local" warp group copies them from x straight into the output.
//       With local_split (the default) the sender and the receiver block of a channel each have such a group
//       and take alternate messages: a receiver block moves (R-1) remote streams and half the local one, a
//       sender block (R-1) remote streams and the other half, so neither waits on the other (without the
//       split the receivers carry R/(R-1) times the senders' bytes: 2x at EP2). Local groups get warps in
//       proportion to their bytes, 32/(2R-1) rounded (11 of 32 at EP2, 5 at EP4, 2 at EP8); the remote
//       groups share the rest evenly. Without the split the receiver block has R equal groups, the local one
//       among them.
// Copies: a message's metadata loads are issued before its row copy and stored after it, and a row moves in
// batches of copy_depth 16-byte loads per lane with the tail predicated into the last batch
// (warp_copy_v4_batched), so a message costs ceil(row / (512 * depth)) + 1 dependent memory latencies.
// Output rows: source i's tokens start at rank_prefix_matrix[i - 1][this rank]; its channel c starts
// recv_channel_prefix_matrix[i][c] rows later; message k of stream (c, i) is the k-th row after that. This
// is the receive order of the contract (source rank, then source token index).
// Split launch (phase, runtime.cpp: dispatch_fresh with DEEPEP_PLUGIN_EARLY_DISPATCH=1): when every channel's
// sends fit in its queue (ceil(T / C) <= Q), a fresh dispatch runs as two launches. Phase 1, enqueued right after
// notify and before the host reads the receive count, runs only the senders: they push every message (no slot can
// be busy: the previous call drained its queues, and this one needs at most Q slots) and record how many they sent,
// without waiting for the drain. Phase 2, enqueued once the host has allocated the outputs, runs the rest: the
// receivers, the local copies and the senders' drain. No kernel ever waits on the host, so a host call that
// synchronises the device in between (the caching allocator freeing its cache under memory pressure) cannot hang.
// At the end each sender waits until its streams are drained (head == tail; in phase 2 for a split launch), so
// queues are empty between calls (see buffer_layout.h). Every wait is bounded (wait.cuh); a failed wait makes the
// whole group leave its loop at the next barrier.
#include <cuda_runtime.h>

#include "common/vec_copy.cuh"
#include "common/wait.cuh"
#include "intranode/api.h"
#include "intranode/kernel_common.cuh"

namespace deepep::intranode {
namespace {

// A token's metadata as the warp's lanes hold it between load and store: scales (lane i holds scales i and
// i + 32; more than 64 scales go through a slow loop in store_meta), local top-k id and weight (lanes < K), and
// whether this rank owns the expert.
struct Meta {
  int32_t s0, s1;
  int64_t e;
  float w;
};

// Issue the loads of `token`'s metadata (all before any use, so they overlap each other and the row copy).
__device__ __forceinline__ Meta load_meta(const DispatchArgs& a, int token) {
  const int lane = lane_id();
  Meta m{0, 0, -1, 0.0f};
  if (a.x_scales != nullptr) {
    const int32_t* s = a.x_scales + token * a.scale_stride_token;
    if (lane < a.num_scales) m.s0 = s[lane * a.scale_stride_elem];
    if (lane + 32 < a.num_scales) m.s1 = s[(lane + 32) * a.scale_stride_elem];
  }
  if (a.topk_idx != nullptr && lane < a.num_topk) {
    m.e = a.topk_idx[static_cast<int64_t>(token) * a.num_topk + lane];
    m.w = a.topk_weights[static_cast<int64_t>(token) * a.num_topk + lane];
  }
  return m;
}

// Write `token`'s metadata for destination rank `dst` (scales, local top-k ids, weights, source index) with the
// warp's lanes. `Store*` functors write one 4-byte value each.
template <typename StoreScale, typename StoreIdx, typename StoreWeight, typename StoreSrc>
__device__ __forceinline__ void store_meta(const DispatchArgs& a, const Meta& m, int token, int dst,
                                           StoreScale store_scale, StoreIdx store_idx, StoreWeight store_weight,
                                           StoreSrc store_src) {
  const int lane = lane_id();
  if (a.x_scales != nullptr) {
    if (lane < a.num_scales) store_scale(lane, m.s0);
    if (lane + 32 < a.num_scales) store_scale(lane + 32, m.s1);
    const int32_t* s = a.x_scales + token * a.scale_stride_token;
    for (int i = lane + 64; i < a.num_scales; i += 32) store_scale(i, s[i * a.scale_stride_elem]);
  }
  if (a.topk_idx != nullptr && lane < a.num_topk) {
    const int64_t lo = static_cast<int64_t>(dst) * a.num_local_experts;
    const bool mine = m.e >= lo && m.e < lo + a.num_local_experts;
    store_idx(lane, mine ? static_cast<int>(m.e - lo) : -1);
    store_weight(lane, mine ? m.w : 0.0f);
  }
  if (lane == 0) store_src(token);
}

template <int kDepth>
__device__ void run_sender(const DispatchArgs& a, int c, int t0, int t1, int dst, int group, int group_warps,
                           int warp_in_group) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, Q = a.queue_tokens, lane = lane_id();
  const DispatchSlot& sl = a.slot;
  Header* self = a.peers.ctrl[rank];
  Header* remote = a.peers.ctrl[dst];
  uint8_t* queue = queue_base(a.peers.buffers[dst], c, rank, a.peers.region_bytes, Q, sl.slot_bytes);
  const int round = round_tokens(Q);
  const int bar = 1 + group, bar_threads = group_warps * 32;
  const uint64_t base = self->sent[c][dst];
  uint64_t head = 0;  // last seen head (lazy)
  int pos = 0;
  bool failed = false;
  for (int w0 = t0; w0 < t1; w0 += round) {
    const int t = w0 + lane;
    const bool valid = lane < round && t < t1;
    const bool in = valid && a.is_token_in_rank[static_cast<int64_t>(t) * R + dst];
    const unsigned mask = __ballot_sync(0xffffffffu, in);
    if (a.send_head != nullptr && warp_in_group == 0 && valid)
      a.send_head[static_cast<int64_t>(t) * R + dst] = in ? pos + __popc(mask & lanemask_lt()) : -1;
    const int n_msgs = __popc(mask);
    for (int k = (warp_in_group - pos % group_warps + group_warps) % group_warps; k < n_msgs && !failed;
         k += group_warps) {
      const int token = w0 + nth_set_bit(mask, k);
      const uint64_t m = base + pos + k;
      if (!wait_ring_slot(a.env, &self->head[c][dst], m, Q, head, kWaitDispatchSlots, dst, c)) {
        failed = true;
        break;
      }
      uint8_t* slot = queue + (m % Q) * sl.slot_bytes;
      const uint8_t* src_row = a.x + static_cast<int64_t>(token) * sl.row_bytes;
      const Meta meta = load_meta(a, token);
      warp_copy_v4_batched<kDepth, LoadKind::kNonCoherent>(
          reinterpret_cast<int4*>(slot), reinterpret_cast<const int4*>(src_row), sl.row_bytes / 16);
      store_meta(
          a, meta, token, dst, [&](int i, int32_t v) { reinterpret_cast<int32_t*>(slot + sl.scales_off)[i] = v; },
          [&](int k2, int v) { reinterpret_cast<int32_t*>(slot + sl.idx_off)[k2] = v; },
          [&](int k2, float v) { reinterpret_cast<float*>(slot + sl.weights_off)[k2] = v; },
          [&](int v) { *reinterpret_cast<int32_t*>(slot + sl.src_off) = v; });
    }
    pos += n_msgs;
    // Every warp's stores of this round happen before the barrier; the leader's release then publishes them.
    failed = named_barrier_or(bar, bar_threads, failed || aborted(a.env));
    if (failed) break;
    if (warp_in_group == 0 && lane == 0 && n_msgs > 0) st_release_sys(&remote->tail[c][rank], base + pos);
  }
  if (!failed && warp_in_group == 0 && lane == 0) {
    const uint64_t end = base + pos;
    if (a.phase == 1 || wait_drained(a.env, self, c, dst, end, kWaitDispatchDrain))  // phase 1: phase 2 drains
      self->sent[c][dst] = end;
  }
}

// Copy one message (already in local memory, written by a peer) into output row `row`: metadata loads first,
// then the row, then the metadata stores.
template <int kDepth>
__device__ __forceinline__ void store_row_from_slot(const DispatchArgs& a, const uint8_t* slot, int row) {
  const DispatchSlot& sl = a.slot;
  const int lane = lane_id();
  const int64_t r = row;
  const int* scales = reinterpret_cast<const int*>(slot + sl.scales_off);
  const bool has_scales = a.recv_scales != nullptr, has_topk = a.recv_topk_idx != nullptr && lane < a.num_topk;
  int s0 = 0, s1 = 0, idx = 0, src = 0;
  float w = 0.0f;
  if (has_scales && lane < a.num_scales) s0 = ld_cg(scales + lane);
  if (has_scales && lane + 32 < a.num_scales) s1 = ld_cg(scales + lane + 32);
  if (has_topk) {
    idx = ld_cg(reinterpret_cast<const int*>(slot + sl.idx_off) + lane);
    w = ld_cg(reinterpret_cast<const float*>(slot + sl.weights_off) + lane);
  }
  if (a.recv_src_idx != nullptr && lane == 0) src = ld_cg(reinterpret_cast<const int*>(slot + sl.src_off));
  warp_copy_v4_batched<kDepth, LoadKind::kL2>(reinterpret_cast<int4*>(a.recv_x + r * sl.row_bytes),
                                              reinterpret_cast<const int4*>(slot), sl.row_bytes / 16);
  if (has_scales) {
    int32_t* out = a.recv_scales + r * a.num_scales;
    if (lane < a.num_scales) out[lane] = s0;
    if (lane + 32 < a.num_scales) out[lane + 32] = s1;
    for (int i = lane + 64; i < a.num_scales; i += 32) out[i] = ld_cg(scales + i);
  }
  if (has_topk) {
    a.recv_topk_idx[r * a.num_topk + lane] = idx;
    a.recv_topk_weights[r * a.num_topk + lane] = w;
  }
  if (a.recv_src_idx != nullptr && lane == 0) a.recv_src_idx[r] = src;
}

// A row past the outputs: num_worst_tokens was too small (reported), or there are no outputs (num_rows -1: dropped).
__device__ void report_overflow(const DispatchArgs& a, int row) {
  if (lane_id() == 0 && a.num_rows >= 0)
    report_error(a.env, kMailboxOverflow, kWaitWorstTokens, -1, -1, row + 1, a.num_rows);
}

template <int kDepth>
__device__ void run_receiver(const DispatchArgs& a, int c, int src, int group, int group_warps, int warp_in_group) {
  const int rank = a.peers.rank, Q = a.queue_tokens, lane = lane_id();
  Header* self = a.peers.ctrl[rank];
  Header* remote = a.peers.ctrl[src];
  const uint8_t* queue =
      queue_base(a.peers.buffers[rank], c, src, a.peers.region_bytes, Q, a.slot.slot_bytes);
  int row0, n;
  source_channel_rows(a, src, c, row0, n);
  const int round = round_tokens(Q);
  const int bar = 1 + group, bar_threads = group_warps * 32;
  const uint64_t base = self->consumed[c][src];
  uint64_t tail = 0;
  bool failed = false;
  for (int r0 = 0; r0 < n; r0 += round) {
    const int m_count = min(round, n - r0);
    for (int k = warp_in_group; k < m_count; k += group_warps) {
      const uint64_t m = base + r0 + k;
      if (tail <= m) {
        bool ok = true;
        if (lane == 0)
          ok = spin_until(
              a.env, [&] { return ld_acquire_sys(&self->tail[c][src]); }, [&](uint64_t v) { return v > m; },
              kWaitDispatchTokens, src, c, static_cast<int64_t>(m + 1));
        ok = __shfl_sync(0xffffffffu, ok, 0);
        if (!ok) {
          failed = true;
          break;
        }
        tail = __shfl_sync(0xffffffffu, lane == 0 ? ld_acquire_sys(&self->tail[c][src]) : 0ull, 0);
      }
      const int row = row0 + r0 + k;
      if (row < a.num_rows) store_row_from_slot<kDepth>(a, queue + (m % Q) * a.slot.slot_bytes, row);
      else report_overflow(a, row);
    }
    // All reads of this round's slots happen before the barrier; the release then frees the slots.
    failed = named_barrier_or(bar, bar_threads, failed || aborted(a.env));
    if (failed) break;
    if (warp_in_group == 0 && lane == 0) st_release_sys(&remote->head[c][rank], base + r0 + m_count);
  }
  if (!failed && warp_in_group == 0 && lane == 0) self->consumed[c][src] = base + n;
}

// This rank's own tokens: straight from x to the output rows, no queue. The channel's local messages j = 0, 1, ...
// are shared by `parts` groups (the sender and the receiver block with local_split, else the receiver block
// alone): group `part` takes j % parts == part, and its warp w the j with (j / parts) % group_warps == w. Only the
// receiver block's group (`write_head`) records send_head.
template <int kDepth>
__device__ void run_local_copy(const DispatchArgs& a, int c, int t0, int t1, int part, int parts, int group_warps,
                               int warp_in_group, bool write_head) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, lane = lane_id();
  const int row_bytes = a.slot.row_bytes;
  const int cycle = parts * group_warps, mine = part + parts * warp_in_group;
  int row0, n;
  source_channel_rows(a, rank, c, row0, n);
  int pos = 0;
  for (int w0 = t0; w0 < t1; w0 += 32) {
    const int t = w0 + lane;
    const bool valid = t < t1;
    const bool in = valid && a.is_token_in_rank[static_cast<int64_t>(t) * R + rank];
    const unsigned mask = __ballot_sync(0xffffffffu, in);
    if (write_head && a.send_head != nullptr && warp_in_group == 0 && valid)
      a.send_head[static_cast<int64_t>(t) * R + rank] = in ? pos + __popc(mask & lanemask_lt()) : -1;
    const int n_msgs = __popc(mask);
    for (int k = ((mine - pos) % cycle + cycle) % cycle; k < n_msgs; k += cycle) {
      const int token = w0 + nth_set_bit(mask, k);
      const int64_t row = row0 + pos + k;
      if (row >= a.num_rows) {
        report_overflow(a, static_cast<int>(row));
        continue;
      }
      const Meta meta = load_meta(a, token);
      warp_copy_v4_batched<kDepth, LoadKind::kNonCoherent>(
          reinterpret_cast<int4*>(a.recv_x + row * row_bytes),
          reinterpret_cast<const int4*>(a.x + static_cast<int64_t>(token) * row_bytes), row_bytes / 16);
      store_meta(
          a, meta, token, rank, [&](int i, int32_t v) { a.recv_scales[row * a.num_scales + i] = v; },
          [&](int k2, int v) { a.recv_topk_idx[row * a.num_topk + k2] = v; },
          [&](int k2, float v) { a.recv_topk_weights[row * a.num_topk + k2] = v; },
          [&](int v) {
            if (a.recv_src_idx != nullptr) a.recv_src_idx[row] = v;
          });
    }
    pos += n_msgs;
  }
  (void)n;
}

// Warps of a block's local group with local_split: 32 / (2R - 1) rounded, all 32 at R == 1.
__device__ __forceinline__ int local_split_warps(int R) { return (kNumWarps + (2 * R - 1) / 2) / (2 * R - 1); }

template <int kDepth>
__global__ void __launch_bounds__(kNumThreads, 1) dispatch_kernel(DispatchArgs a) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, C = a.num_channels, T = a.num_tokens;
  const int c = blockIdx.x / 2;
  const bool is_sender = (blockIdx.x % 2) == 0;
  const int warp = threadIdx.x / 32;
  int t0, t1;
  channel_tokens(T, C, c, t0, t1);
  // Warp roles: remote groups g = 0 .. R-2 (peer g, or g + 1 from this rank on) of `group_warps` warps from warp
  // 0 on; the local group (`local_warps`) at the end of the block.
  const int local_warps = a.local_split ? local_split_warps(R) : (is_sender ? 0 : kNumWarps / R);
  const int group_warps = R > 1 ? (kNumWarps - local_warps) / (R - 1) : 0;
  const int group = group_warps > 0 ? warp / group_warps : R;
  const int local_first = kNumWarps - local_warps;

  if (!is_sender && a.worst_mode) {
    // Rows past the received count, as the reference and internode paths pad them: data, scales and top-k
    // weights 0, top-k ids -1 (contract), source index -1. Spread over the receiver blocks; the padding's bytes
    // are written once (no read), so the cost follows the padding, not num_worst_tokens.
    const int n = a.rank_prefix_matrix[(R - 1) * R + rank];
    const int64_t first = min(n, a.num_rows), rows = a.num_rows;
    const int64_t stride = static_cast<int64_t>(C) * blockDim.x;
    const int64_t tid = static_cast<int64_t>(c) * blockDim.x + threadIdx.x;
    const int64_t row_vecs = a.slot.row_bytes / 16;  // row_bytes % 16 == 0 (checked on the host)
    int4* data = reinterpret_cast<int4*>(a.recv_x);
    for (int64_t i = first * row_vecs + tid; i < rows * row_vecs; i += stride) data[i] = make_int4(0, 0, 0, 0);
    if (a.recv_scales != nullptr)
      for (int64_t i = first * a.num_scales + tid; i < rows * a.num_scales; i += stride) a.recv_scales[i] = 0;
    if (a.recv_topk_idx != nullptr)
      for (int64_t i = first * a.num_topk + tid; i < rows * a.num_topk; i += stride) {
        a.recv_topk_idx[i] = -1;
        a.recv_topk_weights[i] = 0.0f;
      }
    if (a.recv_src_idx != nullptr)
      for (int64_t i = first + tid; i < rows; i += stride) a.recv_src_idx[i] = -1;
  }
  if (a.phase == 1) {  // the remote sends alone, and none after a failed notify (its matrices are not written)
    __shared__ int leave;  // read once for the block: warps of one group must agree (they meet at named barriers)
    if (threadIdx.x == 0) leave = aborted(a.env);
    __syncthreads();
    if (!is_sender || warp >= local_first || leave) return;
  }
  if (warp >= local_first) {
    const int parts = a.local_split ? 2 : 1, part = a.local_split && !is_sender ? 1 : 0;
    run_local_copy<kDepth>(a, c, t0, t1, part, parts, local_warps, warp - local_first, !is_sender);
    return;
  }
  if (group >= R - 1) return;  // warps left over by an uneven split
  const int peer = group < rank ? group : group + 1;
  if (is_sender && a.phase == 2) {  // phase 1 pushed the messages and recorded their end in sent[c][peer]
    if (warp % group_warps == 0 && lane_id() == 0) {
      const Header* self = a.peers.ctrl[rank];
      wait_drained(a.env, self, c, peer, self->sent[c][peer], kWaitDispatchDrain);
    }
  } else if (is_sender) {
    run_sender<kDepth>(a, c, t0, t1, peer, group, group_warps, warp % group_warps);
  } else {
    run_receiver<kDepth>(a, c, peer, group, group_warps, warp % group_warps);
  }
}

}  // namespace

cudaError_t launch_dispatch(const DispatchArgs& a, cudaStream_t stream) {
  if (a.copy_depth == 8) dispatch_kernel<8><<<2 * a.num_channels, kNumThreads, 0, stream>>>(a);
  else if (a.copy_depth == 4) dispatch_kernel<4><<<2 * a.num_channels, kNumThreads, 0, stream>>>(a);
  else return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace deepep::intranode
