"""Single-process units: Config and its size hints, events on CPU, layout, permute."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepep_plugin as dp
from deepep_plugin.layout import get_dispatch_layout, stream_slots
from deepep_plugin.permute import permute, unpermute


def test_config_keeps_deepep_defaults_and_validation() -> None:
    c = dp.Config()  # rdma_recv 256 is rounded up to a multiple of rdma_send 6, as DeepEP does
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == (20, 6, 256, 6, 258)
    assert dp.Config(24, 6, 256, 20, 110).num_max_rdma_chunked_recv_tokens == 120  # rounded up to the send chunk
    with pytest.raises(dp.DeepEPInputError, match="at most half"):
        dp.Config(24, 6, 256, 20, 20)


def test_size_hints_equal_deepeps_published_examples() -> None:
    assert dp.Config(24, 6, 256, 6, 128).get_nvl_buffer_size_hint(14336, 8) == 402_851_712
    c = dp.Config(24, 36, 288, 20, 128)
    assert c.get_nvl_buffer_size_hint(14336, 16) == 453_208_704
    assert c.get_rdma_buffer_size_hint(14336, 16) == 110_265_216
    assert c.get_rdma_buffer_size_hint(14336, 8) == 0
    assert dp.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) == 1_908_410_496
    assert dp.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 288) == 2_146_961_792


def test_default_configs_follow_the_table_and_num_sms() -> None:
    old = dp.Buffer.num_sms
    try:
        dp.Buffer.set_num_sms(24)
        d, c = dp.Buffer.get_dispatch_config(2), dp.Buffer.get_combine_config(8)
        assert (d.num_sms, d.num_max_nvl_chunked_send_tokens, d.num_max_rdma_chunked_recv_tokens) == (24, 24, 132)
        assert (c.num_sms, c.num_max_nvl_chunked_send_tokens) == (24, 4)
        assert dp.Buffer.get_dispatch_config(6).num_max_nvl_chunked_send_tokens == 6  # 6 ranks: the 8-rank entry
    finally:
        dp.Buffer.num_sms = old


def test_events_on_cpu_are_no_ops_but_keep_deepeps_contract() -> None:
    with dp.Buffer.capture() as ev:
        assert isinstance(ev, dp.EventOverlap)
    with pytest.raises(AssertionError, match="no event"):
        dp.EventOverlap(None).current_stream_wait()
    with dp.EventOverlap(None):
        pass
    dp.EventOverlap(dp.EventHandle()).current_stream_wait()
    assert dp.topk_idx_t == torch.int64


def _layout_by_loops(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, per_node: int):
    t, _ = topk_idx.shape
    e_loc = num_experts // num_ranks
    per_expert = [0] * num_experts
    in_rank = torch.zeros(t, num_ranks, dtype=torch.bool)
    for i in range(t):
        for e in topk_idx[i].tolist():
            if 0 <= e < num_experts:
                per_expert[e] += 1
                in_rank[i, e // e_loc] = True
    in_node = in_rank.view(t, num_ranks // per_node, per_node).any(-1)
    return in_rank.sum(0).tolist(), in_node.sum(0).tolist(), per_expert, in_rank


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 30), st.sampled_from([(2, 2), (4, 2), (8, 8), (16, 8)]), st.integers(1, 6), st.integers(0, 99))
def test_layout_matches_a_loop_over_tokens(num_tokens: int, ranks_nodes: tuple, num_topk: int, seed: int) -> None:
    num_ranks, per_node = ranks_nodes
    num_experts = num_ranks * 3
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, num_experts, (num_tokens, num_topk), generator=g)
    per_rank, per_rdma, per_expert, in_rank = get_dispatch_layout(idx, num_experts, num_ranks, per_node)
    want = _layout_by_loops(idx, num_experts, num_ranks, per_node)
    assert per_rank.tolist() == want[0] and per_expert.tolist() == want[2] and torch.equal(in_rank, want[3])
    assert (per_rdma is None) == (num_ranks <= per_node)
    if per_rdma is not None:
        assert per_rdma.tolist() == want[1]
    assert per_rank.dtype == per_expert.dtype == torch.int32 and in_rank.dtype == torch.bool


def test_stream_slots_count_earlier_tokens_of_the_same_channel() -> None:
    mask = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1], [1, 0]], dtype=torch.bool)
    # 2 channels of ceil(5/2)=3 tokens: {0,1,2}, {3,4}
    assert stream_slots(mask, 2).tolist() == [[0, -1], [1, 0], [-1, 1], [0, 0], [1, -1]]


def test_permute_groups_rows_by_expert_and_unpermute_sums_them_back() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, generator=g)
    idx = torch.tensor([[1, -1], [0, 1], [-1, -1], [2, 0], [1, 1], [0, -1]])
    w = torch.rand(6, 2, generator=g)
    perm = permute(x, idx, 3, w, alignment=2)
    assert perm.tokens_per_expert.tolist() == [4, 4, 2]  # 3 -> 4, 4 (row 4 twice), 1 -> 2
    assert perm.row_ids.tolist() == [1, 3, 5, -1, 0, 1, 4, 4, 3, -1]
    assert torch.equal(perm.x[3], torch.zeros(8)) and float(perm.probs[3]) == 0.0
    assert torch.equal(perm.x[0], x[1]) and float(perm.probs[0]) == float(w[1, 0])
    back = unpermute(perm.x, perm, 6)
    copies = (idx >= 0).sum(1, keepdim=True).float()
    torch.testing.assert_close(back, x * copies)


def test_permute_is_differentiable() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    idx = torch.tensor([[0, 1], [1, -1], [0, 0], [-1, -1]])
    perm = permute(x, idx, 2)
    unpermute(perm.x * 2, perm, 4).sum().backward()
    assert x.grad[:, 0].tolist() == [4.0, 2.0, 4.0, 0.0]


def test_permute_with_a_known_row_count_pads_at_the_end() -> None:
    x = torch.randn(3, 4)
    idx = torch.tensor([[1, 0], [0, -1], [1, -1]])
    perm = permute(x, idx, 2, num_out_rows=6)
    assert perm.x.shape == (6, 4) and perm.row_ids.tolist() == [0, 1, 0, 2, -1, -1]
    assert perm.tokens_per_expert.tolist() == [2, 2]
    torch.testing.assert_close(unpermute(perm.x, perm, 3), x * torch.tensor([[2.0], [1.0], [1.0]]))


def test_is_sm90_compiled_reports_the_built_kernels() -> None:
    from deepep_plugin.backends import cuda_extensions_available

    assert dp.Buffer.is_sm90_compiled() == cuda_extensions_available()
    if not torch.cuda.is_available():
        assert dp.Buffer.is_sm90_compiled() is False


@pytest.mark.parametrize("num_ranks", [16, 32, 64, 128])
@pytest.mark.parametrize("num_sms", [8, 24, 64])
def test_size_hints_hold_the_internode_rings(num_ranks: int, num_sms: int) -> None:
    # Buffers sized like DeepEP's (Config.get_rdma/nvl_buffer_size_hint with BF16 hidden bytes) hold the internode
    # kernels' rings for the default configs, BF16 and FP8 records and combine rows, with put staging (RDMA).
    from deepep_plugin.backends.cuda_internode import buffer_layout, combine_row_bytes, record_bytes, ring_bytes

    hidden, per_node, topk = 7168, 8, 8
    nodes = num_ranks // per_node
    for cfg in (dp.Buffer.get_dispatch_config(num_ranks), dp.Buffer.get_combine_config(num_ranks)):
        cfg = dp.Config(num_sms, cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens,
                        cfg.num_max_rdma_chunked_send_tokens, cfg.num_max_rdma_chunked_recv_tokens)
        hint = cfg.get_rdma_buffer_size_hint(hidden * 2, num_ranks)
        layout = buffer_layout(num_ranks, nodes, hint, 0)
        items = [record_bytes(hidden * 2, 0, topk, per_node), record_bytes(hidden, hidden // 128, topk, per_node),
                 combine_row_bytes(hidden, topk)]  # BF16 record, FP8 record with scales, combine row
        for item in items:
            need = ring_bytes(layout, nodes, cfg.num_channels, cfg.num_max_rdma_chunked_recv_tokens, item, True)
            assert need <= hint, (item, need, hint)
        # Combine's NVL rings (G x C x num_max_nvl_chunked_recv_tokens rows) in a get_nvl_buffer_size_hint buffer.
        nvl_rings = per_node * cfg.num_channels * cfg.num_max_nvl_chunked_recv_tokens * items[2]
        assert nvl_rings <= cfg.get_nvl_buffer_size_hint(hidden * 2, num_ranks)
