// Launch interface of the intranode kernels: plain structs of pointers and sizes, so the .cu files need no
// torch headers (the CPU torch wheel has no CUDA headers) and the torch/pybind glue stays in runtime.cpp.
// All launches are asynchronous on the given stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/error_env.h"
#include "intranode/buffer_layout.h"

namespace deepep::intranode {

struct Peers {
  uint8_t* buffers[kMaxRanks];  // every rank's NVL buffer (queues) as this process sees it (own one included)
  Header* ctrl[kMaxRanks];      // every rank's control block
  size_t region_bytes;          // bytes of NVL buffer reserved for each source rank (num_nvl_bytes / R, 16-aligned)
  int rank;
  int num_ranks;
};

// get_dispatch_layout. The outputs need no initialisation (the counts gather in `work`, see LayoutWork).
// An id outside [-1, E) selects nothing and is reported through the mailbox (kMailboxBadInput, the first one).
struct LayoutArgs {
  ErrorEnv env;
  LayoutWork* work;
  const int64_t* topk_idx;      // [T, K]
  int num_tokens, num_topk, num_experts, num_ranks;
  int* num_tokens_per_rank;     // [R]
  int* num_tokens_per_expert;   // [E]
  bool* is_token_in_rank;       // [T, R]
};
cudaError_t launch_layout(const LayoutArgs& a, cudaStream_t stream);

// Notify step of a non-cached dispatch: per-channel counts, an all-to-all of counts through the NVL
// buffers (a barrier), and the receiver-side matrices of the handle.
struct NotifyArgs {
  Peers peers;
  ErrorEnv env;
  int num_tokens, num_channels, num_local_experts, expert_alignment;
  const int* num_tokens_per_rank;     // [R]
  const int* num_tokens_per_expert;   // [E]
  const bool* is_token_in_rank;       // [T, R]
  int* rank_prefix_matrix;            // [R, R] out
  int* channel_prefix_matrix;         // [R, C] out
  int* recv_channel_prefix_matrix;    // [R, C] out
  int64_t* host_counters;             // device alias of host-mapped [2 + E_loc]: ready, n_recv, per expert;
                                      // nullptr in num_worst_tokens mode (no host sync)
};
cudaError_t launch_notify(const NotifyArgs& a, cudaStream_t stream);

struct DispatchArgs {
  Peers peers;
  ErrorEnv env;
  int num_tokens, num_channels, queue_tokens;
  int num_scales, num_topk, num_local_experts;
  DispatchSlot slot;
  int64_t scale_stride_token, scale_stride_elem;  // in elements (4 bytes)
  const uint8_t* x;                   // [T, row_bytes]
  const int32_t* x_scales;            // [T, S] (float32 or int32 bits), arbitrary strides; may be null
  const int64_t* topk_idx;            // [T, K] global expert ids; may be null
  const float* topk_weights;          // [T, K]; null iff topk_idx null
  const bool* is_token_in_rank;       // [T, R]
  const int* rank_prefix_matrix;      // [R, R]
  const int* recv_channel_prefix_matrix;  // [R, C]
  uint8_t* recv_x;                    // [rows, row_bytes]
  int32_t* recv_scales;               // [rows, S]
  int64_t* recv_topk_idx;             // [rows, K]
  float* recv_topk_weights;           // [rows, K]
  int* recv_src_idx;                  // [rows]; null for a cached dispatch (the handle has it)
  int* send_head;                     // [T, R]; null for a cached dispatch
  int num_rows;                       // rows allocated in the outputs (n_recv, or num_worst_tokens); -1: no
                                      // outputs (their allocation failed): every row is consumed and dropped
  int worst_mode;                     // rows beyond the received count: data, scales, weights 0; ids, src -1
  int phase;                          // 0: the whole dispatch. A fresh dispatch whose sends all fit in the queues
                                      // may run as two launches: 1, the senders push every message (no outputs
                                      // needed: enqueued before the host reads the count); 2, the rest (receivers,
                                      // local copies, the senders' drain), once the outputs are allocated
  // Tuning (runtime.cpp reads them once from the environment; see dispatch.cu's header):
  int local_split;                    // 1: this rank's own tokens are copied half by the sender blocks, half by
                                      //    the receiver blocks; 0: all by the receiver blocks
  int copy_depth;                     // 16-byte loads in flight per lane in row copies: 4 or 8
};
cudaError_t launch_dispatch(const DispatchArgs& a, cudaStream_t stream);

struct CombineArgs {
  Peers peers;
  ErrorEnv env;
  int num_tokens, num_channels, queue_tokens, hidden, num_topk;
  CombineSlot slot;
  const uint16_t* x;                  // [n_rows, H] bf16: the rows this rank received in dispatch
  const float* topk_weights;          // [n_rows, K]; null when num_topk == 0 or n_rows == 0
  const uint16_t* bias0;              // [T, H] bf16; may be null
  const uint16_t* bias1;              // [T, H] bf16; may be null
  const int* rank_prefix_matrix;      // [R, R]
  const int* channel_prefix_matrix;   // [R, C] (dispatch sender side)
  const int* recv_channel_prefix_matrix;  // [R, C]
  const int* send_head;               // [T, R]
  uint16_t* combined_x;               // [T, H] bf16
  float* combined_topk_weights;       // [T, K]; null when num_topk == 0 or T == 0 (test num_topk, not pointers)
  // Tuning (runtime.cpp, from DEEPEP_PLUGIN_COMBINE_SHARE and _SMALL_ROUNDS; combine.cu):
  int share_rounds;                   // 1: a channel's sender block, its sends done, takes reduction rounds too
  int small_rounds;                   // 1: channels of fewer than 32 tokens use 2 or 4 warps per token
};
cudaError_t launch_combine(const CombineArgs& a, cudaStream_t stream);

// Reference copy of the per-SM rate benchmark (copy_probe.cu): `bytes` (a multiple of 16, both pointers 16-byte
// aligned) from src to dst, one contiguous piece per block; mode 0 = bulk-copy engine through shared-memory stages,
// 1 = 16-byte register copies by 32 warps (4 loads in flight per lane), 2 = the same 8 deep, 3 = 16 warps 16 deep.
struct CopyProbeArgs {
  const uint8_t* src;
  uint8_t* dst;
  int64_t bytes;
  int mode;
};
cudaError_t launch_copy_probe(const CopyProbeArgs& a, int blocks, cudaStream_t stream);

}  // namespace deepep::intranode
