// Host runtime of the intranode kernels and the pybind11 module deepep_plugin._intranode_C.
//
// The runtime owns: this rank's NVL buffer (queues, num_nvl_bytes) and control block (struct Header), both
// cudaMalloc'ed, zeroed and exported with CUDA IPC handles; the peers' allocations opened from their handles;
// and one page of pinned host memory mapped into the device holding the error mailbox and the receive counters
// of the non-cached dispatch. It allocates no tensors and keeps no per-call state: Python (deepep_plugin/backends/cuda_intranode.py) allocates outputs on the
// current stream and calls the launchers below, which enqueue on the current CUDA stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "common/mailbox.h"
#include "intranode/api.h"

namespace py = pybind11;

namespace deepep::intranode {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("deepep_plugin intranode: ") + what + ": " +
                                                 cudaGetErrorString(e));
}

template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<T*>(t->data_ptr()) : nullptr;
}

// Layout of the pinned, device-mapped host page.
struct HostPage {
  Mailbox mailbox;
  int64_t pad[8];
  int64_t counters[2 + kMaxLocalExperts];  // [0] ready, [1] n_recv, [2 + e] tokens of local expert e
};

class Runtime {
 public:
  Runtime(int rank, int num_ranks, int64_t num_nvl_bytes, int device)
      : rank_(rank), num_ranks_(num_ranks), num_nvl_bytes_(num_nvl_bytes), device_(device) {
    if (num_ranks < 1 || num_ranks > kMaxRanks) throw std::invalid_argument("num_ranks must be in [1, 8]");
    if (rank < 0 || rank >= num_ranks) throw std::invalid_argument("rank out of range");
    if (num_nvl_bytes <= 0) throw std::invalid_argument("num_nvl_bytes must be positive");
    c10::cuda::CUDAGuard guard(device_);
    check_cuda(cudaMalloc(&buffer_, static_cast<size_t>(num_nvl_bytes)), "cudaMalloc of the NVL buffer");
    check_cuda(cudaMemset(buffer_, 0, static_cast<size_t>(num_nvl_bytes)), "cudaMemset of the NVL buffer");
    check_cuda(cudaMalloc(&ctrl_, sizeof(Header)), "cudaMalloc of the control block");
    check_cuda(cudaMemset(ctrl_, 0, sizeof(Header)), "cudaMemset of the control block");
    check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&host_), sizeof(HostPage), cudaHostAllocMapped),
               "cudaHostAlloc of the mailbox");
    std::memset(static_cast<void*>(host_), 0, sizeof(HostPage));
    check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_dev_), host_, 0),
               "cudaHostGetDevicePointer of the mailbox");
    check_cuda(cudaDeviceSynchronize(), "buffer initialisation");
    for (auto& p : peers_) p = nullptr;
    for (auto& p : peer_ctrl_) p = nullptr;
    peers_[rank_] = static_cast<uint8_t*>(buffer_);
    peer_ctrl_[rank_] = static_cast<Header*>(ctrl_);
  }

  ~Runtime() { destroy(); }

  // Two CUDA IPC handles, concatenated: the NVL buffer's, then the control block's.
  py::bytes ipc_handle() const {
    cudaIpcMemHandle_t h[2];
    check_cuda(cudaIpcGetMemHandle(&h[0], buffer_), "cudaIpcGetMemHandle of the NVL buffer");
    check_cuda(cudaIpcGetMemHandle(&h[1], ctrl_), "cudaIpcGetMemHandle of the control block");
    return py::bytes(reinterpret_cast<const char*>(h), sizeof(h));
  }

  void open_peers(const std::vector<py::bytes>& handles) {
    if (static_cast<int>(handles.size()) != num_ranks_) throw std::invalid_argument("need one handle per rank");
    c10::cuda::CUDAGuard guard(device_);
    for (int j = 0; j < num_ranks_; ++j) {
      if (j == rank_) continue;
      std::string s = handles[j];
      cudaIpcMemHandle_t h[2];
      if (s.size() != sizeof(h)) throw std::invalid_argument("bad IPC handle size");
      std::memcpy(h, s.data(), sizeof(h));
      void* p = nullptr;
      check_cuda(cudaIpcOpenMemHandle(&p, h[0], cudaIpcMemLazyEnablePeerAccess),
                 ("cudaIpcOpenMemHandle of rank " + std::to_string(j) + "'s NVL buffer").c_str());
      peers_[j] = static_cast<uint8_t*>(p);
      check_cuda(cudaIpcOpenMemHandle(&p, h[1], cudaIpcMemLazyEnablePeerAccess),
                 ("cudaIpcOpenMemHandle of rank " + std::to_string(j) + "'s control block").c_str());
      peer_ctrl_[j] = static_cast<Header*>(p);
    }
    opened_ = true;
  }

  void destroy() {
    if (destroyed_) return;
    destroyed_ = true;
    cudaSetDevice(device_);
    cudaDeviceSynchronize();
    for (int j = 0; j < num_ranks_; ++j)
      if (j != rank_) {
        if (peers_[j] != nullptr) cudaIpcCloseMemHandle(peers_[j]);
        if (peer_ctrl_[j] != nullptr) cudaIpcCloseMemHandle(peer_ctrl_[j]);
      }
    if (buffer_ != nullptr) cudaFree(buffer_);
    if (ctrl_ != nullptr) cudaFree(ctrl_);
    if (host_ != nullptr) cudaFreeHost(host_);
    buffer_ = nullptr;
    ctrl_ = nullptr;
    host_ = nullptr;
  }

  bool destroyed() const { return destroyed_; }

  at::Tensor local_buffer() const {
    alive();
    return torch::from_blob(buffer_, {num_nvl_bytes_},
                            torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCUDA, device_));
  }

  // --- layout --------------------------------------------------------------------------------------------
  void layout(const at::Tensor& topk_idx, int num_experts, const at::Tensor& num_tokens_per_rank,
              const at::Tensor& num_tokens_per_expert, const at::Tensor& is_token_in_rank) {
    alive();
    LayoutArgs a{};
    a.topk_idx = topk_idx.data_ptr<int64_t>();
    a.num_tokens = static_cast<int>(topk_idx.size(0));
    a.num_topk = static_cast<int>(topk_idx.size(1));
    a.num_experts = num_experts;
    a.num_ranks = num_ranks_;
    a.num_tokens_per_rank = num_tokens_per_rank.data_ptr<int>();
    a.num_tokens_per_expert = num_tokens_per_expert.data_ptr<int>();
    a.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    check_cuda(launch_layout(a, c10::cuda::getCurrentCUDAStream().stream()), "layout kernel launch");
  }

  // --- notify --------------------------------------------------------------------------------------------
  void notify(const at::Tensor& num_tokens_per_rank, const at::Tensor& num_tokens_per_expert,
              const at::Tensor& is_token_in_rank, const at::Tensor& rank_prefix_matrix,
              const at::Tensor& channel_prefix_matrix,
              const at::Tensor& recv_channel_prefix_matrix, int num_channels, int num_local_experts,
              int expert_alignment, bool host_sync, double timeout_s) {
    alive();
    NotifyArgs a{};
    a.peers = peers(); a.env = env(timeout_s);
    a.num_tokens = static_cast<int>(is_token_in_rank.size(0));
    a.num_channels = num_channels;
    a.num_local_experts = num_local_experts;
    a.expert_alignment = expert_alignment;
    a.num_tokens_per_rank = num_tokens_per_rank.data_ptr<int>();
    a.num_tokens_per_expert = num_tokens_per_expert.data_ptr<int>();
    a.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    a.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
    a.channel_prefix_matrix = channel_prefix_matrix.data_ptr<int>();
    a.recv_channel_prefix_matrix = recv_channel_prefix_matrix.data_ptr<int>();
    a.host_counters = nullptr;
    if (host_sync) {
      // Only a non-cached, non-worst dispatch writes the counters, and its caller waits for them before
      // returning, so no earlier kernel can still be writing here.
      reinterpret_cast<volatile int64_t*>(host_->counters)[0] = 0;
      a.host_counters = host_dev_->counters;
    }
    check_cuda(launch_notify(a, c10::cuda::getCurrentCUDAStream().stream()), "notify kernel launch");
  }

  // Wait (GIL released) until the notify kernel published the receive counts. Returns
  // (status, n_recv, per-expert counts): status 0 = ready, 1 = the host wait timed out, 2 = a kernel
  // reported an error in the mailbox.
  std::tuple<int, int64_t, std::vector<int64_t>> wait_recv_counts(int num_local_experts, double timeout_s) {
    alive();
    int status = 1;
    {
      py::gil_scoped_release release;
      volatile int64_t* ready = reinterpret_cast<volatile int64_t*>(host_->counters);
      const auto start = std::chrono::steady_clock::now();
      for (uint64_t it = 0;; ++it) {
        if (*ready != 0) {
          status = 0;
          break;
        }
        if (host_->mailbox.status != kMailboxEmpty) {
          status = 2;
          break;
        }
        if ((it & 1023u) == 0) {
          const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          if (waited > timeout_s) break;
          std::this_thread::yield();
        }
      }
    }
    std::vector<int64_t> per_expert;
    int64_t n_recv = -1;
    if (status == 0) {
      std::atomic_thread_fence(std::memory_order_acquire);
      volatile int64_t* c = reinterpret_cast<volatile int64_t*>(host_->counters);
      n_recv = c[1];
      per_expert.resize(num_local_experts);
      for (int e = 0; e < num_local_experts; ++e) per_expert[e] = c[2 + e];
    }
    return {status, n_recv, per_expert};
  }

  // --- dispatch ------------------------------------------------------------------------------------------
  void dispatch(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
                const at::Tensor& is_token_in_rank, const at::Tensor& rank_prefix_matrix,
                const at::Tensor& recv_channel_prefix_matrix, const at::Tensor& recv_x,
                const std::optional<at::Tensor>& recv_scales, const std::optional<at::Tensor>& recv_topk_idx,
                const std::optional<at::Tensor>& recv_topk_weights, const std::optional<at::Tensor>& recv_src_idx,
                const std::optional<at::Tensor>& send_head, int num_channels, int queue_tokens,
                int num_local_experts, bool worst_mode, double timeout_s) {
    alive();
    DispatchArgs a{};
    a.peers = peers(); a.env = env(timeout_s);
    a.num_tokens = static_cast<int>(x.size(0));
    a.num_channels = num_channels;
    a.queue_tokens = queue_tokens;
    const int row_bytes = static_cast<int>(x.size(1) * x.element_size());
    a.num_scales = x_scales.has_value() ? static_cast<int>(x_scales->size(1)) : 0;
    a.num_topk = topk_idx.has_value() ? static_cast<int>(topk_idx->size(1)) : 0;
    a.num_local_experts = num_local_experts;
    a.slot = dispatch_slot(row_bytes, a.num_scales, a.num_topk);
    a.scale_stride_token = x_scales.has_value() ? x_scales->stride(0) : 0;
    a.scale_stride_elem = x_scales.has_value() ? x_scales->stride(1) : 0;
    a.x = static_cast<const uint8_t*>(x.data_ptr());
    a.x_scales = ptr_or_null<const int32_t>(x_scales);
    a.topk_idx = ptr_or_null<const int64_t>(topk_idx);
    a.topk_weights = ptr_or_null<const float>(topk_weights);
    a.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    a.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
    a.recv_channel_prefix_matrix = recv_channel_prefix_matrix.data_ptr<int>();
    a.recv_x = static_cast<uint8_t*>(recv_x.data_ptr());
    a.recv_scales = ptr_or_null<int32_t>(recv_scales);
    a.recv_topk_idx = ptr_or_null<int64_t>(recv_topk_idx);
    a.recv_topk_weights = ptr_or_null<float>(recv_topk_weights);
    a.recv_src_idx = ptr_or_null<int>(recv_src_idx);
    a.send_head = ptr_or_null<int>(send_head);
    a.num_rows = static_cast<int>(recv_x.size(0));
    a.worst_mode = worst_mode ? 1 : 0;
    check_cuda(launch_dispatch(a, c10::cuda::getCurrentCUDAStream().stream()), "dispatch kernel launch");
  }

  // --- combine -------------------------------------------------------------------------------------------
  void combine(const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
               const std::optional<at::Tensor>& bias0, const std::optional<at::Tensor>& bias1,
               const at::Tensor& rank_prefix_matrix, const at::Tensor& channel_prefix_matrix,
               const at::Tensor& recv_channel_prefix_matrix, const at::Tensor& send_head, const at::Tensor& combined_x,
               const std::optional<at::Tensor>& combined_topk_weights, int num_channels, int queue_tokens,
               double timeout_s) {
    alive();
    CombineArgs a{};
    a.peers = peers(); a.env = env(timeout_s);
    a.num_tokens = static_cast<int>(send_head.size(0));
    a.num_channels = num_channels;
    a.queue_tokens = queue_tokens;
    a.hidden = static_cast<int>(x.size(1));
    a.num_topk = topk_weights.has_value() ? static_cast<int>(topk_weights->size(1)) : 0;
    a.slot = combine_slot(a.hidden * 2, a.num_topk);
    a.x = static_cast<const uint16_t*>(x.data_ptr());
    a.topk_weights = ptr_or_null<const float>(topk_weights);
    a.bias0 = ptr_or_null<const uint16_t>(bias0);
    a.bias1 = ptr_or_null<const uint16_t>(bias1);
    a.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
    a.channel_prefix_matrix = channel_prefix_matrix.data_ptr<int>();
    a.recv_channel_prefix_matrix = recv_channel_prefix_matrix.data_ptr<int>();
    a.send_head = send_head.data_ptr<int>();
    a.combined_x = static_cast<uint16_t*>(combined_x.data_ptr());
    a.combined_topk_weights = ptr_or_null<float>(combined_topk_weights);
    check_cuda(launch_combine(a, c10::cuda::getCurrentCUDAStream().stream()), "combine kernel launch");
  }

  // --- errors --------------------------------------------------------------------------------------------
  // (status, rank, peer, channel, what, what_name, detail, observed); status 0 = no error. An overflow
  // report is cleared once read (the buffer stays consistent); a timeout stays (the buffer is unusable).
  py::tuple read_mailbox() {
    if (destroyed_) return py::make_tuple(0, -1, -1, -1, 0, "", 0, 0);
    const Mailbox& m = host_->mailbox;
    const int status = m.status;
    if (status == kMailboxEmpty) return py::make_tuple(0, -1, -1, -1, 0, "", 0, 0);
    std::atomic_thread_fence(std::memory_order_acquire);
    py::tuple t = py::make_tuple(status, m.rank, m.peer, m.channel, m.what, std::string(wait_name(m.what)),
                                 m.detail, m.observed);
    if (status == kMailboxOverflow) host_->mailbox.status = kMailboxEmpty;
    return t;
  }

  static int dispatch_slot_bytes(int row_bytes, int num_scales, int num_topk) {
    return dispatch_slot(row_bytes, num_scales, num_topk).slot_bytes;
  }
  static int combine_slot_bytes(int row_bytes, int num_topk) { return combine_slot(row_bytes, num_topk).slot_bytes; }

 private:
  void alive() const {
    if (destroyed_) throw std::runtime_error("deepep_plugin intranode runtime used after destroy()");
  }
  Peers peers() const {
    if (!opened_ && num_ranks_ > 1) throw std::runtime_error("intranode runtime: peers not opened");
    Peers p{};
    for (int j = 0; j < kMaxRanks; ++j) {
      p.buffers[j] = peers_[j];
      p.ctrl[j] = peer_ctrl_[j];
    }
    p.rank = rank_;
    p.num_ranks = num_ranks_;
    p.region_bytes = region_bytes_of(static_cast<size_t>(num_nvl_bytes_), num_ranks_);
    return p;
  }
  ErrorEnv env(double timeout_s) const {
    ErrorEnv e{};
    e.abort_flag = &static_cast<Header*>(ctrl_)->abort_flag;
    e.mailbox = &host_dev_->mailbox;
    e.timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
    e.rank = rank_;
    return e;
  }

  int rank_, num_ranks_;
  int64_t num_nvl_bytes_;
  int device_;
  void* buffer_ = nullptr;
  void* ctrl_ = nullptr;
  HostPage* host_ = nullptr;
  HostPage* host_dev_ = nullptr;
  uint8_t* peers_[kMaxRanks];
  Header* peer_ctrl_[kMaxRanks];
  bool opened_ = false;
  bool destroyed_ = false;
};

}  // namespace
}  // namespace deepep::intranode

PYBIND11_MODULE(_intranode_C, m) {
  using deepep::intranode::Runtime;
  m.doc() = "deepep_plugin intranode NVLink kernels (CUDA IPC buffers, layout/notify/dispatch/combine)";
  py::class_<Runtime>(m, "Runtime")
      .def(py::init<int, int, int64_t, int>(), py::arg("rank"), py::arg("num_ranks"), py::arg("num_nvl_bytes"),
           py::arg("device"))
      .def("ipc_handle", &Runtime::ipc_handle)
      .def("open_peers", &Runtime::open_peers)
      .def("destroy", &Runtime::destroy)
      .def("destroyed", &Runtime::destroyed)
      .def("local_buffer", &Runtime::local_buffer)
      .def("layout", &Runtime::layout)
      .def("notify", &Runtime::notify)
      .def("wait_recv_counts", &Runtime::wait_recv_counts)
      .def("dispatch", &Runtime::dispatch)
      .def("combine", &Runtime::combine)
      .def("read_mailbox", &Runtime::read_mailbox)
      .def_static("dispatch_slot_bytes", &Runtime::dispatch_slot_bytes)
      .def_static("combine_slot_bytes", &Runtime::combine_slot_bytes);
}
