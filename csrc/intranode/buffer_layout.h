// Layout of one rank's two device allocations, both cudaMalloc'ed by the host runtime and mapped into every
// peer of the node with CUDA IPC, and the tuning constants of the intranode kernels.
//
//   control block (struct Header, ~109 KiB, its own allocation so that the user's num_nvl_bytes is all queue
//                 space and the size hint of Config always suffices): abort flag, notify barrier, queue
//                 counters; fixed size, so its layout never depends on a call's channel count or row size.
//   NVL buffer    (num_nvl_bytes): receive queues, one fixed region of num_nvl_bytes / R (rounded down to 16)
//                 per source rank i; queue (c, i) holds messages from source i on channel c: Q slots of
//                 `slot_bytes` at offset i * region_bytes + c * Q * slot_bytes. Fixed per-source regions
//                 matter: a fast source may start its next call (another slot size or channel count) while this
//                 rank still receives from a slow one, and must not write into the slow one's slots.
//
// Streams. Every ordered pair (sender s, receiver d) and channel c forms one message stream; its ring is
// queue (c, s) in d's buffer. The stream's counters are monotonic over the buffer's lifetime (64-bit, so they
// never wrap) and shared by dispatch and combine:
//   d.tail[c][s]      messages s has published to d (written by s over NVLink with st.release.sys)
//   s.head[c][d]      messages d has consumed (written by d over NVLink with st.release.sys)
//   s.sent[c][d]      s's own copy of tail, read at kernel start, written at kernel end
//   d.consumed[c][s]  d's own copy of head, likewise
// Message number m of a stream lives in slot m % Q. A sender may write message m once head > m - Q; a
// receiver may read message m once tail > m. Every call drains its streams before its last kernel ends (senders
// wait until head == tail; a split-launch dispatch's first kernel leaves that to its second, dispatch.cu), so
// between calls every queue is empty: the next call may use another slot size, queue depth or channel count, and
// no barrier or cleanup pass is needed between calls.
//
// Plain C++ shared by host and device code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/limits.h"

namespace deepep::intranode {

constexpr int kMaxRanks = kMaxNvlPeers;  // NVLink peers in a node (kMaxChannels, kMaxLocalExperts: limits.h)
constexpr int kMaxExperts = kMaxRanks * kMaxLocalExperts;

// Notify payload a source writes into each destination: its num_tokens_per_rank row [R], its per-channel
// token counts to that destination [C], and its per-expert counts for the destination's experts [E_loc].
constexpr int kNotifyInts = kMaxRanks + kMaxChannels + kMaxLocalExperts;

// A channel's reduction rounds in a combine with shared rounds (combine.cu): this rank's own, never touched by
// peers. Zero between calls (the second of the channel's two blocks to finish clears it), so CUDA-graph
// replays find the same state. A call that times out leaves it as it was (like the queue counters): the abort
// flag is never cleared, so no later call runs on this buffer.
struct CombineRounds {
  unsigned claimed;   // rounds handed out so far (atomicAdd by either block)
  unsigned released;  // rounds whose queue slots have been freed, in order
  unsigned finished;  // blocks of the channel that have left the reduction
  unsigned pad;
};

struct alignas(128) Header {
  int abort_flag;                      // raised by the first timed-out wait of this rank (never cleared)
  int pad0[31];
  uint64_t notify_seq;                 // notify calls completed by this rank (written by its own kernel)
  uint64_t pad1[15];
  uint64_t notify_flag[kMaxRanks];     // [i]: latest notify sequence number source i has published here
  int notify_payload[2][kMaxRanks][kNotifyInts];  // [seq % 2][source i]
  uint64_t tail[kMaxChannels][kMaxRanks];
  uint64_t head[kMaxChannels][kMaxRanks];
  uint64_t sent[kMaxChannels][kMaxRanks];
  uint64_t consumed[kMaxChannels][kMaxRanks];
  CombineRounds combine_rounds[kMaxChannels];
};

// Scratch of get_dispatch_layout (its own device allocation, this rank's only): the blocks add their counts
// here, and the last block to finish (by `ticket`) moves them into the outputs and leaves everything zero
// again (first_bad: all ones), so no memset runs before a call and CUDA-graph replays find the same state.
struct LayoutWork {
  unsigned int ticket;                  // blocks of the running call that have flushed their counts
  unsigned int pad0[31];
  unsigned long long first_bad;         // smallest flat index t * K + k of an id outside [-1, E); ~0 if none
  unsigned long long pad1[15];
  int counts[kMaxExperts + kMaxRanks];  // [e] (token, k) entries of expert e, then [E + r] tokens of rank r
};

constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// ---------------------------------------------------------------------------------------------------------
// Tuning (measured on 2x H200; see deepep_plugin/config.py for the user-facing knobs).

// Threads per block: 32 warps. One block per SM; the facts in design.md (NVLink stores reach 299/333/350
// GB/s with 8/16/24 SMs) were measured with 1024-thread blocks.
constexpr int kNumThreads = 1024;
constexpr int kNumWarps = kNumThreads / 32;

// Messages per publication round: a warp-wide ballot scans 32 tokens at a time, and a sender publishes its
// tail once per round. Capped at about half the queue depth: with rounds of r messages and a ring of Q
// slots, a sender blocked inside an unpublished round can never hold back a message the receiver needs
// as long as Q >= 2r - 1.
constexpr int kRoundTokens = 32;

// Message layouts (bytes; every field 4-byte aligned, slots 16-byte aligned).
struct DispatchSlot {
  int row_bytes, scales_off, idx_off, weights_off, src_off, slot_bytes;
};
inline DispatchSlot dispatch_slot(int row_bytes, int num_scales, int num_topk) {
  DispatchSlot s;
  s.row_bytes = row_bytes;
  s.scales_off = row_bytes;
  s.idx_off = s.scales_off + 4 * num_scales;
  s.weights_off = s.idx_off + 4 * num_topk;
  s.src_off = s.weights_off + 4 * num_topk;
  s.slot_bytes = static_cast<int>(align_up(static_cast<size_t>(s.src_off) + 4, 16));
  return s;
}

struct CombineSlot {
  int row_bytes, weights_off, slot_bytes;
};
inline CombineSlot combine_slot(int row_bytes, int num_topk) {
  CombineSlot s;
  s.row_bytes = row_bytes;
  s.weights_off = row_bytes;
  s.slot_bytes = static_cast<int>(align_up(static_cast<size_t>(row_bytes) + 4 * num_topk, 16));
  return s;
}

inline size_t region_bytes_of(size_t num_nvl_bytes, int num_ranks) {
  return num_nvl_bytes / num_ranks / 16 * 16;
}

}  // namespace deepep::intranode
