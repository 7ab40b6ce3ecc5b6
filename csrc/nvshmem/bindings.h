// Torch glue shared by the bindings of the NVSHMEM extension (deepep_plugin._nvshmem_C): the errors Python receives
// as deepep_plugin.errors exceptions, the checks every bound function runs on its tensors, and SymmetricBuffer,
// one runtime's symmetric allocation with its peer table and error mailbox.
//
// Include from .cpp files only: it includes torch, which the .cu files of the extension must not (their NVSHMEM
// headers need the CUDA operators torch's build switches off, see cuda_operators.h).
#pragma once

#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/mailbox.h"
#include "common/py_errors.h"
#include "common/stream_order.h"

namespace deepep {
namespace nvshmem {

// Bad input raises deepep::InputError / BufferTooSmall (common/py_errors.h).

// Checks of one tensor argument of bound function `op`, each raising InputError that names the argument:
//   TensorCheck(t, "ll_dispatch_send", "x", device).dtype(at::kBFloat16).shape({T, H}).contiguous();
// The constructor checks that `t` lives on CUDA device `device`.
class TensorCheck {
 public:
  TensorCheck(const at::Tensor& t, const char* op, const char* name, int device);
  const TensorCheck& dtype(at::ScalarType type) const;
  const TensorCheck& itemsize(int64_t bytes) const;  // any dtype of this element size
  const TensorCheck& shape(std::initializer_list<int64_t> sizes) const;  // -1: any size in that dimension
  const TensorCheck& contiguous() const;

 private:
  [[noreturn]] void fail(const std::string& what) const;
  const at::Tensor& t_;
  const char* op_;
  const char* name_;
};

template <typename T>
T* data(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}
template <typename T>
T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

// One runtime's NVSHMEM symmetric buffer (the same size on every rank), the device table of its peers' mappings,
// the device abort flag its kernels raise on a timeout, and its host-mapped error mailbox. Construction and free()
// are collective over the NVSHMEM world, which must be initialised first. Not freed by the destructor: that is
// collective and Python's destroy() does it. Hidden like pybind11's own types (a bound class must not be more visible
// than pybind11); the extension's .cpp files share it inside the one shared object.
class __attribute__((visibility("hidden"))) SymmetricBuffer {
 public:
  SymmetricBuffer(int64_t num_bytes, int num_ranks, int device, double timeout_s);
  SymmetricBuffer(const SymmetricBuffer&) = delete;
  SymmetricBuffer& operator=(const SymmetricBuffer&) = delete;

  void free();  // collective; idempotent
  bool alive() const { return alive_; }
  // uint8 [num_bytes] view of this rank's buffer, valid until free().
  at::Tensor tensor() const;
  // For each rank: whether its buffer is mapped here (P2P stores) rather than reached with NVSHMEM puts.
  std::vector<bool> mapped_peers() const;
  // Reach these ranks with NVSHMEM puts even where P2P would work (the RDMA code path, testable on one host).
  void use_puts_for(const std::vector<int>& ranks);
  // Whether the kernels must expect puts (staging areas, quiet). Set to true where any rank of the group has an
  // unmapped peer, so that every rank lays out its staging the same way; cannot be false with unmapped peers.
  bool has_rdma_peers() const { return has_rdma_peers_; }
  void set_has_rdma_peers(bool value);
  double timeout_s() const { return timeout_s_; }
  void set_timeout_s(double seconds);
  // The mailbox's report (status, rank, peer, what, detail, observed, channel), cleared; None when it is empty.
  pybind11::object take_report();
  // Lower the abort flag (on the current stream) once the host has taken a timeout report.
  void clear_abort();

  // For the kernel glue. check(op) raises when the buffer was freed.
  void check(const char* op) const;
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int device() const { return device_; }
  int64_t num_bytes() const { return num_bytes_; }
  uint8_t* base() const { return base_; }
  uint8_t* const* peer_table() const { return static_cast<uint8_t* const*>(peer_table_.data_ptr()); }
  int* abort_flag() const { return static_cast<int*>(abort_.data_ptr()); }
  Mailbox* mailbox() const { return mailbox_device_; }
  uint64_t timeout_ns() const {  // saturating: an infinite timeout waits forever
    const double ns = timeout_s_ * 1e9;
    return ns >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(ns);
  }
  // The current CUDA stream of the buffer's device, for a launch: made to wait for the stream of the previous launch
  // on this buffer when that is another one (common/stream_order.h).
  void* call_stream() const;

 private:
  void upload_peers();

  int64_t num_bytes_;
  int num_ranks_, rank_, device_;
  double timeout_s_;
  bool alive_ = false, has_rdma_peers_ = false;
  uint8_t* base_ = nullptr;
  std::vector<uint8_t*> peers_;  // host copy of the peer table
  at::Tensor peer_table_;        // int64 [R] on the device: peers_
  at::Tensor abort_;             // int32 [1] on the device
  Mailbox* mailbox_host_ = nullptr;
  Mailbox* mailbox_device_ = nullptr;
  mutable StreamOrder order_;  // which stream the last launch went to: call state, not part of the buffer's value
};

}  // namespace nvshmem

// The kernel families built into deepep_plugin._nvshmem_C bind their functions here (each in its folder's
// bindings.cpp); bindings.cpp of this layer calls them from the module's init.
void register_low_latency(pybind11::module_& m);
void register_internode(pybind11::module_& m);

}  // namespace deepep
