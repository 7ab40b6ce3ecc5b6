// pybind11 module deepep_plugin._low_latency_C: the NVSHMEM world, the symmetric buffer, the mailbox and the
// four kernel launches. Tensors cross as raw device addresses (ints) filled in by
// deepep_plugin/backends/cuda_low_latency.py, which owns the shapes, dtypes and lifetimes; no torch headers.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "internode/api.h"
#include "low_latency/api.h"
#include "low_latency/layout.h"

namespace py = pybind11;
using namespace deepep;
using namespace deepep::ll;

namespace {

template <typename T>
T* ptr(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw std::runtime_error(std::string("_low_latency_C: missing argument ") + key);
  py::object v = d[key];
  if (v.is_none()) return nullptr;
  return reinterpret_cast<T*>(v.cast<uintptr_t>());
}

int64_t num(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw std::runtime_error(std::string("_low_latency_C: missing argument ") + key);
  return d[key].cast<int64_t>();
}

Env make_env(const py::dict& d) {
  const Layout l(static_cast<int>(num(d, "num_ranks")), static_cast<int>(num(d, "num_experts")),
                 static_cast<int>(num(d, "hidden")), static_cast<int>(num(d, "num_max_tokens")));
  const int parity = static_cast<int>(num(d, "parity"));
  Env env{};
  env.rank = static_cast<int>(num(d, "rank"));
  env.has_rdma_peers = static_cast<int>(num(d, "has_rdma_peers"));
  env.buffer = ptr<uint8_t>(d, "buffer");
  env.peers = ptr<uint8_t* const>(d, "peers");
  env.workspace = ptr<int>(d, "workspace");
  env.abort_flag = ptr<int>(d, "abort_flag");
  env.mailbox = ptr<Mailbox>(d, "mailbox");
  env.timeout_ns = static_cast<uint64_t>(num(d, "timeout_ns"));
  Geometry& g = env.geo;
  g.num_ranks = l.num_ranks;
  g.num_experts = l.num_experts;
  g.num_local_experts = l.num_local_experts;
  g.hidden = l.hidden;
  g.num_max_tokens = l.num_max_tokens;
  g.combine_slots_per_token = l.combine_slots_per_token;
  g.header_bytes = l.header_bytes;
  g.msg_bytes = l.msg_bytes;
  g.combine_send_row_bytes = l.combine_send_row_bytes;
  g.count_bytes = l.count_bytes;
  g.signal_offset = l.signal_offset(parity);
  g.send_offset = l.send_offset(parity);
  g.recv_offset = l.recv_offset(parity);
  return env;
}

DispatchArgs make_dispatch(const py::dict& d) {
  DispatchArgs a{};
  a.env = make_env(d);
  a.x = ptr<const void>(d, "x");
  a.topk_idx = ptr<const int64_t>(d, "topk_idx");
  a.num_tokens = static_cast<int>(num(d, "num_tokens"));
  a.num_topk = static_cast<int>(num(d, "num_topk"));
  a.use_fp8 = static_cast<int>(num(d, "use_fp8"));
  a.round_scale = static_cast<int>(num(d, "round_scale"));
  a.use_ue8m0 = static_cast<int>(num(d, "use_ue8m0"));
  a.recv_x = ptr<void>(d, "recv_x");
  a.recv_scales = ptr<void>(d, "recv_scales");
  a.recv_count = ptr<int>(d, "recv_count");
  a.src_info = ptr<int>(d, "src_info");
  a.slot_info = ptr<int>(d, "slot_info");
  a.layout_range = ptr<int64_t>(d, "layout_range");
  a.cumulative_stats = ptr<int>(d, "cumulative_stats");
  a.wait_stats = ptr<int64_t>(d, "wait_stats");
  return a;
}

CombineArgs make_combine(const py::dict& d) {
  CombineArgs a{};
  a.env = make_env(d);
  a.x = ptr<const void>(d, "x");
  a.src_info = ptr<const int>(d, "src_info");
  a.slot_info = ptr<const int>(d, "slot_info");
  a.layout_range = ptr<const int64_t>(d, "layout_range");
  a.topk_idx = ptr<const int64_t>(d, "topk_idx");
  a.topk_weights = ptr<const float>(d, "topk_weights");
  a.num_tokens = static_cast<int>(num(d, "num_tokens"));
  a.num_topk = static_cast<int>(num(d, "num_topk"));
  a.zero_copy = static_cast<int>(num(d, "zero_copy"));
  a.out = ptr<void>(d, "out");
  a.wait_stats = ptr<int64_t>(d, "wait_stats");
  return a;
}

internode::Env make_internode_env(const py::dict& d) {
  internode::Env env{};
  env.rank = static_cast<int>(num(d, "rank"));
  env.num_ranks = static_cast<int>(num(d, "num_ranks"));
  env.ranks_per_node = static_cast<int>(num(d, "ranks_per_node"));
  env.num_nodes = static_cast<int>(num(d, "num_nodes"));
  env.has_rdma_peers = static_cast<int>(num(d, "has_rdma_peers"));
  env.buffer = ptr<uint8_t>(d, "buffer");
  env.peers = ptr<uint8_t* const>(d, "peers");
  env.epoch = ptr<int64_t>(d, "epoch");
  env.abort_flag = ptr<int>(d, "abort_flag");
  env.mailbox = ptr<Mailbox>(d, "mailbox");
  env.timeout_ns = static_cast<uint64_t>(num(d, "timeout_ns"));
  env.stream_off = num(d, "stream_off");
  env.notify_off = num(d, "notify_off");
  env.notify_stage_off = num(d, "notify_stage_off");
  env.notify_row_ints = num(d, "notify_row_ints");
  env.data_off = num(d, "data_off");
  env.stage_off = num(d, "stage_off");
  env.slots = static_cast<int>(num(d, "slots"));
  env.nvl_off = num(d, "nvl_off");
  return env;
}

internode::DispatchArgs make_internode_dispatch(const py::dict& d) {
  internode::DispatchArgs a{};
  a.env = make_internode_env(d);
  a.rec_bytes = num(d, "rec_bytes");
  a.data_bytes = num(d, "data_bytes");
  a.scale_bytes = num(d, "scale_bytes");
  a.num_tokens = static_cast<int>(num(d, "num_tokens"));
  a.num_topk = static_cast<int>(num(d, "num_topk"));
  a.num_scales = static_cast<int>(num(d, "num_scales"));
  a.scale_stride_token = static_cast<int>(num(d, "scale_stride_token"));
  a.scale_stride_col = static_cast<int>(num(d, "scale_stride_col"));
  a.x = ptr<const uint8_t>(d, "x");
  a.x_scales = ptr<const uint8_t>(d, "x_scales");
  a.topk_idx = ptr<const int64_t>(d, "topk_idx");
  a.topk_weights = ptr<const float>(d, "topk_weights");
  a.pos = ptr<const int>(d, "pos");
  a.node_slot = ptr<const int>(d, "node_slot");
  a.rdma_channel_prefix = ptr<const int>(d, "rdma_channel_prefix");
  a.num_channels = static_cast<int>(num(d, "num_channels"));
  a.chunk = static_cast<int>(num(d, "chunk"));
  a.head_base = ptr<const int>(d, "head_base");
  a.recv_rdma_rank_prefix = ptr<const int>(d, "recv_rdma_rank_prefix");
  a.send_nvl_head = ptr<int>(d, "send_nvl_head");
  a.head_rows = num(d, "head_rows");
  a.recv_base = ptr<const int>(d, "recv_base");
  a.out_rows = num(d, "out_rows");
  a.num_local_experts = static_cast<int>(num(d, "num_local_experts"));
  a.recv_x = ptr<uint8_t>(d, "recv_x");
  a.recv_scales = ptr<uint8_t>(d, "recv_scales");
  a.recv_topk_idx = ptr<int64_t>(d, "recv_topk_idx");
  a.recv_topk_weights = ptr<float>(d, "recv_topk_weights");
  a.recv_src_meta = ptr<int>(d, "recv_src_meta");
  return a;
}

internode::CombineArgs make_internode_combine(const py::dict& d) {
  internode::CombineArgs a{};
  a.env = make_internode_env(d);
  a.row_bytes = num(d, "row_bytes");
  a.hidden = static_cast<int>(num(d, "hidden"));
  a.num_topk = static_cast<int>(num(d, "num_topk"));
  a.num_tokens = static_cast<int>(num(d, "num_tokens"));
  a.x = ptr<const uint16_t>(d, "x");
  a.topk_weights = ptr<const float>(d, "topk_weights");
  a.num_channels = static_cast<int>(num(d, "num_channels"));
  a.chunk = static_cast<int>(num(d, "chunk"));
  a.nvl_slots = static_cast<int>(num(d, "nvl_slots"));
  a.nvl_chunk = static_cast<int>(num(d, "nvl_chunk"));
  a.recv_gbl_channel_prefix = ptr<const int>(d, "recv_gbl_channel_prefix");
  a.recv_gbl_rank_prefix_sum = ptr<const int>(d, "recv_gbl_rank_prefix_sum");
  a.send_nvl_head = ptr<const int>(d, "send_nvl_head");
  a.recv_rdma_rank_prefix_sum = ptr<const int>(d, "recv_rdma_rank_prefix_sum");
  a.recv_rdma_channel_prefix = ptr<const int>(d, "recv_rdma_channel_prefix");
  a.send_rdma_head = ptr<const int>(d, "send_rdma_head");
  a.rdma_channel_prefix = ptr<const int>(d, "rdma_channel_prefix");
  a.bias0 = ptr<const uint16_t>(d, "bias0");
  a.bias1 = ptr<const uint16_t>(d, "bias1");
  a.combined_x = ptr<uint16_t>(d, "combined_x");
  a.combined_topk_weights = ptr<float>(d, "combined_topk_weights");
  return a;
}

void* stream_of(const py::dict& d) { return reinterpret_cast<void*>(static_cast<uintptr_t>(num(d, "stream"))); }

}  // namespace

PYBIND11_MODULE(_low_latency_C, m) {
  m.doc() = "deepep_plugin low-latency kernels over NVSHMEM (use deepep_plugin.Buffer)";

  m.def("layout_bytes", [](int num_ranks, int num_experts, int hidden, int num_max_tokens) {
    const Layout l(num_ranks, num_experts, hidden, num_max_tokens);
    py::dict d;
    d["total"] = l.total_bytes();
    d["signal"] = l.signal_bytes;
    d["send"] = l.send_bytes;
    d["recv"] = l.recv_bytes;
    d["msg"] = l.msg_bytes;
    d["combine_send_row"] = l.combine_send_row_bytes;
    d["send_offset_0"] = l.send_offset(0);
    d["send_offset_1"] = l.send_offset(1);
    d["combine_slots_per_token"] = l.combine_slots_per_token;
    return d;
  });
  m.def("max_experts", &max_dispatch_smem_experts);

  m.def("get_unique_id", []() { return py::bytes(get_unique_id()); });
  m.def("init_world", [](int rank, int num_ranks, py::bytes uid, int device) {
    init_world(rank, num_ranks, std::string(uid), device);
  });
  m.def("world_initialized", &world_initialized);
  m.def("world_rank", &world_rank);
  m.def("world_size", &world_size);
  m.def("symmetric_alloc", &symmetric_alloc, py::call_guard<py::gil_scoped_release>());
  m.def("symmetric_free", &symmetric_free, py::call_guard<py::gil_scoped_release>());
  m.def("peer_bases", &peer_bases);
  m.def("barrier_all", &barrier_all, py::call_guard<py::gil_scoped_release>());
  m.def("barrier_on_stream", [](uintptr_t stream) { barrier_on_stream(reinterpret_cast<void*>(stream)); });
  m.def("finalize_world", &finalize_world, py::call_guard<py::gil_scoped_release>());

  m.def("mailbox_alloc", &mailbox_alloc);
  m.def("mailbox_device_ptr", &mailbox_device_ptr);
  m.def("mailbox_free", &mailbox_free);
  m.def("mailbox_read", [](uintptr_t host) {
    const volatile Mailbox* mb = reinterpret_cast<const volatile Mailbox*>(host);
    const int status = mb->status;
    return py::make_tuple(status, mb->rank, mb->peer, mb->what, static_cast<int64_t>(mb->detail),
                          static_cast<int64_t>(mb->observed), mb->channel);
  });
  m.def("mailbox_clear", [](uintptr_t host) {
    volatile Mailbox* mb = reinterpret_cast<volatile Mailbox*>(host);
    mb->status = kMailboxEmpty;
  });

  m.def("dispatch_send", [](const py::dict& d, int num_sms) { dispatch_send(make_dispatch(d), num_sms, stream_of(d)); });
  m.def("dispatch_recv", [](const py::dict& d, int num_sms) { dispatch_recv(make_dispatch(d), num_sms, stream_of(d)); });
  m.def("combine_send", [](const py::dict& d, int num_sms) { combine_send(make_combine(d), num_sms, stream_of(d)); });
  m.def("combine_recv", [](const py::dict& d, int num_sms) { combine_recv(make_combine(d), num_sms, stream_of(d)); });

  // Internode normal kernels (csrc/internode): the same NVSHMEM world, their own symmetric buffer.
  m.def("internode_barrier", [](const py::dict& d) { internode::barrier(make_internode_env(d), stream_of(d)); });
  m.def("internode_notify", [](const py::dict& d) {
    internode::NotifyArgs a{};
    a.env = make_internode_env(d);
    a.payload = ptr<const int>(d, "payload");
    a.received = ptr<int>(d, "received");
    internode::notify(a, stream_of(d));
  });
  m.def("internode_dispatch", [](const py::dict& d) {
    internode::dispatch(make_internode_dispatch(d), stream_of(d));
  });
  m.def("internode_combine", [](const py::dict& d) {
    internode::combine(make_internode_combine(d), stream_of(d));
  });
}
