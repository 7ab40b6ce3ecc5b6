// Torch glue of the low-latency kernels (registered into deepep_plugin._nvshmem_C): the buffer Layout, and the four
// launches, which take tensors, check them against the layout (dtype, shape, device, contiguity) and fill the
// kernels' plain parameter structs (api.h). deepep_plugin/backends/cuda_low_latency.py allocates the outputs and
// owns the call order (parity, hooks); the launches are ordered across streams by the buffer (call_stream).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <optional>
#include <string>

#include "low_latency/api.h"
#include "low_latency/layout.h"
#include "nvshmem/bindings.h"

namespace py = pybind11;

namespace deepep {
namespace ll {
namespace {

using nvshmem::data;
using nvshmem::data_or_null;
using nvshmem::SymmetricBuffer;
using nvshmem::TensorCheck;
using OptTensor = std::optional<at::Tensor>;

// Bound as LowLatencyLayout: a glue-local type, so that the bound class is not more visible than pybind11.
struct BoundLayout : Layout {
  explicit BoundLayout(const Layout& l) : Layout(l) {}
};

BoundLayout make_layout(int num_ranks, int num_experts, int hidden, int num_max_tokens) {
  if (num_ranks < 1 || num_experts < 0 || hidden < 0 || num_max_tokens < 0)
    throw InputError("LowLatencyLayout: num_ranks must be positive and num_experts, hidden, num_max_tokens "
                     "non-negative, got " + std::to_string(num_ranks) + ", " + std::to_string(num_experts) + ", " +
                     std::to_string(hidden) + ", " + std::to_string(num_max_tokens));
  return BoundLayout(Layout(num_ranks, num_experts, hidden, num_max_tokens));
}

// The part of every call's parameters that comes from the buffer and the layout; checks that the layout is one the
// kernels run and that the buffer holds it.
Env make_env(const char* op, const SymmetricBuffer& buf, const at::Tensor& workspace, const Layout& l, int parity) {
  buf.check(op);
  const std::string where = std::string(op) + ": ";
  if (l.num_ranks != buf.num_ranks())
    throw InputError(where + "the layout is for " + std::to_string(l.num_ranks) + " ranks, the buffer's group has " +
                     std::to_string(buf.num_ranks()));
  if (l.num_experts < l.num_ranks || l.num_experts % l.num_ranks != 0 || l.num_experts > max_dispatch_smem_experts())
    throw InputError(where + "num_experts must be a positive multiple of the group size " +
                     std::to_string(l.num_ranks) + " and at most " + std::to_string(max_dispatch_smem_experts()) +
                     ", got " + std::to_string(l.num_experts));
  if (l.hidden <= 0 || l.hidden % kFp8Group != 0)
    throw InputError(where + "hidden must be a positive multiple of " + std::to_string(kFp8Group) + ", got " +
                     std::to_string(l.hidden));
  if (l.num_max_tokens < 1 || l.num_max_tokens > kMaxLowLatencyTokensPerRank)
    throw InputError(where + "num_max_dispatch_tokens_per_rank must be in [1, " +
                     std::to_string(kMaxLowLatencyTokensPerRank) + "], got " + std::to_string(l.num_max_tokens));
  if (l.total_bytes() > buf.num_bytes())
    throw BufferTooSmall(where + "the layout needs " + std::to_string(l.total_bytes()) + " bytes, the buffer has " +
                         std::to_string(buf.num_bytes()));
  if (parity != 0 && parity != 1) throw InputError(where + "parity must be 0 or 1, got " + std::to_string(parity));
  TensorCheck(workspace, op, "workspace", buf.device()).dtype(at::kInt).shape({kWorkspaceInts}).contiguous();
  Env env{};
  env.rank = buf.rank();
  env.parity = parity;
  env.has_rdma_peers = buf.has_rdma_peers() ? 1 : 0;
  env.buffer = buf.base();
  env.peers = buf.peer_table();
  env.workspace = data<int>(workspace);
  env.abort_flag = buf.abort_flag();
  env.mailbox = buf.mailbox();
  env.timeout_ns = buf.timeout_ns();
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

// topk_idx [T, K] int64 with T <= N and K <= the kernels' top-k; returns K.
int check_topk_idx(const char* op, const at::Tensor& topk_idx, int64_t num_tokens, const Layout& l, int device) {
  TensorCheck(topk_idx, op, "topk_idx", device).dtype(at::kLong).shape({num_tokens, -1}).contiguous();
  const int64_t K = topk_idx.size(1);
  if (K > kMaxTopk)
    throw InputError(std::string(op) + ": top-k must be <= " + std::to_string(kMaxTopk) + ", got " + std::to_string(K));
  if (num_tokens > l.num_max_tokens)
    throw InputError(std::string(op) + ": " + std::to_string(num_tokens) +
                     " tokens, more than num_max_dispatch_tokens_per_rank=" + std::to_string(l.num_max_tokens));
  return static_cast<int>(K);
}

// recv_info: int32 [2, E_loc, R*N]: row 0 the source token of each received row, row 1 its combine slot.
void check_recv_info(const char* op, const at::Tensor& recv_info, const at::Tensor& layout_range, const Layout& l,
                     int device) {
  const int64_t rn = static_cast<int64_t>(l.num_ranks) * l.num_max_tokens;
  TensorCheck(recv_info, op, "recv_info", device).dtype(at::kInt).shape({2, l.num_local_experts, rn}).contiguous();
  TensorCheck(layout_range, op, "layout_range", device)
      .dtype(at::kLong)
      .shape({l.num_local_experts, l.num_ranks})
      .contiguous();
}

DispatchArgs make_dispatch(const char* op, const SymmetricBuffer& buf, const at::Tensor& workspace, const Layout& l,
                           int parity, const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& recv_x,
                           const OptTensor& recv_scales, const at::Tensor& recv_count, const at::Tensor& recv_info,
                           const at::Tensor& layout_range, const OptTensor& cumulative_stats,
                           const OptTensor& wait_stats, bool use_fp8, bool round_scale, bool use_ue8m0) {
  DispatchArgs a{};
  a.env = make_env(op, buf, workspace, l, parity);
  const int dev = buf.device();
  const int64_t el = l.num_local_experts, rn = static_cast<int64_t>(l.num_ranks) * l.num_max_tokens;
  TensorCheck(x, op, "x", dev).dtype(at::kBFloat16).shape({-1, l.hidden}).contiguous();
  const int64_t T = x.size(0);
  a.num_topk = check_topk_idx(op, topk_idx, T, l, dev);
  TensorCheck(recv_x, op, "recv_x", dev)
      .dtype(use_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16)
      .shape({el, rn, l.hidden})
      .contiguous();
  if (use_fp8) {
    if (!recv_scales.has_value()) throw InputError(std::string(op) + ": recv_scales is required with use_fp8");
    const int64_t groups = l.hidden / kFp8Group;
    if (use_ue8m0)
      TensorCheck(*recv_scales, op, "recv_scales", dev).dtype(at::kInt).shape({el, (groups + 3) / 4, rn}).contiguous();
    else
      TensorCheck(*recv_scales, op, "recv_scales", dev).dtype(at::kFloat).shape({el, groups, rn}).contiguous();
  } else if (recv_scales.has_value()) {
    throw InputError(std::string(op) + ": recv_scales must be None without use_fp8");
  }
  TensorCheck(recv_count, op, "recv_count", dev).dtype(at::kInt).shape({el}).contiguous();
  check_recv_info(op, recv_info, layout_range, l, dev);
  if (cumulative_stats.has_value())
    TensorCheck(*cumulative_stats, op, "cumulative_stats", dev).dtype(at::kInt).shape({el}).contiguous();
  if (wait_stats.has_value())
    TensorCheck(*wait_stats, op, "wait_stats", dev).dtype(at::kLong).shape({l.num_ranks}).contiguous();
  a.x = x.data_ptr();
  a.topk_idx = data<const int64_t>(topk_idx);
  a.num_tokens = static_cast<int>(T);
  a.use_fp8 = use_fp8 ? 1 : 0;
  a.round_scale = round_scale ? 1 : 0;
  a.use_ue8m0 = use_ue8m0 ? 1 : 0;
  a.recv_x = recv_x.data_ptr();
  a.recv_scales = use_fp8 ? recv_scales->data_ptr() : nullptr;
  a.recv_count = data<int>(recv_count);
  a.src_info = data<int>(recv_info);
  a.slot_info = data<int>(recv_info) + el * rn;
  a.layout_range = data<int64_t>(layout_range);
  a.cumulative_stats = data_or_null<int>(cumulative_stats);
  a.wait_stats = data_or_null<int64_t>(wait_stats);
  return a;
}

CombineArgs make_combine(const char* op, const SymmetricBuffer& buf, const at::Tensor& workspace, const Layout& l,
                         int parity, const at::Tensor& x, const at::Tensor& recv_info, const at::Tensor& layout_range,
                         const at::Tensor& topk_idx, const at::Tensor& topk_weights, bool zero_copy,
                         const at::Tensor& out, const OptTensor& wait_stats) {
  CombineArgs a{};
  a.env = make_env(op, buf, workspace, l, parity);
  const int dev = buf.device();
  const int64_t el = l.num_local_experts, rn = static_cast<int64_t>(l.num_ranks) * l.num_max_tokens;
  TensorCheck(x, op, "x", dev).dtype(at::kBFloat16).shape({el, rn, l.hidden}).contiguous();
  check_recv_info(op, recv_info, layout_range, l, dev);
  const int64_t T = topk_idx.size(0);
  a.num_topk = check_topk_idx(op, topk_idx, T, l, dev);
  TensorCheck(topk_weights, op, "topk_weights", dev).dtype(at::kFloat).shape({T, a.num_topk}).contiguous();
  TensorCheck(out, op, "out", dev).dtype(at::kBFloat16).shape({T, l.hidden}).contiguous();
  if (wait_stats.has_value())
    TensorCheck(*wait_stats, op, "wait_stats", dev).dtype(at::kLong).shape({l.num_ranks}).contiguous();
  a.x = x.data_ptr();
  a.src_info = data<const int>(recv_info);
  a.slot_info = data<const int>(recv_info) + el * rn;
  a.layout_range = data<const int64_t>(layout_range);
  a.topk_idx = data<const int64_t>(topk_idx);
  a.topk_weights = data<const float>(topk_weights);
  a.num_tokens = static_cast<int>(T);
  a.zero_copy = zero_copy ? 1 : 0;
  a.out = out.data_ptr();
  a.wait_stats = data_or_null<int64_t>(wait_stats);
  return a;
}

void check_num_sms(const char* op, int num_sms) {
  if (num_sms < 1 || num_sms > kMaxGrid)
    throw InputError(std::string(op) + ": num_sms must be in [1, " + std::to_string(kMaxGrid) + "], got " +
                     std::to_string(num_sms));
}

using DispatchLaunch = void (*)(const DispatchArgs&, int, void*);
using CombineLaunch = void (*)(const CombineArgs&, int, void*);

// One bound function per launch; the send and receive halves of an operation take the same arguments.
// Each returns the handle of the stream the kernel went to (the current one), so that the caller can tell whether
// the two halves of an operation ran on different streams.
template <DispatchLaunch kLaunch>
int64_t run_dispatch(const char* op, const SymmetricBuffer& buffer, const at::Tensor& workspace, const Layout& layout,
                  int parity, const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& recv_x,
                  const OptTensor& recv_scales, const at::Tensor& recv_count, const at::Tensor& recv_info,
                  const at::Tensor& layout_range, const OptTensor& cumulative_stats, const OptTensor& wait_stats,
                  bool use_fp8, bool round_scale, bool use_ue8m0, int num_sms) {
  check_num_sms(op, num_sms);
  const DispatchArgs a = make_dispatch(op, buffer, workspace, layout, parity, x, topk_idx, recv_x, recv_scales,
                                       recv_count, recv_info, layout_range, cumulative_stats, wait_stats, use_fp8,
                                       round_scale, use_ue8m0);
  c10::cuda::CUDAGuard guard(buffer.device());
  void* stream = buffer.call_stream();
  kLaunch(a, num_sms, stream);
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(stream));
}

template <CombineLaunch kLaunch>
int64_t run_combine(const char* op, const SymmetricBuffer& buffer, const at::Tensor& workspace, const Layout& layout,
                 int parity, const at::Tensor& x, const at::Tensor& recv_info, const at::Tensor& layout_range,
                 const at::Tensor& topk_idx, const at::Tensor& topk_weights, bool zero_copy, const at::Tensor& out,
                 const OptTensor& wait_stats, int num_sms) {
  check_num_sms(op, num_sms);
  const CombineArgs a = make_combine(op, buffer, workspace, layout, parity, x, recv_info, layout_range, topk_idx,
                                     topk_weights, zero_copy, out, wait_stats);
  c10::cuda::CUDAGuard guard(buffer.device());
  void* stream = buffer.call_stream();
  kLaunch(a, num_sms, stream);
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(stream));
}

template <DispatchLaunch kLaunch>
void def_dispatch(py::module_& m, const char* name) {
  m.def(
      name,
      [name](const SymmetricBuffer& buffer, const at::Tensor& workspace, const BoundLayout& layout, int parity,
             const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& recv_x, const OptTensor& recv_scales,
             const at::Tensor& recv_count, const at::Tensor& recv_info, const at::Tensor& layout_range,
             const OptTensor& cumulative_stats, const OptTensor& wait_stats, bool use_fp8, bool round_scale,
             bool use_ue8m0, int num_sms) {
        return run_dispatch<kLaunch>(name, buffer, workspace, layout, parity, x, topk_idx, recv_x, recv_scales,
                                     recv_count, recv_info, layout_range, cumulative_stats, wait_stats, use_fp8,
                                     round_scale, use_ue8m0, num_sms);
      },
      py::kw_only(), py::arg("buffer"), py::arg("workspace"), py::arg("layout"), py::arg("parity"), py::arg("x"),
      py::arg("topk_idx"), py::arg("recv_x"), py::arg("recv_scales"), py::arg("recv_count"), py::arg("recv_info"),
      py::arg("layout_range"), py::arg("cumulative_stats"), py::arg("wait_stats"), py::arg("use_fp8"),
      py::arg("round_scale"), py::arg("use_ue8m0"), py::arg("num_sms"));
}

template <CombineLaunch kLaunch>
void def_combine(py::module_& m, const char* name) {
  m.def(
      name,
      [name](const SymmetricBuffer& buffer, const at::Tensor& workspace, const BoundLayout& layout, int parity,
             const at::Tensor& x, const at::Tensor& recv_info, const at::Tensor& layout_range,
             const at::Tensor& topk_idx, const at::Tensor& topk_weights, bool zero_copy, const at::Tensor& out,
             const OptTensor& wait_stats, int num_sms) {
        return run_combine<kLaunch>(name, buffer, workspace, layout, parity, x, recv_info, layout_range, topk_idx,
                                    topk_weights, zero_copy, out, wait_stats, num_sms);
      },
      py::kw_only(), py::arg("buffer"), py::arg("workspace"), py::arg("layout"), py::arg("parity"), py::arg("x"),
      py::arg("recv_info"), py::arg("layout_range"), py::arg("topk_idx"), py::arg("topk_weights"),
      py::arg("zero_copy"), py::arg("out"), py::arg("wait_stats"), py::arg("num_sms"));
}

}  // namespace
}  // namespace ll

void register_low_latency(py::module_& m) {
  using ll::Layout;
  py::class_<ll::BoundLayout>(m, "LowLatencyLayout", "Sizes and offsets of the low-latency symmetric buffer (layout.h)")
      .def(py::init(&ll::make_layout), py::arg("num_ranks"), py::arg("num_experts"), py::arg("hidden"),
           py::arg("num_max_tokens"))
      .def_readonly("num_ranks", &Layout::num_ranks)
      .def_readonly("num_experts", &Layout::num_experts)
      .def_readonly("num_local_experts", &Layout::num_local_experts)
      .def_readonly("hidden", &Layout::hidden)
      .def_readonly("num_max_tokens", &Layout::num_max_tokens)
      .def_readonly("combine_slots_per_token", &Layout::combine_slots_per_token)
      .def_readonly("header_bytes", &Layout::header_bytes)
      .def_readonly("msg_bytes", &Layout::msg_bytes)
      .def_readonly("combine_row_bytes", &Layout::combine_row_bytes)
      .def_readonly("combine_send_row_bytes", &Layout::combine_send_row_bytes)
      .def_readonly("count_bytes", &Layout::count_bytes)
      .def_readonly("signal_bytes", &Layout::signal_bytes)
      .def_readonly("send_bytes", &Layout::send_bytes)
      .def_readonly("recv_bytes", &Layout::recv_bytes)
      .def_property_readonly("total_bytes", &Layout::total_bytes)
      .def("signal_offset", &Layout::signal_offset, py::arg("parity"))
      .def("send_offset", &Layout::send_offset, py::arg("parity"))
      .def("recv_offset", &Layout::recv_offset, py::arg("parity"));
  m.attr("LL_WORKSPACE_INTS") = ll::kWorkspaceInts;
  m.def("ll_max_experts", &ll::max_dispatch_smem_experts,
        "largest num_experts the dispatch kernel's shared memory holds");
  ll::def_dispatch<&ll::dispatch_send>(m, "ll_dispatch_send");
  ll::def_dispatch<&ll::dispatch_recv>(m, "ll_dispatch_recv");
  ll::def_combine<&ll::combine_send>(m, "ll_combine_send");
  ll::def_combine<&ll::combine_recv>(m, "ll_combine_recv");
}

}  // namespace deepep
