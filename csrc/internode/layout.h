// Where everything lives in the internode symmetric (NVSHMEM) buffer, and the record formats. The host glue
// (bindings.cpp) computes the layout from the group and the Buffer's sizes and hands the offsets to the kernels
// (api.h, Env); deepep_plugin/backends/cuda_internode.py asks the extension for it (InternodeLayout).
//
// One allocation per rank, the same on every rank: [flags | stream words | notify rows (recv) | notify rows (put
// staging) | data region | NVL region]. The first five make up num_rdma_bytes, the NVL region num_nvl_bytes:
//   flags         uint64 [kFlagKinds][R]  barrier and notify flags, one word per source rank.
//   stream words  uint64, each indexed by the peer node and the channel:
//     extent   [N][kMaxChannels]     (dispatch, at the forwarder) stream base << 32 | records;
//     progress [N][kMaxChannels]     (dispatch: at the forwarder, per source node; combine: at the source, per
//                                    forwarder node) epoch << 32 | items written;
//     dcons    [N][kMaxChannels][G]  (dispatch, at the sender, per destination node and reader) epoch << 32 | read;
//     ccons    [N][kMaxChannels]     (combine, at the forwarder, per source node) epoch << 32 | partial rows read;
//     ntail    [G][kMaxChannels]     (combine, at the forwarder, per pushing node peer) epoch << 32 | rows pushed;
//     ncons    [G][kMaxChannels]     (combine, at the pusher, per forwarder node peer) epoch << 32 | rows read.
//   notify rows   int32 [R][notify_row_ints], received (one row per source) and, for puts, staged (one per
//                 destination); a row: this rank's token counts to each rank [R], its tokens per local expert of
//                 the destination [kMaxLocalExperts], its inclusive channel prefix to the destination rank
//                 [kMaxChannels] and to the destination's node [kMaxChannels].
//   data region   rings [N][C][slots] of items (dispatch records or combine partial rows), then as many put-staging
//                 slots when some peer is reached with puts.
//   NVL region    combine NVL rings [G][C][nvl_slots] rows.
//
// Dispatch record (bytes, each part a multiple of 16): data | scales | meta int32 [1 + G + 2K]
//   meta: source token, pos[G] (row offset among this source's tokens to each node peer, or -1), topk_idx[K]
//   (global expert ids), topk_weights[K] (float bits).
// Combine row (an NVL ring row or a partial row): BF16 data [align16(2H)] | float32 weights [align16(4K)].
//
// Plain C++ (no CUDA, no torch): the host glue and the kernels both include it.
#pragma once

#include <cstdint>

#include "common/limits.h"

namespace deepep {
namespace internode {

enum FlagKind : int { kFlagBarrier = 0, kFlagNotify = 1 };
constexpr int kFlagKinds = 2;

// Offsets (int32) inside a dispatch record's meta.
constexpr int kMetaToken = 0;
constexpr int kMetaPos = 1;  // pos[G], then topk_idx[K] at kMetaPos + G, topk_weights[K] at kMetaPos + G + K

inline int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

inline int64_t record_bytes(int64_t data_bytes, int num_scales, int num_topk, int ranks_per_node) {
  return align_up(data_bytes, 16) + align_up(4LL * num_scales, 16) +
         align_up(4LL * (kMetaPos + ranks_per_node + 2 * num_topk), 16);
}

inline int64_t combine_row_bytes(int hidden, int num_topk) {
  return align_up(2LL * hidden, 16) + align_up(4LL * num_topk, 16);
}

struct Layout {
  int num_ranks, num_nodes, ranks_per_node;
  int64_t stream_off;                                  // stream words
  int64_t notify_off, notify_stage_off, notify_row_ints;
  int64_t notify_experts_off, notify_gbl_channels_off, notify_rdma_channels_off;  // inside a row (int32)
  int64_t data_off, data_bytes;                        // data region: [data_off, nvl_off)
  int64_t nvl_off, nvl_bytes;                          // NVL region

  // `num_ranks` must be a multiple of `num_nodes` (the glue checks).
  Layout(int r, int n, int64_t num_rdma_bytes, int64_t num_nvl_bytes)
      : num_ranks(r), num_nodes(n), ranks_per_node(r / n) {
    const int64_t g = ranks_per_node;
    notify_experts_off = r;
    notify_gbl_channels_off = notify_experts_off + kMaxLocalExperts;
    notify_rdma_channels_off = notify_gbl_channels_off + kMaxChannels;
    notify_row_ints = align_up(notify_rdma_channels_off + kMaxChannels, 4);
    stream_off = align_up(8LL * kFlagKinds * r, 16);
    // extent, progress, ccons: [N][kMaxChannels]; dcons: [N][kMaxChannels][G]; ntail, ncons: [G][kMaxChannels]
    const int64_t words = (3 + g) * n * kMaxChannels + 2 * g * kMaxChannels;
    notify_off = align_up(stream_off + 8 * words, 256);
    const int64_t notify = align_up(4LL * r * notify_row_ints, 256);
    notify_stage_off = notify_off + notify;
    data_off = notify_stage_off + notify;
    nvl_off = align_up(num_rdma_bytes, 256);
    data_bytes = nvl_off > data_off ? nvl_off - data_off : 0;
    nvl_bytes = num_nvl_bytes;
  }
  // Bytes of the whole allocation.
  int64_t total_bytes() const { return nvl_off + align_up(nvl_bytes, 256); }
  // Put staging of rings of `slots` items for `num_channels` channels.
  int64_t stage_off(int num_channels, int slots, int64_t item_bytes) const {
    return data_off + static_cast<int64_t>(num_nodes) * num_channels * slots * item_bytes;
  }
  // num_rdma_bytes the rings need (their put staging too when some peer is reached with puts).
  int64_t ring_bytes(int num_channels, int slots, int64_t item_bytes, bool has_rdma_peers) const {
    return data_off + (has_rdma_peers ? 2 : 1) * (stage_off(num_channels, slots, item_bytes) - data_off);
  }
  // num_nvl_bytes combine's NVL rings need.
  int64_t nvl_ring_bytes(int num_channels, int nvl_slots, int64_t row_bytes) const {
    return static_cast<int64_t>(ranks_per_node) * num_channels * nvl_slots * row_bytes;
  }
};

}  // namespace internode
}  // namespace deepep
