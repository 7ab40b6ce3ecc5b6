// Small device helpers of the low-latency kernels that csrc/common/ptx.cuh does not have.
#pragma once

#include <cstdint>

namespace deepep {
namespace ll {

// 8-byte load of data another GPU wrote (after an acquire): at L2, never from a stale L1 line.
__device__ __forceinline__ uint64_t ld_cg_u64(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// System-scope relaxed atomic add (the counter lives in a peer's memory, mapped here).
__device__ __forceinline__ void red_add_sys(int* p, int v) {
  asm volatile("red.relaxed.sys.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

}  // namespace ll
}  // namespace deepep
