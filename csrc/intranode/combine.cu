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
//   odd block = receiver: tokens of channel c in order. A producer warp finds, for token t, every rank j that
//       received it (send_head[t][j] >= 0): the row is in its own x (j == this rank, row rank_prefix(me) +
//       recv_channel_prefix[me][c] + send_head[t][me]) or in queue (c, j) once tail > message. It bulk-loads the
//       copies, chunk by chunk, into shared-memory stages; consumer warps sum them in FP32 and write the BF16
//       result (see "Receiver" below). The producer publishes head for stream (c, j) as the copies are consumed.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/bf16x8.cuh"
#include "common/bulk_copy.cuh"
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
            a.env, [&] { return ld_relaxed_sys(&self->head[c][dst]); }, [&](uint64_t h) { return h >= end; },
            kWaitCombineDrain, dst, c, static_cast<int64_t>(end))) {
      (void)ld_acquire_sys(&self->head[c][dst]);  // the receiver's reads of the slots happen before our next writes
      self->sent[c][dst] = end;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Receiver: warp 0 produces, warps 1..kCombineStages consume (warp 1 + s owns stage s); the others idle.
//
// Producer. Tokens of the channel in order; for each, lane j < R holds send_head[t][j] (read 32 tokens ahead into
// shared memory) and, for a remote j, makes sure message base_j + send_head is published (tail polled relaxed, acquired
// once, then a proxy fence for the copy engine). The token's row is cut into chunks; each chunk is an item: the
// present sources' pieces are bulk-loaded into stage item % S (full[s] counts the bytes), after the consumer released
// the stage's previous item (empty[s]). The producer retires items in order by their empty barriers; a retired
// token's messages are free, and the producer publishes head to each source once per round of them, and whenever it
// would otherwise wait for a source (so a sender blocked on a full ring always gets the slots this rank emptied).
// After the last token, one terminal item per stage (token -1, no bytes) stops the consumers.
//
// Consumer. Waits for its stage's full phase, sums bias0, bias1 and the present pieces in source-rank order in FP32
// (the order, and so the bits, of the reference and DeepEP), stores BF16 rows, adds the top-k weights on the token's
// last chunk, and releases the stage (empty).

struct CombineRec {
  int token;      // -1: terminal
  int off;        // byte offset of the chunk in the row
  int len;        // chunk bytes
  unsigned mask;  // sources holding a copy of the token
};

struct CombineSmem {
  uint64_t* full;    // [S]
  uint64_t* empty;   // [S]
  CombineRec* recs;  // [S]
  int* counts;       // [S][kMaxRanks]: per source, messages up to and including the item's token
  int* window;       // [32][kMaxRanks]: send_head of the producer's current 32 tokens
  uint8_t* data;     // [S][stage_bytes]
};

__device__ CombineSmem combine_smem(uint8_t* smem) {
  CombineSmem m;
  m.full = reinterpret_cast<uint64_t*>(smem);
  m.empty = m.full + kCombineStages;
  m.recs = reinterpret_cast<CombineRec*>(m.empty + kCombineStages);
  m.counts = reinterpret_cast<int*>(m.recs + kCombineStages);
  m.window = m.counts + kCombineStages * kMaxRanks;
  m.data = smem + kCombineHeaderBytes;
  return m;
}
static_assert(16 * kCombineStages + 16 * kCombineStages + 4 * kCombineStages * kMaxRanks + 4 * 32 * kMaxRanks <=
                  kCombineHeaderBytes,
              "the combine receiver's header fits");

__device__ void run_combine_producer(const CombineArgs& a, int c, int t0, int t1, const CombineSmem& sm) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, Q = a.queue_tokens, C = a.num_channels, lane = lane_id();
  const int row_bytes = a.hidden * 2, chunk = a.staging.chunk, stage_bytes = a.staging.stage_bytes;
  Header* self = a.peers.ctrl[rank];
  const bool remote = lane < R && lane != rank;  // this lane follows stream (c, lane)
  const uint64_t base = lane < R ? self->consumed[c][lane] : 0;
  const uint64_t* tail_word = remote ? &self->tail[c][lane] : nullptr;
  uint64_t* head_word = remote ? &a.peers.ctrl[lane]->head[c][rank] : nullptr;
  const uint8_t* queue =
      lane < R ? queue_base(a.peers.buffers[rank], c, lane, a.peers.region_bytes, Q, a.slot.slot_bytes) : nullptr;
  const int64_t local_row0 = (rank == 0 ? 0 : a.rank_prefix_matrix[(rank - 1) * R + rank]) +
                             a.recv_channel_prefix_matrix[rank * C + c];
  const int release_every = round_tokens(Q);

  uint64_t tail = base;     // lane j: messages of stream j known to be published
  int issued_msgs = 0;      // lane j: messages of stream j up to the last issued token
  int consumed = 0, released = 0;  // lane j: messages of stream j retired, and published as head
  uint32_t item = 0, retired = 0;
  bool failed = false;

  auto retire = [&](bool wait) -> bool {  // the oldest unretired item, if done (or once done, with wait)
    if (retired == item) return false;
    const uint32_t s = retired % kCombineStages, parity = (retired / kCombineStages) & 1u;
    if (wait) mbar_wait(sm.empty + s, parity);
    else if (!__all_sync(0xffffffffu, mbar_test(sm.empty + s, parity))) return false;
    const CombineRec rec = sm.recs[s];
    if (rec.off + rec.len == row_bytes && lane < R) consumed = sm.counts[s * kMaxRanks + lane];
    ++retired;
    return true;
  };
  auto release = [&](int at_least) {
    if (remote && consumed - released >= at_least && consumed > released) {
      fence_proxy_async_global();
      st_release_sys(head_word, base + consumed);
      released = consumed;
    }
  };

  int next_window[kMaxRanks];  // lane l: send_head of token (window start + 32 + l), loaded a window ahead
  auto load_window = [&](int w0) {
#pragma unroll
    for (int j = 0; j < kMaxRanks; ++j)
      next_window[j] = j < R && w0 + lane < t1 ? a.send_head[static_cast<int64_t>(w0 + lane) * R + j] : -1;
  };
  load_window(t0);
  for (int w0 = t0; w0 < t1 && !failed; w0 += 32) {
    __syncwarp();
#pragma unroll
    for (int j = 0; j < kMaxRanks; ++j) sm.window[lane * kMaxRanks + j] = next_window[j];
    __syncwarp();
    if (w0 + 32 < t1) load_window(w0 + 32);
    const int w1 = min(w0 + 32, t1);
    for (int t = w0; t < w1; ++t) {
      const int sh = lane < R ? sm.window[(t - w0) * kMaxRanks + lane] : -1;
      const unsigned mask = __ballot_sync(0xffffffffu, sh >= 0);
      // Remote copies must be published. Wait while retiring finished items and publishing their heads.
      const uint64_t m = base + static_cast<uint64_t>(sh);
      bool ready = !(remote && sh >= 0) || tail > m;
      if (!__all_sync(0xffffffffu, ready)) {
        uint64_t start = 0;
        for (uint32_t it = 0;; ++it) {
          if (!ready) {
            tail = ld_relaxed_sys(tail_word);
            ready = tail > m;
          }
          if (__all_sync(0xffffffffu, ready)) break;
          while (retire(false)) {
          }
          release(1);
          if ((it & 63u) == 63u) {
            if (start == 0) start = global_timer_ns();
            const bool abort = aborted(a.env);
            const bool late = global_timer_ns() - start > a.env.timeout_ns;
            if (!ready && late && !abort)
              report_error(a.env, kMailboxTimeout, kWaitCombineTokens, lane, c, static_cast<int64_t>(m + 1),
                           static_cast<int64_t>(tail));
            if (__any_sync(0xffffffffu, abort || late)) {
              failed = true;
              break;
            }
          }
        }
        if (failed) break;
        if (remote && sh >= 0) {
          tail = ld_acquire_sys(tail_word);
          fence_proxy_async_global();
        }
        __syncwarp();  // the lanes' acquires happen before lane 0's fence and bulk loads
        if (lane == 0) fence_proxy_async_global();
      }
      if (sh >= 0) issued_msgs = sh + 1;
      const uint8_t* src = nullptr;
      if (sh >= 0)
        src = lane == rank ? reinterpret_cast<const uint8_t*>(a.x) + (local_row0 + sh) * row_bytes
                           : queue + (m % Q) * a.slot.slot_bytes;
      for (int off = 0; off < row_bytes; off += chunk) {
        const int len = min(chunk, row_bytes - off);
        if (item >= kCombineStages)
          while (retired + kCombineStages <= item) retire(true);
        const uint32_t s = item % kCombineStages;
        uint8_t* stage = sm.data + static_cast<size_t>(s) * stage_bytes;
        if (lane < R) sm.counts[s * kMaxRanks + lane] = issued_msgs;
        __syncwarp();
        if (lane == 0) {
          sm.recs[s] = CombineRec{t, off, len, mask};
          mbar_arrive_expect_tx(sm.full + s, static_cast<uint32_t>(__popc(mask) * len));
        }
#pragma unroll
        for (int j = 0; j < kMaxRanks; ++j) {
          const uint8_t* p = reinterpret_cast<const uint8_t*>(
              __shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(src), j));
          if (lane == 0 && j < R && ((mask >> j) & 1u)) bulk_load(stage + j * chunk, p + off, len, sm.full + s);
        }
        ++item;
      }
      while (retire(false)) {
      }
      release(release_every);
    }
  }
  // Stop the consumers: one terminal item per stage, once its previous item is released.
  const uint32_t real_items = item;
  for (int k = 0; k < kCombineStages; ++k) {
    if (item >= kCombineStages)
      while (retired + kCombineStages <= item) retire(true);
    const uint32_t s = item % kCombineStages;
    __syncwarp();
    if (lane == 0) {
      sm.recs[s] = CombineRec{-1, 0, 0, 0u};
      mbar_arrive(sm.full + s);
    }
    ++item;
  }
  item = real_items;  // terminal items are never released: retire only the real ones
  while (retire(true)) {
  }
  release(1);
  if (!failed && lane < R && lane != rank) self->consumed[c][lane] = base + issued_msgs;
}

__device__ void run_combine_consumer(const CombineArgs& a, int c, int s, const CombineSmem& sm) {
  const int R = a.peers.num_ranks, rank = a.peers.rank, Q = a.queue_tokens, C = a.num_channels, lane = lane_id();
  const int row_bytes = a.hidden * 2, chunk = a.staging.chunk;
  const uint8_t* stage = sm.data + static_cast<size_t>(s) * a.staging.stage_bytes;
  Header* self = a.peers.ctrl[rank];
  const int64_t local_row0 = (rank == 0 ? 0 : a.rank_prefix_matrix[(rank - 1) * R + rank]) +
                             a.recv_channel_prefix_matrix[rank * C + c];
  uint64_t base[kMaxRanks];       // stream (c, j)'s messages consumed before this call
  const uint8_t* queue[kMaxRanks];
#pragma unroll
  for (int j = 0; j < kMaxRanks; ++j) {
    base[j] = j < R ? self->consumed[c][j] : 0;
    queue[j] = j < R ? queue_base(a.peers.buffers[rank], c, j, a.peers.region_bytes, Q, a.slot.slot_bytes) : nullptr;
  }
  for (uint32_t phase = 0;; phase ^= 1u) {
    mbar_wait(sm.full + s, phase);
    const CombineRec rec = sm.recs[s];
    if (rec.token < 0) return;
    const int64_t t = rec.token;
    const int nvec = rec.len / 16;
    const int64_t out_vec = (t * row_bytes + rec.off) / 16;
    const int4* b0 = a.bias0 != nullptr ? reinterpret_cast<const int4*>(a.bias0) + out_vec : nullptr;
    const int4* b1 = a.bias1 != nullptr ? reinterpret_cast<const int4*>(a.bias1) + out_vec : nullptr;
    int4* out = reinterpret_cast<int4*>(a.combined_x) + out_vec;
    for (int v = lane; v < nvec; v += 32) {
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
      if (b0 != nullptr) add_bf16x8(acc, ld_nc_v4(b0 + v));
      if (b1 != nullptr) add_bf16x8(acc, ld_nc_v4(b1 + v));
#pragma unroll
      for (int j = 0; j < kMaxRanks; ++j)
        if (j < R && ((rec.mask >> j) & 1u)) add_bf16x8(acc, reinterpret_cast<const int4*>(stage + j * chunk)[v]);
      st_na_v4(out + v, to_bf16x8(acc));
    }
    if (rec.off + rec.len == row_bytes && a.num_topk > 0 && lane < a.num_topk) {
      // The token's last chunk: its top-k weights, the sum of the copies' (each source's message number is in the
      // stage's counts: messages up to and including this token, minus one). All loads first, then the sum in
      // source order.
      float wj[kMaxRanks];
#pragma unroll
      for (int j = 0; j < kMaxRanks; ++j) {
        wj[j] = 0.0f;
        if (j < R && ((rec.mask >> j) & 1u)) {
          const int sh = sm.counts[s * kMaxRanks + j] - 1;
          const float* p = j == rank ? a.topk_weights + (local_row0 + sh) * a.num_topk
                                     : reinterpret_cast<const float*>(queue[j] + ((base[j] + sh) % Q) *
                                                                      a.slot.slot_bytes + a.slot.weights_off);
          wj[j] = ld_cg(p + lane);
        }
      }
      float w = 0.0f;
#pragma unroll
      for (int j = 0; j < kMaxRanks; ++j)
        if (j < R && ((rec.mask >> j) & 1u)) w += wj[j];
      a.combined_topk_weights[t * a.num_topk + lane] = w;
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(sm.empty + s);
  }
}

__device__ void run_receiver(const CombineArgs& a, int c, int t0, int t1, uint8_t* smem) {
  const int warp = threadIdx.x / 32;
  if (warp > kCombineStages) return;
  const CombineSmem sm = combine_smem(smem);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kCombineStages; ++s) {
      mbar_init(sm.full + s);
      mbar_init(sm.empty + s);
    }
    mbar_init_fence();
  }
  named_barrier(1, 32 * (kCombineStages + 1));  // the barriers exist before anyone uses them
  if (warp == 0) run_combine_producer(a, c, t0, t1, sm);
  else run_combine_consumer(a, c, warp - 1, sm);
}

__global__ void __launch_bounds__(kNumThreads, 1) combine_kernel(CombineArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
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
    run_receiver(a, c, t0, t1, smem);
  }
}

}  // namespace

cudaError_t launch_combine(const CombineArgs& args, cudaStream_t stream) {
  CombineArgs a = args;
  a.staging = combine_staging(a.peers.num_ranks, a.hidden * 2);
  const int smem_bytes = kCombineHeaderBytes + kCombineStages * a.staging.stage_bytes;
  static bool raised[64] = {};
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (device < 0 || device >= 64 || !raised[device]) {
    e = cudaFuncSetAttribute(combine_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRecvSmemBytes);
    if (e != cudaSuccess) return e;
    if (device >= 0 && device < 64) raised[device] = true;
  }
  combine_kernel<<<2 * a.num_channels, kNumThreads, smem_bytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace deepep::intranode
