"""Groups spanning several nodes (reference backend): layout per node, the 10-tuple handle, dispatch/combine."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from routing_cases import Case, expected_combine, expected_dispatch, make_case

import deepep_plugin as dp
from deepep_plugin.backends.base import InternodeHandle
from deepep_plugin.routing import group_limited_topk


def _check_multinode(rank: int, world_size: int, per_node: int) -> None:
    num_nodes = world_size // per_node
    num_experts = 4 * world_size
    cases = []
    for r in range(world_size):
        c = make_case("random", 21, r, world_size, num_experts=num_experts)
        # DeepSeek-V3 node-limited routing: one expert group per node, each token within 2 nodes at most.
        g = torch.Generator().manual_seed(100 + r)
        logits = torch.randn(c.num_tokens, num_experts, generator=g)
        idx, w = group_limited_topk(logits, 4, num_groups=num_nodes, topk_group=min(2, num_nodes),
                                    score_function="sigmoid")
        c.topk_idx, c.topk_weights = idx.contiguous(), w.contiguous()
        cases.append(c)
    me = cases[rank]
    config = dp.Buffer.get_dispatch_config(world_size)
    buf = dp.Buffer(dist.group.WORLD, config.get_nvl_buffer_size_hint(me.hidden * 2, max(world_size, 8)),
                    config.get_rdma_buffer_size_hint(me.hidden * 2, max(world_size, 8) if world_size > 8 else 16),
                    num_ranks_per_node=per_node)
    assert buf.num_nodes == num_nodes
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(me.topk_idx, num_experts)
    in_node = in_rank.view(-1, num_nodes, per_node).any(-1)
    assert torch.equal(per_rdma, in_node.sum(0, dtype=torch.int32))
    assert all(n <= min(2, num_nodes) for n in in_node.sum(1).tolist())
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(me.x, None, per_rank, per_rdma, in_rank, per_expert,
                                                               me.topk_idx, me.topk_weights)
    assert isinstance(handle, InternodeHandle) and len(handle) == 10
    want = expected_dispatch(cases, rank)
    assert torch.equal(recv_x, want["x"]) and torch.equal(recv_idx, want["topk_idx"])
    assert torch.equal(recv_w, want["topk_weights"]) and counts == want["per_expert"]
    # handle[-4] (recv_gbl_rank_prefix_sum) is what DeepEP's tests inspect.
    assert handle[-4].tolist() == torch.cumsum(torch.tensor(want["counts"]), 0).tolist()
    meta = handle.recv_src_meta.view(torch.int32)
    assert torch.equal(meta[:, 0].long(), want["src_idx"])
    # Forwarder view: tokens arriving from the same-local-index GPU of every node.
    local = rank % per_node
    rdma = [int(((cases[n * per_node + local].topk_idx >= 0) &
                 (torch.div(cases[n * per_node + local].topk_idx, num_experts // num_nodes, rounding_mode="floor")
                  == rank // per_node)).any(1).sum()) for n in range(num_nodes)]
    assert handle.recv_rdma_rank_prefix_sum.tolist() == torch.cumsum(torch.tensor(rdma), 0).tolist()
    assert handle.send_nvl_head.shape == (sum(rdma), per_node)
    again = buf.dispatch(me.x, handle=handle)[0]
    assert torch.equal(again, recv_x)
    rows = [expected_dispatch(cases, j)["x"] for j in range(world_size)]
    out, out_w, _ = buf.combine(recv_x, handle, recv_w)
    torch.testing.assert_close(out.float(), expected_combine(cases, rank, rows).to(torch.bfloat16).float())
    torch.testing.assert_close(out_w, me.topk_weights)


@pytest.mark.parametrize("world_size,per_node", [(4, 2), (16, 8)])
def test_multinode_dispatch_combine_with_node_limited_routing(world_size: int, per_node: int) -> None:
    run_distributed(_check_multinode, world_size, per_node, timeout=400)


# ----------------------------------------------------------------------------------------------------------
# The node-indexed handle fields (send_rdma_head, send_nvl_head) and worst-tokens padding, against a
# single-process oracle built from every rank's regenerated inputs.
TOPOLOGIES = [(4, 2), (16, 8)]
ZERO_RANK = 1  # a rank with no tokens: a source of nothing, still a destination and a forwarder


def _imbalanced_cases(seed: int, world_size: int) -> list[Case]:
    """Routing skewed towards low expert ids (high ranks receive several times less than low ones, some none),
    with dropped (-1) entries, and rank ZERO_RANK without tokens."""
    cases = []
    for r in range(world_size):
        c = make_case("random", seed, r, world_size)
        g = torch.Generator().manual_seed(seed * 1000 + 500 + r)
        scores = torch.rand(c.num_tokens, c.num_experts, generator=g) * torch.linspace(1.0, 0.7, c.num_experts)
        idx = torch.topk(scores, c.num_topk, dim=1).indices
        c.topk_idx = torch.where(c.topk_idx < 0, c.topk_idx, idx).contiguous()
        cases.append(c)
    c = cases[ZERO_RANK]
    cases[ZERO_RANK] = Case(0, c.hidden, c.num_experts, c.num_topk, c.x[:0], c.topk_idx[:0], c.topk_weights[:0])
    return cases


def _oracle_in_rank(case: Case, world_size: int) -> torch.Tensor:
    """``[T, R]`` bool: token t has at least one valid expert owned by rank j."""
    e_loc = case.num_experts // world_size
    out = torch.zeros(case.num_tokens, world_size, dtype=torch.bool)
    for t in range(case.num_tokens):
        for e in case.topk_idx[t].tolist():
            if e >= 0:
                out[t, e // e_loc] = True
    return out


def _oracle_recv_rows(in_rank: list[torch.Tensor], dst: int) -> dict[tuple[int, int], int]:
    """Row of each (source rank, source token) in ``dst``'s recv_x: by source rank, then source token index."""
    rows: dict[tuple[int, int], int] = {}
    for src, mask in enumerate(in_rank):
        for t in range(mask.size(0)):
            if mask[t, dst]:
                rows[(src, t)] = len(rows)
    return rows


def _dispatch_imbalanced(rank: int, world_size: int, per_node: int, **kwargs):
    cases = _imbalanced_cases(31, world_size)
    me = cases[rank]
    buf = dp.Buffer(dist.group.WORLD, 0, 1 << 20, num_ranks_per_node=per_node)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(me.topk_idx, me.num_experts)
    out = buf.dispatch(me.x, None, per_rank, per_rdma, in_rank, per_expert, me.topk_idx, me.topk_weights, **kwargs)
    return cases, buf, out


def _check_send_rdma_head(rank: int, world_size: int, per_node: int) -> None:
    cases, _, (_, _, _, _, handle, _) = _dispatch_imbalanced(rank, world_size, per_node)
    num_nodes = world_size // per_node
    in_rank = _oracle_in_rank(cases[rank], world_size)
    want = torch.full((cases[rank].num_tokens, num_nodes), -1, dtype=torch.int32)
    for n in range(num_nodes):
        seen = 0
        for t in range(cases[rank].num_tokens):
            if in_rank[t, n * per_node:(n + 1) * per_node].any():
                want[t, n] = seen
                seen += 1
    assert handle.send_rdma_head.dtype == torch.int32
    assert torch.equal(handle.send_rdma_head, want)


@pytest.mark.parametrize("world_size,per_node", TOPOLOGIES)
def test_send_rdma_head_is_the_index_among_tokens_to_each_node(world_size: int, per_node: int) -> None:
    run_distributed(_check_send_rdma_head, world_size, per_node, timeout=400)


def _check_send_nvl_head(rank: int, world_size: int, per_node: int) -> None:
    cases, _, (recv_x, _, _, _, handle, _) = _dispatch_imbalanced(rank, world_size, per_node)
    num_nodes, node, local = world_size // per_node, rank // per_node, rank % per_node
    in_rank = [_oracle_in_rank(c, world_size) for c in cases]
    rows_on = [_oracle_recv_rows(in_rank, node * per_node + g) for g in range(per_node)]
    # My RDMA-received records: from the rank with my local index on every node, by source node, token index.
    want = []
    for n in range(num_nodes):
        src = n * per_node + local
        for t in range(cases[src].num_tokens):
            if in_rank[src][t, node * per_node:(node + 1) * per_node].any():
                want.append([rows_on[g].get((src, t), -1) for g in range(per_node)])
    want_t = torch.tensor(want, dtype=torch.int32).reshape(-1, per_node)
    assert handle.send_nvl_head.dtype == torch.int32
    assert torch.equal(handle.send_nvl_head, want_t)
    # The rows are absolute rows of the destinations' dispatch output: for my own column, my recv_x there
    # holds exactly the forwarded token.
    mine = 0
    for n in range(num_nodes):
        src = n * per_node + local
        for t in range(cases[src].num_tokens):
            if in_rank[src][t, node * per_node:(node + 1) * per_node].any():
                row = int(handle.send_nvl_head[mine, local])
                assert (row >= 0) == bool(in_rank[src][t, rank])
                if row >= 0:
                    assert torch.equal(recv_x[row], cases[src].x[t])
                mine += 1


@pytest.mark.parametrize("world_size,per_node", TOPOLOGIES)
def test_send_nvl_head_is_the_row_in_each_local_destination(world_size: int, per_node: int) -> None:
    run_distributed(_check_send_nvl_head, world_size, per_node, timeout=400)


def _check_worst_tokens(rank: int, world_size: int, per_node: int) -> None:
    cases, buf, normal = _dispatch_imbalanced(rank, world_size, per_node)
    in_rank = [_oracle_in_rank(c, world_size) for c in cases]
    worst = max(len(_oracle_recv_rows(in_rank, j)) for j in range(world_size)) + 3
    _, _, worst_out = _dispatch_imbalanced(rank, world_size, per_node, num_worst_tokens=worst)
    h, hw = normal[4], worst_out[4]
    n_recv, n_rdma = h.recv_src_meta.size(0), h.send_nvl_head.size(0)
    assert worst_out[0].shape == (worst, cases[rank].hidden)
    assert hw.recv_src_meta.shape == (worst, 8) and hw.recv_src_meta.dtype == torch.uint8
    assert torch.equal(hw.recv_src_meta[:n_recv], h.recv_src_meta)
    assert bool((hw.recv_src_meta[n_recv:] == 0xFF).all())
    assert bool((hw.recv_src_meta.view(torch.int32)[n_recv:] == -1).all())
    assert hw.send_nvl_head.shape == (per_node * worst, per_node) and hw.send_nvl_head.dtype == torch.int32
    assert torch.equal(hw.send_nvl_head[:n_rdma], h.send_nvl_head)
    assert bool((hw.send_nvl_head[n_rdma:] == -1).all())
    # Every other field is the unpadded one.
    for name in InternodeHandle._fields:
        if name not in ("recv_src_meta", "send_nvl_head"):
            assert torch.equal(getattr(hw, name), getattr(h, name)), name
    # Combine and cached dispatch read the padded handle like the unpadded one.
    me = cases[rank]
    recv_x = normal[0]
    padded_x = torch.cat([recv_x, torch.full((worst - n_recv, me.hidden), 5.0, dtype=recv_x.dtype)])
    assert torch.equal(buf.combine(padded_x, hw)[0], buf.combine(recv_x, h)[0])
    assert torch.equal(buf.dispatch(me.x, handle=hw)[0], recv_x)
    cached = buf.dispatch(me.x, handle=hw, num_worst_tokens=worst)[0]
    assert cached.shape == (worst, me.hidden) and torch.equal(cached[:n_recv], recv_x)


@pytest.mark.parametrize("world_size,per_node", TOPOLOGIES)
def test_num_worst_tokens_fixes_internode_handle_shapes(world_size: int, per_node: int) -> None:
    run_distributed(_check_worst_tokens, world_size, per_node, timeout=400)


# ---------------------------------------------------------------------------------------------------------------
# The default node size: the ranks of the group on each host (by host name), at most 8.


def _node_size_from_hosts(rank: int, world_size: int, hosts: list[str], want_per_node: int) -> None:
    import socket

    socket.gethostname = lambda: hosts[rank]  # this process only (forked worker)
    buf = dp.Buffer(dist.group.WORLD, 1 << 20, (1 << 20) if want_per_node < world_size else 0)
    assert buf.num_ranks_per_node == want_per_node and buf.num_nodes == world_size // want_per_node


@pytest.mark.parametrize("hosts,per_node", [(["a", "a", "b", "b"], 2), (["a"] * 4, 4), (["a", "b", "c", "d"], 1)])
def test_default_node_size_is_the_ranks_per_host(hosts: list[str], per_node: int) -> None:
    run_distributed(_node_size_from_hosts, 4, hosts, per_node)


def _uneven_hosts(rank: int, world_size: int) -> None:
    import socket

    socket.gethostname = lambda: "a" if rank < 3 else "b"
    with pytest.raises(ValueError, match="num_ranks_per_node"):
        dp.Buffer(dist.group.WORLD, 1 << 20, 1 << 20)


def test_uneven_hosts_ask_for_an_explicit_node_size() -> None:
    run_distributed(_uneven_hosts, 4)
