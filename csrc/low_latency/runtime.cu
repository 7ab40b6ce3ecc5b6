// Host side of the low-latency extension: the NVSHMEM world (unique-id bootstrap), the symmetric buffer and
// the error mailbox. Compiled by nvcc in this module, so that NVSHMEM's init registers this module's device
// state (the kernels of low_latency.cu call NVSHMEM device functions for RDMA peers).
//
// NVSHMEM cannot be initialised twice in one process (its documentation: a second nvshmem_init after the
// first is undefined behaviour), so the world is created once per process and kept: a later runtime of the
// same (rank, size) reuses it, and destroying a runtime frees only its symmetric buffer.

#include "low_latency/cuda_operators.h"  // first: undoes torch's __CUDA_NO_*__ macros

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "low_latency/api.h"

namespace deepep {
namespace ll {
namespace {

struct World {
  bool up = false;
  int rank = -1, size = 0, device = -1;
};
World g_world;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("deepep_plugin low-latency: ") + what + ": " +
                                                 cudaGetErrorString(e));
}

}  // namespace

std::string get_unique_id() {
  nvshmemx_uniqueid_t uid;
  std::memset(&uid, 0, sizeof(uid));
  if (nvshmemx_get_uniqueid(&uid) != 0) throw std::runtime_error("deepep_plugin low-latency: nvshmemx_get_uniqueid failed");
  return std::string(reinterpret_cast<const char*>(&uid), sizeof(uid));
}

void init_world(int rank, int num_ranks, const std::string& unique_id, int device) {
  if (g_world.up) {
    if (g_world.rank == rank && g_world.size == num_ranks && g_world.device == device) return;
    throw std::runtime_error(
        "deepep_plugin low-latency: this process already joined an NVSHMEM world as rank " +
        std::to_string(g_world.rank) + " of " + std::to_string(g_world.size) + " on device " +
        std::to_string(g_world.device) + "; NVSHMEM cannot be re-initialised in one process, so every low-latency "
        "Buffer of a process must use the same rank, group size and device");
  }
  if (unique_id.size() != sizeof(nvshmemx_uniqueid_t))
    throw std::runtime_error("deepep_plugin low-latency: malformed NVSHMEM unique id");
  check(cudaSetDevice(device), "cudaSetDevice");
  nvshmemx_uniqueid_t uid;
  std::memcpy(&uid, unique_id.data(), sizeof(uid));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &uid, &attr) != 0)
    throw std::runtime_error("deepep_plugin low-latency: nvshmemx_set_attr_uniqueid_args failed");
  if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0)
    throw std::runtime_error("deepep_plugin low-latency: nvshmemx_init_attr failed");
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks)
    throw std::runtime_error("deepep_plugin low-latency: NVSHMEM PE numbering differs from the process group");
  g_world = World{true, rank, num_ranks, device};
}

bool world_initialized() { return g_world.up; }
int world_rank() { return g_world.rank; }
int world_size() { return g_world.size; }

uintptr_t symmetric_alloc(int64_t bytes) {
  void* p = nvshmem_malloc(static_cast<size_t>(bytes));
  if (p == nullptr)
    throw std::runtime_error("deepep_plugin low-latency: nvshmem_malloc of " + std::to_string(bytes) +
                             " bytes failed (NVSHMEM_SYMMETRIC_SIZE too small, or out of GPU memory)");
  check(cudaMemset(p, 0, static_cast<size_t>(bytes)), "cudaMemset of the symmetric buffer");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  nvshmem_barrier_all();
  return reinterpret_cast<uintptr_t>(p);
}

void symmetric_free(uintptr_t ptr) {
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  nvshmem_barrier_all();
  nvshmem_free(reinterpret_cast<void*>(ptr));
}

std::vector<uintptr_t> peer_bases(uintptr_t base, int num_ranks) {
  std::vector<uintptr_t> out(num_ranks);
  for (int j = 0; j < num_ranks; ++j)
    out[j] = reinterpret_cast<uintptr_t>(nvshmem_ptr(reinterpret_cast<void*>(base), j));
  return out;
}

void barrier_all() { nvshmem_barrier_all(); }

void barrier_on_stream(void* stream) { nvshmemx_barrier_all_on_stream(static_cast<cudaStream_t>(stream)); }

void finalize_world() {
  if (!g_world.up) return;
  nvshmem_finalize();
  g_world = World{};
}

uintptr_t mailbox_alloc() {
  void* p = nullptr;
  check(cudaHostAlloc(&p, sizeof(Mailbox), cudaHostAllocMapped), "cudaHostAlloc of the mailbox");
  std::memset(p, 0, sizeof(Mailbox));
  return reinterpret_cast<uintptr_t>(p);
}

uintptr_t mailbox_device_ptr(uintptr_t host) {
  void* d = nullptr;
  check(cudaHostGetDevicePointer(&d, reinterpret_cast<void*>(host), 0), "cudaHostGetDevicePointer");
  return reinterpret_cast<uintptr_t>(d);
}

void mailbox_free(uintptr_t host) { check(cudaFreeHost(reinterpret_cast<void*>(host)), "cudaFreeHost"); }

}  // namespace ll
}  // namespace deepep
