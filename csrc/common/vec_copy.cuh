// Warp-wide copies of rows whose size is a multiple of 16 bytes. Each lane moves 16 bytes per access; a
// warp issues `kUnroll` independent loads before the first store, so several 512-byte requests are in
// flight per warp (what keeps NVLink stores and HBM reads busy with few SMs).
//
// Stable interface: the low-latency kernels may include this header.
#pragma once

#include <cstdint>

#include "common/ptx.cuh"

namespace deepep {

// 16-byte accesses in flight per lane before the first store: 4 x 16 B x 32 lanes = 2 KiB per warp.
constexpr int kCopyUnroll = 4;

enum class LoadKind { kNonCoherent, kL2 };

template <LoadKind kLoad>
__device__ __forceinline__ int4 load_v4(const int4* p) {
  if constexpr (kLoad == LoadKind::kNonCoherent) {
    return ld_nc_v4(p);
  } else {
    return ld_cg_v4(p);
  }
}

// Copy `num_vec` int4 elements from `src` to `dst` with the whole warp (all 32 lanes must call).
template <LoadKind kLoad>
__device__ __forceinline__ void warp_copy_v4(int4* __restrict__ dst, const int4* __restrict__ src, int num_vec) {
  const int lane = lane_id();
  constexpr int kStep = 32 * kCopyUnroll;
  int i = lane;
  for (; i + (kCopyUnroll - 1) * 32 < num_vec; i += kStep) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) v[u] = load_v4<kLoad>(src + i + u * 32);
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) st_na_v4(dst + i + u * 32, v[u]);
  }
  for (; i < num_vec; i += 32) st_na_v4(dst + i, load_v4<kLoad>(src + i));
}

// Like warp_copy_v4 with `kDepth` loads in flight per lane, but a row's tail travels in the last batch as
// predicated accesses instead of one load-store round trip per 512 bytes: a row of n vectors costs
// ceil(n / (32 * kDepth)) dependent memory latencies (an FP8 row of 7168 bytes: 2 at depth 8, 4 at depth 4 with
// warp_copy_v4's 3 + 2 tails). Its accesses carry no "memory" clobber (ptx.cuh's *_free): callers order the copy
// against flags with their own acquire, barrier and release.
template <int kDepth, LoadKind kLoad>
__device__ __forceinline__ void warp_copy_v4_batched(int4* __restrict__ dst, const int4* __restrict__ src,
                                                     int num_vec) {
  for (int i = lane_id(); i < num_vec; i += 32 * kDepth) {
    int4 v[kDepth];
#pragma unroll
    for (int u = 0; u < kDepth; ++u)
      if (i + u * 32 < num_vec)
        v[u] = kLoad == LoadKind::kL2 ? ld_cg_v4_free(src + i + u * 32) : ld_nc_v4(src + i + u * 32);
#pragma unroll
    for (int u = 0; u < kDepth; ++u)
      if (i + u * 32 < num_vec) st_na_v4_free(dst + i + u * 32, v[u]);
  }
}

}  // namespace deepep
