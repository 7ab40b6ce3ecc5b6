// The error mailbox: how a kernel tells the host that a wait on a peer ran out of time (or that an output
// was too small), without __trap, so the CUDA context stays usable and Python can raise a clear error.
//
// The mailbox lives in pinned host memory mapped into the device (cudaHostAllocMapped): kernels write it
// through the device alias, the host reads it with no device synchronisation. The first failing thread
// claims the mailbox by atomically raising the device-side abort flag (see wait.cuh), fills the fields,
// fences, and only then sets `status`; the host reads `status` first.
//
// Plain C++ (no CUDA, no torch): included by .cu kernels and by the host runtime.
// Stable interface: the low-latency kernels use it too. Append new codes; never renumber.
#pragma once

#include <cstdint>

namespace deepep {

enum MailboxStatus : int32_t {
  kMailboxEmpty = 0,
  kMailboxTimeout = 1,   // a spin-wait ran out of time; the buffer's queues are in an unknown state
  kMailboxOverflow = 2,  // more rows arrived than the output holds (num_worst_tokens too small); no write
                         // went out of bounds and the buffer stays consistent
  kMailboxBadInput = 3,  // an input value was out of range (what = kWaitBadExpertId: peer = token, channel =
                         // top-k slot, detail = the value, observed = num_experts); the entry selected
                         // nothing, the collective went on and the buffer stays consistent
};

// What a kernel was waiting for. The host turns these into sentences (see wait_name()).
enum WaitKind : int32_t {
  kWaitNone = 0,
  kWaitNotifyBarrier = 1,   // dispatch notify: peer's counts (it has not reached the same dispatch)
  kWaitDispatchSlots = 2,   // dispatch sender: free slots in the peer's receive queue
  kWaitDispatchTokens = 3,  // dispatch receiver: tokens from the peer
  kWaitDispatchDrain = 4,   // dispatch sender: peer to consume the last tokens
  kWaitCombineSlots = 5,    // combine sender: free slots in the peer's receive queue
  kWaitCombineTokens = 6,   // combine receiver: rows from the peer
  kWaitCombineDrain = 7,    // combine sender: peer to consume the last rows
  kWaitWorstTokens = 8,     // (overflow) rows beyond num_worst_tokens were dropped
  kWaitBadExpertId = 9,     // (bad input) a topk_idx entry outside [-1, num_experts)
  kWaitLowLatencyBase = 64  // codes >= 64 belong to the low-latency kernels
};

struct Mailbox {
  volatile int32_t status;  // MailboxStatus; written last
  int32_t rank;             // rank whose kernel reported
  int32_t peer;             // rank it waited for (-1 if none)
  int32_t channel;          // channel (-1 if none)
  int32_t what;             // WaitKind
  int32_t pad;
  int64_t detail;           // extra number: the counter value expected, or the rows needed
  int64_t observed;         // the counter value last seen, or the rows available
};

inline const char* wait_name(int32_t what) {
  switch (what) {
    case kWaitNotifyBarrier: return "dispatch notify barrier (the peer's token counts; did it call dispatch?)";
    case kWaitDispatchSlots: return "dispatch send: free slots in the peer's receive queue";
    case kWaitDispatchTokens: return "dispatch receive: tokens from the peer";
    case kWaitDispatchDrain: return "dispatch send: the peer to consume the last tokens";
    case kWaitCombineSlots: return "combine send: free slots in the peer's receive queue";
    case kWaitCombineTokens: return "combine receive: rows from the peer";
    case kWaitCombineDrain: return "combine send: the peer to consume the last rows";
    case kWaitWorstTokens: return "dispatch: received rows beyond num_worst_tokens";
    case kWaitBadExpertId: return "topk_idx: an expert id outside [-1, num_experts)";
    default: return "unknown wait";
  }
}

}  // namespace deepep
