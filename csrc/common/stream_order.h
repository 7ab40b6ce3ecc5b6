// Ordering of a runtime's calls across CUDA streams, shared by the host runtimes (intranode, NVSHMEM).
//
// A runtime's kernels read its counters at kernel start and write them at kernel end (the intranode ring
// counters, the internode epoch, the low-latency signals and parity guard), so its calls must run one after
// another even when the caller issues them on different streams. enter(s), called once per launch with the stream
// it goes to, makes `s` wait for the stream of the previous call when that is another one (one event record and
// one wait); on the same stream it costs a compare.
//
// CUDA-graph capture: when both streams belong to the same capture, the record and the wait are captured (an edge
// of the graph). When only one of them is capturing (the first call of a capture after eager calls, an eager call
// after or beside a capture) no wait is possible (a capture cannot wait on work outside it, nor eager work on a
// capture), so none is made: ordering a graph's replays with eager calls is the caller's (replay it on the stream
// of those calls, or make the streams wait for each other).
//
// Host C++ (CUDA runtime API only, no torch). Not thread-safe: a runtime's calls come from one thread at a time.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace deepep {

class StreamOrder {
 public:
  StreamOrder() = default;
  StreamOrder(const StreamOrder&) = delete;
  StreamOrder& operator=(const StreamOrder&) = delete;

  // Create the event on the current device (the owner's, at construction: not while a graph is captured).
  void open() {
    if (event_ == nullptr) check(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "cudaEventCreate");
  }
  // Destroy the event (idempotent; the owner's teardown, with its device current).
  void close() {
    if (event_ != nullptr) cudaEventDestroy(event_);
    event_ = nullptr;
    started_ = false;
  }

  // `s` is the stream of this call: make it wait for the previous call's stream when that is another one.
  void enter(cudaStream_t s) {
    if (started_ && s == last_) return;
    const bool had_previous = started_;
    const cudaStream_t before = last_;
    last_ = s;
    started_ = true;
    if (had_previous && event_ != nullptr && same_capture(s, before)) {
      check(cudaEventRecord(event_, before), "cudaEventRecord (call ordering)");
      check(cudaStreamWaitEvent(s, event_, 0), "cudaStreamWaitEvent (call ordering)");
    }
  }

 private:
  static void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("deepep_plugin stream ordering: ") + what + ": " + cudaGetErrorString(e));
  }

  static bool is_legacy(cudaStream_t s) { return s == nullptr || s == cudaStreamLegacy; }

  // Whether an event recorded on `before` may be waited on by `now`: neither is capturing, or both are part of
  // the same active capture.
  static bool same_capture(cudaStream_t now, cudaStream_t before) {
    cudaStreamCaptureStatus status_now = cudaStreamCaptureStatusNone, status_before = cudaStreamCaptureStatusNone;
    unsigned long long id_now = 0, id_before = 0;
    check(cudaStreamGetCaptureInfo(now, &status_now, &id_now), "cudaStreamGetCaptureInfo");
    // The legacy stream is never part of a capture, and asking about it while another stream captures may
    // invalidate that capture: answer without asking.
    if (status_now != cudaStreamCaptureStatusNone && is_legacy(before)) return false;
    check(cudaStreamGetCaptureInfo(before, &status_before, &id_before), "cudaStreamGetCaptureInfo");
    if (status_now == cudaStreamCaptureStatusNone) return status_before == cudaStreamCaptureStatusNone;
    return status_now == cudaStreamCaptureStatusActive && status_before == cudaStreamCaptureStatusActive &&
           id_now == id_before;
  }

  cudaEvent_t event_ = nullptr;
  cudaStream_t last_ = nullptr;
  bool started_ = false;  // a call has been made (the legacy stream is nullptr too, so last_ cannot tell)
};

}  // namespace deepep
