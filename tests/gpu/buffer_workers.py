"""Per-process bodies of the Buffer-level GPU tests: ``Buffer(backend="cuda")`` against
``Buffer(backend="reference")`` on CPU copies of the same inputs, over one gloo group (processes may share a GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from gpu_env import bits, layout_and_dispatch, take_device
from routing_cases import make_case

import deepep_plugin as dp
from deepep_plugin.fp8 import per_token_cast_to_fp8


def normal_worker(rank: int, world_size: int, *, kind: str, seed: int) -> None:
    dev = take_device(rank)
    case = make_case(kind, seed, rank, world_size, hidden=256, num_topk=6)
    hidden, num_experts = case.hidden, case.num_experts
    size = max(dp.Buffer.get_dispatch_config(world_size).get_nvl_buffer_size_hint(hidden * 2, world_size),
               dp.Buffer.get_combine_config(world_size).get_nvl_buffer_size_hint(hidden * 2, world_size))
    gpu = dp.Buffer(dist.group.WORLD, size, 0, backend="cuda")
    ref = dp.Buffer(dist.group.WORLD, size, 0, backend="reference")
    assert gpu.backend_name == "cuda" and ref.backend_name == "reference"
    x, idx, w = case.x.to(dev), case.topk_idx.to(dev), case.topk_weights.to(dev)

    # Layout on the GPU equals the reference's.
    lay_gpu = gpu.get_dispatch_layout(idx, num_experts)
    lay_ref = ref.get_dispatch_layout(case.topk_idx, num_experts)
    for got, want in zip(lay_gpu[:4], lay_ref[:4]):
        assert (got is None and want is None) or torch.equal(got.cpu(), want)

    # Dispatch with previous_event / async_finish / allocate_on_comm_stream: same rows, same handle.
    previous = dp.Buffer.capture()
    out = layout_and_dispatch(gpu, x, idx, w, num_experts, expert_alignment=2, previous_event=previous,
                              async_finish=True, allocate_on_comm_stream=True)
    assert out[5].event is not None and out[5].extra_tensors
    out[5].current_stream_wait()
    want = layout_and_dispatch(ref, case.x, case.topk_idx, case.topk_weights, num_experts, expert_alignment=2)
    assert torch.equal(bits(out[0]), bits(want[0]))
    assert torch.equal(out[1].cpu(), want[1]) and torch.equal(bits(out[2]), bits(want[2]))
    assert out[3] == want[3]
    for name, got, exp in zip(want[4]._fields, out[4], want[4]):
        assert torch.equal(got.cpu(), exp.to(got.dtype)), f"handle.{name} differs"

    # The synchronous call gives the same result; cached dispatch of the FP8 tuple too.
    sync = layout_and_dispatch(gpu, x, idx, w, num_experts, expert_alignment=2)
    assert torch.equal(bits(sync[0]), bits(out[0]))
    data, scales = per_token_cast_to_fp8(case.x)
    (got8, gots), *_ = gpu.dispatch((data.to(dev), scales.to(dev)), handle=out[4])
    (want8, wants), *_ = ref.dispatch((data, scales), handle=want[4])
    assert torch.equal(bits(got8), bits(want8)) and torch.equal(gots.cpu(), wants)

    # Combine with weights and bias, async: within FP32-accumulation tolerance of the reference.
    rows = (want[0].float() * 1.5).to(torch.bfloat16)
    bias = torch.randn(case.num_tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    got_x, got_w, event = gpu.combine(rows.to(dev), out[4], out[2], bias=bias.to(dev), async_finish=True)
    event.current_stream_wait()
    want_x, want_w, _ = ref.combine(rows, want[4], want[2], bias=bias)
    torch.testing.assert_close(got_x.float().cpu(), want_x.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_w.cpu(), want_w)

    # num_worst_tokens: a padded prefix-identical result, no host sync.
    worst = sum(make_case(kind, seed, r, world_size, hidden=256, num_topk=6).num_tokens for r in range(world_size))
    padded = layout_and_dispatch(gpu, x, idx, w, num_experts, num_worst_tokens=worst)
    n = out[0].size(0)
    assert padded[0].size(0) == worst and padded[3] == []
    assert torch.equal(bits(padded[0][:n]), bits(out[0])) and bool((padded[1][n:] == -1).all())
    torch.cuda.synchronize()


def low_latency_worker(rank: int, world_size: int, *, seed: int) -> None:
    dev = take_device(rank)
    n_ll = 64
    case = make_case("random", seed, rank, world_size, hidden=256, num_topk=4)
    hidden, num_experts = case.hidden, case.num_experts
    size = dp.Buffer.get_low_latency_rdma_size_hint(n_ll, hidden, world_size, num_experts)
    qps = num_experts // world_size
    gpu = dp.Buffer(dist.group.WORLD, 0, size, low_latency_mode=True, num_qps_per_rank=qps, backend="cuda",
                    explicitly_destroy=True)
    ref = dp.Buffer(dist.group.WORLD, 0, size, low_latency_mode=True, num_qps_per_rank=qps, backend="reference")
    x, idx, w = case.x.to(dev), case.topk_idx.to(dev), case.topk_weights.to(dev)
    recv, count, handle, _, hook = gpu.low_latency_dispatch(x, idx, n_ll, num_experts, use_fp8=False,
                                                            return_recv_hook=True)
    hook()
    torch.cuda.synchronize()
    want, want_count, want_handle, _, _ = ref.low_latency_dispatch(case.x, case.topk_idx, n_ll, num_experts,
                                                                   use_fp8=False)
    assert torch.equal(count.cpu(), want_count)
    assert torch.equal(handle[1].cpu(), want_handle[1])  # layout_range: the same deterministic block order
    for i, c in enumerate(want_count.tolist()):
        assert torch.equal(bits(recv[i, :c]), bits(want[i, :c]))
        assert torch.equal(handle[0][i, :c].cpu(), want_handle[0][i, :c])
    got, _, _ = gpu.low_latency_combine(recv, idx, w, handle)
    exp, _, _ = ref.low_latency_combine(want, case.topk_idx, case.topk_weights, want_handle)
    torch.testing.assert_close(got.float().cpu(), exp.float(), rtol=1e-2, atol=1e-2)
    torch.cuda.synchronize()
    gpu.destroy()
