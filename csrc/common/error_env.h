// Where a kernel reports a failed wait (plain C++; the device side is in wait.cuh).
// Stable interface: the low-latency kernels use it too.
#pragma once

#include <cstdint>

#include "common/mailbox.h"

namespace deepep {

struct ErrorEnv {
  int* abort_flag;       // device memory, this rank's; non-zero once any wait of this rank timed out
  Mailbox* mailbox;      // device alias of the host-mapped mailbox
  uint64_t timeout_ns;   // per wait
  int rank;
};

}  // namespace deepep
