// Low-latency dispatch and combine (inference decoding) over NVSHMEM symmetric memory.
//
// Each operation is two kernels, so that nothing spins while the data is in flight:
//   * send: every block takes a contiguous range of this rank's tokens; dispatch casts each token to FP8 once
//     (or keeps BF16) and writes it ONCE per destination rank (not once per expert) with a header listing the
//     destination's local experts the token selected; combine writes each received row back to its source.
//     The blocks then publish: dispatch's last block writes, per destination, the per-expert counts and a
//     "messages + 1" signal; combine's blocks add their row counts to the destination's signal.
//   * receive (the hook): waits for the signals of every source, then dispatch fans each message out to the
//     rows of its local experts (a deterministic layout: per expert, source ranks in order, tokens in order),
//     and combine reduces the K rows of every token (weighted, FP32, in top-k order, rounded once to BF16).
// Peers whose buffer NVSHMEM maps into this process (NVLink P2P, or the same GPU) are written with plain
// stores; other peers (RDMA) with NVSHMEM puts from the local staging area.
//
// Buffer layout and wire formats: layout.h. Every wait is bounded (common/wait.cuh): on timeout the mailbox
// gets {rank, peer, what} and the kernel finishes without trapping.

#include "nvshmem/cuda_operators.h"  // first: undoes torch's __CUDA_NO_*__ macros

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/grid.cuh"
#include "common/ptx.cuh"
#include "common/wait.cuh"
#include "low_latency/api.h"
#include "low_latency/layout.h"

namespace deepep {
namespace ll {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;
// Workspace words (grid-completion counters; the last block of a launch resets its word).
constexpr int kWsDispatchSend = 0;
constexpr int kWsDispatchRecv = 1;
constexpr int kWsCombineRecv = 2;
static_assert(kWsCombineRecv < kGuardOffset, "the workspace holds every counter before the parity guard");
// Shared memory the dispatch sender may use (it holds two int32 counters per expert).
constexpr int kMaxSmemBytes = 200 * 1024;

#define LL_CUDA_CHECK(expr)                                                                             \
  do {                                                                                                  \
    cudaError_t e_ = (expr);                                                                            \
    if (e_ != cudaSuccess)                                                                              \
      throw std::runtime_error(std::string("deepep_plugin low-latency: ") + #expr + ": " +             \
                               cudaGetErrorString(e_));                                                 \
  } while (0)

__device__ __forceinline__ ErrorEnv error_env(const Env& env) {
  return ErrorEnv{env.abort_flag, env.mailbox, env.timeout_ns, env.rank};
}

__device__ __forceinline__ uint8_t* signal_ptr(const Env& env, uint8_t* base, int src) {
  return base + env.geo.signal_offset + 4LL * src;
}

// ---------------------------------------------------------------------------------------------------------
// Parity guard. Two consecutive low-latency ops must use different buffer halves: an op writes into its peers'
// half while they may still be reading the previous op's, and each receiver resets the signal words of its own
// half once it has read them, so an op that reuses the previous op's half overwrites messages being read and races
// with that reset (wrong rows, lost signals, a timed-out wait). The host picks the half when a call is issued (or
// captured), so a CUDA graph holding an odd number of ops, replayed twice in a row or between eager calls, would
// reuse it.
//
// Workspace word kWsGuard + b holds the previous op's parity + 1 (0 after creation or a reset, kGuardRefused once
// an op was refused). Block b of a send kernel reads word b at its start and, once all its threads have (after a
// __syncthreads), writes this op's value into words b, b + G, b + 2G, ... (G: its grid): every word sees every op,
// and no block reads a word that another block of its launch writes. An op with the previous op's parity is
// refused, and so is every op after it until clean_low_latency_buffer: it does no work. Every rank runs the same
// sequence of ops, so every rank refuses the same one and no peer waits for it; the op that finds the reuse reports
// it through the mailbox (kMailboxRefused, kWaitLLParity). A receive kernel only reads its word (its send kernel
// wrote it) and does nothing when the op was refused. Cost: one load and at most a few stores per block. (Only the
// first refusal reports; should the mailbox then still hold an earlier report, that one reaches the host instead.)
constexpr int kWsGuard = kGuardOffset;
constexpr int kGuardRefused = 3;

// Send kernels, every thread, before the block's first __syncthreads: this block's guard word.
__device__ __forceinline__ int guard_read(const Env& env) {
  return ld_volatile(env.workspace + kWsGuard + blockIdx.x);
}

// Send kernels, every thread, after that __syncthreads: whether this op is refused; writes this op's value.
__device__ __forceinline__ bool guard_publish(const Env& env, int previous) {
  const bool refused = previous == kGuardRefused || previous == env.parity + 1;
  const int value = refused ? kGuardRefused : env.parity + 1;
  for (int w = blockIdx.x + threadIdx.x * gridDim.x; w < kMaxGrid; w += blockDim.x * gridDim.x)
    env.workspace[kWsGuard + w] = value;
  if (refused && previous != kGuardRefused && blockIdx.x == 0 && threadIdx.x == 0)
    report_error(error_env(env), kMailboxRefused, kWaitLLParity, -1, -1, env.parity, previous - 1);
  return refused;
}

// Receive kernels: whether the send kernel refused this op.
__device__ __forceinline__ bool guard_refused(const Env& env) {
  return ld_volatile(env.workspace + kWsGuard + blockIdx.x) == kGuardRefused;
}

// ---------------------------------------------------------------------------------------------------------
// Routing of one token: its top-k experts (invalid -> -1), which slots are the first occurrence of their
// expert (a token that lists an expert twice reaches it once) and of their destination rank.

struct Route {
  int expert[kMaxTopk];
  unsigned first_expert;  // bit k: slot k holds the first occurrence of a valid expert
  unsigned first_rank;    // bit k: slot k is the first slot whose expert lives on its rank
};

__device__ __forceinline__ void route_token(const int64_t* row, int num_topk, int num_experts, int experts_per_rank,
                                            Route& r) {
  int rank_of[kMaxTopk];
#pragma unroll
  for (int k = 0; k < kMaxTopk; ++k) {
    int e = -1;
    if (k < num_topk) {
      const int64_t v = __ldg(row + k);
      e = (v >= 0 && v < num_experts) ? static_cast<int>(v) : -1;
    }
    r.expert[k] = e;
    rank_of[k] = e >= 0 ? e / experts_per_rank : -1;
  }
  r.first_expert = 0;
  r.first_rank = 0;
#pragma unroll
  for (int k = 0; k < kMaxTopk; ++k) {
    bool fe = r.expert[k] >= 0, fr = fe;
#pragma unroll
    for (int k2 = 0; k2 < k; ++k2) {
      fe = fe && r.expert[k2] != r.expert[k];
      fr = fr && rank_of[k2] != rank_of[k];
    }
    r.first_expert |= static_cast<unsigned>(fe) << k;
    r.first_rank |= static_cast<unsigned>(fr) << k;
  }
}

// ---------------------------------------------------------------------------------------------------------
// BF16 / FP8 helpers

__device__ __forceinline__ void bf16x8_to_float(const int4& v, float (&f)[8]) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

__device__ __forceinline__ int4 float_to_bf16x8(const float (&f)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(f[2 * i]));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(f[2 * i + 1]));
    w[i] = lo | (hi << 16);
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

// Scale of one 128-channel group, exactly as deepep_plugin.fp8.per_token_cast_to_fp8: returns the stored
// (dequantisation) scale and sets `inverse` to the factor the data is multiplied by.
__device__ __forceinline__ float fp8_scale(float amax, bool round_scale, float& inverse) {
  amax = fmaxf(amax, kAmaxFloor);
  if (round_scale) {
    const uint32_t bits = __float_as_uint(__fdiv_rn(amax, kFp8Max));
    const uint32_t exponent = ((bits >> 23) & 0xFFu) + ((bits & 0x7FFFFFu) != 0u);
    const float scale = __uint_as_float(exponent << 23);
    inverse = __fdiv_rn(1.0f, scale);  // exact: a power of two
    return scale;
  }
  inverse = __fdiv_rn(kFp8Max, amax);
  return __fdiv_rn(amax, kFp8Max);
}

__device__ __forceinline__ uint2 float8_to_fp8x8(const float (&f)[8], float inverse) {
  uint32_t w[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    uint32_t packed = 0;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float2 pair;
      pair.x = fminf(fmaxf(__fmul_rn(f[4 * i + 2 * j], inverse), -kFp8Max), kFp8Max);
      pair.y = fminf(fmaxf(__fmul_rn(f[4 * i + 2 * j + 1], inverse), -kFp8Max), kFp8Max);
      const uint32_t two = __nv_cvt_float2_to_fp8x2(pair, __NV_SATFINITE, __NV_E4M3);
      packed |= two << (16 * j);
    }
    w[i] = packed;
  }
  return make_uint2(w[0], w[1]);
}

// ---------------------------------------------------------------------------------------------------------
// Block-wide exclusive scan of `n` ints in shared memory (in place); returns the total.
__device__ int block_exclusive_scan(int* data, int n, int* scratch /* [kWarps + 1] */) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per = (n + kThreads - 1) / kThreads;
  const int lo = min(n, tid * per), hi = min(n, lo + per);
  int sum = 0;
  for (int i = lo; i < hi; ++i) sum += data[i];
  int incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (tid == 0) exclusive_prefix_in_place(scratch, kWarps);
  __syncthreads();
  int run = scratch[warp] + incl - sum;
  for (int i = lo; i < hi; ++i) {
    const int v = data[i];
    data[i] = run;
    run += v;
  }
  const int total = scratch[kWarps];
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------------------------
// Dispatch, send half.
//
// Shared memory: before_expert[E], total_expert[E], before_rank[R], total_rank[R] (int32), then per own token
// [16] experts, [16] slots and [16] header entries.

template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) dispatch_send_kernel(DispatchArgs a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  __shared__ int s_last;
  const Env& env = a.env;
  const Geometry& g = env.geo;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int T = a.num_tokens, K = a.num_topk, E = g.num_experts, R = g.num_ranks, el = g.num_local_experts;
  const int H = g.hidden, S = H / kFp8Group;
  const int per_block = (T + gridDim.x - 1) / gridDim.x;
  const int own_begin = min(T, static_cast<int>(blockIdx.x) * per_block);
  const int own_end = min(T, own_begin + per_block);
  const int num_own = own_end - own_begin;

  int* before_expert = reinterpret_cast<int*>(smem_raw);
  int* total_expert = before_expert + E;
  int* before_rank = total_expert + E;
  int* total_rank = before_rank + R;
  int* own_expert = total_rank + R;                       // [per_block][16], -1 unless first occurrence
  int* own_slot = own_expert + per_block * kMaxTopk;      // [per_block][16], message slot for first-of-rank
  uint64_t* own_entry = reinterpret_cast<uint64_t*>(  // [per_block][16] header entries, 8-byte aligned
      (reinterpret_cast<uintptr_t>(own_slot + per_block * kMaxTopk) + 7) & ~uintptr_t(7));

  __shared__ unsigned long long s_first_bad;  // block 0: smallest flat index of an id outside [-1, E)
  const int guard = guard_read(env);
  for (int i = tid; i < 2 * E + 2 * R; i += kThreads) before_expert[i] = 0;
  if (tid == 0) s_first_bad = ~0ull;
  __syncthreads();
  if (guard_publish(env, guard)) return;  // refused: nothing sent, no signal (the receive kernel skips too)

  // 1. Counts: per expert and per destination rank, over all tokens and over the tokens before this block's.
  // Block 0 also range-checks topk_idx (ids outside [-1, E) select nothing) and reports the first bad one.
  for (int t = tid; t < T; t += kThreads) {
    Route r;
    if (blockIdx.x == 0)
      for (int k = 0; k < K; ++k) {
        const int64_t v = __ldg(a.topk_idx + static_cast<int64_t>(t) * K + k);
        if (v < -1 || v >= E) atomicMin(&s_first_bad, static_cast<unsigned long long>(t) * K + k);
      }
    route_token(a.topk_idx + static_cast<int64_t>(t) * K, K, E, el, r);
    const bool before = t < own_begin, own = t >= own_begin && t < own_end;
#pragma unroll
    for (int k = 0; k < kMaxTopk; ++k) {
      const int e = r.expert[k];
      const bool fe = (r.first_expert >> k) & 1u, fr = (r.first_rank >> k) & 1u;
      if (fe) {
        atomicAdd(&total_expert[e], 1);
        if (before) atomicAdd(&before_expert[e], 1);
      }
      if (fr) {
        atomicAdd(&total_rank[e / el], 1);
        if (before) atomicAdd(&before_rank[e / el], 1);
      }
      if (own) {
        const int o = (t - own_begin) * kMaxTopk + k;
        own_expert[o] = fe ? e : -1;
        own_slot[o] = fr ? 0 : -1;
        const unsigned q = __popc(r.first_expert & ((1u << k) - 1u));
        own_entry[o] = static_cast<uint64_t>(t) | (static_cast<uint64_t>(fe ? e % el : 0) << 16) |
                       (static_cast<uint64_t>(q) << 48);
      }
    }
  }
  __syncthreads();
  if (blockIdx.x == 0 && tid == 0 && s_first_bad != ~0ull)
    report_error(error_env(env), kMailboxBadInput, kWaitBadExpertId, static_cast<int>(s_first_bad / K),
                 static_cast<int>(s_first_bad % K), a.topk_idx[s_first_bad], E);

  // 2. Rows and message slots of the own tokens, in token order (one token per step, one lane per slot).
  if (warp == 0) {
    for (int o = 0; o < num_own; ++o) {
      if (lane < kMaxTopk) {
        const int idx = o * kMaxTopk + lane;
        const int e = own_expert[idx];
        if (e >= 0) {
          const int row = before_expert[e]++;
          own_entry[idx] |= static_cast<uint64_t>(row) << 32;
          if (own_slot[idx] == 0) own_slot[idx] = before_rank[e / el]++;
        }
      }
      __syncwarp();
    }
  }
  __syncthreads();

  const int64_t recv_base = g.recv_offset + g.count_bytes;
  const int64_t payload_bytes = kFp8 ? H + 4LL * S : 2LL * H;
  uint8_t* staging = env.buffer + g.send_offset;  // [N] messages (only the payload part is used)

  // 3. Payload: cast once, store to every destination rank of the token.
  for (int o = 0; o < num_own; ++o) {
    const int t = own_begin + o;
    const int* slots = own_slot + o * kMaxTopk;
    const int* experts = own_expert + o * kMaxTopk;
    const uint8_t* src_row = static_cast<const uint8_t*>(a.x) + static_cast<int64_t>(t) * H * 2;
    if (kFp8) {
      const int half = lane >> 4, hl = lane & 15;
      for (int g0 = warp * 2; g0 < S; g0 += kWarps * 2) {
        const int grp = g0 + half;
        const bool active = grp < S;
        float f[8];
        int4 v = make_int4(0, 0, 0, 0);
        if (active) v = ld_nc_v4(reinterpret_cast<const int4*>(src_row + grp * 256 + hl * 16));
        bf16x8_to_float(v, f);
        float amax = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(f[i]));
#pragma unroll
        for (int m = 8; m >= 1; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, m));
        float inverse;
        const float scale = fp8_scale(amax, a.round_scale != 0, inverse);
        const uint2 packed = float8_to_fp8x8(f, inverse);
        if (active) {
#pragma unroll 1
          for (int k = 0; k < kMaxTopk; ++k) {
            if (slots[k] < 0) continue;
            const int d = experts[k] / el;
            uint8_t* peer = env.peers[d];
            const int64_t msg = recv_base + (static_cast<int64_t>(env.rank) * g.num_max_tokens + slots[k]) * g.msg_bytes;
            uint8_t* dst = peer != nullptr ? peer + msg : staging + static_cast<int64_t>(t) * g.msg_bytes;
            *reinterpret_cast<uint2*>(dst + g.header_bytes + grp * kFp8Group + hl * 8) = packed;
            if (hl == 0) *reinterpret_cast<float*>(dst + g.header_bytes + H + grp * 4) = scale;
          }
        }
      }
    } else {
      const int num_vec = H / 8;
      for (int c = tid; c < num_vec; c += kThreads) {
        const int4 v = ld_nc_v4(reinterpret_cast<const int4*>(src_row) + c);
#pragma unroll 1
        for (int k = 0; k < kMaxTopk; ++k) {
          if (slots[k] < 0) continue;
          const int d = experts[k] / el;
          uint8_t* peer = env.peers[d];
          const int64_t msg = recv_base + (static_cast<int64_t>(env.rank) * g.num_max_tokens + slots[k]) * g.msg_bytes;
          uint8_t* dst = peer != nullptr ? peer + msg : staging + static_cast<int64_t>(t) * g.msg_bytes;
          st_na_v4(reinterpret_cast<int4*>(dst + g.header_bytes) + c, v);
        }
      }
    }
  }

  // 4. Headers (one warp per own token and destination), and RDMA puts of the staged payloads.
  if (env.has_rdma_peers) __syncthreads();  // staged payloads complete before they are put
  for (int o = warp; o < num_own; o += kWarps) {
    const int t = own_begin + o;
    const int* slots = own_slot + o * kMaxTopk;
    const int* experts = own_expert + o * kMaxTopk;
    const int my_expert = lane < kMaxTopk ? experts[lane] : -1;
    const uint64_t my_entry = lane < kMaxTopk ? own_entry[o * kMaxTopk + lane] : 0;
    for (int k = 0; k < kMaxTopk; ++k) {
      if (slots[k] < 0) continue;  // warp-uniform
      const int d = experts[k] / el;
      const bool sel = my_expert >= 0 && my_expert / el == d;
      const unsigned mask = __ballot_sync(0xFFFFFFFFu, sel);
      const uint64_t n = __popc(mask);
      const int pos = __popc(mask & lanemask_lt());
      const int64_t msg = recv_base + (static_cast<int64_t>(env.rank) * g.num_max_tokens + slots[k]) * g.msg_bytes;
      uint8_t* peer = env.peers[d];
      if (peer != nullptr) {
        if (sel) reinterpret_cast<uint64_t*>(peer + msg)[pos] = my_entry | (n << 56);
      } else {
        if (sel) nvshmem_uint64_p(reinterpret_cast<uint64_t*>(env.buffer + msg) + pos, my_entry | (n << 56), d);
        nvshmemx_putmem_nbi_warp(env.buffer + msg + g.header_bytes,
                                 staging + static_cast<int64_t>(t) * g.msg_bytes + g.header_bytes,
                                 static_cast<size_t>(payload_bytes), d);
      }
    }
  }

  // 5. Publish: once every block is done, the last one sends each destination its counts and signal.
  if (env.has_rdma_peers) nvshmem_quiet();
  __threadfence_system();
  if (!last_block(env.workspace + kWsDispatchSend, &s_last)) return;
  __threadfence_system();
  for (int d = tid; d < R; d += kThreads) {
    uint8_t* peer = env.peers[d];
    const int messages = total_rank[d];
    if (peer != nullptr) {
      if (el >= 2) {
        int* counts = reinterpret_cast<int*>(peer + g.recv_offset) + env.rank * el;
        for (int i = 0; i < el; ++i) counts[i] = total_expert[d * el + i];
      }
      __threadfence_system();
      st_release_sys(reinterpret_cast<int*>(signal_ptr(env, peer, env.rank)), messages + 1);
    } else {
      if (el >= 2) {
        int* counts = reinterpret_cast<int*>(env.buffer + g.recv_offset) + env.rank * el;
        for (int i = 0; i < el; ++i) nvshmem_int_p(counts + i, total_expert[d * el + i], d);
      }
      nvshmem_fence();
      nvshmem_int_p(reinterpret_cast<int*>(signal_ptr(env, env.buffer, env.rank)), messages + 1, d);
      nvshmem_quiet();
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Dispatch, receive half (the hook).
//
// Shared memory: begin[E_loc][R] (start row of each source's block), messages[R + 1] (exclusive prefix of the
// messages per source).

__global__ void __launch_bounds__(kThreads, 1) dispatch_recv_kernel(DispatchArgs a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  __shared__ int s_last;
  const Env& env = a.env;
  const Geometry& g = env.geo;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int R = g.num_ranks, el = g.num_local_experts, H = g.hidden, S = H / kFp8Group;
  const int64_t rn = static_cast<int64_t>(R) * g.num_max_tokens;
  int* begin = reinterpret_cast<int*>(smem_raw);
  int* messages = begin + el * R;
  const long long start = clock64();
  if (guard_refused(env)) {  // the send kernel refused the op: no rows (so a combine of its handle sends none)
    if (blockIdx.x == 0) {
      for (int i = tid; i < el; i += kThreads) a.recv_count[i] = 0;
      for (int i = tid; i < el * R; i += kThreads) a.layout_range[i] = 0;
    }
    return;
  }

  // 1. Wait for every source's "all messages sent" signal (value = messages + 1).
  const ErrorEnv err = error_env(env);
  for (int j = tid; j < R; j += kThreads) {
    const int* sig = reinterpret_cast<const int*>(signal_ptr(env, env.buffer, j));
    int value = 0;
    const bool ok = spin_until(
        err, [&] { return ld_acquire_sys(sig); },
        [&](int v) {
          value = v;
          return v != 0;
        },
        kWaitLLDispatchRecv, j, -1, 1);
    messages[j] = ok ? value - 1 : 0;
    if (blockIdx.x == 0 && a.wait_stats != nullptr)
      atomicAdd(reinterpret_cast<unsigned long long*>(a.wait_stats + j),
                static_cast<unsigned long long>(clock64() - start));
  }
  __syncthreads();

  // 2. Layout: per local expert, the sources' blocks in rank order, each source's tokens in token order.
  const int* counts = reinterpret_cast<const int*>(env.buffer + g.recv_offset);
  for (int i = tid; i < el; i += kThreads) {
    int run = 0;
    for (int j = 0; j < R; ++j) {
      const int n = el == 1 ? messages[j] : ld_cg(counts + j * el + i);
      begin[i * R + j] = run;
      if (blockIdx.x == 0) a.layout_range[static_cast<int64_t>(i) * R + j] = (static_cast<int64_t>(run) << 32) | n;
      run += n;
    }
    if (blockIdx.x == 0) {
      a.recv_count[i] = run;
      if (a.cumulative_stats != nullptr) a.cumulative_stats[i] += run;
    }
  }
  __syncthreads();
  if (tid == 0) exclusive_prefix_in_place(messages, R);
  // Every block has read the signals and counts: the last one to get here resets the signals.
  if (last_block(env.workspace + kWsDispatchRecv, &s_last)) {
    for (int j = tid; j < R; j += kThreads) *reinterpret_cast<volatile int*>(signal_ptr(env, env.buffer, j)) = 0;
  }

  // 3. Fan out: each (message, part) unit is copied by one warp into the rows of all its local experts.
  const int total = messages[R];
  const int row_bytes = a.use_fp8 ? H : 2 * H;
  const int num_vec = row_bytes / 16;
  const int total_warps = gridDim.x * kWarps;
  const int parts = max(1, min(total_warps / max(total, 1), num_vec / 32));
  const int64_t recv_base = g.recv_offset + g.count_bytes;
  for (int u = blockIdx.x * kWarps + warp; u < total * parts; u += total_warps) {
    const int m = u / parts, part = u % parts;
    const int j = upper_index(messages, R, m);
    const int slot = m - messages[j];
    const uint8_t* msg = env.buffer + recv_base + (static_cast<int64_t>(j) * g.num_max_tokens + slot) * g.msg_bytes;
    const int entries = static_cast<int>(g.header_bytes / 8);
    uint64_t entry = lane < entries ? ld_cg(reinterpret_cast<const uint64_t*>(msg) + lane) : 0;
    const int n = static_cast<int>(__shfl_sync(0xFFFFFFFFu, entry, 0) >> 56);
    const int expert = static_cast<int>((entry >> 16) & 0xFFFFu);
    const int row = lane < n ? begin[expert * R + j] + static_cast<int>((entry >> 32) & 0xFFFFu) : 0;
    int64_t dst_row[kMaxEntries];
#pragma unroll
    for (int f = 0; f < kMaxEntries; ++f)
      dst_row[f] = static_cast<int64_t>(__shfl_sync(0xFFFFFFFFu, expert, f)) * rn + __shfl_sync(0xFFFFFFFFu, row, f);

    const int4* src = reinterpret_cast<const int4*>(msg + g.header_bytes);
    const int c0 = static_cast<int>(static_cast<int64_t>(part) * num_vec / parts);
    const int c1 = static_cast<int>(static_cast<int64_t>(part + 1) * num_vec / parts);
    for (int c = c0 + lane; c < c1; c += 32) {
      const int4 v = ld_cg_v4(src + c);
#pragma unroll
      for (int f = 0; f < kMaxEntries; ++f) {
        if (f < n) st_na_v4(reinterpret_cast<int4*>(static_cast<uint8_t*>(a.recv_x) + dst_row[f] * row_bytes) + c, v);
      }
    }
    if (part != 0) continue;
    if (lane < n) {
      const int64_t r = static_cast<int64_t>(expert) * rn + row;
      a.src_info[r] = static_cast<int>(entry & 0xFFFFu);
      a.slot_info[r] = static_cast<int>((entry >> 48) & 0xFFu);
    }
    if (!a.use_fp8) continue;
    const float* scales = reinterpret_cast<const float*>(msg + g.header_bytes + H);
    if (a.use_ue8m0) {
      const int words = (S + 3) / 4;
      int* out = static_cast<int*>(a.recv_scales);
      for (int w = lane; w < words; w += 32) {
        uint32_t packed = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int s = 4 * w + b;
          const uint32_t ex = s < S ? (__float_as_uint(ld_cg(scales + s)) >> 23) & 0xFFu : 127u;
          packed |= ex << (8 * b);
        }
#pragma unroll
        for (int f = 0; f < kMaxEntries; ++f) {
          if (f < n) {
            const int64_t e_f = dst_row[f] / rn, r_f = dst_row[f] % rn;
            out[(e_f * words + w) * rn + r_f] = static_cast<int>(packed);
          }
        }
      }
    } else {
      float* out = static_cast<float*>(a.recv_scales);
      for (int s = lane; s < S; s += 32) {
        const float sc = ld_cg(scales + s);
#pragma unroll
        for (int f = 0; f < kMaxEntries; ++f) {
          if (f < n) {
            const int64_t e_f = dst_row[f] / rn, r_f = dst_row[f] % rn;
            out[(e_f * S + s) * rn + r_f] = sc;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Combine, send half: every valid row of every local expert goes back to its source, into the slot
// (source token t, its distinct-expert position q).
//
// Shared memory: unit_start[E + 1] (exclusive prefix of rows over (expert, source) units), unit_begin[E],
// sent[R], scan scratch.

__global__ void __launch_bounds__(kThreads, 1) combine_send_kernel(CombineArgs a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const Env& env = a.env;
  const Geometry& g = env.geo;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int R = g.num_ranks, el = g.num_local_experts, H = g.hidden, units = el * R;
  const int64_t rn = static_cast<int64_t>(R) * g.num_max_tokens;
  int* unit_start = reinterpret_cast<int*>(smem_raw);  // [units + 1]
  int* unit_begin = unit_start + units + 1;             // [units]
  int* sent = unit_begin + units;                       // [R]
  int* scratch = sent + R;                              // [kWarps + 1]
  const int guard = guard_read(env);

  for (int u = tid; u < units; u += kThreads) {
    const int64_t lr = a.layout_range[u];  // u = i * R + j, the layout of layout_range
    unit_start[u] = static_cast<int>(lr & 0xFFFFFFFFLL);
    unit_begin[u] = static_cast<int>(lr >> 32);
  }
  for (int j = tid; j < R; j += kThreads) sent[j] = 0;
  __syncthreads();
  if (guard_publish(env, guard)) return;  // refused: nothing sent, no signal (the receive kernel skips too)
  const int rows = block_exclusive_scan(unit_start, units, scratch);
  if (tid == 0) unit_start[units] = rows;
  __syncthreads();

  const int num_vec = H / 8;  // 16-byte vectors of a BF16 row
  const int total_warps = gridDim.x * kWarps;
  const int parts = max(1, min(total_warps / max(rows, 1), num_vec / 32));
  uint8_t* staging = env.buffer + g.send_offset;  // [E_loc][R*N] rows of combine_send_row_bytes
  for (int w = blockIdx.x * kWarps + warp; w < rows * parts; w += total_warps) {
    const int f = w / parts, part = w % parts;
    const int unit = upper_index(unit_start, units, f);
    const int i = unit / R, j = unit % R;
    const int64_t row = static_cast<int64_t>(i) * rn + unit_begin[unit] + (f - unit_start[unit]);
    const int token = __ldg(a.src_info + row), q = __ldg(a.slot_info + row);
    const int64_t dst_off = g.recv_offset + (static_cast<int64_t>(token) * g.combine_slots_per_token + q) * 2LL * H;
    uint8_t* stage_row = staging + row * g.combine_send_row_bytes;
    const int4* src = a.zero_copy ? reinterpret_cast<const int4*>(stage_row)
                                  : reinterpret_cast<const int4*>(static_cast<const uint8_t*>(a.x) + row * 2LL * H);
    const int c0 = static_cast<int>(static_cast<int64_t>(part) * num_vec / parts);
    const int c1 = static_cast<int>(static_cast<int64_t>(part + 1) * num_vec / parts);
    uint8_t* peer = env.peers[j];
    if (peer != nullptr) {
      int4* dst = reinterpret_cast<int4*>(peer + dst_off);
      int c = c0 + lane;
      for (; c + 96 < c1; c += 128) {
        const int4 v0 = ld_nc_v4(src + c), v1 = ld_nc_v4(src + c + 32), v2 = ld_nc_v4(src + c + 64),
                   v3 = ld_nc_v4(src + c + 96);
        st_na_v4(dst + c, v0);
        st_na_v4(dst + c + 32, v1);
        st_na_v4(dst + c + 64, v2);
        st_na_v4(dst + c + 96, v3);
      }
      for (; c < c1; c += 32) st_na_v4(dst + c, ld_nc_v4(src + c));
    } else {
      if (!a.zero_copy) {
        for (int c = c0 + lane; c < c1; c += 32) st_na_v4(reinterpret_cast<int4*>(stage_row) + c, ld_nc_v4(src + c));
        __syncwarp();
      }
      nvshmemx_putmem_nbi_warp(env.buffer + dst_off + c0 * 16LL, stage_row + c0 * 16LL,
                               static_cast<size_t>(c1 - c0) * 16, j);
    }
    if (part == 0 && lane == 0) atomicAdd(&sent[j], 1);
  }

  if (env.has_rdma_peers) nvshmem_quiet();
  __threadfence_system();
  __syncthreads();
  for (int j = tid; j < R; j += kThreads) {
    const int n = sent[j];
    if (n == 0) continue;
    uint8_t* peer = env.peers[j];
    if (peer != nullptr) {
      __threadfence_system();
      red_add_sys(reinterpret_cast<int*>(signal_ptr(env, peer, env.rank)), n);
    } else {
      nvshmem_int_atomic_add(reinterpret_cast<int*>(signal_ptr(env, env.buffer, env.rank)), n, j);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Combine, receive half (the hook): out[t] = bf16(sum over k in order of w[t,k] * row(t, q(k))), FP32.
//
// Shared memory: expected[R] (rows to wait for from each rank).

__global__ void __launch_bounds__(kThreads, 1) combine_recv_kernel(CombineArgs a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  __shared__ int s_last;
  const Env& env = a.env;
  const Geometry& g = env.geo;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int T = a.num_tokens, K = a.num_topk, R = g.num_ranks, el = g.num_local_experts, H = g.hidden;
  const int E = g.num_experts;
  int* expected = reinterpret_cast<int*>(smem_raw);
  const long long start = clock64();
  if (guard_refused(env)) return;  // the send kernel refused the op: out is left as it was

  for (int j = tid; j < R; j += kThreads) expected[j] = 0;
  __syncthreads();
  for (int t = tid; t < T; t += kThreads) {
    Route r;
    route_token(a.topk_idx + static_cast<int64_t>(t) * K, K, E, el, r);
#pragma unroll
    for (int k = 0; k < kMaxTopk; ++k)
      if ((r.first_expert >> k) & 1u) atomicAdd(&expected[r.expert[k] / el], 1);
  }
  __syncthreads();

  const ErrorEnv err = error_env(env);
  for (int j = tid; j < R; j += kThreads) {
    const int want = expected[j];
    if (want == 0) continue;
    const int* sig = reinterpret_cast<const int*>(signal_ptr(env, env.buffer, j));
    spin_until(
        err, [&] { return ld_acquire_sys(sig); }, [&](int v) { return v >= want; }, kWaitLLCombineRecv, j, -1, want);
    if (blockIdx.x == 0 && a.wait_stats != nullptr)
      atomicAdd(reinterpret_cast<unsigned long long*>(a.wait_stats + j),
                static_cast<unsigned long long>(clock64() - start));
  }
  if (last_block(env.workspace + kWsCombineRecv, &s_last)) {
    for (int j = tid; j < R; j += kThreads) *reinterpret_cast<volatile int*>(signal_ptr(env, env.buffer, j)) = 0;
  }

  const int num_vec = H / 8;
  const int total_warps = gridDim.x * kWarps;
  const int parts = max(1, min(total_warps / max(T, 1), num_vec / 32));
  const uint8_t* slots = env.buffer + g.recv_offset;
  for (int u = blockIdx.x * kWarps + warp; u < T * parts; u += total_warps) {
    const int t = u / parts, part = u % parts;
    int e = -1;
    float w = 0.0f;
    if (lane < K) {
      const int64_t v = __ldg(a.topk_idx + static_cast<int64_t>(t) * K + lane);
      e = (v >= 0 && v < E) ? static_cast<int>(v) : -1;
      w = __ldg(a.topk_weights + static_cast<int64_t>(t) * K + lane);
    }
    // q of each slot: the position of its expert's first occurrence among the token's distinct experts.
    const unsigned same = __match_any_sync(0xFFFFFFFFu, e >= 0 ? e : -2 - lane);
    const int first = __ffs(same) - 1;
    const unsigned firsts = __ballot_sync(0xFFFFFFFFu, e >= 0 && first == lane);
    const int q = __popc(firsts & ((1u << first) - 1u));
    const int my_slot = t * g.combine_slots_per_token + q;
    const unsigned valid = __ballot_sync(0xFFFFFFFFu, e >= 0);
    const int c0 = static_cast<int>(static_cast<int64_t>(part) * num_vec / parts);
    const int c1 = static_cast<int>(static_cast<int64_t>(part + 1) * num_vec / parts);
    int slot[kMaxTopk];
    float wk[kMaxTopk];
#pragma unroll
    for (int k = 0; k < kMaxTopk; ++k) {
      slot[k] = __shfl_sync(0xFFFFFFFFu, my_slot, k);
      wk[k] = __shfl_sync(0xFFFFFFFFu, w, k);
    }
    const int64_t row_bytes = 2LL * H;
    for (int c = c0 + lane; c < c1; c += 32) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      // Four rows in flight at a time; the sum stays in top-k order.
#pragma unroll
      for (int kb = 0; kb < kMaxTopk; kb += 4) {
        if ((valid >> kb) == 0u) break;
        int4 v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k)
          if ((valid >> (kb + k)) & 1u) v[k] = ld_cg_v4(reinterpret_cast<const int4*>(slots + slot[kb + k] * row_bytes) + c);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if ((valid >> (kb + k)) & 1u) {
            float f[8];
            bf16x8_to_float(v[k], f);
#pragma unroll
            for (int x = 0; x < 8; ++x) acc[x] = __fadd_rn(acc[x], __fmul_rn(f[x], wk[kb + k]));
          }
        }
      }
      st_na_v4(reinterpret_cast<int4*>(static_cast<uint8_t*>(a.out) + static_cast<int64_t>(t) * 2 * H) + c,
               float_to_bf16x8(acc));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers

int64_t dispatch_send_smem(int num_experts, int num_ranks, int per_block) {
  return 4LL * (2 * num_experts + 2 * num_ranks + 2 * kMaxTopk * per_block) + 8 + 8LL * kMaxTopk * per_block;
}

// Raise the kernel's dynamic shared-memory limit once per process (not a stream operation, so it is also
// safe while a CUDA graph is being captured).
void set_smem(const void* kernel, int64_t bytes) {
  if (bytes > kMaxSmemBytes)
    throw std::runtime_error("deepep_plugin low-latency: the kernel needs " + std::to_string(bytes) +
                             " bytes of shared memory (too many experts or ranks)");
  static const void* done[8] = {nullptr};
  for (const void*& d : done) {
    if (d == kernel) return;
    if (d == nullptr) {
      LL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmemBytes));
      d = kernel;
      return;
    }
  }
}

}  // namespace

int64_t max_dispatch_smem_experts() { return (kMaxSmemBytes - 4096) / 8; }

void dispatch_send(const DispatchArgs& a, int num_sms, void* stream) {
  const int grid = std::max(1, std::min(num_sms, a.num_tokens));
  const int per_block = (a.num_tokens + grid - 1) / grid;
  const int64_t smem = dispatch_send_smem(a.env.geo.num_experts, a.env.geo.num_ranks, per_block);
  const void* kernel = a.use_fp8 ? reinterpret_cast<const void*>(&dispatch_send_kernel<true>)
                                 : reinterpret_cast<const void*>(&dispatch_send_kernel<false>);
  set_smem(kernel, smem);
  auto s = static_cast<cudaStream_t>(stream);
  if (a.use_fp8) {
    dispatch_send_kernel<true><<<grid, kThreads, smem, s>>>(a);
  } else {
    dispatch_send_kernel<false><<<grid, kThreads, smem, s>>>(a);
  }
  LL_CUDA_CHECK(cudaGetLastError());
}

void dispatch_recv(const DispatchArgs& a, int num_sms, void* stream) {
  const Geometry& g = a.env.geo;
  const int64_t smem = 4LL * (g.num_local_experts * g.num_ranks + g.num_ranks + 1);
  set_smem(reinterpret_cast<const void*>(&dispatch_recv_kernel), smem);
  dispatch_recv_kernel<<<num_sms, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(a);
  LL_CUDA_CHECK(cudaGetLastError());
}

void combine_send(const CombineArgs& a, int num_sms, void* stream) {
  const Geometry& g = a.env.geo;
  const int units = g.num_local_experts * g.num_ranks;
  const int64_t smem = 4LL * (2 * units + 1 + g.num_ranks + kWarps + 1);
  set_smem(reinterpret_cast<const void*>(&combine_send_kernel), smem);
  combine_send_kernel<<<num_sms, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(a);
  LL_CUDA_CHECK(cudaGetLastError());
}

void combine_recv(const CombineArgs& a, int num_sms, void* stream) {
  const int64_t smem = 4LL * a.env.geo.num_ranks;
  set_smem(reinterpret_cast<const void*>(&combine_recv_kernel), smem);
  combine_recv_kernel<<<num_sms, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(a);
  LL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ll
}  // namespace deepep
