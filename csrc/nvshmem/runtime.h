// The NVSHMEM layer's host interface: the process's NVSHMEM world, symmetric memory and the host-mapped error
// mailbox. Plain C++ (no CUDA, no torch headers): implemented in runtime.cu, used by the torch glue (bindings.cpp).
//
// NVSHMEM cannot be initialised twice in one process (a second nvshmem_init is undefined behaviour), so the world
// is created once per process and kept: a later runtime of the same (rank, size, device) reuses it, and
// destroying a runtime frees only its symmetric buffer.
#pragma once

#include <cstdint>
#include <string>

#include "common/mailbox.h"

namespace deepep {
namespace nvshmem {

// World (unique-id bootstrap). init_world is collective over the world's ranks.
std::string get_unique_id();
void init_world(int rank, int num_ranks, const std::string& unique_id, int device);
bool world_initialized();
int world_rank();
int world_size();
void barrier_all();
void barrier_on_stream(void* stream);

// Symmetric memory. Both are collective; the allocation is zeroed.
void* symmetric_alloc(int64_t bytes);
void symmetric_free(void* ptr);
// Rank `pe`'s allocation `base` as this process can address it (NVLink P2P or the same GPU), or null when only
// NVSHMEM puts reach it (RDMA).
void* peer_pointer(void* base, int pe);

// The error mailbox: pinned host memory mapped into the device (kernels write it, the host reads it without a
// device synchronisation).
Mailbox* mailbox_alloc();
Mailbox* mailbox_device_alias(Mailbox* host);
void mailbox_free(Mailbox* host);

}  // namespace nvshmem
}  // namespace deepep
