// Reference copies for the per-SM rate benchmark (deepep_plugin/bench/sm_rates.py): `bytes` from src to dst, split
// into equal contiguous pieces, one per block, so that a rate per SM can be read off and set beside the dispatch
// receiver's local copy (the same rows, plus a message stream's bookkeeping). The bulk mode is the ceiling of a
// receiver built on the bulk-copy engine with one issuing thread per SM (an experiment with such receivers, commit
// "Experiment: intranode receivers on the bulk-copy engine", ran 2.2-3x slower than register copies: this mode tells
// whether the engine itself, driven so, is the limit).
//   mode 0 (bulk): lane 0 of each block copies its piece with the bulk-copy engine through kStages shared-memory
//          stages of kSmemBytes in all, kStages - 1 loads in flight (each stage refilled once the bulk store that
//          read it has finished reading).
//   mode 1 (registers): all 32 warps copy 16-byte vectors, kCopyUnroll loads in flight per lane (vec_copy.cuh).
//   mode 2 (registers, depth 8): 32 warps, 8 loads in flight per lane (warp_copy_v4_batched), 64 registers a thread.
//   mode 3 (registers, depth 16): 16 warps, 16 loads in flight per lane: as many bytes in flight per SM as mode 2,
//          half the warps (tells whether the SM's rate follows bytes in flight or warps).
#include <cuda_runtime.h>

#include "common/bulk_copy.cuh"
#include "common/vec_copy.cuh"
#include "intranode/api.h"

namespace deepep::intranode {
namespace {

constexpr int kSmemBytes = 200 * 1024;
constexpr int kStages = 8;
constexpr int kHeaderBytes = 128;  // the stages' mbarriers

// This block's piece [begin, end) of the bytes: equal 16-byte-aligned pieces, one per block.
__device__ __forceinline__ void block_piece(const CopyProbeArgs& a, int64_t& begin, int64_t& end) {
  const int64_t per_block = (a.bytes / gridDim.x + 15) / 16 * 16;
  begin = min(a.bytes, per_block * blockIdx.x);
  end = min(a.bytes, begin + per_block);
}

__global__ void __launch_bounds__(kNumThreads, 1) copy_probe_kernel(CopyProbeArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
  int64_t begin, end;
  block_piece(a, begin, end);
  if (a.mode == 1) {
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    constexpr int64_t kPiece = 32 * 16 * kCopyUnroll;  // one unrolled step of a warp
    for (int64_t off = begin + warp * kPiece; off < end; off += warps * kPiece)
      warp_copy_v4<LoadKind::kNonCoherent>(reinterpret_cast<int4*>(a.dst + off),
                                           reinterpret_cast<const int4*>(a.src + off),
                                           static_cast<int>(min(kPiece, end - off) / 16));
    return;
  }
  if (threadIdx.x != 0) return;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem);
  uint8_t* data = smem + kHeaderBytes;
  const int stage_bytes = (kSmemBytes - kHeaderBytes) / kStages / 16 * 16;
  for (int i = 0; i < kStages; ++i) mbar_init(bars + i);
  mbar_init_fence();
  const uint32_t items = static_cast<uint32_t>((end - begin + stage_bytes - 1) / stage_bytes);
  auto len_of = [&](uint32_t i) {
    return static_cast<uint32_t>(min(static_cast<int64_t>(stage_bytes), end - begin - int64_t{i} * stage_bytes));
  };
  uint32_t issued = 0;
  for (uint32_t done = 0; done < items; ++done) {
    for (; issued < items && issued - done < kStages - 1; ++issued) {
      bulk_wait_read<1>();
      const uint32_t s = issued % kStages;
      mbar_arrive_expect_tx(bars + s, len_of(issued));
      bulk_load(data + s * stage_bytes, a.src + begin + int64_t(issued) * stage_bytes, len_of(issued), bars + s);
    }
    const uint32_t s = done % kStages;
    mbar_wait(bars + s, (done / kStages) & 1u);
    bulk_store(a.dst + begin + int64_t(done) * stage_bytes, data + s * stage_bytes, len_of(done));
    bulk_commit();
  }
  bulk_wait_all();
}

// Modes 2 and 3: kWarps warps copy pieces of one batch each (kDepth vectors per lane) from the block's share.
template <int kDepth, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 1) copy_probe_deep_kernel(CopyProbeArgs a) {
  int64_t begin, end;
  block_piece(a, begin, end);
  const int warp = threadIdx.x / 32;
  constexpr int64_t kPiece = 32 * 16 * kDepth;
  for (int64_t off = begin + warp * kPiece; off < end; off += kWarps * kPiece)
    warp_copy_v4_batched<kDepth, LoadKind::kNonCoherent>(reinterpret_cast<int4*>(a.dst + off),
                                                         reinterpret_cast<const int4*>(a.src + off),
                                                         static_cast<int>(min(kPiece, end - off) / 16));
}

}  // namespace

cudaError_t launch_copy_probe(const CopyProbeArgs& a, int blocks, cudaStream_t stream) {
  if (a.bytes % 16 != 0 || blocks < 1 || a.mode < 0 || a.mode > 3) return cudaErrorInvalidValue;
  if (a.mode == 2) {
    copy_probe_deep_kernel<8, 32><<<blocks, 32 * 32, 0, stream>>>(a);
    return cudaGetLastError();
  }
  if (a.mode == 3) {
    copy_probe_deep_kernel<16, 16><<<blocks, 16 * 32, 0, stream>>>(a);
    return cudaGetLastError();
  }
  const int smem = a.mode == 0 ? kSmemBytes : 0;
  // The shared-memory limit is raised once per device, outside the launches the benchmark times.
  static bool raised[64] = {};
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (device < 0 || device >= 64 || !raised[device]) {
    e = cudaFuncSetAttribute(copy_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (e != cudaSuccess) return e;
    if (device >= 0 && device < 64) raised[device] = true;
  }
  copy_probe_kernel<<<blocks, kNumThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace deepep::intranode
