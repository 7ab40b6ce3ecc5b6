// Grid-level helpers shared by the NVSHMEM kernels (low-latency and internode).
#pragma once

namespace deepep {

// Grid-completion counter: returns true in exactly one block, the last one to arrive (which resets the counter to
// zero for the next launch). Every thread of every block must call it; `flag_smem` is a shared int.
__device__ __forceinline__ bool last_block(int* counter, int* flag_smem) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const int prev = atomicAdd(counter, 1);
    const bool last = prev == static_cast<int>(gridDim.x) - 1;
    if (last) {
      __threadfence();
      *counter = 0;
    }
    *flag_smem = last;
  }
  __syncthreads();
  return *flag_smem != 0;
}

// Largest index i in [0, n) with prefix[i] <= value (prefix non-decreasing, prefix[0] = 0): the group that holds
// item `value` of a concatenation whose exclusive group starts are `prefix` (empty groups are skipped).
__device__ __forceinline__ int upper_index(const int* prefix, int n, int value) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (prefix[mid] <= value) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// One thread: turn v[0..n) into its exclusive prefix sums in place and store the total in v[n].
__device__ __forceinline__ void exclusive_prefix_in_place(int* v, int n) {
  int run = 0;
  for (int i = 0; i < n; ++i) {
    const int x = v[i];
    v[i] = run;
    run += x;
  }
  v[n] = run;
}

}  // namespace deepep
