// Bounded spin-waits. Every wait on another GPU goes through `spin_until`: it polls a condition, and every
// few polls checks the global timer against the timeout and a device-side abort flag. On expiry it reports
// {rank, peer, channel, what} through the mailbox (mailbox.h), raises the abort flag so every other waiting
// thread of this GPU gives up too, and returns false; callers then leave their loops together (see
// named_barrier_or in ptx.cuh) and the kernel ends normally. No __trap: the context stays usable and the
// host raises DeepEPTimeoutError from the mailbox.
//
// Stable interface: the low-latency kernels include this header too.
#pragma once

#include <cstdint>

#include "common/error_env.h"
#include "common/mailbox.h"
#include "common/ptx.cuh"

namespace deepep {

// Record an error once per rank (the first reporter wins) and, for timeouts, raise the abort flag.
__device__ __forceinline__ void report_error(const ErrorEnv& env, int status, int what, int peer, int channel,
                                             int64_t detail, int64_t observed) {
  if (status == kMailboxTimeout) {
    if (atomicCAS(env.abort_flag, 0, 1) != 0) return;  // someone else reported first
  } else if (atomicCAS(env.abort_flag, 0, 0) != 0) {
    return;  // a timeout is already being reported; keep it
  }
  Mailbox* mb = env.mailbox;
  if (status != kMailboxTimeout && mb->status != kMailboxEmpty) return;
  mb->rank = env.rank;
  mb->peer = peer;
  mb->channel = channel;
  mb->what = what;
  mb->detail = detail;
  mb->observed = observed;
  __threadfence_system();
  mb->status = status;
}

__device__ __forceinline__ bool aborted(const ErrorEnv& env) { return ld_volatile(env.abort_flag) != 0; }

// Poll `load()` until `done(value)` holds. Returns false (after reporting) on timeout or when another
// thread of this rank aborted. Called by a single thread (usually lane 0 of a warp).
template <typename Load, typename Done>
__device__ __forceinline__ bool spin_until(const ErrorEnv& env, Load load, Done done, int what, int peer,
                                           int channel, int64_t expected) {
  auto v = load();
  if (done(v)) return true;
  const uint64_t start = global_timer_ns();
  for (uint32_t it = 1;; ++it) {
    v = load();
    if (done(v)) return true;
    if ((it & 63u) == 0) {
      if (aborted(env)) return false;
      if (global_timer_ns() - start > env.timeout_ns) {
        report_error(env, kMailboxTimeout, what, peer, channel, expected, static_cast<int64_t>(v));
        return false;
      }
    }
  }
}

}  // namespace deepep
