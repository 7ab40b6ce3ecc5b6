"""Host cost of Buffer's Python path for the normal-mode calls, with the intranode C++ runtime stubbed out.

    python tools/host_cost.py [--profile]

Runs on any machine (CPU tensors, one gloo rank): Buffer -> IntranodeRuntime -> a stub that returns outputs made
once by the reference backend, so what is timed is the Python that every call runs before and after the extension
(checks, handle and result objects, stream bookkeeping). Prints us per call, the best of 3 runs of 20000 calls;
--profile adds a cProfile of the forward step, cached dispatch and combine.
"""
import cProfile
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29577")
dist.init_process_group("gloo", rank=0, world_size=1)
import deepep_plugin as dp  # noqa: E402
from deepep_plugin.backends.cuda_intranode import IntranodeRuntime  # noqa: E402

R, T, H, E, K = 1, 256, 7168, 256, 8
buf = dp.Buffer(dist.group.WORLD, dp.Config(24, 6, 256, 6, 128).get_nvl_buffer_size_hint(2 * H, R), 0,
                backend="reference")
x = torch.randn(T, H).to(torch.bfloat16)
idx = torch.randint(0, E, (T, K))
w = torch.rand(T, K)
per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
rx, ridx, rw, counts, handle, _ = buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w)
comb = buf.combine(rx, handle, topk_weights=rw)

class Ext:
    class MailboxPending(Exception):  # noqa: N818 - the extension's name
        pass

class FakeRT:
    def layout(self, topk_idx, num_experts):
        return per_rank, per_expert, in_rank
    def dispatch_fresh(self, *a):
        h = handle
        return (rx, None, ridx, rw, list(counts), h.rank_prefix_matrix, h.channel_prefix_matrix,
                h.recv_channel_prefix_matrix, h.recv_src_idx, h.send_head, 0)
    def dispatch_cached(self, *a):
        return rx, None
    def combine(self, *a):
        return comb[0], comb[1]

rt = IntranodeRuntime.__new__(IntranodeRuntime)
rt._broken, rt._destroyed, rt.timeout_s, rt.rank, rt.num_ranks = None, False, 30.0, 0, R
rt._ext, rt._rt = Ext, FakeRT()

class FakeBackend:
    name = "cuda"
    reference = None
    def runtime_for(self, op, cuda, dtype=None):
        return rt
    def check_error(self):
        pass
ref = buf.runtime
buf.runtime = FakeBackend()
buf._usable_sms = (10 ** 6, "")
# Handles as the kernels return them (IntranodeHandle built by the runtime).
_, _, _, _, handle, _ = buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w)

def layout():
    return buf.get_dispatch_layout(idx, E)
def fresh():
    return buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w)
def cached():
    return buf.dispatch(x, handle)
def combine():
    return buf.combine(rx, handle, topk_weights=rw)
def fwd():
    a, b, c, d, _ = buf.get_dispatch_layout(idx, E)
    r, _, rw2, _, h, _ = buf.dispatch(x, None, a, b, d, c, idx, w)
    return buf.combine(r, h, topk_weights=rw2)

N = 20000
for name, fn in [("layout", layout), ("fresh", fresh), ("cached", cached), ("combine", combine), ("fwd", fwd)]:
    for _ in range(2000):
        fn()
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(N):
            fn()
        best = min(best, (time.perf_counter() - t0) / N * 1e6)
    print(f"{name:8s} {best:6.2f} us/call")
if "--profile" in sys.argv:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(N):
        fwd()
        cached()
        combine()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)
dist.destroy_process_group()
