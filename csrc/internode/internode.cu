// Internode normal dispatch and combine over one NVSHMEM symmetric buffer per rank (design: internode/api.h).
//
// Two hops per token and destination node: the network hop (source -> the forwarder of the destination node,
// the rank with the source's local index) carries each token ONCE per node; the NVLink hop is a pull by every
// destination rank from the forwarders of its own node, straight into its output rows. Row positions are fixed
// by the source (its token's offset among the tokens it sends to each rank), so nothing is reordered and no
// atomics decide where a row lands: the outputs are bit-identical to the reference backend's.
//
// Memory order: a producer writes data (P2P stores, or puts from local staging), then publishes a 64-bit flag
// (epoch << 32 | count) with a system-scope release store (P2P) or nvshmem_quiet + signal (puts); a consumer
// polls the flag with an acquire load and then reads the data at L2 (ld.cg), never from a stale L1 line. The
// epoch (device memory, advanced by the op's first kernel) makes flags monotonic: nothing is ever reset, and
// a CUDA graph replays correctly.
//
// Every wait is bounded (common/wait.cuh): on timeout the mailbox gets {rank, peer, what}.

#include "low_latency/cuda_operators.h"  // first: undoes torch's __CUDA_NO_*__ macros

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/bf16x8.cuh"
#include "common/grid.cuh"
#include "common/ptx.cuh"
#include "common/vec_copy.cuh"
#include "common/wait.cuh"
#include "internode/api.h"

namespace deepep {
namespace internode {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxNodes = 32;    // N (the host checks; a node index is one lane)
constexpr int kMaxLocal = 32;    // G (the host checks; a node peer index is one lane)
// Workspace words (grid-completion counters; the last block of a launch resets its word).
constexpr int kWsSend = 0;    // sender blocks of the dispatch kernel
constexpr int kWsStage = 1;

#define IN_CUDA_CHECK(expr)                                                                             \
  do {                                                                                                  \
    cudaError_t e_ = (expr);                                                                            \
    if (e_ != cudaSuccess)                                                                              \
      throw std::runtime_error(std::string("deepep_plugin internode: ") + #expr + ": " +               \
                               cudaGetErrorString(e_));                                                 \
  } while (0)

__device__ __forceinline__ ErrorEnv error_env(const Env& env) {
  return ErrorEnv{env.abort_flag, env.mailbox, env.timeout_ns, env.rank};
}

__device__ __forceinline__ uint64_t* flag_at(uint8_t* base, int num_ranks, int kind, int index) {
  return reinterpret_cast<uint64_t*>(base) + static_cast<int64_t>(kind) * num_ranks + index;
}

// One thread: publish `value` in flag (kind, index) of rank `pe`. Every write this thread ordered before (its
// own, and those of threads it synchronised with) is visible to whoever observes the flag.
__device__ __forceinline__ void signal_peer(const Env& env, int pe, int kind, int index, uint64_t value) {
  uint8_t* peer = env.peers[pe];
  if (peer != nullptr) {
    __threadfence_system();
    st_release_sys(flag_at(peer, env.num_ranks, kind, index), value);
  } else {
    nvshmem_fence();
    nvshmemx_signal_op(flag_at(env.buffer, env.num_ranks, kind, index), value, NVSHMEM_SIGNAL_SET, pe);
  }
}

// One thread: wait until the flag at `p` holds epoch >= `epoch` (packed: in its high 32 bits). Returns the
// flag's value, or ~0 after a timeout (reported).
__device__ __forceinline__ uint64_t wait_flag(const Env& env, const uint64_t* p, uint64_t epoch, bool packed,
                                              int what, int peer) {
  uint64_t seen = 0;
  const bool ok = spin_until(
      error_env(env), [&] { return ld_acquire_sys(p); },
      [&](uint64_t v) { return (packed ? (v >> 32) : v) >= epoch; }, what, peer, -1, static_cast<int64_t>(epoch));
  if (ok) seen = ld_acquire_sys(p);
  return ok ? seen : ~0ull;
}

__device__ __forceinline__ int64_t align16(int64_t x) { return (x + 15) / 16 * 16; }

// ---------------------------------------------------------------------------------------------------------
// Barrier / notify (one block). Both advance the epoch: the notify kernel is the barrier of a fresh dispatch.

__device__ __forceinline__ uint64_t advance_epoch(const Env& env) {
  __shared__ uint64_t s_epoch;
  if (threadIdx.x == 0) {
    s_epoch = static_cast<uint64_t>(*env.epoch) + 1;
    *env.epoch = static_cast<int64_t>(s_epoch);
  }
  __syncthreads();
  return s_epoch;
}

__global__ void __launch_bounds__(kThreads, 1) barrier_kernel(Env env) {
  const uint64_t e = advance_epoch(env);
  const int R = env.num_ranks;
  for (int p = threadIdx.x; p < R; p += blockDim.x) signal_peer(env, p, kFlagBarrier, env.rank, e);
  if (env.has_rdma_peers) nvshmem_quiet();
  for (int p = threadIdx.x; p < R; p += blockDim.x)
    wait_flag(env, flag_at(env.buffer, R, kFlagBarrier, p), e, false, kWaitBarrier, p);
}

__global__ void __launch_bounds__(kThreads, 1) notify_kernel(NotifyArgs a) {
  const Env& env = a.env;
  const uint64_t e = advance_epoch(env);
  const int R = env.num_ranks, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t P = env.notify_row_ints;
  for (int d = warp; d < R; d += kWarps) {
    const int* row = a.payload + d * P;
    if (env.peers[d] != nullptr) {
      int* dst = reinterpret_cast<int*>(env.peers[d] + env.notify_off) + env.rank * P;
      for (int64_t i = lane; i < P; i += 32) dst[i] = row[i];
    } else {
      int* stage = reinterpret_cast<int*>(env.buffer + env.notify_stage_off) + d * P;
      for (int64_t i = lane; i < P; i += 32) stage[i] = row[i];
      __syncwarp();
      nvshmemx_int_put_nbi_warp(reinterpret_cast<int*>(env.buffer + env.notify_off) + env.rank * P, stage,
                                static_cast<size_t>(P), d);
      if (lane == 0) nvshmem_quiet();
    }
    __threadfence_system();
    __syncwarp();
    if (lane == 0) signal_peer(env, d, kFlagNotify, env.rank, e);
  }
  if (env.has_rdma_peers) nvshmem_quiet();
  for (int p = threadIdx.x; p < R; p += blockDim.x)
    wait_flag(env, flag_at(env.buffer, R, kFlagNotify, p), e, false, kWaitNotify, p);
  __syncthreads();
  if (aborted(error_env(env))) return;
  const int* recv = reinterpret_cast<const int*>(env.buffer + env.notify_off);
  for (int64_t i = threadIdx.x; i < R * P; i += blockDim.x) a.received[i] = ld_cg(recv + i);
}

// ---------------------------------------------------------------------------------------------------------
// Dispatch.

// Stream words of (source node, channel) in the buffer at `base` (this rank's or a peer's mapping).
__device__ __forceinline__ uint64_t* extent_at(uint8_t* base, const Env& env, int node, int channel) {
  return reinterpret_cast<uint64_t*>(base + env.stream_off) + node * kMaxChannels + channel;
}
__device__ __forceinline__ uint64_t* progress_at(uint8_t* base, const Env& env, int node, int channel) {
  return reinterpret_cast<uint64_t*>(base + env.stream_off) + (env.num_nodes + node) * kMaxChannels + channel;
}

// Token range of channel c: C contiguous ranges of max(ceil(T / C), 1) tokens (deepep_plugin.layout's split).
__device__ __forceinline__ void channel_range(int num_tokens, int num_channels, int c, int& t0, int& t1) {
  const int per = max((num_tokens + num_channels - 1) / num_channels, 1);
  t0 = min(c * per, num_tokens);
  t1 = min(t0 + per, num_tokens);
}

// Sender block of channel c: one record per (token, destination node) into the forwarder's region
// [my node][slot]; records of one (node, channel) stream occupy consecutive slots from the stream's base.
// Thread n < N owns node n's stream: it publishes the extent first, then the progress every `chunk` records
// (P2P: a release store after the block's stores; puts: one put of the new records with the progress as its
// signal).
__device__ void dispatch_sender(const DispatchArgs& a, int c, uint64_t e, int* s_done, int* s_published, int* s_due,
                                int* s_last) {
  const Env& env = a.env;
  const int R = env.num_ranks, G = env.ranks_per_node, N = env.num_nodes, K = a.num_topk, C = a.num_channels;
  const int my_node = env.rank / G, my_local = env.rank % G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t meta_off = a.data_bytes + a.scale_bytes;
  int t0, t1;
  channel_range(a.num_tokens, C, c, t0, t1);
  int base = 0, count = 0, published = 0;
  const int n = threadIdx.x;  // the stream this thread publishes, when < N
  if (n < N) {
    base = c == 0 ? 0 : a.rdma_channel_prefix[n * C + c - 1];
    count = a.rdma_channel_prefix[n * C + c] - base;
    s_done[n] = 0;
    s_published[n] = 0;
    const int f = n * G + my_local;
    const uint64_t extent = (static_cast<uint64_t>(base) << 32) | static_cast<uint32_t>(count);
    if (env.peers[f] != nullptr) {
      *reinterpret_cast<volatile uint64_t*>(extent_at(env.peers[f], env, my_node, c)) = extent;
      st_release_sys(progress_at(env.peers[f], env, my_node, c), e << 32);
    } else {
      nvshmem_uint64_p(extent_at(env.buffer, env, my_node, c), extent, f);
      nvshmem_fence();
      nvshmemx_signal_op(progress_at(env.buffer, env, my_node, c), e << 32, NVSHMEM_SIGNAL_SET, f);
    }
  }
  __syncthreads();
  for (int tb = t0; tb < t1; tb += kWarps) {
    const int t = tb + warp;
    if (t < t1) {
      for (int nn = 0; nn < N; ++nn) {
        const int j = a.node_slot[static_cast<int64_t>(t) * N + nn];
        if (j < 0) continue;  // warp-uniform
        const int f = nn * G + my_local;
        uint8_t* dst = env.peers[f] != nullptr
                           ? env.peers[f] + env.data_off + (static_cast<int64_t>(my_node) * env.cap + j) * a.rec_bytes
                           : env.buffer + env.stage_off + (static_cast<int64_t>(nn) * env.cap + j) * a.rec_bytes;
        warp_copy_v4<LoadKind::kNonCoherent>(reinterpret_cast<int4*>(dst),
                                             reinterpret_cast<const int4*>(a.x + t * a.data_bytes),
                                             static_cast<int>(a.data_bytes / 16));
        if (a.x_scales != nullptr) {
          const int* src = reinterpret_cast<const int*>(a.x_scales);
          int* out = reinterpret_cast<int*>(dst + a.data_bytes);
          for (int i = lane; i < a.num_scales; i += 32)
            out[i] = src[static_cast<int64_t>(t) * a.scale_stride_token + static_cast<int64_t>(i) * a.scale_stride_col];
        }
        int* meta = reinterpret_cast<int*>(dst + meta_off);
        if (lane == 0) {
          meta[0] = t;
          meta[1] = 0;
        }
        if (lane < G) meta[2 + lane] = a.pos[static_cast<int64_t>(t) * R + nn * G + lane];
        if (a.topk_idx != nullptr && lane < K) {
          meta[2 + G + lane] = static_cast<int>(a.topk_idx[static_cast<int64_t>(t) * K + lane]);
          meta[2 + G + K + lane] =
              __float_as_int(a.topk_weights != nullptr ? a.topk_weights[static_cast<int64_t>(t) * K + lane] : 0.0f);
        }
        if (lane == 0) atomicAdd(&s_done[nn], 1);
      }
    }
    __syncthreads();
    // Publish the streams that gathered a chunk (all of them after the last batch). The decision is the same in
    // every thread (s_done and the published counts are block-uniform), so only batches that publish pay for the
    // system-scope fence that makes this block's records visible first.
    const bool last_batch = tb + kWarps >= t1;
    if (threadIdx.x < 32) {
      bool due = false;
      for (int k = lane; k < N; k += 32) {
        const int d = s_done[k];
        due |= d > s_published[k] && (d - s_published[k] >= a.chunk || last_batch);
      }
      due = __any_sync(0xffffffffu, due);
      if (lane == 0) *s_due = due;
    }
    __syncthreads();
    if (!*s_due) continue;
    __threadfence_system();
    __syncthreads();
    if (n < N) {
      const int done = s_done[n];
      if (done > published && (done - published >= a.chunk || last_batch)) {
        const int f = n * G + my_local;
        const uint64_t progress = (e << 32) | static_cast<uint32_t>(done);
        if (env.peers[f] != nullptr) {
          st_release_sys(progress_at(env.peers[f], env, my_node, c), progress);
        } else {
          const int64_t first = static_cast<int64_t>(base) + published;
          nvshmem_fence();
          nvshmem_putmem_signal_nbi(env.buffer + env.data_off + (static_cast<int64_t>(my_node) * env.cap + first) * a.rec_bytes,
                                    env.buffer + env.stage_off + (static_cast<int64_t>(n) * env.cap + first) * a.rec_bytes,
                                    static_cast<size_t>(done - published) * a.rec_bytes,
                                    progress_at(env.buffer, env, my_node, c), progress, NVSHMEM_SIGNAL_SET, f);
        }
        published = done;
        s_published[n] = done;
      }
    }
    __syncthreads();
  }
  if (env.has_rdma_peers && n < N) nvshmem_quiet();
  // The last sender block tells every forwarder how many records it gets in all (the head kernel waits on it).
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    const int prev = atomicAdd(env.workspace + kWsSend, 1);
    *s_last = prev == C - 1;
    if (*s_last) env.workspace[kWsSend] = 0;
  }
  __syncthreads();
  if (!*s_last) return;
  __threadfence_system();
  for (int nn = threadIdx.x; nn < N; nn += blockDim.x)
    signal_peer(env, nn * G + my_local, kFlagDispatch, my_node, (e << 32) | static_cast<uint32_t>(a.node_count[nn]));
}

// Receiver warps: stream by stream ((forwarder g of my node, source node n, channel c)), pull the records that
// list this rank as they are published, straight into the outputs.
__device__ void dispatch_receiver(const DispatchArgs& a, int rb, uint64_t e) {
  const Env& env = a.env;
  const int G = env.ranks_per_node, N = env.num_nodes, K = a.num_topk, C = a.num_channels;
  const int my_node = env.rank / G, my_local = env.rank % G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t meta_off = a.data_bytes + a.scale_bytes;
  const int el = a.num_local_experts, first_expert = env.rank * el;
  // Streams are shared out over the receiver warps; when warps outnumber streams, `group` warps take one stream
  // and split its records (warp k of the group takes records k, k + group, ...).
  const int num_streams = G * N * C, receiver_warps = C * kWarps;
  const int group = max(1, receiver_warps / num_streams);
  const int rw = rb * kWarps + warp, member = rw % group;
  for (int q = rw / group; q < num_streams; q += receiver_warps / group) {
    const int g = q / (N * C), n = (q / C) % N, c = q % C;
    const int f = my_node * G + g, s = n * G + g;
    uint8_t* fwd = env.peers[f];
    const uint64_t* progress = progress_at(fwd, env, n, c);
    uint64_t v = 0, extent = 0;
    if (lane == 0) {
      v = wait_flag(env, progress, e, true, kWaitForwarded, f);
      if (v != ~0ull) extent = ld_acquire_sys(extent_at(fwd, env, n, c));
    }
    v = __shfl_sync(0xffffffffu, v, 0);
    if (v == ~0ull) return;
    extent = __shfl_sync(0xffffffffu, extent, 0);
    const int base = static_cast<int>(extent >> 32), count = static_cast<int>(extent & 0xffffffffu);
    int ready = static_cast<int>(v & 0xffffffffu);
    const int64_t row0 = a.recv_base[s];
    for (int i = member; i < count; i += group) {
      if (i >= ready) {  // wait for the next chunk
        if (lane == 0) {
          const bool ok = spin_until(
              error_env(env), [&] { return ld_acquire_sys(progress); },
              [&](uint64_t w) { return (w >> 32) > e || static_cast<int>(w & 0xffffffffu) > i; }, kWaitForwarded, f,
              c, static_cast<int64_t>(i + 1));
          ready = ok ? static_cast<int>(ld_acquire_sys(progress) & 0xffffffffu) : -1;
        }
        ready = __shfl_sync(0xffffffffu, ready, 0);
        if (ready < 0) return;
      }
      const uint8_t* rec = fwd + env.data_off + (static_cast<int64_t>(n) * env.cap + base + i) * a.rec_bytes;
      const int* meta = reinterpret_cast<const int*>(rec + meta_off);
      int pos = 0, token = 0;
      if (lane == 0) {
        pos = ld_cg(meta + 2 + my_local);
        token = ld_cg(meta);
      }
      pos = __shfl_sync(0xffffffffu, pos, 0);
      token = __shfl_sync(0xffffffffu, token, 0);
      if (pos < 0) continue;
      const int64_t row = row0 + pos;
      if (row >= a.out_rows) {
        if (lane == 0) report_error(error_env(env), kMailboxOverflow, kWaitWorstTokens, s, -1, row + 1, a.out_rows);
        continue;
      }
      warp_copy_v4<LoadKind::kL2>(reinterpret_cast<int4*>(a.recv_x + row * a.data_bytes),
                                  reinterpret_cast<const int4*>(rec), static_cast<int>(a.data_bytes / 16));
      if (a.recv_scales != nullptr) {
        const int* src = reinterpret_cast<const int*>(rec + a.data_bytes);
        int* out = reinterpret_cast<int*>(a.recv_scales) + row * a.num_scales;
        for (int k = lane; k < a.num_scales; k += 32) out[k] = ld_cg(src + k);
      }
      if (a.recv_src_meta != nullptr && lane == 0) {
        a.recv_src_meta[row * 2] = token;
        a.recv_src_meta[row * 2 + 1] = s;
      }
      if (a.recv_topk_idx != nullptr && lane < K) {
        const int expert = ld_cg(meta + 2 + G + lane);
        const int local = expert - first_expert;
        const bool mine = expert >= 0 && local >= 0 && local < el;
        a.recv_topk_idx[row * K + lane] = mine ? local : -1;
        if (a.recv_topk_weights != nullptr)
          a.recv_topk_weights[row * K + lane] = mine ? __int_as_float(ld_cg(meta + 2 + G + K + lane)) : 0.0f;
      }
    }
  }
}

// One launch, 2C blocks: blocks [0, C) send channel by channel, blocks [C, 2C) receive. All blocks are resident
// together (2C <= the SMs, one block per SM), so receivers spinning never starve the senders they wait for.
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(DispatchArgs a) {
  __shared__ int s_done[kMaxNodes], s_published[kMaxNodes];
  __shared__ int s_due, s_last;
  const uint64_t e = static_cast<uint64_t>(*a.env.epoch);
  if (static_cast<int>(blockIdx.x) < a.num_channels)
    dispatch_sender(a, blockIdx.x, e, s_done, s_published, &s_due, &s_last);
  else
    dispatch_receiver(a, blockIdx.x - a.num_channels, e);
}

// Forwarder (fresh dispatch): send_nvl_head[i][g] = the row of record i in the output of node peer g, or -1.
__global__ void __launch_bounds__(kThreads, 1) dispatch_head_kernel(DispatchArgs a) {
  __shared__ int s_prefix[kMaxNodes + 1];
  __shared__ int s_base[kMaxLocal * kMaxNodes];
  const Env& env = a.env;
  const uint64_t e = static_cast<uint64_t>(*env.epoch);
  const int R = env.num_ranks, G = env.ranks_per_node, N = env.num_nodes;
  const int my_node = env.rank / G, my_local = env.rank % G;
  const int64_t meta_off = a.data_bytes + a.scale_bytes;
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    const uint64_t v = wait_flag(env, flag_at(env.buffer, R, kFlagDispatch, n), e, true, kWaitRecords, n * G + my_local);
    s_prefix[n + 1] = v == ~0ull ? 0 : static_cast<int>(v & 0xffffffffu);
  }
  // Row base of source s = n * G + my_local in the output of d = my_node * G + g: tokens d gets from ranks < s.
  for (int i = threadIdx.x; i < G * N; i += blockDim.x) {
    const int g = i / N, n = i % N, s = n * G + my_local, d = my_node * G + g;
    int sum = 0;
    for (int s2 = 0; s2 < s; ++s2) sum += a.count_matrix[s2 * R + d];
    s_base[i] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    s_prefix[0] = 0;
    for (int n = 0; n < N; ++n) s_prefix[n + 1] += s_prefix[n];
  }
  __syncthreads();
  if (aborted(error_env(env))) return;
  const int total = s_prefix[N];
  if (total > a.head_rows && blockIdx.x == 0 && threadIdx.x == 0)
    report_error(error_env(env), kMailboxOverflow, kWaitRecords, -1, -1, total, a.head_rows);
  const int64_t cells = a.head_rows * G;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cells;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(c / G), g = static_cast<int>(c % G);
    int out = -1;
    if (i < total) {
      const int n = upper_index(s_prefix, N, i);
      const int j = i - s_prefix[n];
      const int* meta = reinterpret_cast<const int*>(env.buffer + env.data_off +
                                                     (static_cast<int64_t>(n) * env.cap + j) * a.rec_bytes + meta_off);
      const int p = ld_cg(meta + 2 + g);
      if (p >= 0) out = s_base[g * N + n] + p;
    }
    a.send_nvl_head[c] = out;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Combine.

// Every rank: its expert outputs (and weights) into its NVL region, where the forwarders of its node read them.
__global__ void __launch_bounds__(kThreads, 1) combine_stage_kernel(CombineArgs a) {
  __shared__ int s_last;
  const Env& env = a.env;
  const uint64_t e = static_cast<uint64_t>(*env.epoch);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, K = a.num_topk;
  const int64_t data_bytes = align16(2LL * a.hidden);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp; i < a.num_rows;
       i += static_cast<int64_t>(gridDim.x) * kWarps) {
    uint8_t* dst = env.buffer + env.nvl_off + i * a.row_bytes;
    warp_copy_v4<LoadKind::kNonCoherent>(reinterpret_cast<int4*>(dst),
                                         reinterpret_cast<const int4*>(a.x + i * a.hidden), a.hidden / 8);
    if (a.topk_weights != nullptr && lane < K)
      reinterpret_cast<float*>(dst + data_bytes)[lane] = a.topk_weights[i * K + lane];
  }
  __threadfence_system();
  if (!last_block(env.workspace + kWsStage, &s_last)) return;
  if (threadIdx.x == 0) {
    __threadfence_system();
    st_release_sys(flag_at(env.buffer, env.num_ranks, kFlagStaged, 0), e);
  }
}

// Forwarder blocks (channel c): for every source node, the records of channel c in order (batches of one record
// per warp): the sum of its node peers' staged rows (FP32, rounded once to BF16) and weights, written to the
// source's region [my node][slot]; every `chunk` records the source's progress word of (my node, c) advances
// (P2P: release store; puts: one put of the new partial rows with the progress as its signal).
__device__ void combine_forwarder(const CombineArgs& a, int c, uint64_t e) {
  const Env& env = a.env;
  const int R = env.num_ranks, G = env.ranks_per_node, N = env.num_nodes, K = a.num_topk, C = a.num_channels;
  const int my_node = env.rank / G, my_local = env.rank % G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t data_bytes = align16(2LL * a.hidden);
  const int vec = a.hidden / 8;
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    const int d = my_node * G + g;
    wait_flag(env, flag_at(env.peers[d], R, kFlagStaged, 0), e, false, kWaitStaged, d);
  }
  __syncthreads();
  if (aborted(error_env(env))) return;
  for (int n = 0; n < N; ++n) {
    const int s = n * G + my_local;
    const int first_record = n == 0 ? 0 : a.recv_rdma_rank_prefix_sum[n - 1];
    const int j0 = c == 0 ? 0 : a.recv_rdma_channel_prefix[n * C + c - 1];
    const int j1 = a.recv_rdma_channel_prefix[n * C + c];
    int published = j0;
    for (int jb = j0; jb < j1; jb += kWarps) {
      const int j = jb + warp;
      if (j < j1) {
        const int64_t i = first_record + j;
        const int my_row = lane < G ? a.send_nvl_head[i * G + lane] : -1;
        uint8_t* dst = env.peers[s] != nullptr
                           ? env.peers[s] + env.data_off + (static_cast<int64_t>(my_node) * env.cap + j) * a.row_bytes
                           : env.buffer + env.stage_off + (static_cast<int64_t>(n) * env.cap + j) * a.row_bytes;
        const uint8_t* src[kMaxLocal];
        int num_src = 0;
        for (int g = 0; g < G; ++g) {
          const int row = __shfl_sync(0xffffffffu, my_row, g);
          if (row >= 0)
            src[num_src++] = env.peers[my_node * G + g] + env.nvl_off + static_cast<int64_t>(row) * a.row_bytes;
        }
        for (int v = lane; v < vec; v += 32) {
          float acc[8];
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[k] = 0.0f;
          for (int q = 0; q < num_src; ++q) add_bf16x8(acc, ld_cg_v4(reinterpret_cast<const int4*>(src[q]) + v));
          st_na_v4(reinterpret_cast<int4*>(dst) + v, to_bf16x8(acc));
        }
        // Test K, not this rank's weight pointer: a forwarder that received no rows itself has none.
        if (K > 0 && lane < K) {
          float w = 0.0f;
          for (int q = 0; q < num_src; ++q) w += ld_cg(reinterpret_cast<const float*>(src[q] + data_bytes) + lane);
          reinterpret_cast<float*>(dst + data_bytes)[lane] = w;
        }
      }
      __threadfence_system();  // this batch's partial rows, before thread 0 publishes them
      __syncthreads();
      const int done = min(jb + kWarps, j1);
      if (threadIdx.x == 0 && (done - published >= a.chunk || done == j1)) {
        const uint64_t progress = (e << 32) | static_cast<uint32_t>(done - j0);
        if (env.peers[s] != nullptr) {
          st_release_sys(progress_at(env.peers[s], env, my_node, c), progress);
        } else {
          nvshmem_fence();
          nvshmem_putmem_signal_nbi(
              env.buffer + env.data_off + (static_cast<int64_t>(my_node) * env.cap + published) * a.row_bytes,
              env.buffer + env.stage_off + (static_cast<int64_t>(n) * env.cap + published) * a.row_bytes,
              static_cast<size_t>(done - published) * a.row_bytes, progress_at(env.buffer, env, my_node, c), progress,
              NVSHMEM_SIGNAL_SET, s);
        }
      }
      published = done - published >= a.chunk || done == j1 ? done : published;
    }
  }
  if (env.has_rdma_peers && threadIdx.x == 0) nvshmem_quiet();
}

// Source blocks (channel c of this rank's tokens): bias plus the partial row of every node each token went to,
// as soon as that node's forwarder has published it (FP32, in node order, rounded once).
__device__ void combine_receiver(const CombineArgs& a, int c, uint64_t e) {
  const Env& env = a.env;
  const int G = env.ranks_per_node, N = env.num_nodes, K = a.num_topk, C = a.num_channels;
  const int my_local = env.rank % G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t data_bytes = align16(2LL * a.hidden);
  const int vec = a.hidden / 8;
  int t0, t1;
  channel_range(a.num_tokens, C, c, t0, t1);
  // Lane n < N: first slot of channel c in my stream to node n (the forwarder publishes progress from there).
  const int stream_base = lane < N ? (c == 0 ? 0 : a.rdma_channel_prefix[lane * C + c - 1]) : 0;
  int seen = 0;  // lane n: records of (node n, channel c) known to have arrived
  for (int t = t0 + warp; t < t1; t += kWarps) {
    const int my_slot = lane < N ? a.send_rdma_head[static_cast<int64_t>(t) * N + lane] : -1;
    bool ok = true;
    if (my_slot >= 0 && my_slot - stream_base >= seen) {
      const uint64_t* progress = progress_at(env.buffer, env, lane, c);
      const int need = my_slot - stream_base;
      ok = spin_until(
          error_env(env), [&] { return ld_acquire_sys(progress); },
          [&](uint64_t w) { return (w >> 32) > e || ((w >> 32) == e && static_cast<int>(w & 0xffffffffu) > need); },
          kWaitPartials, lane * G + my_local, c, static_cast<int64_t>(need + 1));
      if (ok) seen = static_cast<int>(ld_acquire_sys(progress) & 0xffffffffu);
    }
    if (__any_sync(0xffffffffu, !ok)) return;
    const uint8_t* src[kMaxNodes];
    int num_src = 0;
    for (int n = 0; n < N; ++n) {
      const int slot = __shfl_sync(0xffffffffu, my_slot, n);
      if (slot >= 0) src[num_src++] = env.buffer + env.data_off + (static_cast<int64_t>(n) * env.cap + slot) * a.row_bytes;
    }
    const int64_t out_row = static_cast<int64_t>(t) * vec;
    for (int v = lane; v < vec; v += 32) {
      float acc[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] = 0.0f;
      if (a.bias0 != nullptr) add_bf16x8(acc, ld_nc_v4(reinterpret_cast<const int4*>(a.bias0) + out_row + v));
      if (a.bias1 != nullptr) add_bf16x8(acc, ld_nc_v4(reinterpret_cast<const int4*>(a.bias1) + out_row + v));
      for (int q = 0; q < num_src; ++q) add_bf16x8(acc, ld_cg_v4(reinterpret_cast<const int4*>(src[q]) + v));
      st_na_v4(reinterpret_cast<int4*>(a.combined_x) + out_row + v, to_bf16x8(acc));
    }
    if (K > 0 && lane < K) {
      float w = 0.0f;
      for (int q = 0; q < num_src; ++q) w += ld_cg(reinterpret_cast<const float*>(src[q] + data_bytes) + lane);
      a.combined_topk_weights[static_cast<int64_t>(t) * K + lane] = w;
    }
  }
}

// One launch, 2C blocks: blocks [0, C) forward (reduce inside the node, send partials back), blocks [C, 2C) receive
// this rank's tokens as their partials arrive.
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(CombineArgs a) {
  const uint64_t e = static_cast<uint64_t>(*a.env.epoch);
  if (static_cast<int>(blockIdx.x) < a.num_channels)
    combine_forwarder(a, blockIdx.x, e);
  else
    combine_receiver(a, blockIdx.x - a.num_channels, e);
}

int blocks_for(int num_sms, int64_t work_warps) {
  const int64_t want = std::max<int64_t>(1, (work_warps + kWarps - 1) / kWarps);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_sms, want)));
}

}  // namespace

void barrier(const Env& env, void* stream) {
  barrier_kernel<<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(env);
  IN_CUDA_CHECK(cudaGetLastError());
}

void notify(const NotifyArgs& a, void* stream) {
  notify_kernel<<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  IN_CUDA_CHECK(cudaGetLastError());
}

void dispatch(const DispatchArgs& a, void* stream) {
  if (a.num_channels < 1 || a.num_channels > kMaxChannels)
    throw std::runtime_error("deepep_plugin internode: num_channels must be in [1, " + std::to_string(kMaxChannels) +
                             "], got " + std::to_string(a.num_channels));
  dispatch_kernel<<<2 * a.num_channels, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  IN_CUDA_CHECK(cudaGetLastError());
}

void dispatch_head(const DispatchArgs& a, int num_sms, void* stream) {
  const int blocks = blocks_for(num_sms, (a.head_rows * a.env.ranks_per_node + 31) / 32);
  dispatch_head_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  IN_CUDA_CHECK(cudaGetLastError());
}

void combine_stage(const CombineArgs& a, int num_sms, void* stream) {
  combine_stage_kernel<<<blocks_for(num_sms, a.num_rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  IN_CUDA_CHECK(cudaGetLastError());
}

void combine(const CombineArgs& a, void* stream) {
  if (a.num_channels < 1 || a.num_channels > kMaxChannels)
    throw std::runtime_error("deepep_plugin internode: num_channels must be in [1, " + std::to_string(kMaxChannels) +
                             "], got " + std::to_string(a.num_channels));
  combine_kernel<<<2 * a.num_channels, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  IN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace internode
}  // namespace deepep
