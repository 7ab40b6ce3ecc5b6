// The low-latency kernels' C++ interface: kernel parameters (plain structs the torch glue, bindings.cpp, fills
// from tensors) and the launchers of low_latency.cu. Plain C++ (no CUDA, no torch headers). NVSHMEM start-up,
// the symmetric buffer and the mailbox are the NVSHMEM layer's (csrc/nvshmem).
#pragma once

#include <cstdint>

#include "common/mailbox.h"

namespace deepep {
namespace ll {

// Wait codes (kWaitLL*) are in common/limits.h.

// Blocks of one low-latency launch at most (num_sms; the parity guard keeps one word per block).
constexpr int kMaxGrid = 256;
// int32 words of the workspace: grid-completion counters (low_latency.cu's kWs*, zero between launches), then the
// parity guard's words (one per block, kWsGuard + b). All zero at creation and after clean_low_latency_buffer.
constexpr int kGuardOffset = 8;
constexpr int kWorkspaceInts = kGuardOffset + kMaxGrid;

// Geometry of one call, with the byte offsets of the parity it uses (from Layout, layout.h).
struct Geometry {
  int num_ranks, num_experts, num_local_experts, hidden, num_max_tokens, combine_slots_per_token;
  int64_t header_bytes, msg_bytes, combine_send_row_bytes, count_bytes;
  int64_t signal_offset, send_offset, recv_offset;
};

// What every kernel needs to reach the buffers and report errors.
struct Env {
  int rank;
  int parity;                // buffer half of this call (0 or 1): the host's toggle, checked by the parity guard
  int has_rdma_peers;        // some peer is not mapped (no P2P): the kernels use NVSHMEM puts for it
  uint8_t* buffer;           // this rank's symmetric buffer
  uint8_t* const* peers;     // device array [R]: each rank's buffer mapped here (P2P), or null (RDMA)
  int* workspace;            // device int32 [kWorkspaceInts]: grid-completion counters and the parity guard
  int* abort_flag;           // device int32: set once any wait of this rank timed out
  Mailbox* mailbox;          // device alias of the host-mapped mailbox
  uint64_t timeout_ns;
  Geometry geo;
};

struct DispatchArgs {
  Env env;
  const void* x;                 // bf16 [T, H]
  const int64_t* topk_idx;       // [T, K]
  int num_tokens, num_topk;
  int use_fp8, round_scale, use_ue8m0;
  void* recv_x;                  // [E_loc, R*N, H] fp8 or bf16
  void* recv_scales;             // fp32 [E_loc, S, R*N] or int32 [E_loc, ceil(S/4), R*N]; null without FP8
  int* recv_count;               // [E_loc]
  int* src_info;                 // [E_loc, R*N]
  int* slot_info;                // [E_loc, R*N]: combine slot q of each row
  int64_t* layout_range;         // [E_loc, R]
  int* cumulative_stats;         // [E_loc] or null
  int64_t* wait_stats;           // [R] or null
};

struct CombineArgs {
  Env env;
  const void* x;                 // bf16 [E_loc, R*N, H] (ignored with zero_copy)
  const int* src_info;           // [E_loc, R*N]
  const int* slot_info;          // [E_loc, R*N]
  const int64_t* layout_range;   // [E_loc, R]
  const int64_t* topk_idx;       // [T, K]
  const float* topk_weights;     // [T, K]
  int num_tokens, num_topk;
  int zero_copy;
  void* out;                     // bf16 [T, H]
  int64_t* wait_stats;           // [R] or null
};

// low_latency.cu
void dispatch_send(const DispatchArgs& a, int num_sms, void* stream);
void dispatch_recv(const DispatchArgs& a, int num_sms, void* stream);
void combine_send(const CombineArgs& a, int num_sms, void* stream);
void combine_recv(const CombineArgs& a, int num_sms, void* stream);
int64_t max_dispatch_smem_experts();  // largest E the kernels' shared memory holds

}  // namespace ll
}  // namespace deepep
