// Internode normal dispatch and combine over one NVSHMEM symmetric buffer per rank (design: internode/api.h;
// buffer layout and record format: internode/layout.h).
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

#include "nvshmem/cuda_operators.h"  // first: undoes torch's __CUDA_NO_*__ macros

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/bf16x8.cuh"
#include "common/ptx.cuh"
#include "common/vec_copy.cuh"
#include "common/wait.cuh"
#include "internode/api.h"

namespace deepep {
namespace internode {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Group shape (the glue checks): N <= kMaxNodes nodes (a node index is one lane) of G <= kMaxNvlPeers ranks (a node
// peer index is one lane; combine gives each node peer at least one pusher warp), both from common/limits.h.
static_assert(kMaxNodes <= 32 && kMaxNvlPeers <= 32, "node and node peer indices are lanes of a warp");

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
// Streams and rings.

// Stream words (layout.h) in the buffer at `base` (this rank's or a peer's mapping).
__device__ __forceinline__ uint64_t* stream_words(uint8_t* base, const Env& env) {
  return reinterpret_cast<uint64_t*>(base + env.stream_off);
}
__device__ __forceinline__ uint64_t* extent_at(uint8_t* base, const Env& env, int node, int channel) {
  return stream_words(base, env) + node * kMaxChannels + channel;
}
__device__ __forceinline__ uint64_t* progress_at(uint8_t* base, const Env& env, int node, int channel) {
  return stream_words(base, env) + (env.num_nodes + node) * kMaxChannels + channel;
}
__device__ __forceinline__ uint64_t* dcons_at(uint8_t* base, const Env& env, int node, int channel, int reader) {
  return stream_words(base, env) + 2 * env.num_nodes * kMaxChannels +
         (static_cast<int64_t>(node) * kMaxChannels + channel) * env.ranks_per_node + reader;
}
__device__ __forceinline__ uint64_t* ccons_at(uint8_t* base, const Env& env, int node, int channel) {
  return stream_words(base, env) + (2 + env.ranks_per_node) * env.num_nodes * kMaxChannels + node * kMaxChannels +
         channel;
}

// Item index (in items of the op's size) of slot 0 of ring (node, channel) in the data or staging region.
__device__ __forceinline__ int64_t ring_first(const Env& env, int num_channels, int node, int channel) {
  return (static_cast<int64_t>(node) * num_channels + channel) * env.slots;
}

// The count in a packed word of this op (epoch e), 0 while the word still holds an earlier op's value.
__device__ __forceinline__ int count_of(uint64_t v, uint64_t e) {
  return (v >> 32) == e ? static_cast<int>(v & 0xffffffffu) : 0;
}

// One thread: publish items [from, to) of a stream whose ring at `pe` is (dst_node, channel), with `progress`
// (epoch << 32 | to). P2P: the items were stored straight into pe's ring, so a release store of the progress word
// suffices (the caller fenced the block's stores). Puts: the items wait in local staging at the same slots of the
// staging ring `stage_first`; one put per contiguous piece (two when the range wraps), the last carrying the
// progress as its signal (nvshmem_fence orders the pieces).
__device__ void publish_items(const Env& env, int pe, int dst_node, int channel, int64_t dst_first,
                              int64_t stage_first, int64_t item_bytes, int from, int to, uint64_t progress) {
  if (env.peers[pe] != nullptr) {
    st_release_sys(progress_at(env.peers[pe], env, dst_node, channel), progress);
    return;
  }
  const int S = env.slots;
  uint8_t* dst = env.buffer + env.data_off + dst_first * item_bytes;  // symmetric: the same address at pe
  const uint8_t* src = env.buffer + env.stage_off + stage_first * item_bytes;
  int first = from % S, len = to - from;
  nvshmem_fence();
  if (first + len > S) {
    nvshmem_putmem_nbi(dst + first * item_bytes, src + first * item_bytes, static_cast<size_t>(S - first) * item_bytes,
                       pe);
    nvshmem_fence();
    len -= S - first;
    first = 0;
  }
  nvshmem_putmem_signal_nbi(dst + first * item_bytes, src + first * item_bytes, static_cast<size_t>(len) * item_bytes,
                            progress_at(env.buffer, env, dst_node, channel), progress, NVSHMEM_SIGNAL_SET, pe);
}

// One thread: tell `pe` how far this rank has read one of its streams: `value` into the word at pe that lies where
// `word_here` lies in this rank's buffer.
__device__ __forceinline__ void publish_consumed(const Env& env, int pe, uint64_t* word_here, uint64_t value) {
  if (env.peers[pe] != nullptr) {
    const int64_t off = reinterpret_cast<uint8_t*>(word_here) - env.buffer;
    st_release_sys(reinterpret_cast<uint64_t*>(env.peers[pe] + off), value);
  } else {
    nvshmemx_signal_op(word_here, value, NVSHMEM_SIGNAL_SET, pe);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Dispatch.

// Token range of channel c: C contiguous ranges of max(ceil(T / C), 1) tokens (deepep_plugin.layout's split).
__device__ __forceinline__ void channel_range(int num_tokens, int num_channels, int c, int& t0, int& t1) {
  const int per = max((num_tokens + num_channels - 1) / num_channels, 1);
  t0 = min(c * per, num_tokens);
  t1 = min(t0 + per, num_tokens);
}

// Sender block of channel c: one record per (token, destination node) into the forwarder's ring [my node][c],
// record i of the stream in slot i % slots. Thread n < N owns node n's stream: it publishes the extent first,
// then the progress every `chunk` records; before a batch (one token per warp) it makes sure the ring has room:
// all G readers of node n must have consumed the records whose slots the batch reuses (it publishes what it has
// first, so the readers can get there).
__device__ void dispatch_sender(const DispatchArgs& a, int c, uint64_t e, int* s_done, int* s_published,
                                int* s_base, int* s_due) {
  const Env& env = a.env;
  const int R = env.num_ranks, G = env.ranks_per_node, N = env.num_nodes, K = a.num_topk, C = a.num_channels;
  const int S = env.slots;
  const int my_node = env.rank / G, my_local = env.rank % G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t meta_off = a.data_bytes + a.scale_bytes;
  int t0, t1;
  channel_range(a.num_tokens, C, c, t0, t1);
  int base = 0, count = 0, published = 0, room = S;  // room: records writable before the next consumption check
  const int n = threadIdx.x;  // the stream this thread publishes, when < N
  const int f_n = n * G + my_local;
  if (n < N) {
    base = c == 0 ? 0 : a.rdma_channel_prefix[n * C + c - 1];
    count = a.rdma_channel_prefix[n * C + c] - base;
    s_done[n] = 0;
    s_published[n] = 0;
    s_base[n] = base;
    const uint64_t extent = (static_cast<uint64_t>(base) << 32) | static_cast<uint32_t>(count);
    if (env.peers[f_n] != nullptr) {
      *reinterpret_cast<volatile uint64_t*>(extent_at(env.peers[f_n], env, my_node, c)) = extent;
      st_release_sys(progress_at(env.peers[f_n], env, my_node, c), e << 32);
    } else {
      nvshmem_uint64_p(extent_at(env.buffer, env, my_node, c), extent, f_n);
      nvshmem_fence();
      nvshmemx_signal_op(progress_at(env.buffer, env, my_node, c), e << 32, NVSHMEM_SIGNAL_SET, f_n);
    }
  }
  __syncthreads();
  for (int tb = t0; tb < t1; tb += kWarps) {
    // Room for this batch: at most kWarps records per stream.
    bool lacks = false;
    if (n < N) lacks = s_done[n] + min(count - s_done[n], kWarps) > room;
    if (__syncthreads_or(lacks)) {
      __threadfence_system();  // the records written so far, before they are published
      __syncthreads();
      bool ok = true;
      if (lacks) {
        const int done = s_done[n];
        if (done > published) {
          publish_items(env, f_n, my_node, c, ring_first(env, C, my_node, c), ring_first(env, C, n, c), a.rec_bytes,
                        published, done, (e << 32) | static_cast<uint32_t>(done));
          published = done;
          s_published[n] = done;
        }
        const int need = done + min(count - done, kWarps) - S;
        int consumed = 0;
        ok = spin_until(
            error_env(env),
            [&] {
              int m = 0x7fffffff;
              for (int g = 0; g < G; ++g) m = min(m, count_of(ld_acquire_sys(dcons_at(env.buffer, env, n, c, g)), e));
              return m;
            },
            [&](int m) {
              consumed = m;
              return m >= need;
            },
            kWaitRingSpace, f_n, c, need);
        room = consumed + S;
      }
      if (__syncthreads_or(!ok)) return;
    }
    const int t = tb + warp;
    if (t < t1) {
      for (int nn = 0; nn < N; ++nn) {
        const int j = a.node_slot[static_cast<int64_t>(t) * N + nn];
        if (j < 0) continue;  // warp-uniform
        const int f = nn * G + my_local;
        const int i = j - s_base[nn];
        uint8_t* dst = env.peers[f] != nullptr
                           ? env.peers[f] + env.data_off + (ring_first(env, C, my_node, c) + i % S) * a.rec_bytes
                           : env.buffer + env.stage_off + (ring_first(env, C, nn, c) + i % S) * a.rec_bytes;
        warp_copy_v4<LoadKind::kNonCoherent>(reinterpret_cast<int4*>(dst),
                                             reinterpret_cast<const int4*>(a.x + t * a.data_bytes),
                                             static_cast<int>(a.data_bytes / 16));
        if (a.x_scales != nullptr) {
          const int* src = reinterpret_cast<const int*>(a.x_scales);
          int* out = reinterpret_cast<int*>(dst + a.data_bytes);
          for (int k = lane; k < a.num_scales; k += 32)
            out[k] = src[static_cast<int64_t>(t) * a.scale_stride_token + static_cast<int64_t>(k) * a.scale_stride_col];
        }
        int* meta = reinterpret_cast<int*>(dst + meta_off);
        if (lane == 0) {
          meta[kMetaToken] = t;
        }
        if (lane < G) meta[kMetaPos + lane] = a.pos[static_cast<int64_t>(t) * R + nn * G + lane];
        if (a.topk_idx != nullptr && lane < K) {
          meta[kMetaPos + G + lane] = static_cast<int>(a.topk_idx[static_cast<int64_t>(t) * K + lane]);
          meta[kMetaPos + G + K + lane] =
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
        publish_items(env, f_n, my_node, c, ring_first(env, C, my_node, c), ring_first(env, C, n, c), a.rec_bytes,
                      published, done, (e << 32) | static_cast<uint32_t>(done));
        published = done;
        s_published[n] = done;
      }
    }
    __syncthreads();
  }
  if (env.has_rdma_peers && n < N) nvshmem_quiet();
}

// Receiver: groups of `group` warps (a power of two, inside one block) each own a set of streams
// (forwarder g of my node, source node n, channel c) and serve them round-robin: the group's leader (lane 0 of
// its first warp) finds a stream with published records it has not read, the members copy those that list this
// rank (member k takes records k, k + group, ...), then the leader publishes how far the group has read back to
// the stream's sender, whose ring slots become free. Round-robin keeps a group from blocking on one stream while
// another's sender waits for room. Reading its own forwarder's streams (g == my local index), a rank also writes
// send_nvl_head for each record: the record's row in every node peer's output.
// Streams per group: at most ceil(G * N / kWarps) (one warp per group when there are many streams).
constexpr int kMaxOwned = (kMaxNvlPeers * kMaxNodes + kWarps - 1) / kWarps;

struct ReceiverState {
  int next[kWarps][kMaxOwned];   // records read (by the group whose first warp is the index)
  int count[kWarps][kMaxOwned];  // records in the stream, or -1 before its extent was seen
  int base[kWarps][kMaxOwned];   // the stream's first index among its source's records to this node
  int told[kWarps][kMaxOwned];   // consumption published to the sender
  int cmd[kWarps][4];            // the leader's decision: stream, first, end (or -1 done / -2 failed)
  int head_base[kMaxNvlPeers * kMaxNodes];  // [g][n]
  int first_record[kMaxNodes];
};

__device__ __forceinline__ void group_sync(int group, int id) {
  if (group > 1)
    named_barrier(1 + id, group * 32);
  else
    __syncwarp();
}

__device__ void dispatch_receiver(const DispatchArgs& a, int rb, uint64_t e, ReceiverState& st) {
  const Env& env = a.env;
  const int G = env.ranks_per_node, N = env.num_nodes, K = a.num_topk, C = a.num_channels, S = env.slots;
  const int my_node = env.rank / G, my_local = env.rank % G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t meta_off = a.data_bytes + a.scale_bytes;
  const int el = a.num_local_experts, first_expert = env.rank * el;
  const int num_streams = G * N * C;
  int group = 1;
  while (group < kWarps && 2 * group * num_streams <= C * kWarps) group *= 2;
  const int per_block = kWarps / group, num_groups = C * per_block;
  const int gid = warp / group, member = warp % group, lead = gid * group;
  const int my_group = rb * per_block + gid;
  const int owned = my_group < num_streams ? (num_streams - my_group + num_groups - 1) / num_groups : 0;
  const bool head = a.send_nvl_head != nullptr;
  if (head) {
    for (int i = threadIdx.x; i < G * N; i += blockDim.x) st.head_base[i] = a.head_base[(i % N) * G + i / N];
    if (threadIdx.x == 0)
      for (int n = 0; n < N; ++n) st.first_record[n] = n == 0 ? 0 : a.recv_rdma_rank_prefix[n - 1];
  }
  const bool leader = member == 0 && lane == 0;
  if (leader)
    for (int k = 0; k < owned; ++k) {
      st.next[lead][k] = 0;
      st.count[lead][k] = -1;
      st.told[lead][k] = 0;
    }
  __syncthreads();
  int rr = 0;  // leader: the stream to look at first
  for (;;) {
    if (leader) {
      int pick = -1, i0 = 0, i1 = 0, ready = 0;
      const uint64_t start = global_timer_ns();
      for (uint32_t scan = 1; pick == -1; ++scan) {
        bool all_done = true;
        int waiting_on = -1;
        for (int kk = 0; kk < owned; ++kk) {
          const int k = (rr + kk) % owned;
          int cnt = st.count[lead][k];
          const int nx = st.next[lead][k];
          if (cnt >= 0 && nx >= cnt) continue;
          all_done = false;
          const int q = my_group + k * num_groups;
          const int g = q / (N * C), n = (q / C) % N, c = q % C;
          uint8_t* fwd = env.peers[my_node * G + g];
          if (waiting_on < 0) waiting_on = my_node * G + g;
          const uint64_t v = ld_acquire_sys(progress_at(fwd, env, n, c));
          if ((v >> 32) < e) continue;  // the sender has not started this op's stream yet
          if (cnt < 0) {
            const uint64_t extent = ld_acquire_sys(extent_at(fwd, env, n, c));
            st.base[lead][k] = static_cast<int>(extent >> 32);
            cnt = st.count[lead][k] = static_cast<int>(extent & 0xffffffffu);
            if (cnt == 0) continue;
          }
          const int avail = static_cast<int>(v & 0xffffffffu);
          if (avail > nx) {
            pick = k;
            i0 = nx;
            ready = avail;
            i1 = min(avail, nx + 4 * group);
            rr = k + 1;
            break;
          }
        }
        if (pick >= 0) break;
        if (all_done) {
          pick = -1;
          break;
        }
        if ((scan & 15u) == 0) {
          if (aborted(error_env(env))) {
            pick = -2;
            break;
          }
          if (global_timer_ns() - start > env.timeout_ns) {
            report_error(error_env(env), kMailboxTimeout, kWaitForwarded, waiting_on, -1, static_cast<int64_t>(e), 0);
            pick = -2;
            break;
          }
        }
      }
      st.cmd[lead][0] = pick;
      st.cmd[lead][1] = i0;
      st.cmd[lead][2] = i1;
      st.cmd[lead][3] = ready;
    }
    group_sync(group, gid);
    const int k = st.cmd[lead][0];
    if (k < 0) break;
    const int i0 = st.cmd[lead][1], i1 = st.cmd[lead][2];
    const int q = my_group + k * num_groups;
    const int g = q / (N * C), n = (q / C) % N, c = q % C;
    const int f = my_node * G + g, s = n * G + g;
    const uint8_t* fwd = env.peers[f];
    const int base = st.base[lead][k];
    const int64_t row0 = a.recv_base[s];
    for (int i = i0 + member; i < i1; i += group) {
      const uint8_t* rec = fwd + env.data_off + (ring_first(env, C, n, c) + i % S) * a.rec_bytes;
      const int* meta = reinterpret_cast<const int*>(rec + meta_off);
      if (head && g == my_local && lane < G) {
        const int64_t hrow = st.first_record[n] + base + i;
        const int p = ld_cg(meta + kMetaPos + lane);
        if (hrow < a.head_rows)
          a.send_nvl_head[hrow * G + lane] = p >= 0 ? st.head_base[lane * N + n] + p : -1;
        else if (lane == 0)
          report_error(error_env(env), kMailboxOverflow, kWaitWorstTokens, s, -1, hrow + 1, a.head_rows);
      }
      int pos = 0, token = 0;
      if (lane == 0) {
        pos = ld_cg(meta + kMetaPos + my_local);
        token = ld_cg(meta + kMetaToken);
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
        for (int x = lane; x < a.num_scales; x += 32) out[x] = ld_cg(src + x);
      }
      if (a.recv_src_meta != nullptr && lane == 0) {
        a.recv_src_meta[row * 2] = token;
        a.recv_src_meta[row * 2 + 1] = s;
      }
      if (a.recv_topk_idx != nullptr && lane < K) {
        const int expert = ld_cg(meta + kMetaPos + G + lane);
        const int local = expert - first_expert;
        const bool mine = expert >= 0 && local >= 0 && local < el;
        a.recv_topk_idx[row * K + lane] = mine ? local : -1;
        if (a.recv_topk_weights != nullptr)
          a.recv_topk_weights[row * K + lane] = mine ? __int_as_float(ld_cg(meta + kMetaPos + G + K + lane)) : 0.0f;
      }
    }
    group_sync(group, gid);  // every member's reads of these slots are done
    if (leader) {
      st.next[lead][k] = i1;
      // Tell the sender when a chunk was read, the group caught up with what was published, or the stream ended.
      if (i1 - st.told[lead][k] >= a.chunk || i1 == st.cmd[lead][3] || i1 == st.count[lead][k]) {
        publish_consumed(env, s, dcons_at(env.buffer, env, my_node, c, my_local),
                         (e << 32) | static_cast<uint32_t>(i1));
        st.told[lead][k] = i1;
      }
    }
  }
  if (env.has_rdma_peers && leader) nvshmem_quiet();
}

// One launch, 2C blocks: blocks [0, C) send channel by channel, blocks [C, 2C) receive. All blocks are resident
// together (2C <= the SMs, one block per SM), so receivers spinning never starve the senders they wait for.
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(DispatchArgs a) {
  __shared__ int s_done[kMaxNodes], s_published[kMaxNodes], s_base[kMaxNodes];
  __shared__ int s_due;
  __shared__ ReceiverState s_recv;
  const uint64_t e = static_cast<uint64_t>(*a.env.epoch);
  if (static_cast<int>(blockIdx.x) < a.num_channels)
    dispatch_sender(a, blockIdx.x, e, s_done, s_published, s_base, &s_due);
  else
    dispatch_receiver(a, blockIdx.x - a.num_channels, e, s_recv);
}

// ---------------------------------------------------------------------------------------------------------
// Combine.

// NVL ring words (combine, layout.h): tail of pusher g's ring at this forwarder; consumption of forwarder l.
__device__ __forceinline__ uint64_t* ntail_at(uint8_t* base, const Env& env, int peer, int channel) {
  return stream_words(base, env) + (3 + env.ranks_per_node) * env.num_nodes * kMaxChannels + peer * kMaxChannels +
         channel;
}
__device__ __forceinline__ uint64_t* ncons_at(uint8_t* base, const Env& env, int peer, int channel) {
  return ntail_at(base, env, env.ranks_per_node + peer, channel);
}

// Combine roles of a forwarder block: warps [0, kPushWarps) push, the others forward.
constexpr int kPushWarps = 8;
constexpr int kFwdWarps = kWarps - kPushWarps;
constexpr int kFwdBarrier = 1;  // named barrier of the forwarder warps
static_assert(kPushWarps >= kMaxNvlPeers, "every node peer gets a pusher warp");

// Pushers of channel c: kPushWarps / G warps per node peer l (the group of l). They push this rank's rows that
// came from sources (n, l) in channel c, source node by source node, in row order (the order forwarder l reads its
// records in), into l's NVL ring [my local][c] at slot k % nvl_slots, one row per member warp per step. Before a
// step the group's first lane makes sure the ring has room (l's consumption word in this rank's buffer; it first
// publishes everything written, so l can get there); after a step the tail advances when nvl_chunk rows have
// gathered, and at the end.
__device__ void combine_pusher(const CombineArgs& a, int c, int w, uint64_t e) {
  const Env& env = a.env;
  const int G = env.ranks_per_node, N = env.num_nodes, K = a.num_topk, C = a.num_channels, Q = a.nvl_slots;
  const int P = max(1, kPushWarps / G);  // warps per node peer
  const int l = w / P, m = w % P;
  if (l >= G) return;
  const int my_node = env.rank / G, my_local = env.rank % G;
  const int lane = threadIdx.x & 31;
  const bool first = m == 0 && lane == 0;
  const int64_t data_bytes = align16(2LL * a.hidden);
  const int f = my_node * G + l;
  uint8_t* ring = env.peers[f] + env.nvl_off + (static_cast<int64_t>(my_local) * C + c) * Q * a.row_bytes;
  uint64_t* tail = ntail_at(env.peers[f], env, my_local, c);
  const uint64_t* cons = ncons_at(env.buffer, env, l, c);
  // Barrier of the group that also tells every member whether any failed (named barriers 2.. ; 1 is the
  // forwarders').
  auto sync_failed = [&](bool failed) {
    return P > 1 ? named_barrier_or(2 + l, P * 32, failed) : __any_sync(0xffffffffu, failed) != 0;
  };
  int k = 0, told = 0, room = Q;  // rows pushed; published; writable before a consumption check (first lane)
  for (int n = 0; n < N; ++n) {
    const int s = n * G + l;
    const int r0 = a.recv_gbl_channel_prefix[s * C + c];
    const int r1 = c + 1 < C ? a.recv_gbl_channel_prefix[s * C + c + 1] : a.recv_gbl_rank_prefix_sum[s];
    for (int rb = r0; rb < r1; rb += P) {
      const int step = min(P, r1 - rb);
      bool ok = true;
      if (first && k + step > room) {
        if (k > told) {  // the previous steps' rows are fenced and behind a group barrier
          st_release_sys(tail, (e << 32) | static_cast<uint32_t>(k));
          told = k;
        }
        int seen = 0;
        ok = spin_until(
            error_env(env), [&] { return count_of(ld_acquire_sys(cons), e); },
            [&](int v) {
              seen = v;
              return v + Q >= k + step;
            },
            kWaitNvlSpace, f, c, k + step - Q);
        room = seen + Q;
      }
      if (sync_failed(!ok)) return;
      if (m < step) {
        const int row = rb + m;
        uint8_t* dst = ring + static_cast<int64_t>((k + m) % Q) * a.row_bytes;
        warp_copy_v4<LoadKind::kNonCoherent>(reinterpret_cast<int4*>(dst),
                                             reinterpret_cast<const int4*>(a.x + static_cast<int64_t>(row) * a.hidden),
                                             a.hidden / 8);
        if (a.topk_weights != nullptr && lane < K)
          reinterpret_cast<float*>(dst + data_bytes)[lane] = a.topk_weights[static_cast<int64_t>(row) * K + lane];
        __threadfence_system();
      }
      sync_failed(false);
      k += step;
      if (first && (k - told >= a.nvl_chunk || (n == N - 1 && rb + P >= r1))) {
        st_release_sys(tail, (e << 32) | static_cast<uint32_t>(k));
        told = k;
      }
    }
  }
  if (first && k > told) st_release_sys(tail, (e << 32) | static_cast<uint32_t>(k));
}

// Forwarder warps of channel c (kFwdWarps of them, one record each per batch): source node by source node (every
// forwarder serves the source nodes in the same order, so the rings never wait in a cycle), records in order: the
// sum of the node peers' rows, read from this rank's NVL rings (FP32, rounded once to BF16), and weights, written
// to slot j % slots of the source's ring [my node][c]; every `chunk` rows the source's progress word of (my node, c)
// advances (P2P: release store; puts: one put per piece with the progress as its signal). Before a batch, the
// leader makes sure the source's ring has room (publishing what is pending first) and assigns each record its
// position in each peer's NVL ring (peers' rows arrive in record order; a record takes one from each peer that got
// it); after it, it tells the pushers how far their rings were read.
struct ForwarderState {
  int pos[kFwdWarps][kMaxNvlPeers];  // the batch's NVL ring positions (count since the op began), or -1
  int read[kMaxNvlPeers];            // NVL rows read from each peer's ring
};

__device__ void combine_forwarder(const CombineArgs& a, int c, uint64_t e, ForwarderState& st) {
  const Env& env = a.env;
  const int G = env.ranks_per_node, N = env.num_nodes, K = a.num_topk, C = a.num_channels;
  const int S = env.slots, Q = a.nvl_slots;
  const int my_node = env.rank / G, my_local = env.rank % G;
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) - kPushWarps;  // forwarder warp index
  const bool leader = warp == 0 && lane == 0;
  const int64_t data_bytes = align16(2LL * a.hidden);
  const int vec = a.hidden / 8;
  // Barrier of the forwarder warps that also tells every one of them whether any failed (they leave together).
  auto sync_failed = [](bool failed) { return named_barrier_or(kFwdBarrier, kFwdWarps * 32, failed); };
  if (warp == 0 && lane < G) st.read[lane] = 0;
  sync_failed(false);
  for (int n = 0; n < N; ++n) {
    const int s = n * G + my_local;
    const int first_record = n == 0 ? 0 : a.recv_rdma_rank_prefix_sum[n - 1];
    const int j0 = c == 0 ? 0 : a.recv_rdma_channel_prefix[n * C + c - 1];
    const int total = a.recv_rdma_channel_prefix[n * C + c] - j0;
    const int64_t dst_first = ring_first(env, C, my_node, c), stage_first = ring_first(env, C, n, c);
    int told = 0, room = S;  // leader: partial rows published to the source; writable before a consumption check
    for (int jb = 0; jb < total; jb += kFwdWarps) {
      const int nb = min(kFwdWarps, total - jb);
      bool ok = true;
      if (warp == 0) {
        // Room at the source: its consumption word (in this rank's buffer) must be past jb + nb - S.
        if (lane == 0 && jb + nb > room) {
          if (jb > told) {
            publish_items(env, s, my_node, c, dst_first, stage_first, a.row_bytes, told, jb,
                          (e << 32) | static_cast<uint32_t>(jb));
            told = jb;
          }
          int seen = 0;
          ok = spin_until(
              error_env(env), [&] { return count_of(ld_acquire_sys(ccons_at(env.buffer, env, n, c)), e); },
              [&](int v) {
                seen = v;
                return v + S >= jb + nb;
              },
              kWaitPartialSpace, s, c, jb + nb - S);
          room = seen + S;
        }
        // NVL ring positions of the batch's records, peer by peer (lane g).
        if (lane < G) {
          int r = st.read[lane];
          for (int w = 0; w < nb; ++w) {
            const int64_t i = first_record + j0 + jb + w;
            st.pos[w][lane] = a.send_nvl_head[i * G + lane] >= 0 ? r++ : -1;
          }
          st.read[lane] = r;
        }
        ok = __shfl_sync(0xffffffffu, ok, 0);
      }
      if (sync_failed(!ok)) return;
      if (warp < nb) {
        const int jj = jb + warp;
        // Wait for the rows of this record (lane g: peer g's tail past its position).
        const int p = lane < G ? st.pos[warp][lane] : -1;
        if (p >= 0) {
          const uint64_t* tail = ntail_at(env.buffer, env, lane, c);
          ok = spin_until(
              error_env(env), [&] { return count_of(ld_acquire_sys(tail), e); }, [&](int v) { return v > p; },
              kWaitPushed, my_node * G + lane, c, p + 1);
        }
        if (!__any_sync(0xffffffffu, !ok)) {
          uint8_t* dst = env.peers[s] != nullptr ? env.peers[s] + env.data_off + (dst_first + jj % S) * a.row_bytes
                                                 : env.buffer + env.stage_off + (stage_first + jj % S) * a.row_bytes;
          const uint8_t* src[kMaxNvlPeers];
          int num_src = 0;
          for (int g = 0; g < G; ++g) {
            const int q = __shfl_sync(0xffffffffu, p, g);
            if (q >= 0)
              src[num_src++] = env.buffer + env.nvl_off +
                               ((static_cast<int64_t>(g) * C + c) * Q + q % Q) * a.row_bytes;
          }
          for (int v = lane; v < vec; v += 32) {
            float acc[8];
#pragma unroll
            for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
            for (int q = 0; q < num_src; ++q) add_bf16x8(acc, ld_cg_v4(reinterpret_cast<const int4*>(src[q]) + v));
            st_na_v4(reinterpret_cast<int4*>(dst) + v, to_bf16x8(acc));
          }
          // Test K, not this rank's weight pointer: a forwarder that received no rows itself has none.
          if (K > 0 && lane < K) {
            float w = 0.0f;
            for (int q = 0; q < num_src; ++q) w += ld_cg(reinterpret_cast<const float*>(src[q] + data_bytes) + lane);
            reinterpret_cast<float*>(dst + data_bytes)[lane] = w;
          }
        } else {
          ok = false;
        }
      }
      __threadfence_system();  // this batch's partial rows, before the leader publishes them
      if (sync_failed(!ok)) return;
      if (warp == 0) {
        const int done = jb + nb;
        if (lane == 0 && (done - told >= a.chunk || done == total)) {
          publish_items(env, s, my_node, c, dst_first, stage_first, a.row_bytes, told, done,
                        (e << 32) | static_cast<uint32_t>(done));
          told = done;
        }
        // The batch's NVL rows are read: free their slots at the pushers.
        if (lane < G) publish_consumed(env, my_node * G + lane, ncons_at(env.buffer, env, my_local, c),
                                       (e << 32) | static_cast<uint32_t>(st.read[lane]));
      }
    }
  }
  if (env.has_rdma_peers && leader) nvshmem_quiet();
}

// Source blocks (channel c of this rank's tokens), kWarps tokens per round, one per warp: bias plus the partial
// row of every node the token went to, as soon as that node's forwarder has published it (FP32, in node order,
// rounded once). After each round, thread n < N tells node n's forwarder how many of its partial rows this
// channel has consumed (the largest slot read so far, kept per round parity so that a warp already in the next
// round cannot make it count a row still being read).
__device__ void combine_receiver(const CombineArgs& a, int c, uint64_t e, int (*s_read)[kMaxNodes]) {
  const Env& env = a.env;
  const int G = env.ranks_per_node, N = env.num_nodes, K = a.num_topk, C = a.num_channels, S = env.slots;
  const int my_node = env.rank / G, my_local = env.rank % G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t data_bytes = align16(2LL * a.hidden);
  const int vec = a.hidden / 8;
  int t0, t1;
  channel_range(a.num_tokens, C, c, t0, t1);
  for (int i = threadIdx.x; i < 2 * kMaxNodes; i += blockDim.x) s_read[i / kMaxNodes][i % kMaxNodes] = -1;
  // Lane n < N: first slot of channel c in my stream to node n (the forwarder publishes progress from there).
  const int stream_base = lane < N ? (c == 0 ? 0 : a.rdma_channel_prefix[lane * C + c - 1]) : 0;
  int seen = 0;  // lane n: records of (node n, channel c) known to have arrived
  int told = 0;  // thread n < N: consumption published to node n's forwarder
  __syncthreads();
  for (int tb = t0, round = 0; tb < t1; tb += kWarps, ++round) {
    const int t = tb + warp;
    bool ok = true;
    if (t < t1) {
      const int my_slot = lane < N ? a.send_rdma_head[static_cast<int64_t>(t) * N + lane] : -1;
      const int rel = my_slot - stream_base;
      if (my_slot >= 0 && rel >= seen) {
        const uint64_t* progress = progress_at(env.buffer, env, lane, c);
        ok = spin_until(
            error_env(env), [&] { return ld_acquire_sys(progress); },
            [&](uint64_t w) { return (w >> 32) > e || ((w >> 32) == e && static_cast<int>(w & 0xffffffffu) > rel); },
            kWaitPartials, lane * G + my_local, c, static_cast<int64_t>(rel + 1));
        if (ok) seen = static_cast<int>(ld_acquire_sys(progress) & 0xffffffffu);
      }
      if (!__any_sync(0xffffffffu, !ok)) {
        const uint8_t* src[kMaxNodes];
        int num_src = 0;
        for (int n = 0; n < N; ++n) {
          const int r = __shfl_sync(0xffffffffu, rel, n);
          const int slot = __shfl_sync(0xffffffffu, my_slot, n);
          if (slot >= 0)
            src[num_src++] = env.buffer + env.data_off + (ring_first(env, C, n, c) + r % S) * a.row_bytes;
        }
        const int64_t out_row = static_cast<int64_t>(t) * vec;
        for (int v = lane; v < vec; v += 32) {
          float acc[8];
#pragma unroll
          for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
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
        __syncwarp();
        if (my_slot >= 0) atomicMax(&s_read[round & 1][lane], rel);
      } else {
        ok = false;
      }
    }
    if (__syncthreads_or(!ok)) return;
    const int n = threadIdx.x;
    if (n < N) {
      const int consumed = s_read[round & 1][n] + 1;
      if (consumed > told) {
        publish_consumed(env, n * G + my_local, ccons_at(env.buffer, env, my_node, c),
                         (e << 32) | static_cast<uint32_t>(consumed));
        told = consumed;
      }
    }
  }
  if (env.has_rdma_peers && threadIdx.x < N) nvshmem_quiet();
}

// One launch, 2C blocks: blocks [0, C) push (warps < 8) and forward (the other 8 warps: reduce inside the node,
// send partials back), blocks [C, 2C) receive this rank's tokens as their partials arrive.
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(CombineArgs a) {
  __shared__ ForwarderState s_fwd;
  __shared__ int s_read[2][kMaxNodes];
  const uint64_t e = static_cast<uint64_t>(*a.env.epoch);
  if (static_cast<int>(blockIdx.x) < a.num_channels) {
    const int w = threadIdx.x >> 5;
    if (w >= kPushWarps)
      combine_forwarder(a, blockIdx.x, e, s_fwd);
    else
      combine_pusher(a, blockIdx.x, w, e);
  } else {
    combine_receiver(a, blockIdx.x - a.num_channels, e, s_read);
  }
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

void combine(const CombineArgs& a, void* stream) {
  if (a.num_channels < 1 || a.num_channels > kMaxChannels)
    throw std::runtime_error("deepep_plugin internode: num_channels must be in [1, " + std::to_string(kMaxChannels) +
                             "], got " + std::to_string(a.num_channels));
  combine_kernel<<<2 * a.num_channels, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  IN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace internode
}  // namespace deepep
