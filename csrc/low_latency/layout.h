// Where everything lives in the low-latency symmetric (NVSHMEM) buffer, and the wire formats.
//
// One buffer per rank, the same size on every rank. Two parities (each low-latency call toggles), each with
// three regions; the whole is `[signal0 | signal1 | send0 | send1 | recv0 | recv1]`:
//
//   signal[p]  int32 [R]      one word per source rank. Dispatch: the source writes (messages + 1) once all its
//                             messages to us are out. Combine: every source block adds the rows it sent to us.
//                             The receiving kernel resets the words to 0 once every block has read them.
//   send[p]    bytes          combine: the zero-copy staging area, BF16 [E_loc, R*N, H] with a row stride of
//                             Mc = 2H + 4*H/128 bytes (DeepEP's) rounded up to 16, exposed by
//                             get_next_low_latency_combine_buffer;
//                             dispatch: staging of messages for peers that NVSHMEM cannot map (RDMA).
//   recv[p]    bytes          dispatch: counts [R][E_loc] int32 (only when E_loc >= 2), then messages [R][N] of Md
//                             bytes each (source-major: one region per source rank, slot = the token's index
//                             among that source's tokens for us, in token order);
//                             combine: rows [N][Kc] of 2H bytes (token t's q-th distinct expert at slot t*Kc+q).
//                             Dispatch and combine of one parity share it (as in DeepEP).
//
// Dispatch message: a header of min(16, E_loc) 8-byte entries (rounded up to 16 bytes), then the payload:
// BF16 [H], or FP8 [H] followed by float32 scales [H/128]. One message per (token, destination RANK): the
// header lists the local experts of that rank the token selected, and the receiver fans the payload out.
//   entry bits  0..15  source token index t
//              16..31  local expert i on the receiver
//              32..47  row of the token inside (expert i, this source)'s block
//              48..55  q: the position of this expert among the token's distinct experts (its combine slot)
//              56..63  number of entries of this message (same in every entry)
//
// Plain C++ (no CUDA, no torch): the host runtime and the kernels both include it.
#pragma once

#include <cstdint>

#include "common/limits.h"

namespace deepep {
namespace ll {

constexpr int kMaxTopk = kMaxTopkLowLatency;
constexpr int kMaxEntries = kMaxLowLatencyEntries;  // entries of one message header: distinct local experts of one token

inline int64_t align16(int64_t x) { return (x + 15) / 16 * 16; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

struct Layout {
  // geometry
  int num_ranks, num_experts, num_local_experts, hidden, num_max_tokens, combine_slots_per_token;
  // derived sizes (bytes)
  int64_t header_bytes, msg_bytes, combine_row_bytes, combine_send_row_bytes, count_bytes;
  int64_t signal_bytes, send_bytes, recv_bytes;

  Layout(int r, int e, int h, int n) : num_ranks(r), num_experts(e), hidden(h), num_max_tokens(n) {
    num_local_experts = e / r;
    combine_slots_per_token = e < kMaxTopk ? e : kMaxTopk;
    const int entries = num_local_experts < kMaxEntries ? num_local_experts : kMaxEntries;
    header_bytes = align16(8LL * entries);
    msg_bytes = header_bytes + 2LL * h;  // the BF16 payload is the larger one (FP8: H + H/32)
    combine_row_bytes = 2LL * h;
    // DeepEP's 2H + 4 * H/128 bytes, rounded up to 16 so that every row starts on a vector (it already is for
    // H % 512 == 0, DeepEP's hidden sizes; other H would read misaligned int4 vectors).
    combine_send_row_bytes = align16(2LL * h + 4LL * (h / kFp8Group));
    count_bytes = num_local_experts >= 2 ? align16(4LL * e) : 0;
    signal_bytes = align16(4LL * r);
    send_bytes = max64(static_cast<int64_t>(n) * msg_bytes,
                       static_cast<int64_t>(e) * n * combine_send_row_bytes);
    recv_bytes = max64(count_bytes + static_cast<int64_t>(r) * n * msg_bytes,
                       static_cast<int64_t>(n) * combine_slots_per_token * combine_row_bytes);
  }
  int64_t total_bytes() const { return 2 * (signal_bytes + send_bytes + recv_bytes); }
  int64_t signal_offset(int p) const { return p * signal_bytes; }
  int64_t send_offset(int p) const { return 2 * signal_bytes + p * send_bytes; }
  int64_t recv_offset(int p) const { return 2 * signal_bytes + 2 * send_bytes + p * recv_bytes; }
};

}  // namespace ll
}  // namespace deepep
