// The pybind11 module deepep_plugin._nvshmem_C: the NVSHMEM layer (world, SymmetricBuffer, error translation) and
// the kernel families built on it, which bind their own functions (register_low_latency, register_internode).

#include "nvshmem/bindings.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <atomic>
#include <sstream>
#include <string>
#include <vector>

#include "nvshmem/runtime.h"

namespace py = pybind11;

namespace deepep {
namespace nvshmem {

// ---------------------------------------------------------------------------------------------------------
// TensorCheck

namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << c10::toString(t.scalar_type()) << " " << t.sizes() << " on " << t.device();
  if (!t.is_contiguous()) s << " (not contiguous)";
  return s.str();
}

}  // namespace

TensorCheck::TensorCheck(const at::Tensor& t, const char* op, const char* name, int device)
    : t_(t), op_(op), name_(name) {
  if (!t.defined()) fail("must be a tensor, got an undefined one");
  if (!t.is_cuda() || t.get_device() != device)
    fail("must be on cuda:" + std::to_string(device) + " (this Buffer's GPU), got " + describe(t));
}

const TensorCheck& TensorCheck::dtype(at::ScalarType type) const {
  if (t_.scalar_type() != type) fail(std::string("must be ") + c10::toString(type) + ", got " + describe(t_));
  return *this;
}

const TensorCheck& TensorCheck::itemsize(int64_t bytes) const {
  if (static_cast<int64_t>(t_.element_size()) != bytes)
    fail("must have " + std::to_string(bytes) + "-byte elements, got " + describe(t_));
  return *this;
}

const TensorCheck& TensorCheck::shape(std::initializer_list<int64_t> sizes) const {
  bool ok = t_.dim() == static_cast<int64_t>(sizes.size());
  int64_t d = 0;
  for (const int64_t want : sizes) {
    if (ok && want >= 0 && t_.size(d) != want) ok = false;
    ++d;
  }
  if (!ok) {
    std::ostringstream s;
    s << "must have shape [";
    d = 0;
    for (const int64_t want : sizes) s << (d++ ? ", " : "") << (want >= 0 ? std::to_string(want) : "*");
    s << "], got " << describe(t_);
    fail(s.str());
  }
  return *this;
}

const TensorCheck& TensorCheck::contiguous() const {
  if (!t_.is_contiguous()) fail("must be contiguous, got " + describe(t_));
  return *this;
}

void TensorCheck::fail(const std::string& what) const {
  throw InputError(std::string(op_) + ": " + name_ + " " + what);
}

// ---------------------------------------------------------------------------------------------------------
// SymmetricBuffer

SymmetricBuffer::SymmetricBuffer(int64_t num_bytes, int num_ranks, int device, double timeout_s)
    : num_bytes_(num_bytes), num_ranks_(num_ranks), rank_(-1), device_(device), timeout_s_(timeout_s) {
  if (!world_initialized())
    throw std::runtime_error("SymmetricBuffer: this process has not joined an NVSHMEM world (init_world)");
  if (num_ranks != world_size())
    throw InputError("SymmetricBuffer: num_ranks=" + std::to_string(num_ranks) + " differs from the NVSHMEM world's " +
                     std::to_string(world_size()) + " ranks");
  if (num_bytes <= 0) throw InputError("SymmetricBuffer: num_bytes must be positive, got " + std::to_string(num_bytes));
  set_timeout_s(timeout_s);
  rank_ = world_rank();
  c10::cuda::CUDAGuard guard(device_);
  base_ = static_cast<uint8_t*>(symmetric_alloc(num_bytes));
  peers_.resize(num_ranks);
  for (int j = 0; j < num_ranks; ++j) peers_[j] = static_cast<uint8_t*>(peer_pointer(base_, j));
  if (peers_[rank_] == nullptr) throw std::runtime_error("SymmetricBuffer: NVSHMEM did not map this rank's own buffer");
  abort_ = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device_));
  mailbox_host_ = mailbox_alloc();
  mailbox_device_ = mailbox_device_alias(mailbox_host_);
  upload_peers();
  order_.open();
  alive_ = true;
}

void SymmetricBuffer::free() {
  if (!alive_) return;
  alive_ = false;
  c10::cuda::CUDAGuard guard(device_);
  symmetric_free(base_);  // synchronises the device first, then the world
  order_.close();
  mailbox_free(mailbox_host_);
  base_ = nullptr;
  mailbox_host_ = mailbox_device_ = nullptr;
}

void SymmetricBuffer::check(const char* op) const {
  if (!alive_) throw InputError(std::string(op) + ": the NVSHMEM buffer was destroyed");
}

at::Tensor SymmetricBuffer::tensor() const {
  check("SymmetricBuffer.tensor");
  return at::from_blob(base_, {num_bytes_}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device_));
}

std::vector<bool> SymmetricBuffer::mapped_peers() const {
  std::vector<bool> out(peers_.size());
  for (size_t j = 0; j < peers_.size(); ++j) out[j] = peers_[j] != nullptr;
  return out;
}

void SymmetricBuffer::use_puts_for(const std::vector<int>& ranks) {
  check("SymmetricBuffer.use_puts_for");
  for (const int j : ranks) {
    if (j < 0 || j >= num_ranks_ || j == rank_)
      throw InputError("SymmetricBuffer.use_puts_for: rank " + std::to_string(j) + " is not a peer of rank " +
                       std::to_string(rank_) + " in a group of " + std::to_string(num_ranks_));
    peers_[j] = nullptr;
  }
  upload_peers();
}

void SymmetricBuffer::set_has_rdma_peers(bool value) {
  for (const uint8_t* p : peers_)
    if (p == nullptr && !value)
      throw InputError("SymmetricBuffer.has_rdma_peers: some peer is reached with puts, so it must stay true");
  has_rdma_peers_ = value;
}

void SymmetricBuffer::set_timeout_s(double seconds) {
  if (!(seconds > 0.0)) throw InputError("SymmetricBuffer: timeout_s must be positive, got " + std::to_string(seconds));
  timeout_s_ = seconds;
}

py::object SymmetricBuffer::take_report() {
  if (!alive_) return py::none();
  volatile Mailbox* mb = mailbox_host_;
  const int status = mb->status;  // written last by the kernel
  if (status == kMailboxEmpty) return py::none();
  std::atomic_thread_fence(std::memory_order_acquire);
  py::tuple report = py::make_tuple(status, mb->rank, mb->peer, mb->what, static_cast<int64_t>(mb->detail),
                                    static_cast<int64_t>(mb->observed), mb->channel);
  mb->status = kMailboxEmpty;
  return report;
}

void SymmetricBuffer::clear_abort() {
  check("SymmetricBuffer.clear_abort");
  abort_.zero_();
}

void* SymmetricBuffer::call_stream() const {
  const cudaStream_t s = c10::cuda::getCurrentCUDAStream(device_).stream();
  order_.enter(s);
  return s;
}

void SymmetricBuffer::upload_peers() {
  std::vector<int64_t> words(peers_.size());
  bool puts = false;
  for (size_t j = 0; j < peers_.size(); ++j) {
    words[j] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(peers_[j]));
    puts |= peers_[j] == nullptr;
  }
  peer_table_ = at::tensor(words, at::TensorOptions().dtype(at::kLong)).to(at::Device(at::kCUDA, device_));
  has_rdma_peers_ = has_rdma_peers_ || puts;
}

}  // namespace nvshmem
}  // namespace deepep

PYBIND11_MODULE(_nvshmem_C, m) {
  namespace nv = deepep::nvshmem;
  using nv::SymmetricBuffer;
  m.doc() = "deepep_plugin NVSHMEM layer and the kernels on it: low-latency and internode (use deepep_plugin.Buffer)";
  deepep::register_error_translators();  // bad input becomes deepep_plugin's Python exceptions

  // The world: once per process (see nvshmem/runtime.h).
  m.def("get_unique_id", []() { return py::bytes(nv::get_unique_id()); });
  m.def(
      "init_world",
      [](int rank, int num_ranks, const std::string& unique_id, int device) {
        nv::init_world(rank, num_ranks, unique_id, device);
      },
      py::arg("rank"), py::arg("num_ranks"), py::arg("unique_id"), py::arg("device"),
      py::call_guard<py::gil_scoped_release>());
  m.def("world_initialized", &nv::world_initialized);
  m.def("barrier_all", &nv::barrier_all, py::call_guard<py::gil_scoped_release>());
  m.def(
      "barrier_on_stream",
      [](int device) { nv::barrier_on_stream(c10::cuda::getCurrentCUDAStream(device).stream()); },
      py::arg("device"));

  py::class_<SymmetricBuffer>(m, "SymmetricBuffer")
      .def(py::init<int64_t, int, int, double>(), py::arg("num_bytes"), py::arg("num_ranks"), py::arg("device"),
           py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("free", &SymmetricBuffer::free, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("alive", &SymmetricBuffer::alive)
      .def_property_readonly("rank", &SymmetricBuffer::rank)
      .def_property_readonly("num_ranks", &SymmetricBuffer::num_ranks)
      .def_property_readonly("num_bytes", &SymmetricBuffer::num_bytes)
      .def("tensor", &SymmetricBuffer::tensor)
      .def("mapped_peers", &SymmetricBuffer::mapped_peers)
      .def("use_puts_for", &SymmetricBuffer::use_puts_for, py::arg("ranks"))
      .def_property("has_rdma_peers", &SymmetricBuffer::has_rdma_peers, &SymmetricBuffer::set_has_rdma_peers)
      .def_property("timeout_s", &SymmetricBuffer::timeout_s, &SymmetricBuffer::set_timeout_s)
      .def("take_report", &SymmetricBuffer::take_report)
      .def("clear_abort", &SymmetricBuffer::clear_abort)
      .def(
          "order_current_stream",
          [](const SymmetricBuffer& b) {
            b.check("SymmetricBuffer.order_current_stream");
            c10::cuda::CUDAGuard guard(b.device());
            b.call_stream();
          },
          "make the current stream wait for this buffer's last launch (for work the host enqueues on the buffer)");

  deepep::register_low_latency(m);
  deepep::register_internode(m);
}
