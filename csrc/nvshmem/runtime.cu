// Host side of the NVSHMEM layer (runtime.h): the world, symmetric memory and the mailbox. Compiled by nvcc into
// the same relocatable-device-code module as the kernels, so that NVSHMEM's init registers that module's device
// state (the low-latency and internode kernels call NVSHMEM device functions for RDMA peers).

#include "nvshmem/cuda_operators.h"  // first: undoes torch's __CUDA_NO_*__ macros

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "nvshmem/runtime.h"

namespace deepep {
namespace nvshmem {
namespace {

struct World {
  bool up = false;
  int rank = -1, size = 0, device = -1;
};
World g_world;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("deepep_plugin NVSHMEM: ") + what + ": " +
                                                 cudaGetErrorString(e));
}

}  // namespace

std::string get_unique_id() {
  nvshmemx_uniqueid_t uid;
  std::memset(&uid, 0, sizeof(uid));
  if (nvshmemx_get_uniqueid(&uid) != 0) throw std::runtime_error("deepep_plugin NVSHMEM: nvshmemx_get_uniqueid failed");
  return std::string(reinterpret_cast<const char*>(&uid), sizeof(uid));
}

void init_world(int rank, int num_ranks, const std::string& unique_id, int device) {
  if (g_world.up) {
    if (g_world.rank == rank && g_world.size == num_ranks && g_world.device == device) return;
    throw std::runtime_error(
        "deepep_plugin NVSHMEM: this process already joined an NVSHMEM world as rank " +
        std::to_string(g_world.rank) + " of " + std::to_string(g_world.size) + " on device " +
        std::to_string(g_world.device) + "; NVSHMEM cannot be re-initialised in one process, so every "
        "NVSHMEM-backed Buffer of a process must use the same rank, group size and device");
  }
  if (unique_id.size() != sizeof(nvshmemx_uniqueid_t))
    throw std::runtime_error("deepep_plugin NVSHMEM: malformed NVSHMEM unique id");
  check(cudaSetDevice(device), "cudaSetDevice");
  nvshmemx_uniqueid_t uid;
  std::memcpy(&uid, unique_id.data(), sizeof(uid));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &uid, &attr) != 0)
    throw std::runtime_error("deepep_plugin NVSHMEM: nvshmemx_set_attr_uniqueid_args failed");
  if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0)
    throw std::runtime_error("deepep_plugin NVSHMEM: nvshmemx_init_attr failed");
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks)
    throw std::runtime_error("deepep_plugin NVSHMEM: NVSHMEM PE numbering differs from the process group");
  g_world = World{true, rank, num_ranks, device};
}

bool world_initialized() { return g_world.up; }
int world_rank() { return g_world.rank; }
int world_size() { return g_world.size; }

void barrier_all() { nvshmem_barrier_all(); }

void barrier_on_stream(void* stream) { nvshmemx_barrier_all_on_stream(static_cast<cudaStream_t>(stream)); }

void* symmetric_alloc(int64_t bytes) {
  void* p = nvshmem_malloc(static_cast<size_t>(bytes));
  if (p == nullptr)
    throw std::runtime_error("deepep_plugin NVSHMEM: nvshmem_malloc of " + std::to_string(bytes) +
                             " bytes failed (NVSHMEM_SYMMETRIC_SIZE too small, or out of GPU memory)");
  check(cudaMemset(p, 0, static_cast<size_t>(bytes)), "cudaMemset of the symmetric buffer");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  nvshmem_barrier_all();
  return p;
}

void symmetric_free(void* ptr) {
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  nvshmem_barrier_all();
  nvshmem_free(ptr);
}

void* peer_pointer(void* base, int pe) { return nvshmem_ptr(base, pe); }

Mailbox* mailbox_alloc() {
  void* p = nullptr;
  check(cudaHostAlloc(&p, sizeof(Mailbox), cudaHostAllocMapped), "cudaHostAlloc of the mailbox");
  std::memset(p, 0, sizeof(Mailbox));
  return static_cast<Mailbox*>(p);
}

Mailbox* mailbox_device_alias(Mailbox* host) {
  void* d = nullptr;
  check(cudaHostGetDevicePointer(&d, host, 0), "cudaHostGetDevicePointer");
  return static_cast<Mailbox*>(d);
}

void mailbox_free(Mailbox* host) { check(cudaFreeHost(host), "cudaFreeHost"); }

}  // namespace nvshmem
}  // namespace deepep
