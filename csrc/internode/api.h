// Internode normal dispatch/combine (EP groups spanning several nodes): kernel parameters and host entry points.
// Plain C++ (no CUDA, no torch headers). The torch glue is bindings.cpp, registered into the NVSHMEM layer's
// extension deepep_plugin._nvshmem_C (csrc/nvshmem), whose world these kernels share with the low-latency ones.
//
// The design (deepep_plugin/backends/cuda_internode.py has the host side and the user-facing description):
//   R ranks = N nodes x G local ranks (G <= kMaxNvlPeers, N <= kMaxNodes); rank r is node r / G, local index
//   r % G. One NVSHMEM symmetric buffer per rank, laid out as layout.h says. The data region holds fixed rings:
//   one per (peer node, channel) stream, `slots` items each (Config.num_max_rdma_chunked_recv_tokens), followed
//   by as many put-staging slots when some peer is reached with puts. Item i of a stream lives in slot i % slots;
//   producers wait for the consumers' published consumption before reusing a slot, so any batch size runs in the
//   same fixed buffer.
//   dispatch: (notify: every rank sends every rank one row of counts; doubles as the op's barrier)
//             one kernel, two roles, C = num_sms / 2 blocks each (the overlap of the two hops):
//             senders:   block c takes channel c (a contiguous token range); each token goes ONCE per destination
//                        node, as one record, to the rank of that node with this rank's local index (the
//                        "forwarder"): its ring [source node][c]. P2P stores where NVSHMEM maps the peer, else
//                        local staging and one put per chunk of records (RDMA). Each stream publishes its extent
//                        once and its progress every `chunk` records; before reusing a slot the sender waits
//                        until all G readers of the destination node have consumed that record.
//             receivers: every rank pulls, over NVLink from the G forwarders of its node, round-robin over its
//                        streams as their progress words advance, the records that list it, straight into its
//                        outputs at rows fixed by the source (no atomics, no reorder), and publishes how far it
//                        has read back to the sender. Reading its own forwarder's streams, a rank also writes
//                        the handle's send_nvl_head rows (fresh dispatch).
//   combine: (barrier) one kernel, C forwarder blocks and C receiver blocks:
//             pushers (8 warps of each forwarder block): warp l pushes, over NVLink, this rank's expert-output rows
//                         that came through node peer l (sources with local index l) in channel c, in order,
//                         into l's NVL ring [my local index][c] (Config.num_max_nvl_chunked_recv_tokens rows),
//                         publishing its tail every num_max_nvl_chunked_send_tokens rows; a slot is reused once
//                         l has consumed it;
//             forwarders (the other 8 warps): source node by source node, in record order, the sum of the node
//                         peers' rows from the local NVL rings (FP32, rounded once to BF16), sent back to the
//                         source as one partial row per record into its ring [my node][c] (P2P stores, or one
//                         put per chunk), with the stream's progress every `chunk` records; a slot is reused once
//                         the source consumed it;
//             receivers:  each source adds bias and its <= N partial rows per token as they arrive, and
//                         publishes its consumption to each forwarder after every 16 tokens.
// Every wait is bounded (common/wait.cuh) and reports {rank, peer, what} through the mailbox.
#pragma once

#include <cstdint>

#include "common/mailbox.h"
#include "internode/layout.h"

namespace deepep {
namespace internode {

// Wait codes (kWaitBarrier ... kWaitNvlSpace) are in common/limits.h; the buffer layout and record formats in
// layout.h.

struct Env {
  int rank, num_ranks, ranks_per_node, num_nodes;
  int has_rdma_peers;           // some peer is reached with NVSHMEM puts (its pointer in `peers` is null)
  uint8_t* buffer;              // this rank's symmetric buffer
  uint8_t* const* peers;        // device array [R]: each rank's buffer mapped here, or null (puts)
  int64_t* epoch;               // device int64 [1]: operations so far (advanced by the barrier/notify kernel)
  int* abort_flag;              // device int32: set once any wait of this rank timed out
  Mailbox* mailbox;             // device alias of the host-mapped mailbox
  uint64_t timeout_ns;
  // Buffer geometry (the same on every rank; from Layout, layout.h).
  int64_t stream_off;                     // stream words
  int64_t notify_off, notify_stage_off, notify_row_ints;
  int64_t data_off, stage_off;            // rings [N][C][slots] items at data_off; put staging alike at stage_off
  int slots;                              // ring slots per stream (items of the current op's size)
  int64_t nvl_off;                        // combine NVL rings [G][C][nvl_slots] rows at nvl_off
};

struct NotifyArgs {
  Env env;
  const int* payload;           // [R][P] int32: the row for each destination
  int* received;                // [R][P] int32: the row from each source
};

struct DispatchArgs {
  Env env;
  // Record format: layout.h (record_bytes).
  int64_t rec_bytes, data_bytes, scale_bytes;
  int num_tokens, num_topk, num_scales, scale_stride_token, scale_stride_col;
  const uint8_t* x;             // [T, data_bytes]
  const uint8_t* x_scales;      // [T, S] 4-byte elements with the strides above, or null
  const int64_t* topk_idx;      // [T, K] or null
  const float* topk_weights;    // [T, K] or null
  const int* pos;               // [T, R] int32: row offset among this rank's tokens to rank r, or -1
  const int* node_slot;         // [T, N] int32: index of the token among this rank's records to node n, or -1
                                //   (send_rdma_head)
  const int* rdma_channel_prefix;  // [N, C] int32: inclusive prefix over channels of the records to node n
  int num_channels;             // C: sender blocks = receiver blocks = C
  int chunk;                    // records per progress update (Config.num_max_rdma_chunked_send_tokens)
  // Forwarder bookkeeping (fresh dispatch): send_nvl_head [head_rows, G] (prefilled with -1 by the host).
  const int* head_base;         // [N, G] int32: first output row of source (n, my local index) at node peer g
  const int* recv_rdma_rank_prefix;  // [N] int32: inclusive prefix of the records this rank forwards per node
  int* send_nvl_head;           // [head_rows, G] int32, or null (cached dispatch)
  int64_t head_rows;
  // Receiver.
  const int* recv_base;         // [R] int32: first output row of each source rank
  int64_t out_rows;             // rows of the outputs (overflow check in num_worst_tokens mode)
  int num_local_experts;
  uint8_t* recv_x;              // [rows, data_bytes]
  uint8_t* recv_scales;         // [rows, S] 4-byte elements, or null
  int64_t* recv_topk_idx;       // [rows, K] local expert ids or -1, or null
  float* recv_topk_weights;     // [rows, K], or null
  int* recv_src_meta;           // [rows, 2] int32 (source token, source rank), or null
};

struct CombineArgs {
  Env env;
  int64_t row_bytes;            // align16(2H) + align16(4K): one NVL row or partial row
  int hidden, num_topk, num_tokens;
  const uint16_t* x;            // [rows, H] bf16: this rank's expert outputs (the dispatch's received rows)
  const float* topk_weights;    // [rows, K] or null
  int num_channels;             // C of the dispatch that made the handle: C forwarder + C receiver blocks
  int chunk;                    // partial rows per progress update (Config.num_max_rdma_chunked_send_tokens)
  int nvl_slots, nvl_chunk;     // NVL ring rows and rows per tail update (Config's NVL recv / send chunk)
  const int* recv_gbl_channel_prefix;    // [R, C] first row of (source, channel) in x (pusher)
  const int* recv_gbl_rank_prefix_sum;   // [R] inclusive rows per source (pusher)
  const int* send_nvl_head;     // [head_rows, G] (forwarder)
  const int* recv_rdma_rank_prefix_sum;  // [N] inclusive record counts per source node (forwarder)
  const int* recv_rdma_channel_prefix;   // [N, C] inclusive per-channel record counts per source node (forwarder)
  const int* send_rdma_head;    // [T, N] (source)
  const int* rdma_channel_prefix;        // [N, C] inclusive per-channel records this rank sent to node n (source)
  const uint16_t* bias0;        // [T, H] or null
  const uint16_t* bias1;        // [T, H] or null
  uint16_t* combined_x;         // [T, H]
  float* combined_topk_weights; // [T, K] or null
};

void barrier(const Env& env, void* stream);
void notify(const NotifyArgs& a, void* stream);
void dispatch(const DispatchArgs& a, void* stream);  // 2 * num_channels blocks
void combine(const CombineArgs& a, void* stream);  // 2 * num_channels blocks

}  // namespace internode
}  // namespace deepep
