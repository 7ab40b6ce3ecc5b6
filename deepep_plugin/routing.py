"""Group-limited (node-limited) top-k gating, DeepSeek-V3 style, and the aux-loss-free expert-bias update.

DeepSeek-V3 splits its ``E`` routed experts into ``num_groups`` contiguous groups, places each group inside one
node, and lets every token pick its ``topk`` experts from only ``topk_group`` groups. A token therefore crosses
the network to at most ``topk_group`` nodes, which is what makes the two-hop internode dispatch cheap (interface
spec 4.1). This module computes such routings, checks that a group-to-node placement keeps the guarantee, and
measures how many nodes each token reaches.

Gating of one token (all in float32):

1. ``scores = softmax(logits)`` or ``sigmoid(logits)``;
2. selection scores ``s = scores + expert_bias`` (the bias steers selection only, never the weights);
3. a group's score is the sum of its two best selection scores (its best one if a group has one expert);
   the ``topk_group`` best groups are kept, the experts of the others are excluded;
4. the ``topk`` best kept experts by selection score are chosen;
5. weights = the unbiased ``scores`` of the chosen experts, divided by their sum when ``normalize``, times
   ``routed_scaling_factor``.

Ties are broken towards the lower index, in both the group choice and the expert choice (a stable descending
sort), so the result is the same on every run, and on every device given the same scores (softmax and sigmoid
themselves may differ in the last bit between CPU and GPU).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .errors import expect

#: Added to the sum of the chosen weights before normalising, so a row whose scores all underflowed to zero
#: yields zero weights instead of NaN.
NORMALIZE_EPS = 1e-20

_SCORE_FUNCTIONS = ("softmax", "sigmoid")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last dim, ties to the lower index, best first (int64)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def group_limited_topk(
    logits: torch.Tensor,
    topk: int,
    *,
    num_groups: int = 1,
    topk_group: int = 1,
    score_function: str = "softmax",
    expert_bias: Optional[torch.Tensor] = None,
    routed_scaling_factor: float = 1.0,
    normalize: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Route each token to ``topk`` experts chosen inside its ``topk_group`` best expert groups.

    With ``num_groups == topk_group`` (the default 1 and 1) this is plain top-k gating.

    Args:
        logits: ``[T, E]`` router logits, any floating dtype, any device.
        topk: experts per token, ``1 <= topk <= topk_group * E / num_groups``.
        num_groups: number of contiguous expert groups; must divide ``E``.
        topk_group: groups each token may use, ``1 <= topk_group <= num_groups``.
        score_function: ``"softmax"`` (over all ``E`` experts) or ``"sigmoid"`` (per expert).
        expert_bias: optional ``[E]`` floating tensor on the device of ``logits`` (used in float32): added to the
            scores for selection only (DeepSeek-V3's aux-loss-free load balancing, see :func:`update_expert_bias`).
        routed_scaling_factor: multiplies the weights (after normalisation).
        normalize: divide the chosen weights by their sum; ``None`` means ``True`` for sigmoid and ``False`` for
            softmax.

    Returns:
        ``(topk_idx, topk_weights)`` on the device of ``logits``:

        * ``topk_idx``: ``[T, topk]`` int64 global expert ids, best (highest selection score) first, no
          duplicates in a row;
        * ``topk_weights``: ``[T, topk]`` float32, differentiable with respect to ``logits``.
    """
    expect(isinstance(logits, torch.Tensor), f"logits must be a torch.Tensor, got {type(logits).__name__}")
    expect(logits.dim() == 2, f"logits must be 2-D [T, E], got shape {tuple(logits.shape)}")
    expect(logits.dtype.is_floating_point, f"logits must be a floating dtype, got {logits.dtype}")
    num_experts = logits.size(1)
    expect(num_experts > 0, f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    expect(
        score_function in _SCORE_FUNCTIONS,
        f"score_function must be one of {_SCORE_FUNCTIONS}, got {score_function!r}",
    )
    expect(_is_int(num_groups) and num_groups >= 1, f"num_groups must be an int >= 1, got {num_groups!r}")
    expect(
        num_experts % num_groups == 0,
        f"num_groups ({num_groups}) must divide the number of experts E = logits.size(1) = {num_experts}",
    )
    expect(
        _is_int(topk_group) and 1 <= topk_group <= num_groups,
        f"topk_group must be an int in [1, num_groups={num_groups}], got {topk_group!r}",
    )
    experts_per_group = num_experts // num_groups
    available = topk_group * experts_per_group
    expect(
        _is_int(topk) and 1 <= topk <= available,
        f"topk must be an int in [1, {available}] (topk_group={topk_group} groups of {experts_per_group} experts), "
        f"got {topk!r}",
    )
    if expert_bias is not None:
        expect(
            isinstance(expert_bias, torch.Tensor),
            f"expert_bias must be a torch.Tensor or None, got {type(expert_bias).__name__}",
        )
        expect(
            expert_bias.dtype.is_floating_point,
            f"expert_bias must be a floating dtype (float32 recommended), got {expert_bias.dtype}",
        )
        expect(
            tuple(expert_bias.shape) == (num_experts,),
            f"expert_bias must have shape ({num_experts},) (one entry per expert), got {tuple(expert_bias.shape)}",
        )
        expect(
            expert_bias.device == logits.device,
            f"expert_bias must be on {logits.device} like logits, got {expert_bias.device}",
        )
    if normalize is None:
        normalize = score_function == "sigmoid"

    logits32 = logits.float()
    scores = torch.softmax(logits32, dim=-1) if score_function == "softmax" else torch.sigmoid(logits32)

    with torch.no_grad():
        selection = scores.detach()
        if expert_bias is not None:
            selection = selection + expert_bias.float()
        if topk_group < num_groups:
            grouped = selection.view(-1, num_groups, experts_per_group)
            group_scores = grouped.topk(min(2, experts_per_group), dim=-1).values.sum(dim=-1)  # [T, G]
            kept_groups = _top_indices(group_scores, topk_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
            selection = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(-1, num_experts)
        topk_idx = _top_indices(selection, topk)

    weights = scores.gather(1, topk_idx)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + NORMALIZE_EPS)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return topk_idx.contiguous(), weights.contiguous()


def check_node_limited_groups(num_experts: int, num_groups: int, num_ranks: int, ranks_per_node: int) -> List[int]:
    """Check that every expert group lies inside one node, and return the node of each group.

    Experts are owned by ranks in contiguous blocks of ``num_experts / num_ranks``; nodes are contiguous blocks of
    ``ranks_per_node`` ranks; groups are contiguous blocks of ``num_experts / num_groups`` experts. When no group
    straddles two nodes, a token routed by :func:`group_limited_topk` with ``topk_group`` groups reaches at most
    ``topk_group`` nodes.

    Returns:
        ``nodes[g]``: the node index that holds group ``g``, for ``g`` in ``range(num_groups)``.

    Raises:
        DeepEPInputError: a count does not divide as required, or a group straddles two nodes (the message names
            the first such group and its expert range).
    """
    for name, value in (
        ("num_experts", num_experts),
        ("num_groups", num_groups),
        ("num_ranks", num_ranks),
        ("ranks_per_node", ranks_per_node),
    ):
        expect(_is_int(value) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
    expect(
        num_experts % num_ranks == 0,
        f"num_experts ({num_experts}) must be a multiple of num_ranks ({num_ranks})",
    )
    expect(
        num_ranks % ranks_per_node == 0,
        f"num_ranks ({num_ranks}) must be a multiple of ranks_per_node ({ranks_per_node})",
    )
    expect(
        num_experts % num_groups == 0,
        f"num_groups ({num_groups}) must divide num_experts ({num_experts})",
    )
    experts_per_node = num_experts // num_ranks * ranks_per_node
    experts_per_group = num_experts // num_groups
    nodes = []
    for group in range(num_groups):
        first, last = group * experts_per_group, (group + 1) * experts_per_group - 1
        node = first // experts_per_node
        expect(
            last // experts_per_node == node,
            f"expert group {group} (experts {first}..{last}) straddles nodes {node} and {last // experts_per_node}: "
            f"with {num_ranks} ranks, {ranks_per_node} per node, each node holds {experts_per_node} experts, which "
            f"must be a multiple of the group size {experts_per_group} (num_groups={num_groups})",
        )
        nodes.append(node)
    return nodes


def nodes_of_topk(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int) -> torch.Tensor:
    """Number of distinct nodes each token is routed to.

    Args:
        topk_idx: ``[T, K]`` int64 global expert ids, ``-1`` for an unused slot, any device.
        num_experts: total experts ``E``, a multiple of ``num_ranks``.
        num_ranks: ranks ``R``, a multiple of ``ranks_per_node``.
        ranks_per_node: ranks per node.

    Returns:
        ``[T]`` int64 on the device of ``topk_idx``: distinct nodes owning at least one of the token's experts
        (0 for a token whose slots are all ``-1``).

    Raises:
        DeepEPInputError: on bad counts, or an id outside ``[-1, E)`` (checking it synchronises with the device).
    """
    expect(isinstance(topk_idx, torch.Tensor), f"topk_idx must be a torch.Tensor, got {type(topk_idx).__name__}")
    expect(topk_idx.dim() == 2, f"topk_idx must be 2-D [T, K], got shape {tuple(topk_idx.shape)}")
    expect(topk_idx.dtype == torch.int64, f"topk_idx must be int64, got {topk_idx.dtype}")
    for name, value in (("num_experts", num_experts), ("num_ranks", num_ranks), ("ranks_per_node", ranks_per_node)):
        expect(_is_int(value) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
    expect(num_experts % num_ranks == 0, f"num_experts ({num_experts}) must be a multiple of num_ranks ({num_ranks})")
    expect(
        num_ranks % ranks_per_node == 0,
        f"num_ranks ({num_ranks}) must be a multiple of ranks_per_node ({ranks_per_node})",
    )
    if topk_idx.numel():
        expect(
            bool(((topk_idx >= -1) & (topk_idx < num_experts)).all()),
            f"topk_idx values must be in [-1, {num_experts}) (-1 = unused slot)",
        )
    num_nodes = num_ranks // ranks_per_node
    experts_per_node = num_experts // num_ranks * ranks_per_node
    # Unused slots go to an extra column that is dropped before counting.
    node = torch.where(topk_idx >= 0, topk_idx // experts_per_node, num_nodes)
    hit = torch.zeros(topk_idx.size(0), num_nodes + 1, dtype=torch.bool, device=topk_idx.device)
    hit.scatter_(1, node, True)
    return hit[:, :num_nodes].sum(dim=1)


@torch.no_grad()
def update_expert_bias(
    expert_bias: torch.Tensor, tokens_per_expert: torch.Tensor, update_rate: float
) -> torch.Tensor:
    """DeepSeek-V3's aux-loss-free balancing step: ``bias + update_rate * sign(mean_load - load)``.

    An under-loaded expert's bias grows and an over-loaded expert's bias shrinks by ``update_rate``; an expert
    at exactly the mean load keeps its bias. The input is not modified: write the result back with
    ``expert_bias.copy_(update_expert_bias(expert_bias, counts, rate))``. No gradient flows.

    Args:
        expert_bias: ``[..., E]`` floating (float32 in practice), any device; a leading dim can stack layers.
        tokens_per_expert: ``[..., E]`` (same shape) token counts of the last step(s), any real dtype, on the
            device of ``expert_bias`` (sum them over data-parallel ranks first for a global update).
        update_rate: the step ``u`` (DeepSeek-V3 uses 0.001), ``>= 0``.

    Returns:
        ``[..., E]`` tensor of ``expert_bias``'s dtype and device: the updated bias. The mean is taken over the last
        dim, in float64 so that integer counts compare exactly.
    """
    expect(
        isinstance(expert_bias, torch.Tensor) and expert_bias.dtype.is_floating_point,
        f"expert_bias must be a floating tensor, got {getattr(expert_bias, 'dtype', type(expert_bias).__name__)}",
    )
    expect(expert_bias.dim() >= 1, f"expert_bias must be [..., E], got shape {tuple(expert_bias.shape)}")
    expect(
        isinstance(tokens_per_expert, torch.Tensor) and not tokens_per_expert.is_complex()
        and tokens_per_expert.dtype != torch.bool,
        "tokens_per_expert must be a real-valued tensor of counts",
    )
    expect(
        tokens_per_expert.shape == expert_bias.shape,
        f"tokens_per_expert must have the shape of expert_bias {tuple(expert_bias.shape)}, "
        f"got {tuple(tokens_per_expert.shape)}",
    )
    expect(
        tokens_per_expert.device == expert_bias.device,
        f"tokens_per_expert must be on {expert_bias.device} like expert_bias, got {tokens_per_expert.device}",
    )
    expect(
        isinstance(update_rate, (int, float)) and not isinstance(update_rate, bool) and update_rate >= 0,
        f"update_rate must be a number >= 0, got {update_rate!r}",
    )
    load = tokens_per_expert.double()
    direction = torch.sign(load.mean(dim=-1, keepdim=True) - load)
    return expert_bias + (update_rate * direction).to(expert_bias.dtype)
