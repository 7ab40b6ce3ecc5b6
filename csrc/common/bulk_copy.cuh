// Hopper's bulk-copy engine (TMA, one-dimensional form) and the shared-memory barriers its loads complete on.
//
// A bulk load moves `bytes` (a multiple of 16, both addresses 16-byte aligned) from global memory into shared
// memory and reports on an mbarrier: the issuing thread announces the bytes it expects (arrive + expect_tx), the
// copy engine counts them down, and the barrier's phase flips when all have landed. A bulk store moves shared memory
// to global memory; stores are grouped (commit_group) and waited for by group (wait_group, or wait_group.read, which
// only waits until the engine has read the shared memory, so the stage may be refilled). One thread issues; no
// registers hold the data, so the bytes in flight per SM are bounded by shared memory, not by the register file.
// (Only the per-SM rate probe uses it, copy_probe.cu, on data no other agent writes. Data a peer GPU wrote with
// ordinary stores would first need fence.proxy.async after its acquire: the copy engine is another proxy.)
#pragma once

#include <cstdint>

namespace deepep {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Barrier of one arrival per phase (the issuing thread's arrive.expect_tx); the engine's byte count completes it.
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

// After mbar_init, before the copy engine may use the barrier.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// Wait until the phase with parity `parity` has completed. Any thread may wait; those that do see the bytes the
// phase's loads wrote. A local bulk load always completes, so the wait needs no timeout.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

__device__ __forceinline__ void bulk_load(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_addr(smem)), "l"(gmem), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

__device__ __forceinline__ void bulk_store(void* gmem, const void* smem, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem), "r"(smem_addr(smem)),
               "r"(bytes)
               : "memory");
}

// Close the group of bulk stores issued since the last commit (an empty group is allowed).
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Wait until at most N committed groups of this thread still read their shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Wait until every committed group of this thread is complete (its writes performed).
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

}  // namespace deepep
