// Intranode combine: the reverse of dispatch. Every rank j sends the rows it received back to their source
// rank i, which sums the copies of each token (FP32 accumulation, plus optional biases) into [T, H] BF16.
//
// Streams are the dispatch streams' counterparts: rows that j received from i on channel c go back on
// stream (c, j -> i), into queue (c, j) of i's buffer, in receive order, which is i's token order. The
// receiver therefore knows where every copy lives without any metadata: token t of channel c, sent to j,
// is message number send_head[t][j] of that stream in this call.
//
// Grid: 2 blocks per channel, 32 warps each.
//   even block = sender: one warp group per remote destination i (the rank that owns the tokens). Its rows
//       are contiguous: [rank_prefix(i) + recv_channel_prefix[i][c], + count). Same rounds, flow control and
//       release protocol as the dispatch sender; each message = {row, top-k weights}.
//   odd block = receiver: tokens of channel c in rounds of 32, one warp per token (small rounds: 2 or 4 warps per
//       token, each a share of the row's vectors, in rounds of 16 or 8; see run_reducer). For token t the warp
//       reads send_head[t][*]; for each rank j that received t it takes the row from its own x (j == this
//       rank, row rank_prefix(me) + recv_channel_prefix[me][c] + send_head[t][me]) or from queue (c, j) after
//       waiting for tail > message; accumulates in FP32 and writes the BF16 result. After each round
//       (__syncthreads_or) thread j publishes head for stream (c, j) = messages of the round's tokens.
// Shared rounds (share_rounds; DEEPEP_PLUGIN_COMBINE_SHARE=1, the default). The receiver reads h + 1 rows per token (h
// holders: about 2 at 2 ranks, top-8 of 256) where the sender moves about 2 (R - 1) p rows (p: the chance a
// peer holds the token), so at 2 ranks the receiver block has about 1.5x the sender's bytes and finishes last.
// With shared rounds the sender block, once its sends are out, takes reduction rounds as well: either block
// claims the channel's next round with an atomicAdd on CombineRounds::claimed (this rank's control block), and
// rounds are released in order: the block that finished round r waits until round r - 1 is released
// (CombineRounds::released, acquire), publishes the heads through round r (the last message of the round's
// tokens + 1, so a round with no message from j publishes nothing) and releases r. No wait can close a cycle:
// the lowest unreleased round is always held by a block that is not waiting for a release, the heads cover every
// round before it, and its messages fit in the ring as in the unshared case (Q >= 2 rounds - 1, kRoundTokens);
// a later round only waits for it. The second block to leave records the streams' consumed counts and clears
// CombineRounds for the next call. Where the senders are the
// slower side (4 ranks and more), the sender block finds no round left and nothing changes but one atomic per
// round. The output is the same either way: a token's sum is computed by one warp (small rounds: each vector by one
// warp) in the same order.
// Small rounds (small_rounds, DEEPEP_PLUGIN_COMBINE_SMALL_ROUNDS=1, the default): see run_reducer. The sum of each
// vector is still taken over the sources in the same order, so the output does not change either.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/bf16x8.cuh"
#include "common/vec_copy.cuh"
#include "common/wait.cuh"
#include "intranode/api.h"
#include "intranode/kernel_common.cuh"

namespace deepep::intranode {
namespace {

// Leader of dst's sender group, after its sends: waits until dst has consumed every row of this call and
// records the stream's end (so the next call starts from an empty queue).
__device__ void drain_sends(const CombineArgs& a, int c, int dst) {
  Header* self = a.peers.ctrl[a.peers.rank];
  int row0, n;
  source_channel_rows(a, dst, c, row0, n);
  const uint64_t end = self->sent[c][dst] + n;
  if (wait_drained(a.env, self, c, dst, end, kWaitCombineDrain)) self->sent[c][dst] = end;
}

// Pushes this rank's rows of channel c back to `dst`. Returns false (in the whole group) after a failed wait.
// With `drain`, the group's leader then waits until dst has consumed them all and records the stream's end.
__device__ bool run_sender(const CombineArgs& a, int c, int dst, int group, int group_warps, int warp_in_group,
                           bool drain) {
  const int rank = a.peers.rank, Q = a.queue_tokens, lane = lane_id();
  const CombineSlot& sl = a.slot;
  Header* self = a.peers.ctrl[rank];
  Header* remote = a.peers.ctrl[dst];
  uint8_t* queue = queue_base(a.peers.buffers[dst], c, rank, a.peers.region_bytes, Q, sl.slot_bytes);
  int row0, n;
  source_channel_rows(a, dst, c, row0, n);
  const int round = round_tokens(Q);
  const int bar = 1 + group, bar_threads = group_warps * 32;
  const uint64_t base = self->sent[c][dst];
  uint64_t head = 0;
  bool failed = false;
  for (int r0 = 0; r0 < n; r0 += round) {
    const int m_count = min(round, n - r0);
    for (int k = warp_in_group; k < m_count; k += group_warps) {
      const uint64_t m = base + r0 + k;
      if (!wait_ring_slot(a.env, &self->head[c][dst], m, Q, head, kWaitCombineSlots, dst, c)) {
        failed = true;
        break;
      }
      const int64_t row = row0 + r0 + k;
      uint8_t* slot = queue + (m % Q) * sl.slot_bytes;
      warp_copy_v4<LoadKind::kNonCoherent>(reinterpret_cast<int4*>(slot),
                                           reinterpret_cast<const int4*>(a.x) + row * (sl.row_bytes / 16),
                                           sl.row_bytes / 16);
      if (a.num_topk > 0 && lane < a.num_topk)
        reinterpret_cast<float*>(slot + sl.weights_off)[lane] = a.topk_weights[row * a.num_topk + lane];
    }
    failed = named_barrier_or(bar, bar_threads, failed || aborted(a.env));
    if (failed) break;
    if (warp_in_group == 0 && lane == 0) st_release_sys(&remote->tail[c][rank], base + r0 + m_count);
  }
  if (!failed && drain && warp_in_group == 0 && lane == 0) drain_sends(a, c, dst);
  return !failed;
}

// Messages of stream (c, j -> this rank) in this call: the tokens of channel c this rank sent to j in dispatch
// (the handle's channel_prefix_matrix, which notify computed from the same routing as send_head; Buffer takes only
// handles its dispatch returned).
__device__ __forceinline__ int channel_messages(const CombineArgs& a, int j, int c) {
  const int* cp = a.channel_prefix_matrix + j * a.num_channels;  // inclusive prefix over channels
  return cp[c] - (c > 0 ? cp[c - 1] : 0);
}

// Per-block tables of the reduction, in shared memory (registers stay for the accumulators).
struct ReduceTables {
  uint64_t base[kMaxRanks];                   // stream (c, j): messages consumed before this call
  const uint8_t* queue[kMaxRanks];            // queue (c, j) in this rank's buffer
  const int4* row[kNumWarps][kMaxRanks];      // per warp: where the current token's copy from j lives
  const float* weight[kNumWarps][kMaxRanks];  // and its top-k weights
  int head[kNumWarps][kMaxRanks];             // per warp: send_head[t][j] of its token (-1: none)
  int round;                                  // the round this block claimed (shared rounds)
};

// One warp: part `part` of `parts` of token t's sum over its copies (pairs of 32 16-byte vectors, every parts-th
// pair; the top-k weights in part 0). Lane j < R also caches the last tail it saw of stream (c, j) in `tail`.
// Returns false in every lane after a failed wait.
__device__ bool reduce_token(const CombineArgs& a, int c, int t, int part, int parts, int64_t local_row0,
                             ReduceTables& tb, int warp, uint64_t& tail) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, Q = a.queue_tokens, lane = lane_id();
  const int vec_per_row = a.hidden / 8;
  Header* self = a.peers.ctrl[rank];
  // Lane j locates token t's copy from rank j (waiting for it if it is still in flight).
  bool ok = true;
  if (lane < R) {
    const int j = lane;
    const int sh = a.send_head[static_cast<int64_t>(t) * R + j];
    const int4* row = nullptr;
    const float* w = nullptr;
    if (sh >= 0 && j == rank) {
      const int64_t r = local_row0 + sh;
      row = reinterpret_cast<const int4*>(a.x) + r * vec_per_row;
      if (a.num_topk > 0) w = a.topk_weights + r * a.num_topk;
    } else if (sh >= 0) {
      const uint64_t m = tb.base[j] + sh;
      if (tail <= m) {
        ok = spin_until(
            a.env, [&] { return ld_acquire_sys(&self->tail[c][j]); }, [&](uint64_t v) { return v > m; },
            kWaitCombineTokens, j, c, static_cast<int64_t>(m + 1));
        if (ok) tail = ld_acquire_sys(&self->tail[c][j]);
      }
      const uint8_t* slot = tb.queue[j] + (m % Q) * a.slot.slot_bytes;
      row = reinterpret_cast<const int4*>(slot);
      if (a.num_topk > 0) w = reinterpret_cast<const float*>(slot + a.slot.weights_off);
    }
    tb.row[warp][j] = row;
    tb.weight[warp][j] = w;
    tb.head[warp][j] = sh;
  }
  if (__any_sync(0xffffffffu, !ok)) return false;
  __syncwarp();
  const int64_t out_row = static_cast<int64_t>(t) * vec_per_row;
  // Two 16-byte vectors per lane per step; all sources' loads of a step are issued before the adds.
  for (int v = lane + 64 * part; v < vec_per_row; v += 64 * parts) {
    const bool has2 = v + 32 < vec_per_row;
    float acc0[8], acc1[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc0[i] = acc1[i] = 0.0f;
    if (a.bias0 != nullptr) {
      const int4* b = reinterpret_cast<const int4*>(a.bias0) + out_row;
      add_bf16x8(acc0, ld_nc_v4(b + v));
      if (has2) add_bf16x8(acc1, ld_nc_v4(b + v + 32));
    }
    if (a.bias1 != nullptr) {
      const int4* b = reinterpret_cast<const int4*>(a.bias1) + out_row;
      add_bf16x8(acc0, ld_nc_v4(b + v));
      if (has2) add_bf16x8(acc1, ld_nc_v4(b + v + 32));
    }
    for (int j0 = 0; j0 < R; j0 += 2) {
      const int4* p0 = tb.row[warp][j0];
      const int4* p1 = j0 + 1 < R ? tb.row[warp][j0 + 1] : nullptr;
      int4 x00, x01, x10, x11;
      if (p0 != nullptr) {
        x00 = ld_cg_v4(p0 + v);
        if (has2) x01 = ld_cg_v4(p0 + v + 32);
      }
      if (p1 != nullptr) {
        x10 = ld_cg_v4(p1 + v);
        if (has2) x11 = ld_cg_v4(p1 + v + 32);
      }
      if (p0 != nullptr) {
        add_bf16x8(acc0, x00);
        if (has2) add_bf16x8(acc1, x01);
      }
      if (p1 != nullptr) {
        add_bf16x8(acc0, x10);
        if (has2) add_bf16x8(acc1, x11);
      }
    }
    int4* out = reinterpret_cast<int4*>(a.combined_x) + out_row;
    st_na_v4(out + v, to_bf16x8(acc0));
    if (has2) st_na_v4(out + v + 32, to_bf16x8(acc1));
  }
  if (part == 0 && a.num_topk > 0 && lane < a.num_topk) {
    float w = 0.0f;
    for (int j = 0; j < R; ++j) {
      const float* p = tb.weight[warp][j];
      if (p != nullptr) w += ld_cg(p + lane);
    }
    a.combined_topk_weights[static_cast<int64_t>(t) * a.num_topk + lane] = w;
  }
  return true;
}

// Warp 0, shared rounds: once round r - 1 is released, free the slots of round r's messages (the send_head rows
// of its tokens are in tb.head[0, count)) and release r. Returns false in every lane after a failed wait.
__device__ bool release_round(const CombineArgs& a, int c, int r, int count, ReduceTables& tb,
                              CombineRounds* work) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, lane = lane_id();
  bool ok = true;
  if (lane == 0 && r > 0)
    ok = spin_until(
        a.env, [&] { return ld_acquire_gpu(&work->released); },
        [&](unsigned v) { return v >= static_cast<unsigned>(r); }, kWaitCombineRound, rank, c, r);
  __syncwarp();  // orders lane 0's acquire before the other lanes' releases
  if (!__shfl_sync(0xffffffffu, ok, 0)) return false;
  if (lane < R && lane != rank) {
    int last = -1;  // send_head grows with the token within a stream: the round's last message is the max
    for (int w = 0; w < count; ++w) last = max(last, tb.head[w][lane]);
    if (last >= 0) st_release_sys(&a.peers.ctrl[lane]->head[c][rank], tb.base[lane] + last + 1);
  }
  __syncwarp();
  if (lane == 0) st_release_gpu(&work->released, static_cast<unsigned>(r + 1));
  return true;
}

// A block's part of channel c's reduction: every round in order (shared == false: the receiver block alone),
// or the rounds it claims (shared == true: both blocks of the channel; see the header).
__device__ void run_reducer(const CombineArgs& a, int c, bool shared) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, Q = a.queue_tokens, C = a.num_channels;
  const int warp = threadIdx.x / 32;
  Header* self = a.peers.ctrl[rank];
  int t0, t1;
  channel_tokens(a.num_tokens, C, c, t0, t1);
  // Small rounds (a.small_rounds): a channel of fewer than 32 tokens gives each token 2 (16-31 tokens) or 4 (fewer)
  // warps, so its reduction takes half or a quarter of the dependent steps, and a round covers 16 or 8 tokens, so
  // that with shared rounds the sender block has a round to take.
  const int parts = a.small_rounds == 0 || t1 - t0 >= 32 ? 1 : t1 - t0 >= 16 ? 2 : 4;
  const int round = min(round_tokens(Q), kNumWarps / parts);
  const int num_rounds = (t1 - t0 + round - 1) / round;

  __shared__ ReduceTables tb;
  if (threadIdx.x < R) {
    tb.base[threadIdx.x] = self->consumed[c][threadIdx.x];
    tb.queue[threadIdx.x] =
        queue_base(a.peers.buffers[rank], c, threadIdx.x, a.peers.region_bytes, Q, a.slot.slot_bytes);
  }
  const int64_t local_row0 = (rank == 0 ? 0 : a.rank_prefix_matrix[(rank - 1) * R + rank]) +
                             a.recv_channel_prefix_matrix[rank * C + c];
  CombineRounds* work = &self->combine_rounds[c];
  __syncthreads();

  uint64_t tail = 0;  // lane j < R: last seen tail of stream (c, j)
  int consumed = 0;   // thread j < R, unshared rounds: messages of stream (c, j) consumed so far in this call
  bool failed = false;
  for (int k = 0;; ++k) {
    int r = k;
    if (shared) {
      if (threadIdx.x == 0) tb.round = static_cast<int>(atomicAdd(&work->claimed, 1u));
      failed = __syncthreads_or(failed || aborted(a.env));  // also: warp 0's release of the previous round
      if (failed) break;
      r = tb.round;
    }
    if (r >= num_rounds) break;
    const int w0 = t0 + r * round, w1 = min(w0 + round, t1);
    if (warp / parts < w1 - w0 &&
        !reduce_token(a, c, w0 + warp / parts, warp % parts, parts, local_row0, tb, warp, tail))
      failed = true;
    // All reads of this round happen before the barrier; then its slots are freed.
    failed = __syncthreads_or(failed || aborted(a.env));
    if (failed) break;
    if (shared) {
      if (warp == 0 && !release_round(a, c, r, (w1 - w0) * parts, tb, work)) failed = true;
    } else if (threadIdx.x < R && static_cast<int>(threadIdx.x) != rank) {
      const int j = threadIdx.x;
      int n = 0;
      for (int tt = w0; tt < w1; ++tt) n += a.send_head[static_cast<int64_t>(tt) * R + j] >= 0;
      if (n > 0) {
        consumed += n;
        st_release_sys(&a.peers.ctrl[j]->head[c][rank], tb.base[j] + consumed);
      }
    }
  }
  if (failed) return;
  if (!shared) {
    if (threadIdx.x < R && static_cast<int>(threadIdx.x) != rank)
      self->consumed[c][threadIdx.x] = tb.base[threadIdx.x] + consumed;
    return;
  }
  // Leaving: the channel's second block to leave (both have read `consumed` by now) records the streams' ends
  // and clears the round state for the next call.
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&work->finished, 1u) == 1u) {
      __threadfence();
      for (int j = 0; j < R; ++j)
        if (j != rank) self->consumed[c][j] = tb.base[j] + channel_messages(a, j, c);
      work->claimed = 0;
      work->released = 0;
      work->finished = 0;
    }
  }
}

__global__ void __launch_bounds__(kNumThreads, 1) combine_kernel(CombineArgs a) {
  const int R = a.peers.num_ranks, rank = a.peers.rank;
  const int c = blockIdx.x / 2;
  const bool shared = a.share_rounds != 0;
  const bool sender = (blockIdx.x % 2) == 0;
  const int warp = threadIdx.x / 32;
  const int groups = R - 1, group_warps = groups > 0 ? kNumWarps / groups : kNumWarps;
  const int group = warp / group_warps;
  const int dst = !sender || group >= groups ? -1 : group < rank ? group : group + 1;  // -1: no sends
  if (sender) {
    if (!shared && dst < 0) return;
    const bool ok = dst < 0 || run_sender(a, c, dst, group, group_warps, warp % group_warps, !shared);
    if (!shared) return;
    // Every send of this block is out: help with the reduction (one call site for both roles), then drain.
    if (__syncthreads_or(!ok || aborted(a.env))) return;
  }
  run_reducer(a, c, shared);
  if (dst >= 0 && warp % group_warps == 0 && lane_id() == 0 && !aborted(a.env)) drain_sends(a, c, dst);
}

}  // namespace

cudaError_t launch_combine(const CombineArgs& a, cudaStream_t stream) {
  combine_kernel<<<2 * a.num_channels, kNumThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace deepep::intranode
