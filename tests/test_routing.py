"""Specification of ``deepep_plugin.routing``: DeepSeek-V3 group-limited top-k gating and its node-limit guarantee.

The reference below routes one token at a time with Python loops over groups and experts, in float32 (numpy
scalars) so that its comparisons see the same values as the vectorised code; ties go to the lower index.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepep_plugin.errors import DeepEPInputError
from deepep_plugin.routing import (
    check_node_limited_groups,
    group_limited_topk,
    nodes_of_topk,
    update_expert_bias,
)


def _scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    logits = logits.float()
    return torch.softmax(logits, dim=-1) if score_function == "softmax" else torch.sigmoid(logits)


def _reference_route(logits, topk, num_groups, topk_group, score_function, expert_bias, scaling, normalize):
    """Slow per-token routing: returns (idx int64 [T, K], weights float32 [T, K])."""
    scores = _scores(logits, score_function)
    selection = scores + expert_bias.float() if expert_bias is not None else scores
    num_tokens, num_experts = scores.shape
    per_group = num_experts // num_groups
    all_idx, all_weights = [], []
    for t in range(num_tokens):
        sel = [np.float32(v) for v in selection[t].tolist()]
        group_score = []
        for g in range(num_groups):
            members = sorted(sel[g * per_group:(g + 1) * per_group], reverse=True)
            group_score.append(members[0] + members[1] if per_group >= 2 else members[0])
        kept = sorted(range(num_groups), key=lambda g: (-group_score[g], g))[:topk_group]
        candidates = [e for g in kept for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(candidates, key=lambda e: (-sel[e], e))[:topk]
        weights = [float(scores[t, e]) for e in chosen]
        if normalize:
            total = sum(weights) + 1e-20
            weights = [w / total for w in weights]
        all_idx.append(chosen)
        all_weights.append([w * scaling for w in weights])
    return (
        torch.tensor(all_idx, dtype=torch.int64).view(num_tokens, topk),
        torch.tensor(all_weights, dtype=torch.float32).view(num_tokens, topk),
    )


CONFIGS = [  # (num_experts, num_groups, topk_group, topk)
    (16, 1, 1, 4),
    (64, 8, 4, 8),
    (64, 8, 1, 8),
    (48, 12, 3, 6),
    (32, 32, 5, 5),  # one expert per group: a group's score is its expert's score
    (256, 8, 4, 8),  # DeepSeek-V3
]


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_experts,num_groups,topk_group,topk", CONFIGS)
def test_matches_per_token_reference(num_experts, num_groups, topk_group, topk, score_function, use_bias):
    gen = torch.Generator().manual_seed(num_experts * 100 + num_groups * 10 + topk_group)
    logits = torch.randn(40, num_experts, generator=gen) * 3
    bias = torch.randn(num_experts, generator=gen) * 0.1 if use_bias else None
    kwargs = dict(num_groups=num_groups, topk_group=topk_group, score_function=score_function, expert_bias=bias)
    idx, weights = group_limited_topk(logits, topk, **kwargs)
    ref_idx, ref_weights = _reference_route(
        logits, topk, num_groups, topk_group, score_function, bias, 1.0, score_function == "sigmoid"
    )
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=0)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_ties_break_to_lower_index(score_function):
    # Logits drawn from 3 values: many exact ties among experts and among group scores.
    gen = torch.Generator().manual_seed(21)
    logits = torch.randint(0, 3, (60, 64), generator=gen).float()
    idx, _ = group_limited_topk(logits, 6, num_groups=8, topk_group=3, score_function=score_function)
    ref_idx, _ = _reference_route(logits, 6, 8, 3, score_function, None, 1.0, False)
    assert torch.equal(idx, ref_idx)
    # All equal: the first groups and, inside them, the first experts win.
    idx, _ = group_limited_topk(torch.zeros(2, 32), 5, num_groups=4, topk_group=2)
    assert idx.tolist() == [[0, 1, 2, 3, 4]] * 2


def test_plain_topk_is_torch_topk_of_scores():
    gen = torch.Generator().manual_seed(22)
    logits = torch.randn(100, 128, generator=gen, dtype=torch.float64).float()  # continuous: no ties
    idx, weights = group_limited_topk(logits, 8)
    expected = torch.softmax(logits.float(), dim=-1).topk(8, dim=-1)
    assert torch.equal(idx, expected.indices)
    assert torch.equal(weights, expected.values)


def test_bias_changes_selection_not_weights():
    gen = torch.Generator().manual_seed(23)
    logits = torch.randn(50, 32, generator=gen)
    bias = torch.zeros(32)
    bias[7] = 10.0  # expert 7 wins every selection...
    idx, weights = group_limited_topk(logits, 4, score_function="softmax", expert_bias=bias)
    assert bool((idx[:, 0] == 7).all())
    # ...but its weight is its unbiased score, and so are the others'.
    assert torch.equal(weights, torch.softmax(logits, dim=-1).gather(1, idx))
    unbiased_idx, _ = group_limited_topk(logits, 4)
    assert not torch.equal(idx, unbiased_idx)


def test_sigmoid_normalizes_by_default_and_softmax_does_not():
    gen = torch.Generator().manual_seed(24)
    logits = torch.randn(30, 64, generator=gen)
    _, w_sigmoid = group_limited_topk(logits, 8, num_groups=8, topk_group=4, score_function="sigmoid")
    torch.testing.assert_close(w_sigmoid.sum(-1), torch.ones(30))
    idx, w_softmax = group_limited_topk(logits, 8, num_groups=8, topk_group=4)
    assert torch.equal(w_softmax, torch.softmax(logits, -1).gather(1, idx))
    assert bool((w_softmax.sum(-1) < 1).all())
    _, w_norm = group_limited_topk(logits, 8, num_groups=8, topk_group=4, normalize=True)
    torch.testing.assert_close(w_norm, w_softmax / w_softmax.sum(-1, keepdim=True))
    idx, w_raw = group_limited_topk(logits, 8, score_function="sigmoid", normalize=False)
    assert torch.equal(w_raw, torch.sigmoid(logits).gather(1, idx))


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_routed_scaling_factor_multiplies_final_weights(score_function):
    gen = torch.Generator().manual_seed(25)
    logits = torch.randn(20, 64, generator=gen)
    kwargs = dict(num_groups=8, topk_group=4, score_function=score_function)
    idx, unscaled = group_limited_topk(logits, 8, **kwargs)
    scaled_idx, scaled = group_limited_topk(logits, 8, routed_scaling_factor=2.5, **kwargs)
    assert torch.equal(scaled_idx, idx)
    torch.testing.assert_close(scaled, unscaled * 2.5, rtol=1e-6, atol=0)
    _, ref = _reference_route(logits, 8, 8, 4, score_function, None, 2.5, score_function == "sigmoid")
    torch.testing.assert_close(scaled, ref, rtol=1e-6, atol=0)


def test_each_token_uses_at_most_topk_group_groups():
    gen = torch.Generator().manual_seed(26)
    logits = torch.randn(500, 256, generator=gen)
    bias = torch.randn(256, generator=gen) * 0.05
    for topk_group in (1, 2, 4):
        idx, _ = group_limited_topk(
            logits, 8, num_groups=8, topk_group=topk_group, score_function="sigmoid", expert_bias=bias
        )
        groups = idx // 32
        distinct = torch.zeros(500, 8, dtype=torch.bool).scatter_(1, groups, True).sum(1)
        assert int(distinct.max()) <= topk_group
        assert bool((idx.sort(dim=1).values.diff(dim=1) > 0).all()), "no expert chosen twice"


def test_weights_are_differentiable_in_logits():
    gen = torch.Generator().manual_seed(27)
    logits = torch.randn(10, 32, generator=gen, requires_grad=True)
    upstream = torch.randn(10, 4, generator=gen)
    idx, weights = group_limited_topk(logits, 4, num_groups=4, topk_group=2, score_function="sigmoid")
    (weights * upstream).sum().backward()
    reference_logits = logits.detach().clone().requires_grad_(True)
    chosen = torch.sigmoid(reference_logits).gather(1, idx)
    (chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad)


def test_zero_tokens():
    idx, weights = group_limited_topk(torch.zeros(0, 64), 8, num_groups=8, topk_group=4)
    assert idx.shape == (0, 8) and weights.shape == (0, 8)


# ----------------------------------------------------------------------------------------------- node limit


@pytest.mark.parametrize(
    "ranks_per_node,num_groups,topk_group",
    [(8, 8, 1), (8, 2, 1), (4, 8, 2), (4, 4, 3), (4, 16, 2), (4, 8, 4)],
)
def test_node_limit_guarantee_16_ranks(ranks_per_node, num_groups, topk_group):
    num_experts, num_ranks, topk = 256, 16, 8
    group_nodes = check_node_limited_groups(num_experts, num_groups, num_ranks, ranks_per_node)
    num_nodes = num_ranks // ranks_per_node
    assert group_nodes == [g * num_nodes // num_groups for g in range(num_groups)]
    gen = torch.Generator().manual_seed(ranks_per_node * 1000 + num_groups * 10 + topk_group)
    logits = torch.randn(2000, num_experts, generator=gen) * 2
    bias = torch.randn(num_experts, generator=gen) * 0.2
    idx, _ = group_limited_topk(
        logits, topk, num_groups=num_groups, topk_group=topk_group, score_function="sigmoid", expert_bias=bias
    )
    nodes = nodes_of_topk(idx, num_experts, num_ranks, ranks_per_node)
    assert nodes.dtype == torch.int64 and nodes.shape == (2000,)
    assert int(nodes.min()) >= 1 and int(nodes.max()) <= min(topk_group, num_nodes)


def test_nodes_of_topk_counts_distinct_nodes_and_ignores_unused_slots():
    gen = torch.Generator().manual_seed(28)
    num_experts, num_ranks, ranks_per_node = 64, 16, 4  # 4 nodes of 16 experts
    idx = torch.randint(-1, num_experts, (300, 6), generator=gen)
    idx[0] = -1  # a token routed nowhere
    idx[1] = torch.tensor([0, 15, -1, 3, 1, -1])  # all in node 0
    counts = nodes_of_topk(idx, num_experts, num_ranks, ranks_per_node)
    expected = [len({e // 16 for e in row if e >= 0}) for row in idx.tolist()]
    assert counts.tolist() == expected
    assert counts[0] == 0 and counts[1] == 1


def test_check_node_limited_groups_rejects_a_straddling_group():
    # 96 experts on 16 ranks, 4 per node: 24 experts per node; 6 groups of 16 -> group 1 spans experts 16..31.
    with pytest.raises(DeepEPInputError, match=r"expert group 1 \(experts 16\.\.31\) straddles nodes 0 and 1"):
        check_node_limited_groups(96, 6, 16, 4)
    # Groups larger than a node straddle too.
    with pytest.raises(DeepEPInputError, match="expert group 0"):
        check_node_limited_groups(256, 2, 16, 4)
    with pytest.raises(DeepEPInputError, match="num_ranks"):
        check_node_limited_groups(256, 8, 12, 8)
    with pytest.raises(DeepEPInputError, match="num_experts"):
        check_node_limited_groups(100, 4, 16, 8)


def test_nodes_of_topk_rejects_out_of_range_ids():
    with pytest.raises(DeepEPInputError, match=r"topk_idx values must be in \[-1, 64\)"):
        nodes_of_topk(torch.tensor([[0, 64]]), 64, 16, 4)
    with pytest.raises(DeepEPInputError, match="topk_idx must be int64"):
        nodes_of_topk(torch.tensor([[0, 1]], dtype=torch.int32), 64, 16, 4)


# ----------------------------------------------------------------------------------------------- bias update


def test_update_expert_bias_moves_towards_balance():
    gen = torch.Generator().manual_seed(29)
    bias = torch.randn(2, 16, generator=gen)  # two stacked layers
    counts = torch.randint(0, 100, (2, 16), generator=gen)
    counts[1] = 10
    counts[1, 0], counts[1, 1] = 14, 6  # mean stays 10: experts 2..15 are exactly at the mean
    original = bias.clone()
    new = update_expert_bias(bias, counts, 0.001)
    mean = counts.double().mean(dim=-1, keepdim=True)
    expected = original + 0.001 * torch.sign(mean - counts.double()).float()
    assert torch.equal(new, expected)
    assert torch.equal(bias, original), "the input is not modified"
    assert new[1, 0] == original[1, 0] - 0.001 and new[1, 1] == original[1, 1] + 0.001
    assert torch.equal(new[1, 2:], original[1, 2:])


def test_update_expert_bias_rejects_bad_arguments():
    with pytest.raises(DeepEPInputError, match="tokens_per_expert must have the shape"):
        update_expert_bias(torch.zeros(8), torch.zeros(9), 0.001)
    with pytest.raises(DeepEPInputError, match="expert_bias must be a floating"):
        update_expert_bias(torch.zeros(8, dtype=torch.int64), torch.zeros(8), 0.001)
    with pytest.raises(DeepEPInputError, match="update_rate"):
        update_expert_bias(torch.zeros(8), torch.zeros(8), -1.0)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_groups=5), r"num_groups \(5\) must divide the number of experts E = logits.size\(1\) = 64"),
        (dict(num_groups=8, topk_group=9), r"topk_group must be an int in \[1, num_groups=8\]"),
        (dict(num_groups=8, topk_group=0), "topk_group"),
        (dict(num_groups=8, topk_group=1, topk=9), r"topk must be an int in \[1, 8\]"),
        (dict(topk=0), "topk must be"),
        (dict(score_function="relu"), "score_function must be one of"),
        (dict(expert_bias=torch.zeros(63)), r"expert_bias must have shape \(64,\)"),
        (dict(expert_bias=torch.zeros(64, dtype=torch.int32)), "expert_bias must be a floating dtype"),
        (dict(logits=torch.zeros(64)), "logits must be 2-D"),
        (dict(logits=torch.zeros(4, 64, dtype=torch.int64)), "logits must be a floating dtype"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(logits=torch.zeros(4, 64), topk=4)
    args.update(kwargs)
    with pytest.raises(DeepEPInputError, match=match):
        group_limited_topk(args.pop("logits"), args.pop("topk"), **args)


# ----------------------------------------------------------------------------------------------- device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_cuda_chooses_the_same_experts_as_cpu(score_function):
    # Integer logits: many exact ties, and scores that CPU and GPU order the same way (softmax/sigmoid may
    # differ in the last bit between devices, so near-ties of unrelated values are not compared).
    gen = torch.Generator().manual_seed(30)
    logits = torch.randint(0, 4, (4096, 256), generator=gen).float()
    kwargs = dict(num_groups=8, topk_group=4, score_function=score_function)
    cpu_idx, cpu_w = group_limited_topk(logits, 8, **kwargs)
    gpu_idx, gpu_w = group_limited_topk(logits.cuda(), 8, **kwargs)
    assert torch.equal(gpu_idx.cpu(), cpu_idx)
    torch.testing.assert_close(gpu_w.cpu(), cpu_w, rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_routing_is_deterministic():
    gen = torch.Generator().manual_seed(31)
    logits = (torch.randint(0, 4, (8192, 256), generator=gen) + torch.randn(8192, 256, generator=gen)).cuda()
    bias = (torch.randn(256, generator=gen) * 0.01).cuda()
    first = group_limited_topk(logits, 8, num_groups=8, topk_group=4, score_function="sigmoid", expert_bias=bias)
    for _ in range(3):
        again = group_limited_topk(logits, 8, num_groups=8, topk_group=4, score_function="sigmoid", expert_bias=bias)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
