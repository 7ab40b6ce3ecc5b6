// Host runtime of the intranode kernels and the pybind11 module deepep_plugin._intranode_C.
//
// The runtime owns: this rank's NVL buffer (queues, num_nvl_bytes) and control block (struct Header), both
// cudaMalloc'ed, zeroed and exported with CUDA IPC handles; the peers' allocations opened from their handles;
// the layout scratch (LayoutWork); and one page of pinned host memory mapped into the device holding the error
// mailbox and the receive counters of the non-cached dispatch.
//
// One call per op (layout, fresh dispatch, cached dispatch, combine): it checks what the kernels need, allocates
// the outputs on the current stream, enqueues the kernels there and returns the tensors, so the Python side
// (deepep_plugin/backends/cuda_intranode.py) costs one bound call per op. Calls are ordered among themselves even
// when they come from different streams (the ring counters are read at kernel start and written at kernel end):
// a call on another stream than the previous call's first makes its stream wait for that one (one event), and a
// call on the same stream costs nothing extra (common/stream_order.h; inside one CUDA-graph capture the wait is
// captured, between a capture and eager calls the caller orders them).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common/mailbox.h"
#include "common/py_errors.h"
#include "common/stream_order.h"
#include "intranode/api.h"

namespace py = pybind11;

namespace deepep::intranode {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("deepep_plugin intranode: ") + what + ": " +
                                                 cudaGetErrorString(e));
}

// Dispatch tuning from the environment, read once per process (dispatch.cu's header says what each does):
//   DEEPEP_PLUGIN_DISPATCH_LOCAL_SPLIT  1 (default): sender and receiver blocks share the copy of this rank's own
//                                       tokens; 0: the receiver blocks copy them all
//   DEEPEP_PLUGIN_COPY_DEPTH            8 (default) or 4: 16-byte loads in flight per lane in dispatch's row copies
//   DEEPEP_PLUGIN_EARLY_DISPATCH        1: a fresh dispatch without num_worst_tokens whose sends fit in the queues
//                                       enqueues its senders before the host reads the receive count and the rest
//                                       after (dispatch.cu: split launch); 0 (default): one launch after the read
//   DEEPEP_PLUGIN_COMBINE_SHARE         1 (default): a combine channel's sender block, its sends out, takes
//                                       reduction rounds too (combine.cu: shared rounds); 0: the receiver block
//                                       does them all
//   DEEPEP_PLUGIN_COMBINE_SMALL_ROUNDS  1 (default): a combine channel of fewer than 32 tokens reduces each token
//                                       with 2 or 4 warps in rounds of 16 or 8 tokens (combine.cu: run_reducer);
//                                       0: one warp per token in rounds of 32
struct DispatchTuning {
  int local_split = 1;
  int copy_depth = 8;
  int early = 0;  // opt-in: measured slower on an H100 (RESULTS.md, 2026-12-07 night)
  int combine_share = 1;  // measured on an H100, 2 and 4 ranks (RESULTS.md, 2026-12-07 night)
  int combine_small_rounds = 1;  // measured on an H100, 2 and 4 ranks (RESULTS.md, 2026-12-07, last session)
};

int env_choice(const char* name, int fallback, std::initializer_list<int> allowed) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  std::string text(v);
  for (int a : allowed)
    if (text == std::to_string(a)) return a;
  std::string options;
  for (int a : allowed) options += (options.empty() ? "" : ", ") + std::to_string(a);
  throw InputError(std::string(name) + " must be one of " + options + ", got '" + text + "'");
}

const DispatchTuning& dispatch_tuning() {
  static const DispatchTuning t{env_choice("DEEPEP_PLUGIN_DISPATCH_LOCAL_SPLIT", 1, {0, 1}),
                                env_choice("DEEPEP_PLUGIN_COPY_DEPTH", 8, {4, 8}),
                                env_choice("DEEPEP_PLUGIN_EARLY_DISPATCH", 0, {0, 1}),
                                env_choice("DEEPEP_PLUGIN_COMBINE_SHARE", 1, {0, 1}),
                                env_choice("DEEPEP_PLUGIN_COMBINE_SMALL_ROUNDS", 1, {0, 1})};
  return t;
}

// Bad input raises deepep::InputError / BufferTooSmall (common/py_errors.h), which Python receives as
// deepep_plugin.errors.DeepEPInputError / DeepEPBufferTooSmall.
// The mailbox holds a report (a timeout, an overflow, a bad id): Python reads it and raises the right error.
struct MailboxPending : std::runtime_error {
  using std::runtime_error::runtime_error;
};

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

// Status of a fresh dispatch's wait for the receive counts (the last element of dispatch_fresh's result).
enum WaitStatus : int { kWaitOk = 0, kWaitHostTimeout = 1, kWaitKernelTimeout = 2 };

class Runtime {
 public:
  Runtime(int rank, int num_ranks, int64_t num_nvl_bytes, int device)
      : rank_(rank), num_ranks_(num_ranks), num_nvl_bytes_(num_nvl_bytes), device_(device) {
    if (num_ranks < 1 || num_ranks > kMaxRanks) throw std::invalid_argument("num_ranks must be in [1, 8]");
    if (rank < 0 || rank >= num_ranks) throw std::invalid_argument("rank out of range");
    if (num_nvl_bytes <= 0) throw std::invalid_argument("num_nvl_bytes must be positive");
    dispatch_tuning();  // a bad DEEPEP_PLUGIN_* tuning value fails here, on every rank, not inside a dispatch
    c10::cuda::CUDAGuard guard(device_);
    check_cuda(cudaMalloc(&buffer_, static_cast<size_t>(num_nvl_bytes)), "cudaMalloc of the NVL buffer");
    check_cuda(cudaMemset(buffer_, 0, static_cast<size_t>(num_nvl_bytes)), "cudaMemset of the NVL buffer");
    check_cuda(cudaMalloc(&ctrl_, sizeof(Header)), "cudaMalloc of the control block");
    check_cuda(cudaMemset(ctrl_, 0, sizeof(Header)), "cudaMemset of the control block");
    check_cuda(cudaMalloc(&work_, sizeof(LayoutWork)), "cudaMalloc of the layout scratch");
    check_cuda(cudaMemset(work_, 0, sizeof(LayoutWork)), "cudaMemset of the layout scratch");
    check_cuda(cudaMemset(&work_->first_bad, 0xff, sizeof(work_->first_bad)), "cudaMemset of the layout scratch");
    check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&host_), sizeof(HostPage), cudaHostAllocMapped),
               "cudaHostAlloc of the mailbox");
    std::memset(static_cast<void*>(host_), 0, sizeof(HostPage));
    check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_dev_), host_, 0),
               "cudaHostGetDevicePointer of the mailbox");
    order_.open();
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
    if (work_ != nullptr) cudaFree(work_);
    if (host_ != nullptr) cudaFreeHost(host_);
    order_.close();
    buffer_ = nullptr;
    ctrl_ = nullptr;
    work_ = nullptr;
    host_ = nullptr;
  }

  bool destroyed() const { return destroyed_; }

  at::Tensor local_buffer() const {
    alive();
    return torch::from_blob(buffer_, {num_nvl_bytes_},
                            torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCUDA, device_));
  }

  // Host waits on the GPU this runtime made (fresh dispatches without num_worst_tokens), for tests.
  int64_t host_waits() const { return host_waits_; }
  // Fresh dispatches run as a split launch (DEEPEP_PLUGIN_EARLY_DISPATCH=1 and the sends fit), for tests.
  int64_t split_launches() const { return split_launches_; }
  // The host clock (steady_clock ns, CLOCK_MONOTONIC: Python's time.perf_counter_ns) at the steps of the last
  // fresh dispatch without num_worst_tokens: entry, notify enqueued, receive count seen, outputs allocated,
  // dispatch enqueued, return. For the benchmark's unprofiled host breakdown (bench compare --host-stamps).
  std::vector<int64_t> fresh_stamps() const { return std::vector<int64_t>(stamps_, stamps_ + kStamps); }

  // --- layout --------------------------------------------------------------------------------------------
  // (num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool).
  py::tuple layout(const at::Tensor& topk_idx, int64_t num_experts) {
    enter(topk_idx, "get_dispatch_layout: topk_idx");
    if (num_experts <= 0 || num_experts % num_ranks_ != 0 || num_experts / num_ranks_ > kMaxLocalExperts)
      throw InputError("get_dispatch_layout: num_experts must be a positive multiple of the group size (" +
                       std::to_string(num_ranks_) + ") with at most " + std::to_string(kMaxLocalExperts) +
                       " experts per rank, got " + std::to_string(num_experts));
    const cudaStream_t stream = call_stream();
    const int64_t T = topk_idx.size(0);
    const auto ints = topk_idx.options().dtype(at::kInt);
    at::Tensor per_rank = at::empty({num_ranks_}, ints);
    at::Tensor per_expert = at::empty({num_experts}, ints);
    at::Tensor in_rank = at::empty({T, num_ranks_}, topk_idx.options().dtype(at::kBool));
    LayoutArgs a{};
    a.env = env(0.0);
    a.work = work_;
    a.topk_idx = topk_idx.data_ptr<int64_t>();
    a.num_tokens = static_cast<int>(T);
    a.num_topk = static_cast<int>(topk_idx.size(1));
    a.num_experts = static_cast<int>(num_experts);
    a.num_ranks = num_ranks_;
    a.num_tokens_per_rank = per_rank.data_ptr<int>();
    a.num_tokens_per_expert = per_expert.data_ptr<int>();
    a.is_token_in_rank = in_rank.data_ptr<bool>();
    check_cuda(launch_layout(a, stream), "layout kernel launch");
    leave();
    return py::make_tuple(per_rank, per_expert, in_rank);
  }

  // --- fresh dispatch: notify, the receive-count read (unless num_worst_tokens), dispatch ----------------
  // Returns (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per-expert counts [list], rank_prefix,
  // channel_prefix, recv_channel_prefix, recv_src_idx, send_head, status): status 0 = done, 1 = the host wait
  // timed out, 2 = a kernel reported a timeout (nothing was dispatched), 3 = done, but the mailbox holds a
  // report (a bad id, an overflow): Python raises it.
  py::tuple dispatch_fresh(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                           const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
                           const at::Tensor& num_tokens_per_rank, const at::Tensor& num_tokens_per_expert,
                           const at::Tensor& is_token_in_rank, int num_channels, int queue_tokens,
                           int expert_alignment, int64_t num_worst_tokens, double timeout_s) {
    stamp(0);
    enter(x, "dispatch: x");
    const int R = num_ranks_, C = num_channels;
    const int64_t E = num_tokens_per_expert.numel();
    if (E % R != 0 || E / R > kMaxLocalExperts)
      throw InputError("dispatch: num_tokens_per_expert must have a multiple of the group size (" +
                       std::to_string(R) + ") entries, at most " + std::to_string(kMaxLocalExperts) +
                       " per rank, got " + std::to_string(E));
    const int E_loc = static_cast<int>(E / R);
    const DispatchSlot slot = check_dispatch(x, x_scales, topk_idx, C, queue_tokens);
    const bool worst = num_worst_tokens > 0;
    const cudaStream_t current = c10::cuda::getCurrentCUDAStream(device_).stream();
    if (!worst && current != nullptr && current != cudaStreamLegacy) {
      // (The legacy stream never captures, and asking about it while another stream captures would break that
      // capture: stream_order.h.)
      cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
      check_cuda(cudaStreamIsCapturing(current, &capturing), "cudaStreamIsCapturing");
      if (capturing != cudaStreamCaptureStatusNone)
        throw InputError("dispatch: a non-cached dispatch without num_worst_tokens reads the receive count on the "
                         "host, which a CUDA graph capture cannot do; pass num_worst_tokens (or a handle) to capture");
    }
    const cudaStream_t stream = call_stream();
    const auto ints = x.options().dtype(at::kInt);
    at::Tensor rank_prefix = at::empty({R, R}, ints);
    at::Tensor channel_prefix = at::empty({R, C}, ints);
    at::Tensor recv_channel_prefix = at::empty({R, C}, ints);
    const int64_t T = x.size(0);
    const int K = topk_idx.has_value() ? static_cast<int>(topk_idx->size(1)) : 0;
    at::Tensor send_head = at::empty({T, R}, ints);  // before notify, like every allocation the kernels need

    NotifyArgs n{};
    n.peers = peers();
    n.env = env(timeout_s);
    n.num_tokens = static_cast<int>(x.size(0));
    n.num_channels = C;
    n.num_local_experts = E_loc;
    n.expert_alignment = expert_alignment;
    n.num_tokens_per_rank = num_tokens_per_rank.data_ptr<int>();
    n.num_tokens_per_expert = num_tokens_per_expert.data_ptr<int>();
    n.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    n.rank_prefix_matrix = rank_prefix.data_ptr<int>();
    n.channel_prefix_matrix = channel_prefix.data_ptr<int>();
    n.recv_channel_prefix_matrix = recv_channel_prefix.data_ptr<int>();
    n.host_counters = nullptr;
    if (!worst) {
      // Only a fresh dispatch without num_worst_tokens writes the counters, and it waits for them before
      // returning, so no earlier kernel can still be writing here.
      reinterpret_cast<volatile int64_t*>(host_->counters)[0] = 0;
      n.host_counters = host_dev_->counters;
    }
    check_cuda(launch_notify(n, stream), "notify kernel launch");

    // Split launch (dispatch.cu's header): when every channel's sends fit in its queue, the senders' phase is
    // enqueued now, so the NVLink pushes run while the host reads the count and allocates; the rest follows.
    // (After a host timeout of the count read, phase 1 may still push into the peers' queues once notify ends; the
    // buffer is declared broken then, and destroy() waits for it: phase 1 itself never waits.)
    at::Tensor recv_x, recv_src_idx;
    std::optional<at::Tensor> recv_scales, recv_topk_idx, recv_topk_weights;
    // The dispatch kernel of this call, in `phase`; without outputs it consumes and drops every row.
    auto launch = [&](bool with_outputs, int phase) {
      if (with_outputs)
        launch_dispatch_kernel(x, x_scales, topk_idx, topk_weights, is_token_in_rank, rank_prefix,
                               recv_channel_prefix, recv_x, recv_scales, recv_topk_idx, recv_topk_weights,
                               &recv_src_idx, &send_head, slot, C, queue_tokens, E_loc, worst, timeout_s, stream,
                               phase);
      else
        launch_dispatch_kernel(x, x_scales, topk_idx, topk_weights, is_token_in_rank, rank_prefix,
                               recv_channel_prefix, std::nullopt, std::nullopt, std::nullopt, std::nullopt, nullptr,
                               &send_head, slot, C, queue_tokens, E_loc, false, timeout_s, stream, phase);
    };
    const bool split = !worst && dispatch_tuning().early && R > 1 && T > 0 && (T + C - 1) / C <= queue_tokens;
    split_launches_ += split ? 1 : 0;
    if (split) launch(/*with_outputs=*/false, /*phase=*/1);
    const int phase = split ? 2 : 0;
    stamp(1);

    int64_t rows = num_worst_tokens;
    if (!worst) {
      const int status = wait_recv_counts(2.0 * timeout_s + 1.0);
      if (status != kWaitOk) return py::make_tuple(py::none(), py::none(), py::none(), py::none(), py::none(),
                                                   py::none(), py::none(), py::none(), py::none(), py::none(),
                                                   status);
      rows = reinterpret_cast<volatile int64_t*>(host_->counters)[1];
      stamp(2);
    }
    try {
      recv_x = at::empty({rows, x.size(1)}, x.options());
      if (x_scales.has_value()) recv_scales = at::empty({rows, x_scales->size(1)}, x_scales->options());
      if (topk_idx.has_value()) {
        recv_topk_idx = at::empty({rows, K}, topk_idx->options());
        recv_topk_weights = at::empty({rows, K}, topk_weights->options());
      }
      recv_src_idx = at::empty({rows}, ints);
    } catch (...) {
      // The peers' dispatch goes on regardless: this rank's kernel consumes and drops every row (it has no
      // outputs), so theirs complete and the queues stay in step; then the allocator's error is raised here.
      try {
        launch(/*with_outputs=*/false, phase);
      } catch (...) {  // the allocator's error is the one to report; the peers then time out
      }
      throw;
    }
    stamp(3);
    launch(/*with_outputs=*/true, phase);
    stamp(4);
    // The per-expert list (E_loc Python ints) is built once the kernel is on its way, not in the GPU's idle gap
    // between notify and dispatch; only notify writes the counters, and the next one is a later call's.
    py::list per_expert;
    if (!worst) {
      const volatile int64_t* c = reinterpret_cast<volatile int64_t*>(host_->counters);
      for (int e = 0; e < E_loc; ++e) per_expert.append(static_cast<int64_t>(c[2 + e]));
    }
    const int status = host_->mailbox.status != kMailboxEmpty ? 3 : 0;
    stamp(5);
    return py::make_tuple(recv_x, opt(recv_scales), opt(recv_topk_idx), opt(recv_topk_weights), per_expert,
                          rank_prefix, channel_prefix, recv_channel_prefix, recv_src_idx, send_head, status);
  }

  // --- cached dispatch: the handle's layout, no notify, no host read --------------------------------------
  // Returns (recv_x [rows, H], recv_scales [rows, S] or None). Rows past the received count (the padding of a
  // num_worst_tokens handle, whether or not this call passes num_worst_tokens) come back zero; without padding
  // that costs nothing.
  py::tuple dispatch_cached(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                            const at::Tensor& is_token_in_rank, const at::Tensor& rank_prefix,
                            const at::Tensor& recv_channel_prefix, int64_t rows, int num_channels, int queue_tokens,
                            double timeout_s) {
    enter(x, "dispatch: x");
    const int C = num_channels;
    if (recv_channel_prefix.size(1) != C)
      throw InputError("cached dispatch: the handle was made with num_sms=" +
                       std::to_string(2 * recv_channel_prefix.size(1)) + ", config has num_sms=" +
                       std::to_string(2 * C));
    if (is_token_in_rank.size(0) != x.size(0))
      throw InputError("cached dispatch: x has " + std::to_string(x.size(0)) + " tokens, the handle was made for " +
                       std::to_string(is_token_in_rank.size(0)));
    const DispatchSlot slot = check_dispatch(x, x_scales, std::nullopt, C, queue_tokens);
    const cudaStream_t stream = call_stream();
    at::Tensor recv_x = at::empty({rows, x.size(1)}, x.options());
    std::optional<at::Tensor> recv_scales;
    if (x_scales.has_value()) recv_scales = at::empty({rows, x_scales->size(1)}, x_scales->options());
    launch_dispatch_kernel(x, x_scales, std::nullopt, std::nullopt, is_token_in_rank, rank_prefix,
                           recv_channel_prefix, recv_x, recv_scales, std::nullopt, std::nullopt, nullptr, nullptr,
                           slot, C, queue_tokens, 1, /*worst=*/true, timeout_s, stream);
    leave();
    return py::make_tuple(recv_x, opt(recv_scales));
  }

  // --- combine -------------------------------------------------------------------------------------------
  // Returns (combined_x [T, H] bf16, combined_topk_weights [T, K] float32 or None).
  py::tuple combine(const at::Tensor& x_in, const std::optional<at::Tensor>& topk_weights,
                    const std::optional<at::Tensor>& bias0, const std::optional<at::Tensor>& bias1,
                    const at::Tensor& rank_prefix_matrix, const at::Tensor& channel_prefix_matrix,
                    const at::Tensor& recv_channel_prefix_matrix, const at::Tensor& send_head, int queue_tokens,
                    double timeout_s) {
    enter(x_in, "combine: x");
    if (x_in.scalar_type() != at::kBFloat16)
      throw InputError(std::string("combine: x must be bfloat16, got ") + c10::toString(x_in.scalar_type()));
    const at::Tensor x = x_in.contiguous();
    const int C = static_cast<int>(channel_prefix_matrix.size(1));
    const int H = static_cast<int>(x.size(1));
    if (H % 8 != 0) throw InputError("combine: hidden must be a multiple of 8, got " + std::to_string(H));
    const int K = topk_weights.has_value() ? static_cast<int>(topk_weights->size(1)) : 0;
    const CombineSlot slot = combine_slot(H * 2, K);
    check_size("combine", C, queue_tokens, slot.slot_bytes);
    const cudaStream_t stream = call_stream();
    const int64_t T = send_head.size(0);
    at::Tensor combined_x = at::empty({T, H}, x.options());
    std::optional<at::Tensor> combined_w;
    if (topk_weights.has_value()) combined_w = at::empty({T, K}, topk_weights->options());
    CombineArgs a{};
    a.peers = peers();
    a.env = env(timeout_s);
    a.num_tokens = static_cast<int>(T);
    a.num_channels = C;
    a.queue_tokens = queue_tokens;
    a.hidden = H;
    a.num_topk = K;
    a.slot = slot;
    a.x = static_cast<const uint16_t*>(x.data_ptr());
    a.topk_weights = ptr_or_null<const float>(topk_weights);
    a.bias0 = ptr_or_null<const uint16_t>(bias0);
    a.bias1 = ptr_or_null<const uint16_t>(bias1);
    a.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
    a.channel_prefix_matrix = channel_prefix_matrix.data_ptr<int>();
    a.recv_channel_prefix_matrix = recv_channel_prefix_matrix.data_ptr<int>();
    a.send_head = send_head.data_ptr<int>();
    a.combined_x = static_cast<uint16_t*>(combined_x.data_ptr());
    a.combined_topk_weights = ptr_or_null<float>(combined_w);
    const DispatchTuning& tuning = dispatch_tuning();
    a.share_rounds = tuning.combine_share;
    a.small_rounds = tuning.combine_small_rounds;
    check_cuda(launch_combine(a, stream), "combine kernel launch");
    leave();
    return py::make_tuple(combined_x, opt(combined_w));
  }

  // --- errors --------------------------------------------------------------------------------------------
  // (status, rank, peer, channel, what, what_name, detail, observed); status 0 = no error. An overflow or
  // bad-input report is cleared once read (the buffer stays consistent); a timeout stays (the buffer is
  // unusable).
  py::tuple read_mailbox() {
    if (destroyed_) return py::make_tuple(0, -1, -1, -1, 0, "", 0, 0);
    const Mailbox& m = host_->mailbox;
    const int status = m.status;
    if (status == kMailboxEmpty) return py::make_tuple(0, -1, -1, -1, 0, "", 0, 0);
    std::atomic_thread_fence(std::memory_order_acquire);
    py::tuple t = py::make_tuple(status, m.rank, m.peer, m.channel, m.what, std::string(wait_name(m.what)),
                                 m.detail, m.observed);
    if (status != kMailboxTimeout) host_->mailbox.status = kMailboxEmpty;
    return t;
  }

 private:
  static py::object opt(const std::optional<at::Tensor>& t) {
    return t.has_value() ? py::cast(*t) : py::none();
  }

  void alive() const {
    if (destroyed_) throw std::runtime_error("deepep_plugin intranode runtime used after destroy()");
  }

  // Every op starts here: a live runtime, an empty mailbox (else Python raises what it holds), `t` on this GPU.
  // A timeout report refuses every call (the queues are in an unknown state). Other reports (a bad id, an
  // overflow) leave the buffer consistent: the call still enqueues its work, so the peers' matching calls
  // complete, and leave() raises the report afterwards.
  void enter(const at::Tensor& t, const char* what) const {
    alive();
    if (host_->mailbox.status == kMailboxTimeout) throw MailboxPending("mailbox");
    if (!t.is_cuda() || t.get_device() != device_)
      throw InputError(std::string(what) + " must be on cuda:" + std::to_string(device_) + " (this Buffer's GPU), got " +
                       t.device().str());
  }

  void leave() const {
    if (host_->mailbox.status != kMailboxEmpty) throw MailboxPending("mailbox");
  }

  // The current stream, made to wait for the previous call when that one was enqueued on another stream.
  cudaStream_t call_stream() {
    const cudaStream_t s = c10::cuda::getCurrentCUDAStream(device_).stream();
    order_.enter(s);
    return s;
  }

  void check_size(const char* what, int C, int Q, int slot_bytes) const {
    const size_t region = region_bytes_of(static_cast<size_t>(num_nvl_bytes_), num_ranks_);
    const size_t need = static_cast<size_t>(C) * Q * slot_bytes;
    if (need > region)
      throw BufferTooSmall(std::string(what) + ": the NVL buffer has " + std::to_string(num_nvl_bytes_) +
                           " bytes but this call needs " + std::to_string(num_ranks_ * (need + 15)) + " (" +
                           std::to_string(num_ranks_) + " ranks x " + std::to_string(C) + " channels x " +
                           std::to_string(Q) + " queue slots x " + std::to_string(slot_bytes) +
                           " bytes per message); size it with Config.get_nvl_buffer_size_hint or lower num_sms / "
                           "num_max_nvl_chunked_recv_tokens");
  }

  DispatchSlot check_dispatch(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                              const std::optional<at::Tensor>& topk_idx, int C, int Q) const {
    if (C < 1 || C > kMaxChannels)
      throw InputError("dispatch: config.num_sms must be in [2, " + std::to_string(2 * kMaxChannels) + "], got " +
                       std::to_string(2 * C));
    const int64_t row_bytes = x.size(1) * static_cast<int64_t>(x.element_size());
    if (row_bytes % 16 != 0)
      throw InputError("dispatch: x: hidden * element_size must be a multiple of 16 bytes, got " +
                       std::to_string(row_bytes));
    const int K = topk_idx.has_value() ? static_cast<int>(topk_idx->size(1)) : 0;
    if (K > 32) throw InputError("dispatch: topk_idx: at most 32 top-k slots, got " + std::to_string(K));
    int S = 0;
    if (x_scales.has_value()) {
      if (x_scales->element_size() != 4) throw InputError("dispatch: x_scales must be float32 or int32");
      S = static_cast<int>(x_scales->size(1));
    }
    const DispatchSlot slot = dispatch_slot(static_cast<int>(row_bytes), S, K);
    check_size("dispatch", C, Q, slot.slot_bytes);
    return slot;
  }

  // Wait (GIL released) until the notify kernel published the receive counts: kWaitOk, kWaitHostTimeout, or
  // kWaitKernelTimeout when a kernel of this rank reported a timeout (a bad-id or overflow report does not stop
  // the wait: the collective goes on and Python raises the report after the dispatch is enqueued).
  int wait_recv_counts(double timeout_s) {
    ++host_waits_;
    int status = kWaitHostTimeout;
    py::gil_scoped_release release;
    volatile int64_t* ready = reinterpret_cast<volatile int64_t*>(host_->counters);
    const auto start = std::chrono::steady_clock::now();
    for (uint64_t it = 0;; ++it) {
      if (*ready != 0) {
        status = kWaitOk;
        break;
      }
      if (host_->mailbox.status == kMailboxTimeout) {
        status = kWaitKernelTimeout;
        break;
      }
#if defined(__x86_64__) || defined(__i386__)
      _mm_pause();  // spin politely: a hyperthread sibling may be another rank's host path
#endif
      if ((it & 1023u) == 0) {
        const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (waited > timeout_s) break;
        if (waited > 1e-3) std::this_thread::yield();
      }
    }
    std::atomic_thread_fence(std::memory_order_acquire);
    return status;
  }

  // The outputs are the recv_* tensors; without them (recv_x absent) every row is consumed and dropped. `phase`:
  // DispatchArgs::phase.
  void launch_dispatch_kernel(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                              const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
                              const at::Tensor& is_token_in_rank, const at::Tensor& rank_prefix,
                              const at::Tensor& recv_channel_prefix, const std::optional<at::Tensor>& recv_x,
                              const std::optional<at::Tensor>& recv_scales,
                              const std::optional<at::Tensor>& recv_topk_idx,
                              const std::optional<at::Tensor>& recv_topk_weights, at::Tensor* recv_src_idx,
                              at::Tensor* send_head, const DispatchSlot& slot, int C, int Q, int num_local_experts,
                              bool worst, double timeout_s, cudaStream_t stream, int phase = 0) {
    DispatchArgs a{};
    a.peers = peers();
    a.env = env(timeout_s);
    a.num_tokens = static_cast<int>(x.size(0));
    a.num_channels = C;
    a.queue_tokens = Q;
    a.num_scales = x_scales.has_value() ? static_cast<int>(x_scales->size(1)) : 0;
    a.num_topk = topk_idx.has_value() ? static_cast<int>(topk_idx->size(1)) : 0;
    a.num_local_experts = num_local_experts;
    a.slot = slot;
    a.scale_stride_token = x_scales.has_value() ? x_scales->stride(0) : 0;
    a.scale_stride_elem = x_scales.has_value() ? x_scales->stride(1) : 0;
    a.x = static_cast<const uint8_t*>(x.data_ptr());
    a.x_scales = ptr_or_null<const int32_t>(x_scales);
    a.topk_idx = ptr_or_null<const int64_t>(topk_idx);
    a.topk_weights = ptr_or_null<const float>(topk_weights);
    a.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    a.rank_prefix_matrix = rank_prefix.data_ptr<int>();
    a.recv_channel_prefix_matrix = recv_channel_prefix.data_ptr<int>();
    a.recv_x = recv_x.has_value() ? static_cast<uint8_t*>(recv_x->data_ptr()) : nullptr;
    a.recv_scales = ptr_or_null<int32_t>(recv_scales);
    a.recv_topk_idx = ptr_or_null<int64_t>(recv_topk_idx);
    a.recv_topk_weights = ptr_or_null<float>(recv_topk_weights);
    a.recv_src_idx = recv_src_idx != nullptr ? recv_src_idx->data_ptr<int>() : nullptr;
    a.send_head = send_head != nullptr ? send_head->data_ptr<int>() : nullptr;
    a.num_rows = recv_x.has_value() ? static_cast<int>(recv_x->size(0)) : -1;  // -1: no outputs, rows dropped
    a.worst_mode = worst ? 1 : 0;
    a.phase = phase;
    const DispatchTuning& tuning = dispatch_tuning();
    a.local_split = tuning.local_split;
    a.copy_depth = tuning.copy_depth;
    check_cuda(launch_dispatch(a, stream), "dispatch kernel launch");
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
  LayoutWork* work_ = nullptr;
  HostPage* host_ = nullptr;
  HostPage* host_dev_ = nullptr;
  StreamOrder order_;  // the stream of the previous call (call_stream)
  int64_t host_waits_ = 0;
  static constexpr int kStamps = 6;
  int64_t stamps_[kStamps] = {};
  void stamp(int i) {
    stamps_[i] = std::chrono::duration_cast<std::chrono::nanoseconds>(
                     std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  int64_t split_launches_ = 0;
  uint8_t* peers_[kMaxRanks];
  Header* peer_ctrl_[kMaxRanks];
  bool opened_ = false;
  bool destroyed_ = false;
};

}  // namespace
}  // namespace deepep::intranode

PYBIND11_MODULE(_intranode_C, m) {
  using deepep::intranode::Runtime;
  namespace di = deepep::intranode;
  m.doc() = "deepep_plugin intranode NVLink kernels (CUDA IPC buffers, layout/notify/dispatch/combine)";
  py::register_exception<di::MailboxPending>(m, "MailboxPending");
  deepep::register_error_translators();
  py::class_<Runtime>(m, "Runtime")
      .def(py::init<int, int, int64_t, int>(), py::arg("rank"), py::arg("num_ranks"), py::arg("num_nvl_bytes"),
           py::arg("device"))
      .def("ipc_handle", &Runtime::ipc_handle)
      .def("open_peers", &Runtime::open_peers)
      .def("destroy", &Runtime::destroy)
      .def("destroyed", &Runtime::destroyed)
      .def("local_buffer", &Runtime::local_buffer)
      .def("host_waits", &Runtime::host_waits)
      .def("split_launches", &Runtime::split_launches)
      .def("fresh_stamps", &Runtime::fresh_stamps)
      .def("layout", &Runtime::layout)
      .def("dispatch_fresh", &Runtime::dispatch_fresh)
      .def("dispatch_cached", &Runtime::dispatch_cached)
      .def("combine", &Runtime::combine)
      .def("read_mailbox", &Runtime::read_mailbox);
  m.def(
      "dispatch_tuning",
      [] {
        const auto& t = di::dispatch_tuning();
        py::dict d;
        d["local_split"] = t.local_split;
        d["copy_depth"] = t.copy_depth;
        d["early_dispatch"] = t.early;
        d["combine_share"] = t.combine_share;
        d["combine_small_rounds"] = t.combine_small_rounds;
        return d;
      },
      "the kernels' tuning as read from DEEPEP_PLUGIN_DISPATCH_LOCAL_SPLIT, DEEPEP_PLUGIN_COPY_DEPTH, "
      "DEEPEP_PLUGIN_EARLY_DISPATCH, DEEPEP_PLUGIN_COMBINE_SHARE and DEEPEP_PLUGIN_COMBINE_SMALL_ROUNDS");
  m.def(
      "copy_probe",
      [](const at::Tensor& dst, const at::Tensor& src, int blocks, int mode) {
        if (!dst.is_cuda() || !src.is_cuda() || dst.device() != src.device() || !dst.is_contiguous() ||
            !src.is_contiguous() || dst.nbytes() != src.nbytes() || dst.nbytes() % 16 != 0 ||
            reinterpret_cast<uintptr_t>(dst.data_ptr()) % 16 != 0 ||
            reinterpret_cast<uintptr_t>(src.data_ptr()) % 16 != 0)
          throw deepep::InputError("copy_probe: dst and src must be contiguous, 16-byte aligned CUDA tensors on one "
                                   "device, of equal size in bytes (a multiple of 16)");
        c10::cuda::CUDAGuard guard(src.device());
        di::CopyProbeArgs a{static_cast<const uint8_t*>(src.data_ptr()), static_cast<uint8_t*>(dst.data_ptr()),
                            static_cast<int64_t>(src.nbytes()), mode};
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(src.device().index()).stream();
        di::check_cuda(di::launch_copy_probe(a, blocks, stream), "copy_probe launch");
      },
      py::arg("dst"), py::arg("src"), py::arg("blocks"), py::arg("mode"),
      "reference copy for bench sm-rates: mode 0 bulk-copy engine through shared-memory stages, 1 register copies "
      "(4 loads in flight per lane, 32 warps), 2 (8 in flight, 32 warps), 3 (16 in flight, 16 warps)");
}
