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
//   odd block = receiver: tokens of channel c, one warp per token, 32 tokens per round. For token t the
//       warp reads send_head[t][*]; for each rank j that received t it takes the row from its own x (j ==
//       this rank, row rank_prefix(me) + recv_channel_prefix[me][c] + send_head[t][me]) or from queue (c, j)
//       after waiting for tail > message; accumulates in FP32 and writes the BF16 result. After each round
//       (__syncthreads_or) thread j publishes head for stream (c, j) = messages of the round's tokens.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/bf16x8.cuh"
#include "common/vec_copy.cuh"
#include "common/wait.cuh"
#include "intranode/api.h"
#include "intranode/kernel_common.cuh"

namespace deepep::intranode {
namespace {

// Rows this rank received from `src` on channel c (the rows it sends back), as [first row, count).
__device__ __forceinline__ void source_channel_rows(const CombineArgs& a, int src, int c, int& row0, int& n) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, C = a.num_channels;
  const int src_start = src == 0 ? 0 : a.rank_prefix_matrix[(src - 1) * R + rank];
  const int src_total = a.rank_prefix_matrix[src * R + rank] - src_start;
  const int c_start = a.recv_channel_prefix_matrix[src * C + c];
  const int c_end = c + 1 < C ? a.recv_channel_prefix_matrix[src * C + c + 1] : src_total;
  row0 = src_start + c_start;
  n = c_end - c_start;
}

__device__ void run_sender(const CombineArgs& a, int c, int dst, int group, int group_warps, int warp_in_group) {
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
  if (!failed && warp_in_group == 0 && lane == 0) {
    const uint64_t end = base + n;
    if (spin_until(
            a.env, [&] { return ld_acquire_sys(&self->head[c][dst]); }, [&](uint64_t h) { return h >= end; },
            kWaitCombineDrain, dst, c, static_cast<int64_t>(end)))
      self->sent[c][dst] = end;
  }
}

__device__ void run_receiver(const CombineArgs& a, int c, int t0, int t1) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, Q = a.queue_tokens, C = a.num_channels;
  const int warp = threadIdx.x / 32, lane = lane_id();
  Header* self = a.peers.ctrl[rank];
  const int round = round_tokens(Q);
  const int vec_per_row = a.hidden / 8;

  // Per-source constants (stream base = messages consumed before this call, queue), and per-warp tables of
  // where the current token's copies live; tables in shared memory keep registers for the accumulators.
  __shared__ uint64_t base_s[kMaxRanks];
  __shared__ const uint8_t* queue_s[kMaxRanks];
  __shared__ const int4* row_s[kNumWarps][kMaxRanks];
  __shared__ const float* weight_s[kNumWarps][kMaxRanks];
  if (threadIdx.x < R) {
    base_s[threadIdx.x] = self->consumed[c][threadIdx.x];
    queue_s[threadIdx.x] =
        queue_base(a.peers.buffers[rank], c, threadIdx.x, a.peers.region_bytes, Q, a.slot.slot_bytes);
  }
  const int local_row0 = (rank == 0 ? 0 : a.rank_prefix_matrix[(rank - 1) * R + rank]) +
                         a.recv_channel_prefix_matrix[rank * C + c];
  __syncthreads();

  uint64_t tail = 0;  // lane j < R: last seen tail of stream (c, j)
  int consumed = 0;   // thread j < R: messages of stream (c, j) consumed so far in this call
  bool failed = false;

  for (int w0 = t0; w0 < t1; w0 += round) {
    const int t = w0 + warp;
    if (warp < round && t < t1 && !failed) {
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
          const uint64_t m = base_s[j] + sh;
          if (tail <= m) {
            ok = spin_until(
                a.env, [&] { return ld_acquire_sys(&self->tail[c][j]); }, [&](uint64_t v) { return v > m; },
                kWaitCombineTokens, j, c, static_cast<int64_t>(m + 1));
            if (ok) tail = ld_acquire_sys(&self->tail[c][j]);
          }
          const uint8_t* slot = queue_s[j] + (m % Q) * a.slot.slot_bytes;
          row = reinterpret_cast<const int4*>(slot);
          if (a.num_topk > 0) w = reinterpret_cast<const float*>(slot + a.slot.weights_off);
        }
        row_s[warp][j] = row;
        weight_s[warp][j] = w;
      }
      if (__any_sync(0xffffffffu, !ok)) {
        failed = true;
      } else {
        __syncwarp();
        const int64_t out_row = static_cast<int64_t>(t) * vec_per_row;
        // Two 16-byte vectors per lane per step; all sources' loads of a step are issued before the adds.
        for (int v = lane; v < vec_per_row; v += 64) {
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
            const int4* p0 = row_s[warp][j0];
            const int4* p1 = j0 + 1 < R ? row_s[warp][j0 + 1] : nullptr;
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
        if (a.num_topk > 0 && lane < a.num_topk) {
          float w = 0.0f;
          for (int j = 0; j < R; ++j) {
            const float* p = weight_s[warp][j];
            if (p != nullptr) w += ld_cg(p + lane);
          }
          a.combined_topk_weights[static_cast<int64_t>(t) * a.num_topk + lane] = w;
        }
      }
    }
    // All reads of this round happen before the barrier; thread j then frees stream j's slots.
    failed = __syncthreads_or(failed || aborted(a.env));
    if (failed) break;
    if (threadIdx.x < R && static_cast<int>(threadIdx.x) != rank) {
      const int j = threadIdx.x;
      const int w1 = min(w0 + round, t1);
      int n = 0;
      for (int tt = w0; tt < w1; ++tt) n += a.send_head[static_cast<int64_t>(tt) * R + j] >= 0;
      if (n > 0) {
        consumed += n;
        st_release_sys(&a.peers.ctrl[j]->head[c][rank], base_s[j] + consumed);
      }
    }
  }
  if (!failed && threadIdx.x < R && static_cast<int>(threadIdx.x) != rank)
    self->consumed[c][threadIdx.x] = base_s[threadIdx.x] + consumed;
}

__global__ void __launch_bounds__(kNumThreads, 1) combine_kernel(CombineArgs a) {
  const int R = a.peers.num_ranks, rank = a.peers.rank;
  const int c = blockIdx.x / 2;
  const int warp = threadIdx.x / 32;
  if ((blockIdx.x % 2) == 0) {
    if (R == 1) return;
    const int groups = R - 1, group_warps = kNumWarps / groups;
    const int group = warp / group_warps;
    if (group >= groups) return;
    const int dst = group < rank ? group : group + 1;
    run_sender(a, c, dst, group, group_warps, warp % group_warps);
  } else {
    int t0, t1;
    channel_tokens(a.num_tokens, a.num_channels, c, t0, t1);
    run_receiver(a, c, t0, t1);
  }
}

}  // namespace

cudaError_t launch_combine(const CombineArgs& a, cudaStream_t stream) {
  combine_kernel<<<2 * a.num_channels, kNumThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace deepep::intranode
