// The error mailbox: how a kernel tells the host that a wait on a peer ran out of time (or that an output
// was too small), without __trap, so the CUDA context stays usable and Python can raise a clear error.
//
// The mailbox lives in pinned host memory mapped into the device (cudaHostAllocMapped): kernels write it
// through the device alias, the host reads it with no device synchronisation. The first failing thread
// claims the mailbox by atomically raising the device-side abort flag (see wait.cuh), fills the fields,
// fences, and only then sets `status`; the host reads `status` first.
//
// Plain C++ (no CUDA, no torch): included by .cu kernels and by the host runtime.
// Stable interface: every kernel family uses it.
#pragma once

#include <cstdint>

#include "common/limits.h"

namespace deepep {

// Statuses (MailboxStatus) and wait codes (WaitKind, wait_name) are in common/limits.h.

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

}  // namespace deepep
