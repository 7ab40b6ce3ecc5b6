"""Groups spanning several nodes (reference backend): layout per node, the 10-tuple handle, dispatch/combine."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from routing_cases import expected_combine, expected_dispatch, make_case

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
