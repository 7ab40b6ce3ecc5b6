// Small PTX wrappers shared by every kernel family: memory-model primitives (acquire/release at system
// scope, for flags that other GPUs write over NVLink), cache-bypassing vector loads, named barriers with an
// OR reduction, and the global nanosecond timer that spin-waits use for their timeouts.
//
// Stable interface: the low-latency kernels include this header too. Add functions; do not change the
// meaning of existing ones.
#pragma once

#include <cstdint>

namespace deepep {

// ---------------------------------------------------------------------------------------------------------
// Lanes and timers

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x & 31u); }

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm volatile("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// Nanoseconds since an arbitrary origin, the same for every SM of a GPU (coarse: ~1 us ticks on Hopper).
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ---------------------------------------------------------------------------------------------------------
// Flags. A producer publishes data with st_release_sys (all its earlier writes become visible to any
// thread that later observes the flag with ld_acquire_sys), so flags written by a peer GPU through an IPC
// mapping and polled locally are safe without extra fences.

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ int ld_acquire_sys(const int* p) {
  int v;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void st_release_sys(int* p, int v) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Device-scope flag between blocks of one GPU (the combine's shared rounds, combine.cu).
__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_gpu(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ int ld_volatile(const int* p) {
  int v;
  asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void fence_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// ---------------------------------------------------------------------------------------------------------
// 16-byte vector accesses. Rows are moved as int4 (16 bytes per lane, 512 bytes per warp instruction).

// Read-only input that no other agent writes during the kernel: the non-coherent path, not kept in L1.
__device__ __forceinline__ int4 ld_nc_v4(const int4* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Data another GPU wrote into this GPU's buffer (after an acquire): read at L2, never from a stale L1 line.
__device__ __forceinline__ int4 ld_cg_v4(const int4* p) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

// Copy-path variants of ld_cg_v4 and st_na_v4 without a "memory" clobber (ld_nc_v4 has none): the compiler may
// keep values in registers across them and schedule plain loads and stores around them. Their order among
// themselves and against the flag accesses above (all asm volatile) is kept; use them only between an acquire and a
// release that order the data (the barrier and st_release_sys after a copy carry the clobber).
__device__ __forceinline__ int4 ld_cg_v4_free(const int4* p) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void st_na_v4_free(int4* p, const int4& v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w));
}

__device__ __forceinline__ int ld_cg(const int* p) {
  int v;
  asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ float ld_cg(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t ld_cg(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// System-scope relaxed atomic add (the counter lives in a peer's memory, mapped here).
__device__ __forceinline__ void red_add_sys(int* p, int v) {
  asm volatile("red.relaxed.sys.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Store that does not allocate in L1 (output rows and peer-buffer slots are written once, read elsewhere).
__device__ __forceinline__ void st_na_v4(int4* p, const int4& v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}

// ---------------------------------------------------------------------------------------------------------
// Named barriers over a subset of a block's warps (ids 1..15; id 0 is __syncthreads).

__device__ __forceinline__ void named_barrier(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

// Barrier among `num_threads` threads that also ORs `pred` over them: every participant gets the same
// answer, so a group can leave a loop together when any of its warps failed (no warp is left waiting on a
// barrier that the others skipped).
__device__ __forceinline__ bool named_barrier_or(int id, int num_threads, bool pred) {
  unsigned out;
  asm volatile(
      "{\n\t.reg .pred p, q;\n\t"
      "setp.ne.u32 p, %1, 0;\n\t"
      "bar.red.or.pred q, %2, %3, p;\n\t"
      "selp.u32 %0, 1, 0, q;\n\t}"
      : "=r"(out)
      : "r"(static_cast<unsigned>(pred)), "r"(id), "r"(num_threads)
      : "memory");
  return out != 0;
}

}  // namespace deepep
