"""Per-process bodies of the internode GPU tests: ``Buffer(backend="cuda", num_ranks_per_node=G)`` against
``Buffer(backend="reference", num_ranks_per_node=G)`` on CPU copies of the same inputs, over one gloo group.

Nodes are emulated: ``G`` smaller than the group makes ``R / G`` "nodes" on one host (processes may share a
GPU). The network hop then runs over NVLink P2P stores, or, with ``puts=True``, over NVSHMEM puts (the code path
RDMA peers take). This checks correctness, not RDMA speed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from gpu_env import bits, layout_and_dispatch, take_device
from routing_cases import Case, make_case

import deepep_plugin as dp
from deepep_plugin.fp8 import per_token_cast_to_fp8
from deepep_plugin.routing import group_limited_topk

MB = 1 << 20


def _node_limited_case(seed: int, rank: int, world: int, per_node: int, hidden: int, num_topk: int) -> Case:
    """DeepSeek-V3 routing: experts grouped by node, each token within min(2, N) nodes; rank 0 has no tokens."""
    nodes = world // per_node
    num_experts = 8 * world
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    t = 0 if rank == 0 else int(torch.randint(20, 90, (1,), generator=g))
    logits = torch.randn(t, num_experts, generator=g)
    idx, w = group_limited_topk(logits, num_topk, num_groups=nodes, topk_group=min(2, nodes),
                                score_function="sigmoid")
    drop = torch.rand(t, num_topk, generator=g) < 0.1
    idx = torch.where(drop, torch.full_like(idx, -1), idx)
    x = torch.randn(t, hidden, generator=g).to(torch.bfloat16)
    return Case(t, hidden, num_experts, num_topk, x, idx.long().contiguous(), w.float().contiguous())


def _case(kind: str, seed: int, rank: int, world: int, per_node: int, hidden: int, num_topk: int) -> Case:
    if kind == "node_limited":
        return _node_limited_case(seed, rank, world, per_node, hidden, num_topk)
    return make_case(kind, seed, rank, world, hidden=hidden, num_topk=num_topk)


def _same_handle(got, want, rows: int | None = None) -> None:
    for name, g, e in zip(want._fields, got, want):
        g = g.cpu()
        if rows is not None and name == "recv_src_meta":
            g, e = g[:rows], e[:rows]
        assert g.dtype == e.dtype or name == "is_token_in_rank", f"handle.{name}: dtype {g.dtype} != {e.dtype}"
        assert torch.equal(g, e.to(g.dtype)), f"handle.{name} differs from the reference's"


def dispatch_combine_worker(rank: int, world: int, *, per_node: int, kind: str, seed: int, hidden: int,
                            num_topk: int, num_sms: int, puts: bool = False, rdma_chunk: int = 16,
                            ring_slots: int = 128, nvl_slots: int = 256) -> None:
    if puts:
        os.environ["DEEPEP_PLUGIN_INTERNODE_PUTS"] = "1"
    dev = take_device(rank)
    case = _case(kind, seed, rank, world, per_node, hidden, num_topk)
    num_experts = case.num_experts
    gpu = dp.Buffer(dist.group.WORLD, 64 * MB, 64 * MB, backend="cuda", num_ranks_per_node=per_node,
                    explicitly_destroy=True)
    ref = dp.Buffer(dist.group.WORLD, 0, MB, backend="reference", num_ranks_per_node=per_node)
    assert gpu.num_nodes == world // per_node > 1 and gpu.backend_name == "cuda"
    assert gpu.runtime.internode is not None, "the CUDA backend did not build the internode runtime"
    # rdma_chunk: records per progress update of a (node, channel) stream (1 = every record on its own);
    # ring_slots: records (and partial rows) each (node, channel) ring holds; nvl_slots: rows of each combine NVL
    # ring (node peer, channel). Fewer than a stream's items make the rings wrap, producers waiting for consumers.
    cfg = dp.Config(num_sms, min(8, nvl_slots // 4), nvl_slots, rdma_chunk, ring_slots)
    x, idx, w = case.x.to(dev), case.topk_idx.to(dev), case.topk_weights.to(dev)

    # Layout on the GPU equals the reference's (per rank, per node, per expert, membership).
    lay_gpu = gpu.get_dispatch_layout(idx, num_experts)
    lay_ref = ref.get_dispatch_layout(case.topk_idx, num_experts)
    for got, want in zip(lay_gpu[:4], lay_ref[:4]):
        assert torch.equal(got.cpu(), want)

    # Fresh BF16 dispatch: the same rows in the same order, the same handle (bit-exact).
    out = layout_and_dispatch(gpu, x, idx, w, num_experts, expert_alignment=4, config=cfg)
    want = layout_and_dispatch(ref, case.x, case.topk_idx, case.topk_weights, num_experts, expert_alignment=4,
                               config=cfg)
    assert torch.equal(bits(out[0]), bits(want[0])), "recv_x differs"
    assert torch.equal(out[1].cpu(), want[1]) and torch.equal(bits(out[2]), bits(want[2]))
    assert out[3] == want[3], f"per-expert counts {out[3]} != {want[3]}"
    _same_handle(out[4], want[4])

    # Cached dispatch of an FP8 tuple with DeepEP's column-major scales: bit-exact, data and scales.
    data, scales = per_token_cast_to_fp8(case.x)
    cm_scales = scales.t().contiguous().t()
    (got8, gots), *_ = gpu.dispatch((data.to(dev), cm_scales.to(dev)), handle=out[4], config=cfg)
    (want8, wants), *_ = ref.dispatch((data, cm_scales), handle=want[4], config=cfg)
    assert torch.equal(bits(got8), bits(want8)) and torch.equal(gots.cpu(), wants)

    # Combine with weights and two biases: within FP32-accumulation tolerance (the GPU rounds one partial
    # per node to BF16, the reference sums all copies at once).
    rows = (want[0].float() * 1.5 + 0.25).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed + rank)
    b0 = torch.randn(case.num_tokens, hidden, generator=gen).to(torch.bfloat16)
    b1 = torch.randn(case.num_tokens, hidden, generator=gen).to(torch.bfloat16)
    for _ in range(2):  # repeated calls on one buffer
        got_x, got_w, _ = gpu.combine(rows.to(dev), out[4], out[2], bias=(b0.to(dev), b1.to(dev)), config=cfg)
        want_x, want_w, _ = ref.combine(rows, want[4], want[2], bias=(b0, b1), config=cfg)
        torch.testing.assert_close(got_x.float().cpu(), want_x.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-6, atol=1e-6)

    # num_worst_tokens: fixed shapes, the reference's padding, no host sync; combine on the padded handle.
    worst = sum(_case(kind, seed, j, world, per_node, hidden, num_topk).num_tokens for j in range(world)) + 3
    padded = layout_and_dispatch(gpu, x, idx, w, num_experts, num_worst_tokens=worst, config=cfg)
    want_p = layout_and_dispatch(ref, case.x, case.topk_idx, case.topk_weights, num_experts, num_worst_tokens=worst,
                                 config=cfg)
    n = want[0].size(0)
    assert padded[0].shape == want_p[0].shape and padded[3] == []
    assert torch.equal(bits(padded[0][:n]), bits(want[0]))
    assert torch.equal(padded[1].cpu(), want_p[1]) and torch.equal(bits(padded[2]), bits(want_p[2]))
    _same_handle(padded[4], want_p[4])
    rows_p = torch.zeros(worst, hidden, dtype=torch.bfloat16)
    rows_p[:n] = rows
    got_x, _, _ = gpu.combine(rows_p.to(dev), padded[4], config=cfg)
    want_x, _, _ = ref.combine(rows, want[4], config=cfg)
    torch.testing.assert_close(got_x.float().cpu(), want_x.float(), rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
    gpu.destroy()


def graph_worker(rank: int, world: int, *, per_node: int, seed: int) -> None:
    """num_worst_tokens dispatch + combine captured in one CUDA graph, replayed with new inputs each time."""
    dev = take_device(rank)
    hidden, num_topk = 256, 4
    gpu = dp.Buffer(dist.group.WORLD, 32 * MB, 32 * MB, backend="cuda", num_ranks_per_node=per_node,
                    explicitly_destroy=True)
    ref = dp.Buffer(dist.group.WORLD, 0, MB, backend="reference", num_ranks_per_node=per_node)
    cfg = dp.Config(8, 8, 256, 16, 128)
    cases = [[_node_limited_case(seed + i, j, world, per_node, hidden, num_topk) for j in range(world)]
             for i in range(3)]
    t = max(len(c[rank].x) for c in cases)
    worst = max(sum(c[j].num_tokens for j in range(world)) for c in cases)
    num_experts = cases[0][0].num_experts
    # Static inputs of the graph: every replay uses the first T rows (T fixed), padding tokens route nowhere.
    x = torch.zeros(t, hidden, dtype=torch.bfloat16, device=dev)
    idx = torch.full((t, num_topk), -1, dtype=torch.int64, device=dev)
    w = torch.zeros(t, num_topk, dtype=torch.float32, device=dev)

    def load(case: Case) -> None:
        x.zero_()
        idx.fill_(-1)
        w.zero_()
        x[:case.num_tokens] = case.x.to(dev)
        idx[:case.num_tokens] = case.topk_idx.to(dev)
        w[:case.num_tokens] = case.topk_weights.to(dev)

    def step():
        recv_x, _, recv_w, _, handle, _ = layout_and_dispatch(gpu, x, idx, w, num_experts, num_worst_tokens=worst,
                                                              config=cfg)
        y = (recv_x.float() * 2).to(torch.bfloat16)
        combined, _, _ = gpu.combine(y, handle, config=cfg)
        return recv_x, combined

    load(cases[0][rank])
    step()  # warm-up outside the graph
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_x, combined = step()
    for c in cases:
        load(c[rank])
        dist.barrier()
        graph.replay()
        torch.cuda.synchronize()
        gpu.runtime.check_error()
        mine = c[rank]
        padded_idx = torch.full((t, num_topk), -1, dtype=torch.int64)
        padded_idx[:mine.num_tokens] = mine.topk_idx
        padded_x = torch.zeros(t, hidden, dtype=torch.bfloat16)
        padded_x[:mine.num_tokens] = mine.x
        want = layout_and_dispatch(ref, padded_x, padded_idx, torch.zeros(t, num_topk), num_experts, config=cfg)
        n = want[0].size(0)
        assert torch.equal(bits(recv_x[:n]), bits(want[0])), "replayed dispatch differs"
        want_c, _, _ = ref.combine((want[0].float() * 2).to(torch.bfloat16), want[4], config=cfg)
        torch.testing.assert_close(combined.float().cpu(), want_c.float(), rtol=2e-2, atol=2e-2)
    gpu.destroy()


def timeout_worker(rank: int, world: int, *, per_node: int) -> None:
    """Rank 1 never dispatches: rank 0's notify wait runs out and names the rank and the wait."""
    os.environ["DEEPEP_PLUGIN_TIMEOUT_S"] = "2"
    dev = take_device(rank)
    gpu = dp.Buffer(dist.group.WORLD, 8 * MB, 8 * MB, backend="cuda", num_ranks_per_node=per_node,
                    explicitly_destroy=True)
    case = make_case("random", 3, rank, world, hidden=128)
    if rank == 0:
        try:
            layout_and_dispatch(gpu, case.x.to(dev), case.topk_idx.to(dev), case.topk_weights.to(dev), case.num_experts)
            torch.cuda.synchronize()
            gpu.runtime.check_error()
        except dp.errors.DeepEPTimeoutError as e:
            assert "rank 0" in str(e) and "notify" in str(e), str(e)
        else:
            raise AssertionError("no timeout reported")
    dist.barrier()
