// Torch glue of the internode normal kernels (registered into deepep_plugin._nvshmem_C): the buffer Layout and the
// record sizes (layout.h), and the barrier, notify, dispatch and combine launches, which take tensors, check them
// (dtype, shape, device, contiguity) and fill the kernels' plain parameter structs (api.h).
// deepep_plugin/backends/cuda_internode.py computes the routing tensors and allocates the outputs.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <optional>
#include <string>

#include "internode/api.h"
#include "internode/layout.h"
#include "nvshmem/bindings.h"

namespace py = pybind11;

namespace deepep {
namespace internode {
namespace {

using nvshmem::data;
using nvshmem::data_or_null;
using nvshmem::SymmetricBuffer;
using nvshmem::TensorCheck;
using OptTensor = std::optional<at::Tensor>;

// Bound as InternodeLayout: a glue-local type, so that the bound class is not more visible than pybind11.
struct BoundLayout : Layout {
  explicit BoundLayout(const Layout& l) : Layout(l) {}
};

BoundLayout make_layout(int num_ranks, int num_nodes, int64_t num_rdma_bytes, int64_t num_nvl_bytes) {
  if (num_nodes < 1 || num_ranks < num_nodes || num_ranks % num_nodes != 0)
    throw InputError("InternodeLayout: " + std::to_string(num_ranks) + " ranks do not form " +
                     std::to_string(num_nodes) + " nodes of equal size");
  if (num_nodes > kMaxNodes || num_ranks / num_nodes > kMaxNvlPeers)
    throw InputError("InternodeLayout: at most " + std::to_string(kMaxNodes) + " nodes of at most " +
                     std::to_string(kMaxNvlPeers) + " ranks are supported, got " + std::to_string(num_nodes) +
                     " nodes of " + std::to_string(num_ranks / num_nodes));
  if (num_rdma_bytes < 0 || num_nvl_bytes < 0) throw InputError("InternodeLayout: buffer sizes must be non-negative");
  return BoundLayout(Layout(num_ranks, num_nodes, num_rdma_bytes, num_nvl_bytes));
}

void check_positive(const char* op, const char* name, int64_t value) {
  if (value < 1) throw InputError(std::string(op) + ": " + name + " must be positive, got " + std::to_string(value));
}

// The part of every call's parameters that comes from the buffer, the layout and the rings of the call (`slots`
// items of `item_bytes` per stream and `num_channels` channels; 0 for the barrier and notify, which use no ring).
Env make_env(const char* op, const SymmetricBuffer& buf, const at::Tensor& epoch, const Layout& l, int num_channels,
             int slots, int64_t item_bytes) {
  buf.check(op);
  if (l.num_ranks != buf.num_ranks())
    throw InputError(std::string(op) + ": the layout is for " + std::to_string(l.num_ranks) +
                     " ranks, the buffer's group has " + std::to_string(buf.num_ranks()));
  if (l.total_bytes() > buf.num_bytes())
    throw BufferTooSmall(std::string(op) + ": the layout needs " + std::to_string(l.total_bytes()) +
                         " bytes, the buffer has " + std::to_string(buf.num_bytes()));
  TensorCheck(epoch, op, "epoch", buf.device()).dtype(at::kLong).shape({1}).contiguous();
  if (num_channels > 0) {
    if (num_channels > kMaxChannels)
      throw InputError(std::string(op) + ": at most " + std::to_string(kMaxChannels) + " channels, got " +
                       std::to_string(num_channels));
    check_positive(op, "slots", slots);
    const int64_t need = l.ring_bytes(num_channels, slots, item_bytes, buf.has_rdma_peers());
    if (need > l.nvl_off)
      throw BufferTooSmall(std::string(op) + ": num_rdma_bytes=" + std::to_string(l.nvl_off) + " is too small for " +
                           std::to_string(l.num_nodes) + " x " + std::to_string(num_channels) + " rings of " +
                           std::to_string(slots) + " items of " + std::to_string(item_bytes) + " bytes: it needs " +
                           std::to_string(need));
  }
  Env env{};
  env.rank = buf.rank();
  env.num_ranks = l.num_ranks;
  env.ranks_per_node = l.ranks_per_node;
  env.num_nodes = l.num_nodes;
  env.has_rdma_peers = buf.has_rdma_peers() ? 1 : 0;
  env.buffer = buf.base();
  env.peers = buf.peer_table();
  env.epoch = data<int64_t>(epoch);
  env.abort_flag = buf.abort_flag();
  env.mailbox = buf.mailbox();
  env.timeout_ns = buf.timeout_ns();
  env.stream_off = l.stream_off;
  env.notify_off = l.notify_off;
  env.notify_stage_off = l.notify_stage_off;
  env.notify_row_ints = l.notify_row_ints;
  env.data_off = l.data_off;
  env.stage_off = num_channels > 0 ? l.stage_off(num_channels, slots, item_bytes) : l.data_off;
  env.slots = slots;
  env.nvl_off = l.nvl_off;
  return env;
}

// An int32 tensor of this shape (-1: any size), contiguous.
void check_ints(const char* op, const char* name, const at::Tensor& t, int device, std::initializer_list<int64_t> s) {
  TensorCheck(t, op, name, device).dtype(at::kInt).shape(s).contiguous();
}

void barrier_op(const SymmetricBuffer& buffer, const at::Tensor& epoch, const BoundLayout& layout) {
  const Env env = make_env("internode_barrier", buffer, epoch, layout, 0, 0, 0);
  c10::cuda::CUDAGuard guard(buffer.device());
  internode::barrier(env, buffer.call_stream());
}

void notify_op(const SymmetricBuffer& buffer, const at::Tensor& epoch, const BoundLayout& layout,
               const at::Tensor& payload, const at::Tensor& received) {
  const char* op = "internode_notify";
  NotifyArgs a{};
  a.env = make_env(op, buffer, epoch, layout, 0, 0, 0);
  check_ints(op, "payload", payload, buffer.device(), {layout.num_ranks, layout.notify_row_ints});
  check_ints(op, "received", received, buffer.device(), {layout.num_ranks, layout.notify_row_ints});
  a.payload = data<const int>(payload);
  a.received = data<int>(received);
  c10::cuda::CUDAGuard guard(buffer.device());
  internode::notify(a, buffer.call_stream());
}

void dispatch_op(const SymmetricBuffer& buffer, const at::Tensor& epoch, const BoundLayout& layout, int slots,
                 int chunk, const at::Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
                 const OptTensor& topk_weights, const at::Tensor& pos, const at::Tensor& node_slot,
                 const at::Tensor& rdma_channel_prefix, const OptTensor& head_base,
                 const OptTensor& recv_rdma_rank_prefix, const OptTensor& send_nvl_head, const at::Tensor& recv_base,
                 int num_local_experts, const at::Tensor& recv_x, const OptTensor& recv_scales,
                 const OptTensor& recv_topk_idx, const OptTensor& recv_topk_weights, const OptTensor& recv_src_meta) {
  const char* op = "internode_dispatch";
  const int dev = buffer.device();
  const int64_t R = layout.num_ranks, N = layout.num_nodes, G = layout.ranks_per_node;
  TensorCheck(x, op, "x", dev).shape({-1, -1}).contiguous();
  const int64_t T = x.size(0), H = x.size(1), data_bytes = H * static_cast<int64_t>(x.element_size());
  if (data_bytes % 16 != 0)
    throw InputError(std::string(op) + ": a row of x must be a multiple of 16 bytes, got " +
                     std::to_string(data_bytes));
  int64_t S = 0;
  if (x_scales.has_value()) {
    TensorCheck(*x_scales, op, "x_scales", dev).itemsize(4).shape({T, -1});  // any strides
    S = x_scales->size(1);
  }
  int64_t K = 0;
  if (topk_idx.has_value()) {
    TensorCheck(*topk_idx, op, "topk_idx", dev).dtype(at::kLong).shape({T, -1}).contiguous();
    K = topk_idx->size(1);
    if (K > kMaxTopkInternode)
      throw InputError(std::string(op) + ": top-k must be <= " + std::to_string(kMaxTopkInternode) + ", got " +
                       std::to_string(K));
  }
  if (topk_weights.has_value()) {
    if (!topk_idx.has_value()) throw InputError(std::string(op) + ": topk_weights needs topk_idx");
    TensorCheck(*topk_weights, op, "topk_weights", dev).dtype(at::kFloat).shape({T, K}).contiguous();
  }
  check_ints(op, "pos", pos, dev, {T, R});
  check_ints(op, "node_slot", node_slot, dev, {T, N});
  check_ints(op, "rdma_channel_prefix", rdma_channel_prefix, dev, {N, -1});
  const int C = static_cast<int>(rdma_channel_prefix.size(1));
  check_positive(op, "the channel count (rdma_channel_prefix columns)", C);
  if (send_nvl_head.has_value()) {
    check_ints(op, "send_nvl_head", *send_nvl_head, dev, {-1, G});
    if (!head_base.has_value() || !recv_rdma_rank_prefix.has_value())
      throw InputError(std::string(op) + ": send_nvl_head needs head_base and recv_rdma_rank_prefix");
  }
  if (head_base.has_value()) check_ints(op, "head_base", *head_base, dev, {N, G});
  if (recv_rdma_rank_prefix.has_value()) check_ints(op, "recv_rdma_rank_prefix", *recv_rdma_rank_prefix, dev, {N});
  check_ints(op, "recv_base", recv_base, dev, {R});
  if (num_local_experts < 0) throw InputError(std::string(op) + ": num_local_experts must be non-negative");
  TensorCheck(recv_x, op, "recv_x", dev).dtype(x.scalar_type()).shape({-1, H}).contiguous();
  const int64_t rows = recv_x.size(0);
  if (x_scales.has_value() != recv_scales.has_value())
    throw InputError(std::string(op) + ": recv_scales must be given exactly when x_scales is");
  if (recv_scales.has_value())
    TensorCheck(*recv_scales, op, "recv_scales", dev).dtype(x_scales->scalar_type()).shape({rows, S}).contiguous();
  if (recv_topk_idx.has_value())
    TensorCheck(*recv_topk_idx, op, "recv_topk_idx", dev).dtype(at::kLong).shape({rows, K}).contiguous();
  if (recv_topk_weights.has_value())
    TensorCheck(*recv_topk_weights, op, "recv_topk_weights", dev).dtype(at::kFloat).shape({rows, K}).contiguous();
  if (recv_src_meta.has_value()) check_ints(op, "recv_src_meta", *recv_src_meta, dev, {rows, 2});
  check_positive(op, "chunk", chunk);

  DispatchArgs a{};
  a.rec_bytes = record_bytes(data_bytes, static_cast<int>(S), static_cast<int>(K), static_cast<int>(G));
  a.env = make_env(op, buffer, epoch, layout, C, slots, a.rec_bytes);
  a.data_bytes = data_bytes;
  a.scale_bytes = align_up(4 * S, 16);
  a.num_tokens = static_cast<int>(T);
  a.num_topk = static_cast<int>(K);
  a.num_scales = static_cast<int>(S);
  a.scale_stride_token = x_scales.has_value() ? static_cast<int>(x_scales->stride(0)) : 0;
  a.scale_stride_col = x_scales.has_value() ? static_cast<int>(x_scales->stride(1)) : 0;
  a.x = data<const uint8_t>(x);
  a.x_scales = data_or_null<const uint8_t>(x_scales);
  a.topk_idx = K > 0 ? data<const int64_t>(*topk_idx) : nullptr;
  a.topk_weights = K > 0 ? data_or_null<const float>(topk_weights) : nullptr;
  a.pos = data<const int>(pos);
  a.node_slot = data<const int>(node_slot);
  a.rdma_channel_prefix = data<const int>(rdma_channel_prefix);
  a.num_channels = C;
  a.chunk = chunk;
  a.head_base = data_or_null<const int>(head_base);
  a.recv_rdma_rank_prefix = data_or_null<const int>(recv_rdma_rank_prefix);
  a.send_nvl_head = data_or_null<int>(send_nvl_head);
  a.head_rows = send_nvl_head.has_value() ? send_nvl_head->size(0) : 0;
  a.recv_base = data<const int>(recv_base);
  a.out_rows = rows;
  a.num_local_experts = num_local_experts;
  a.recv_x = data<uint8_t>(recv_x);
  a.recv_scales = data_or_null<uint8_t>(recv_scales);
  a.recv_topk_idx = data_or_null<int64_t>(recv_topk_idx);
  a.recv_topk_weights = data_or_null<float>(recv_topk_weights);
  a.recv_src_meta = data_or_null<int>(recv_src_meta);
  c10::cuda::CUDAGuard guard(dev);
  internode::dispatch(a, buffer.call_stream());
}

void combine_op(const SymmetricBuffer& buffer, const at::Tensor& epoch, const BoundLayout& layout, int slots,
                int chunk, int nvl_slots, int nvl_chunk, const at::Tensor& x, const OptTensor& topk_weights,
                const at::Tensor& recv_gbl_channel_prefix, const at::Tensor& recv_gbl_rank_prefix_sum,
                const at::Tensor& send_nvl_head, const at::Tensor& recv_rdma_rank_prefix_sum,
                const at::Tensor& recv_rdma_channel_prefix, const at::Tensor& send_rdma_head,
                const at::Tensor& rdma_channel_prefix, const OptTensor& bias0, const OptTensor& bias1,
                const at::Tensor& combined_x, const OptTensor& combined_topk_weights) {
  const char* op = "internode_combine";
  const int dev = buffer.device();
  const int64_t R = layout.num_ranks, N = layout.num_nodes, G = layout.ranks_per_node;
  TensorCheck(x, op, "x", dev).dtype(at::kBFloat16).shape({-1, -1}).contiguous();
  const int64_t rows = x.size(0), H = x.size(1);
  if (H % 8 != 0) throw InputError(std::string(op) + ": hidden must be a multiple of 8, got " + std::to_string(H));
  int64_t K = 0;
  if (topk_weights.has_value()) {
    TensorCheck(*topk_weights, op, "topk_weights", dev).dtype(at::kFloat).shape({rows, -1}).contiguous();
    K = topk_weights->size(1);
    if (K > kMaxTopkInternode)
      throw InputError(std::string(op) + ": top-k must be <= " + std::to_string(kMaxTopkInternode) + ", got " +
                       std::to_string(K));
  }
  TensorCheck(combined_x, op, "combined_x", dev).dtype(at::kBFloat16).shape({-1, H}).contiguous();
  const int64_t T = combined_x.size(0);
  if (topk_weights.has_value() != combined_topk_weights.has_value())
    throw InputError(std::string(op) + ": combined_topk_weights must be given exactly when topk_weights is");
  if (combined_topk_weights.has_value())
    TensorCheck(*combined_topk_weights, op, "combined_topk_weights", dev)
        .dtype(at::kFloat)
        .shape({T, K})
        .contiguous();
  check_ints(op, "rdma_channel_prefix", rdma_channel_prefix, dev, {N, -1});
  const int C = static_cast<int>(rdma_channel_prefix.size(1));
  check_positive(op, "the channel count (rdma_channel_prefix columns)", C);
  check_ints(op, "recv_gbl_channel_prefix", recv_gbl_channel_prefix, dev, {R, C});
  check_ints(op, "recv_gbl_rank_prefix_sum", recv_gbl_rank_prefix_sum, dev, {R});
  check_ints(op, "send_nvl_head", send_nvl_head, dev, {-1, G});
  check_ints(op, "recv_rdma_rank_prefix_sum", recv_rdma_rank_prefix_sum, dev, {N});
  check_ints(op, "recv_rdma_channel_prefix", recv_rdma_channel_prefix, dev, {N, C});
  check_ints(op, "send_rdma_head", send_rdma_head, dev, {T, N});
  if (bias0.has_value()) TensorCheck(*bias0, op, "bias0", dev).dtype(at::kBFloat16).shape({T, H}).contiguous();
  if (bias1.has_value()) TensorCheck(*bias1, op, "bias1", dev).dtype(at::kBFloat16).shape({T, H}).contiguous();
  check_positive(op, "chunk", chunk);
  check_positive(op, "nvl_slots", nvl_slots);
  if (nvl_chunk < 1 || nvl_chunk > nvl_slots)
    throw InputError(std::string(op) + ": nvl_chunk must be in [1, nvl_slots=" + std::to_string(nvl_slots) +
                     "], got " + std::to_string(nvl_chunk));

  CombineArgs a{};
  a.row_bytes = combine_row_bytes(static_cast<int>(H), static_cast<int>(K));
  a.env = make_env(op, buffer, epoch, layout, C, slots, a.row_bytes);
  const int64_t nvl_need = layout.nvl_ring_bytes(C, nvl_slots, a.row_bytes);
  if (nvl_need > layout.nvl_bytes)
    throw BufferTooSmall(std::string(op) + ": num_nvl_bytes=" + std::to_string(layout.nvl_bytes) +
                         " is too small for the NVL rings: it needs " + std::to_string(nvl_need));
  a.hidden = static_cast<int>(H);
  a.num_topk = static_cast<int>(K);
  a.num_tokens = static_cast<int>(T);
  a.x = data<const uint16_t>(x);
  a.topk_weights = data_or_null<const float>(topk_weights);
  a.num_channels = C;
  a.chunk = chunk;
  a.nvl_slots = nvl_slots;
  a.nvl_chunk = nvl_chunk;
  a.recv_gbl_channel_prefix = data<const int>(recv_gbl_channel_prefix);
  a.recv_gbl_rank_prefix_sum = data<const int>(recv_gbl_rank_prefix_sum);
  a.send_nvl_head = data<const int>(send_nvl_head);
  a.recv_rdma_rank_prefix_sum = data<const int>(recv_rdma_rank_prefix_sum);
  a.recv_rdma_channel_prefix = data<const int>(recv_rdma_channel_prefix);
  a.send_rdma_head = data<const int>(send_rdma_head);
  a.rdma_channel_prefix = data<const int>(rdma_channel_prefix);
  a.bias0 = data_or_null<const uint16_t>(bias0);
  a.bias1 = data_or_null<const uint16_t>(bias1);
  a.combined_x = data<uint16_t>(combined_x);
  a.combined_topk_weights = data_or_null<float>(combined_topk_weights);
  c10::cuda::CUDAGuard guard(dev);
  internode::combine(a, buffer.call_stream());
}

}  // namespace
}  // namespace internode

void register_internode(py::module_& m) {
  using internode::Layout;
  py::class_<internode::BoundLayout>(m, "InternodeLayout",
                                     "Offsets of the internode symmetric buffer (internode/layout.h)")
      .def(py::init(&internode::make_layout), py::arg("num_ranks"), py::arg("num_nodes"), py::arg("num_rdma_bytes"),
           py::arg("num_nvl_bytes"))
      .def_readonly("num_ranks", &Layout::num_ranks)
      .def_readonly("num_nodes", &Layout::num_nodes)
      .def_readonly("ranks_per_node", &Layout::ranks_per_node)
      .def_readonly("stream_off", &Layout::stream_off)
      .def_readonly("notify_off", &Layout::notify_off)
      .def_readonly("notify_stage_off", &Layout::notify_stage_off)
      .def_readonly("notify_row_ints", &Layout::notify_row_ints)
      .def_readonly("notify_experts_off", &Layout::notify_experts_off)
      .def_readonly("notify_gbl_channels_off", &Layout::notify_gbl_channels_off)
      .def_readonly("notify_rdma_channels_off", &Layout::notify_rdma_channels_off)
      .def_readonly("data_off", &Layout::data_off)
      .def_readonly("data_bytes", &Layout::data_bytes)
      .def_readonly("nvl_off", &Layout::nvl_off)
      .def_readonly("nvl_bytes", &Layout::nvl_bytes)
      .def_property_readonly("total_bytes", &Layout::total_bytes)
      .def("ring_bytes", &Layout::ring_bytes, py::arg("num_channels"), py::arg("slots"), py::arg("item_bytes"),
           py::arg("has_rdma_peers"))
      .def("nvl_ring_bytes", &Layout::nvl_ring_bytes, py::arg("num_channels"), py::arg("nvl_slots"),
           py::arg("row_bytes"));
  m.def("internode_record_bytes", &internode::record_bytes, py::arg("data_bytes"), py::arg("num_scales"),
        py::arg("num_topk"), py::arg("ranks_per_node"));
  m.def("internode_combine_row_bytes", &internode::combine_row_bytes, py::arg("hidden"), py::arg("num_topk"));
  m.def("internode_barrier", &internode::barrier_op, py::kw_only(), py::arg("buffer"), py::arg("epoch"),
        py::arg("layout"));
  m.def("internode_notify", &internode::notify_op, py::kw_only(), py::arg("buffer"), py::arg("epoch"),
        py::arg("layout"), py::arg("payload"), py::arg("received"));
  m.def("internode_dispatch", &internode::dispatch_op, py::kw_only(), py::arg("buffer"), py::arg("epoch"),
        py::arg("layout"), py::arg("slots"), py::arg("chunk"), py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"),
        py::arg("topk_weights"), py::arg("pos"), py::arg("node_slot"), py::arg("rdma_channel_prefix"),
        py::arg("head_base"), py::arg("recv_rdma_rank_prefix"), py::arg("send_nvl_head"), py::arg("recv_base"),
        py::arg("num_local_experts"), py::arg("recv_x"), py::arg("recv_scales"), py::arg("recv_topk_idx"),
        py::arg("recv_topk_weights"), py::arg("recv_src_meta"));
  m.def("internode_combine", &internode::combine_op, py::kw_only(), py::arg("buffer"), py::arg("epoch"),
        py::arg("layout"), py::arg("slots"), py::arg("chunk"), py::arg("nvl_slots"), py::arg("nvl_chunk"),
        py::arg("x"), py::arg("topk_weights"), py::arg("recv_gbl_channel_prefix"),
        py::arg("recv_gbl_rank_prefix_sum"), py::arg("send_nvl_head"), py::arg("recv_rdma_rank_prefix_sum"),
        py::arg("recv_rdma_channel_prefix"), py::arg("send_rdma_head"), py::arg("rdma_channel_prefix"),
        py::arg("bias0"), py::arg("bias1"), py::arg("combined_x"), py::arg("combined_topk_weights"));
}

}  // namespace deepep
