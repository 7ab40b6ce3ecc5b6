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
//   odd block = receiver of channel c: one driver warp per *source* i, moving rows with the bulk-copy engine
//       through a ring of shared-memory stages (see "Receiver side" below; most of the block's warps idle).
//       i == this rank: no queue at all: the warp copies its own tokens from x straight into the output
//           (local HBM traffic on SMs that are not pushing over NVLink).
//       i != this rank: the warp polls tail (relaxed; acquire once it moved), loads published messages from
//           the local queue into its stages, stores rows out with bulk stores and scatters the metadata, and
//           publishes head into i's buffer (st.release.sys) once per round, which frees the slots.
// Output rows: source i's tokens start at rank_prefix_matrix[i - 1][this rank]; its channel c starts
// recv_channel_prefix_matrix[i][c] rows later; message k of stream (c, i) is the k-th row after that. This
// is the receive order of the contract (source rank, then source token index).
// At the end each sender waits until its streams are drained (head == tail), so queues are empty between
// kernels (see buffer_layout.h). Every wait is bounded (wait.cuh); a failed wait makes the whole group
// leave its loop at the next barrier.
#include <cuda_runtime.h>

#include "common/bulk_copy.cuh"
#include "common/vec_copy.cuh"
#include "common/wait.cuh"
#include "intranode/api.h"
#include "intranode/kernel_common.cuh"

namespace deepep::intranode {
namespace {

// Rows of source `src` on this rank, as [first row, count) of channel `c`.
__device__ __forceinline__ void source_channel_rows(const DispatchArgs& a, int src, int c, int& row0, int& n) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, C = a.num_channels;
  const int src_start = src == 0 ? 0 : a.rank_prefix_matrix[(src - 1) * R + rank];
  const int src_total = a.rank_prefix_matrix[src * R + rank] - src_start;
  const int c_start = a.recv_channel_prefix_matrix[src * C + c];
  const int c_end = c + 1 < C ? a.recv_channel_prefix_matrix[src * C + c + 1] : src_total;
  row0 = src_start + c_start;
  n = c_end - c_start;
}

// Writes the per-token metadata (scales, local top-k ids, weights, source index) of `token` for
// destination rank `dst`, with the warp's lanes. `Store*` functors write one 4-byte value each.
template <typename StoreScale, typename StoreIdx, typename StoreWeight, typename StoreSrc>
__device__ __forceinline__ void write_meta(const DispatchArgs& a, int token, int dst, StoreScale store_scale,
                                           StoreIdx store_idx, StoreWeight store_weight, StoreSrc store_src) {
  const int lane = lane_id();
  if (a.x_scales != nullptr) {
    const int32_t* s = a.x_scales + token * a.scale_stride_token;
    for (int i = lane; i < a.num_scales; i += 32) store_scale(i, s[i * a.scale_stride_elem]);
  }
  if (a.topk_idx != nullptr && lane < a.num_topk) {
    const int64_t e = a.topk_idx[static_cast<int64_t>(token) * a.num_topk + lane];
    const int64_t lo = static_cast<int64_t>(dst) * a.num_local_experts;
    const bool mine = e >= lo && e < lo + a.num_local_experts;
    store_idx(lane, mine ? static_cast<int>(e - lo) : -1);
    store_weight(lane, mine ? a.topk_weights[static_cast<int64_t>(token) * a.num_topk + lane] : 0.0f);
  }
  if (lane == 0) store_src(token);
}

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
      warp_copy_v4<LoadKind::kNonCoherent>(reinterpret_cast<int4*>(slot), reinterpret_cast<const int4*>(src_row),
                                           sl.row_bytes / 16);
      write_meta(
          a, token, dst, [&](int i, int32_t v) { reinterpret_cast<int32_t*>(slot + sl.scales_off)[i] = v; },
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
    if (spin_until(
            a.env, [&] { return ld_relaxed_sys(&self->head[c][dst]); }, [&](uint64_t h) { return h >= end; },
            kWaitDispatchDrain, dst, c, static_cast<int64_t>(end))) {
      (void)ld_acquire_sys(&self->head[c][dst]);  // the receiver's reads of the slots happen before our next writes
      self->sent[c][dst] = end;
    }
  }
}

__device__ void report_overflow(const DispatchArgs& a, int row) {
  if (lane_id() == 0) report_error(a.env, kMailboxOverflow, kWaitWorstTokens, -1, -1, row + 1, a.num_rows);
}

// ---------------------------------------------------------------------------------------------------------
// Receiver side: one driver warp per source, moving rows with the bulk-copy engine through a ring of shared-memory
// stages (buffer_layout.h: kRecvStages, recv_cut). Lane 0 issues the copies; every lane follows the same control
// flow (all loop state is warp-uniform) and helps with the metadata. An item is what one stage holds: `count` whole
// messages, or one chunk [off, off + len) of one message. Items are loaded up to kRecvStages - 1 ahead and stored
// out in order; a stage is refilled only once the bulk store that read it two items ago has finished reading
// (wait_group.read 1: each processed item commits exactly one store group).

struct StageRec {
  int first;  // stream position (message number in this call, from 0) of the item's first message
  int count;  // messages in the item
  int off;    // row bytes before the item's data (0 for whole messages)
  int len;    // row bytes of each message in the item
};

struct Stages {
  uint64_t* bars;   // [kRecvStages] mbarriers
  StageRec* recs;   // [kRecvStages]
  uint8_t* data;    // [kRecvStages][stage_bytes]
  int stage_bytes;

  __device__ uint8_t* stage(uint32_t item) const { return data + (item % kRecvStages) * stage_bytes; }
  __device__ uint64_t* bar(uint32_t item) const { return bars + item % kRecvStages; }
  __device__ StageRec& rec(uint32_t item) const { return recs[item % kRecvStages]; }
  // Every lane: wait until item's loads have landed (its phase: the item's use number of the stage, mod 2).
  __device__ void wait(uint32_t item) const { mbar_wait(bar(item), (item / kRecvStages) & 1u); }
};

// Driver warp of source group `group`: its stages, barriers initialised by lane 0.
__device__ Stages group_stages(uint8_t* smem, const RecvStaging& st, int group) {
  uint8_t* g = smem + static_cast<size_t>(group) * st.group_bytes;
  Stages s;
  s.bars = reinterpret_cast<uint64_t*>(g);
  s.recs = reinterpret_cast<StageRec*>(g + 8 * kRecvStages);
  s.data = g + kRecvHeaderBytes;
  s.stage_bytes = st.stage_bytes;
  if (lane_id() == 0) {
    for (int i = 0; i < kRecvStages; ++i) mbar_init(s.bars + i);
    mbar_init_fence();
  }
  __syncwarp();
  return s;
}

// Lane 0: load `bytes` from `src` into the item's stage at `dst_off`, as part of the item's `total` bytes (the
// first load of an item announces them). The stage's previous store must have read it: bulk_wait_read<1> first.
__device__ __forceinline__ void item_load(const Stages& s, uint32_t item, int dst_off, const void* src, int bytes) {
  bulk_load(s.stage(item) + dst_off, src, static_cast<uint32_t>(bytes), s.bar(item));
}

// The metadata of one message (scales, local top-k ids, weights, source index: the slot's layout after the row)
// from shared memory `meta` into output row `row`, with the warp's lanes.
__device__ __forceinline__ void scatter_meta(const DispatchArgs& a, const uint8_t* meta, int64_t row) {
  const int lane = lane_id();
  const int32_t* m = reinterpret_cast<const int32_t*>(meta);
  if (a.recv_scales != nullptr)
    for (int i = lane; i < a.num_scales; i += 32) a.recv_scales[row * a.num_scales + i] = m[i];
  const int32_t* idx = m + (a.slot.idx_off - a.slot.row_bytes) / 4;
  if (a.recv_topk_idx != nullptr && lane < a.num_topk) {
    a.recv_topk_idx[row * a.num_topk + lane] = idx[lane];
    a.recv_topk_weights[row * a.num_topk + lane] = reinterpret_cast<const float*>(idx + a.num_topk)[lane];
  }
  if (a.recv_src_idx != nullptr && lane == 0) a.recv_src_idx[row] = m[(a.slot.src_off - a.slot.row_bytes) / 4];
}

// Source `src` != this rank: messages of stream (c, src) from the local queue into the output rows. Polls the tail
// with relaxed loads (acquire once it moved, then a proxy fence so the copy engine sees the peer's data); publishes
// the head (frees slots) every round of messages stored into shared memory, and before it blocks on an empty queue,
// so a sender never waits for slots this warp has already emptied.
__device__ void run_receiver(const DispatchArgs& a, int c, int src, const Stages& s) {
  const int rank = a.peers.rank, Q = a.queue_tokens, lane = lane_id();
  const DispatchSlot& sl = a.slot;
  Header* self = a.peers.ctrl[rank];
  const uint64_t* tail_word = &self->tail[c][src];
  uint64_t* head_word = &a.peers.ctrl[src]->head[c][rank];
  const uint8_t* queue = queue_base(a.peers.buffers[rank], c, src, a.peers.region_bytes, Q, sl.slot_bytes);
  int row0, n;
  source_channel_rows(a, src, c, row0, n);
  const int batch = a.remote_cut.batch, chunk = a.remote_cut.chunk, meta_bytes = sl.slot_bytes - sl.row_bytes;
  const int release_every = round_tokens(Q);
  const uint64_t base = self->consumed[c][src];
  uint64_t tail = base;                 // messages known to be published
  int next_msg = 0, chunk_off = 0;      // next message (stream position) to load, and its next chunk
  uint32_t issued = 0, done = 0;        // items
  int stored = 0, released = 0;         // messages whose bytes all reached shared memory; head published
  bool failed = false;

  auto release = [&] {
    if (stored > released) {
      if (lane == 0) {
        fence_proxy_async_global();
        st_release_sys(head_word, base + stored);
      }
      released = stored;
    }
  };

  for (;;) {
    // 1. Load ahead while a stage is free and messages are published.
    while (!failed && issued - done < kRecvStages - 1 && next_msg < n) {
      const uint64_t m = base + next_msg;
      if (tail <= m) {
        uint64_t seen = __shfl_sync(0xffffffffu, lane == 0 ? ld_relaxed_sys(tail_word) : 0ull, 0);
        if (seen <= m) {
          if (issued != done) break;  // store what is in flight first
          release();
          bool ok = true;
          if (lane == 0)
            ok = spin_until(
                a.env, [&] { return ld_relaxed_sys(tail_word); }, [&](uint64_t v) { return v > m; },
                kWaitDispatchTokens, src, c, static_cast<int64_t>(m + 1));
          if (!__shfl_sync(0xffffffffu, ok, 0)) {
            failed = true;
            break;
          }
        }
        uint64_t acquired = 0;
        if (lane == 0) {
          acquired = ld_acquire_sys(tail_word);
          fence_proxy_async_global();
        }
        tail = __shfl_sync(0xffffffffu, acquired, 0);
      }
      StageRec& rec = s.rec(issued);
      if (batch > 0) {
        const int count = min(min(batch, n - next_msg), static_cast<int>(tail - m));
        if (lane == 0) {
          bulk_wait_read<1>();
          mbar_arrive_expect_tx(s.bar(issued), static_cast<uint32_t>(count * sl.slot_bytes));
          for (int i = 0; i < count; ++i)
            item_load(s, issued, i * sl.slot_bytes, queue + ((m + i) % Q) * sl.slot_bytes, sl.slot_bytes);
          rec = StageRec{next_msg, count, 0, sl.row_bytes};
        }
        next_msg += count;
      } else {
        const int len = min(chunk, sl.row_bytes - chunk_off);
        const bool last = chunk_off + len == sl.row_bytes;
        if (lane == 0) {
          const int bytes = len + (last ? meta_bytes : 0);
          bulk_wait_read<1>();
          mbar_arrive_expect_tx(s.bar(issued), static_cast<uint32_t>(bytes));
          item_load(s, issued, 0, queue + (m % Q) * sl.slot_bytes + chunk_off, bytes);
          rec = StageRec{next_msg, 1, chunk_off, len};
        }
        if (last) {
          ++next_msg;
          chunk_off = 0;
        } else {
          chunk_off += len;
        }
      }
      ++issued;
    }
    __syncwarp();  // lane 0's records before the other lanes read them
    if (issued == done) break;

    // 2. Store the oldest item out: rows with one bulk store each, metadata by the lanes.
    s.wait(done);
    const StageRec rec = s.rec(done);
    const uint8_t* stage = s.stage(done);
    const bool ends = rec.off + rec.len == sl.row_bytes;  // the item holds its messages' last bytes (and metadata)
    for (int i = 0; i < rec.count; ++i) {
      const uint8_t* msg = stage + i * sl.slot_bytes;
      const int row = row0 + rec.first + i;
      if (row >= a.num_rows) {
        if (ends) report_overflow(a, row);
        continue;
      }
      if (lane == 0) bulk_store(a.recv_x + static_cast<int64_t>(row) * sl.row_bytes + rec.off, msg, rec.len);
      if (ends) scatter_meta(a, msg + rec.len, row);
    }
    if (lane == 0) bulk_commit();
    ++done;
    if (ends) stored = rec.first + rec.count;
    if (stored - released >= release_every || stored == n) release();
    __syncwarp();  // every lane has read the stage's metadata and record before lane 0 may refill it
  }
  if (lane == 0) bulk_wait_all();
  if (!failed && lane == 0) self->consumed[c][src] = base + n;
}

// This rank's own tokens: rows from x into the output rows through the stages (no queue, no flow control); the
// metadata comes straight from the inputs (write_meta) when a token is loaded.
__device__ void run_local_copy(const DispatchArgs& a, int c, int t0, int t1, const Stages& s) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, lane = lane_id();
  const int row_bytes = a.slot.row_bytes;
  int row0, n;
  source_channel_rows(a, rank, c, row0, n);
  const int batch = a.local_cut.batch, chunk = a.local_cut.chunk;

  // Token cursor: windows of 32 tokens scanned with a ballot; send_head written as each window is scanned.
  int w0 = t0, window = t0, found = 0;
  unsigned mask = 0;
  auto next_token = [&]() -> int {
    while (mask == 0 && w0 < t1) {
      const int t = w0 + lane;
      const bool valid = t < t1;
      const bool in = valid && a.is_token_in_rank[static_cast<int64_t>(t) * R + rank];
      mask = __ballot_sync(0xffffffffu, in);
      if (a.send_head != nullptr && valid)
        a.send_head[static_cast<int64_t>(t) * R + rank] = in ? found + __popc(mask & lanemask_lt()) : -1;
      found += __popc(mask);
      window = w0;
      w0 += 32;
    }
    if (mask == 0) return -1;
    const int token = window + __ffs(mask) - 1;
    mask &= mask - 1;
    return token;
  };
  auto meta = [&](int token, int64_t row) {
    write_meta(
        a, token, rank, [&](int i, int32_t v) { a.recv_scales[row * a.num_scales + i] = v; },
        [&](int k2, int v) { a.recv_topk_idx[row * a.num_topk + k2] = v; },
        [&](int k2, float v) { a.recv_topk_weights[row * a.num_topk + k2] = v; },
        [&](int v) {
          if (a.recv_src_idx != nullptr) a.recv_src_idx[row] = v;
        });
  };

  int next_msg = 0, chunk_off = 0, token = -1;
  uint32_t issued = 0, done = 0;
  for (;;) {
    while (issued - done < kRecvStages - 1 && next_msg < n) {
      StageRec& rec = s.rec(issued);
      if (batch > 0) {
        int tokens[kRecvMaxBatch];
        int count = 0;
#pragma unroll
        for (int i = 0; i < kRecvMaxBatch; ++i) {
          tokens[i] = i < batch && next_msg + count < n ? next_token() : -1;
          count += tokens[i] >= 0;
        }
        if (count == 0) break;  // not reached: n counts this channel's tokens for this rank
        if (lane == 0) {
          bulk_wait_read<1>();
          mbar_arrive_expect_tx(s.bar(issued), static_cast<uint32_t>(count * row_bytes));
#pragma unroll
          for (int i = 0; i < kRecvMaxBatch; ++i)
            if (tokens[i] >= 0) item_load(s, issued, i * row_bytes, a.x + static_cast<int64_t>(tokens[i]) * row_bytes,
                                          row_bytes);
          rec = StageRec{next_msg, count, 0, row_bytes};
        }
#pragma unroll
        for (int i = 0; i < kRecvMaxBatch; ++i)
          if (tokens[i] >= 0 && row0 + next_msg + i < a.num_rows) meta(tokens[i], row0 + next_msg + i);
        next_msg += count;
      } else {
        if (token < 0) token = next_token();
        if (token < 0) break;  // not reached, as above
        const int len = min(chunk, row_bytes - chunk_off);
        if (lane == 0) {
          bulk_wait_read<1>();
          mbar_arrive_expect_tx(s.bar(issued), static_cast<uint32_t>(len));
          item_load(s, issued, 0, a.x + static_cast<int64_t>(token) * row_bytes + chunk_off, len);
          rec = StageRec{next_msg, 1, chunk_off, len};
        }
        if (chunk_off + len == row_bytes) {
          if (row0 + next_msg < a.num_rows) meta(token, row0 + next_msg);
          ++next_msg;
          chunk_off = 0;
          token = -1;
        } else {
          chunk_off += len;
        }
      }
      ++issued;
    }
    __syncwarp();
    if (issued == done) break;

    s.wait(done);
    const StageRec rec = s.rec(done);
    const uint8_t* stage = s.stage(done);
    for (int i = 0; i < rec.count; ++i) {
      const int row = row0 + rec.first + i;
      if (row >= a.num_rows) {
        if (rec.off + rec.len == row_bytes) report_overflow(a, row);
        continue;
      }
      if (lane == 0) bulk_store(a.recv_x + static_cast<int64_t>(row) * row_bytes + rec.off, stage + i * row_bytes,
                                rec.len);
    }
    if (lane == 0) bulk_commit();
    ++done;
    __syncwarp();
  }
  // Tokens past the last one this rank receives still need their send_head entries (-1 or positions).
  while (next_token() >= 0) {
  }
  if (lane == 0) bulk_wait_all();
}

__global__ void __launch_bounds__(kNumThreads, 1) dispatch_kernel(DispatchArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int R = a.peers.num_ranks, rank = a.peers.rank, C = a.num_channels, T = a.num_tokens;
  const int c = blockIdx.x / 2;
  const bool is_sender = (blockIdx.x % 2) == 0;
  const int warp = threadIdx.x / 32;
  int t0, t1;
  channel_tokens(T, C, c, t0, t1);

  if (is_sender) {
    if (R == 1) return;
    const int groups = R - 1, group_warps = kNumWarps / groups;
    const int group = warp / group_warps;
    if (group >= groups) return;
    const int dst = group < rank ? group : group + 1;
    run_sender(a, c, t0, t1, dst, group, group_warps, warp % group_warps);
  } else {
    if (a.worst_mode) {
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
    // Warp i drives source i (its own tokens when i == rank); the other warps have nothing to do.
    if (warp >= R) return;
    const Stages s = group_stages(smem, a.staging, warp);
    if (warp == rank) run_local_copy(a, c, t0, t1, s);
    else run_receiver(a, c, warp, s);
  }
}

}  // namespace

bool dispatch_staging_fits(const DispatchSlot& slot, int num_ranks) {
  const RecvStaging st = recv_staging(num_ranks);
  return recv_cut(slot.slot_bytes, slot.row_bytes, st.stage_bytes).chunk >= 16 &&
         recv_cut(slot.row_bytes, slot.row_bytes, st.stage_bytes).chunk >= 16;
}

cudaError_t launch_dispatch(const DispatchArgs& args, cudaStream_t stream) {
  DispatchArgs a = args;
  const int R = a.peers.num_ranks;
  a.staging = recv_staging(R);
  a.remote_cut = recv_cut(a.slot.slot_bytes, a.slot.row_bytes, a.staging.stage_bytes);
  a.local_cut = recv_cut(a.slot.row_bytes, a.slot.row_bytes, a.staging.stage_bytes);
  if (a.remote_cut.chunk < 16 || a.local_cut.chunk < 16) return cudaErrorInvalidValue;
  const int smem_bytes = R * a.staging.group_bytes;
  // The dynamic shared-memory limit is raised once per device (a function attribute, not a stream operation: also
  // allowed while a graph is being captured).
  static bool raised[64] = {};
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (device < 0 || device >= 64 || !raised[device]) {
    e = cudaFuncSetAttribute(dispatch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRecvSmemBytes);
    if (e != cudaSuccess) return e;
    if (device >= 0 && device < 64) raised[device] = true;
  }
  dispatch_kernel<<<2 * a.num_channels, kNumThreads, smem_bytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace deepep::intranode
