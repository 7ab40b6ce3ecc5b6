"""Capacity-free top-k gating for a DeepSpeed ``TopKGate``, with DeepSpeed's ``l_aux`` and ``exp_counts``.

DeepSpeed's gates (``deepspeed.moe.sharded_moe.top1gating`` / ``top2gating`` / ``topkgating``) mix two things:
the routing decision and the capacity bookkeeping (slot locations, dropped routes, a MAX all-reduce of the
busiest expert when ``drop_tokens=False``). The plugin needs only the decision, so this module recomputes it
from the gate's own weight ``gate.wg.weight`` and returns it in the form dispatch takes (``topk_idx`` /
``topk_weights``). Used without drops, the result equals DeepSpeed's:

* **k = 1**: ``probs = softmax(logits)``; the expert is ``argmax(probs)`` (``argmax(logits + Gumbel)`` with
  ``noisy_gate_policy="RSample"`` in training); its weight is the raw probability (not renormalised). A token
  whose ``used_token`` entry is 0 is not routed (``topk_idx = -1``) and is not counted.
  ``l_aux = sum_e(me_e * ce_e) * E``.
* **k = 2**: first expert ``argmax(probs)``; second ``argmax`` of the logits with the first masked out (Gumbel
  noise added when ``gate.top2_2nd_expert_sampling``); weights ``p_i / max(p_1 + p_2, eps)``.
  ``l_aux = mean_e(me_e * ce_e) * E * E`` with ``ce`` counting first choices only.
* **k >= 3**: ``torch.topk(probs, k)``, weights renormalised to sum 1. ``l_aux = mean_e(me_e * ce_e) * E * E / k``.

with ``me = mean over tokens of probs`` and ``ce = fraction of tokens routed to e``. ``noisy_gate_policy="Jitter"``
multiplies the gate input by uniform noise in ``[1 - 1e-2, 1 + 1e-2]`` in training. The random draws are made
with DeepSpeed's own samplers, in DeepSpeed's order, so a run seeded like a DeepSpeed run draws the same noise.
``exp_counts`` is ``[E]`` int64, per rank (not reduced), detached, as in DeepSpeed.

**Group-limited gating** (DeepSeek-V3, optional): ``deepep_plugin.routing.group_limited_topk`` chooses
``gate.k`` experts from the ``topk_group`` best of ``num_groups`` contiguous expert groups. ``l_aux`` then
follows the k >= 3 formula on the normalised scores (``me = mean of scores / sum(scores)``), which is the
Switch/GShard balance loss for any k; ``exp_counts`` counts every chosen expert. Gumbel sampling does not apply
(the routing is deterministic); Jitter still does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import gumbel_rsample, multiplicative_jitter

from deepep_plugin.errors import expect
from deepep_plugin.routing import group_limited_topk


@dataclass(frozen=True)
class GroupLimitedGating:
    """Options of DeepSeek-V3 group-limited gating (see ``deepep_plugin.routing.group_limited_topk``)."""

    num_groups: int = 1
    topk_group: int = 1
    score_function: str = "softmax"
    routed_scaling_factor: float = 1.0
    normalize: Optional[bool] = None


class Routing(NamedTuple):
    """Where each token goes, and DeepSpeed's gate statistics.

    * ``topk_idx``: ``[S, k]`` int64 global expert ids, ``-1`` = slot unused; same device as the tokens.
    * ``topk_weights``: ``[S, k]`` float32, ``0`` where ``topk_idx == -1``; differentiable w.r.t. ``gate.wg``.
    * ``l_aux``: ``[]`` float32 load-balancing loss, differentiable w.r.t. ``gate.wg`` (the caller adds it).
    * ``exp_counts``: ``[E]`` int64, routes per expert on this rank, detached.
    """

    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    l_aux: torch.Tensor
    exp_counts: torch.Tensor


def _counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` int64: number of ``(token, slot)`` entries equal to each expert (``-1`` ignored)."""
    valid = topk_idx[topk_idx >= 0]
    return torch.bincount(valid, minlength=num_experts).to(torch.int64)


def gate_logits(gate: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``[S, E]`` float32 logits of a DeepSpeed ``TopKGate`` for ``tokens [S, M]`` (Jitter applied in training)."""
    x = tokens.float()
    if gate.noisy_gate_policy == "Jitter" and gate.training:
        x = multiplicative_jitter(x, device=tokens.device)
    return F.linear(x, gate.wg.weight.float())


def route(
    gate: torch.nn.Module,
    tokens: torch.Tensor,
    used_token: Optional[torch.Tensor] = None,
    group_limited: Optional[GroupLimitedGating] = None,
) -> Routing:
    """Route ``tokens`` with DeepSpeed ``TopKGate`` ``gate`` and no capacity limit.

    Args:
        gate: a ``deepspeed.moe.sharded_moe.TopKGate`` (reads ``wg``, ``k``, ``noisy_gate_policy``,
            ``top2_2nd_expert_sampling``, ``training``).
        tokens: ``[S, M]`` floating tensor, the flattened hidden states.
        used_token: optional ``[S]`` mask (bool or 0/1 integers) of tokens to route; as in DeepSpeed it is
            honoured for ``k == 1`` only.
        group_limited: DeepSeek-V3 group-limited gating options, or ``None`` for DeepSpeed's gating.

    Returns:
        :class:`Routing` ``(topk_idx, topk_weights, l_aux, exp_counts)``.
    """
    expect(tokens.dim() == 2, f"tokens must be 2-D [S, M], got shape {tuple(tokens.shape)}")
    num_tokens = tokens.size(0)
    if used_token is not None:
        expect(
            used_token.shape == (num_tokens,),
            f"used_token must have shape ({num_tokens},) (one entry per token), got {tuple(used_token.shape)}",
        )
    k = gate.k
    logits = gate_logits(gate, tokens)
    num_experts = logits.size(1)

    if group_limited is not None:
        topk_idx, topk_weights = group_limited_topk(
            logits,
            k,
            num_groups=group_limited.num_groups,
            topk_group=group_limited.topk_group,
            score_function=group_limited.score_function,
            routed_scaling_factor=group_limited.routed_scaling_factor,
            normalize=group_limited.normalize,
        )
        scores = logits.softmax(dim=1) if group_limited.score_function == "softmax" else logits.sigmoid()
        probs = scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
        exp_counts = _counts(topk_idx, num_experts)
        l_aux = _mean_me_ce(probs, exp_counts, num_tokens) * num_experts * num_experts / k
        return Routing(topk_idx, topk_weights, l_aux, exp_counts)

    probs = F.softmax(logits, dim=1)
    if k == 1:
        noisy = gate.noisy_gate_policy == "RSample" and gate.training
        choice = logits + gumbel_rsample(logits.shape, device=logits.device) if noisy else probs
        idx = choice.argmax(dim=1, keepdim=True)
        weights = probs.gather(1, idx)
        if used_token is not None:
            used = (used_token != 0).unsqueeze(1)
            idx = idx.masked_fill(~used, -1)
            weights = weights * used
        exp_counts = _counts(idx, num_experts)
        # top1gating: sum(me * ce) * E, i.e. mean(me * ce) * E * E
        l_aux = _mean_me_ce(probs, exp_counts, num_tokens) * num_experts * num_experts
        return Routing(idx, weights, l_aux, exp_counts)

    if k == 2:
        first = probs.argmax(dim=1, keepdim=True)
        second_logits = logits
        if gate.top2_2nd_expert_sampling:
            second_logits = logits + gumbel_rsample(logits.shape, device=logits.device)
        second = second_logits.scatter(1, first, float("-inf")).argmax(dim=1, keepdim=True)
        idx = torch.cat([first, second], dim=1)
        picked = probs.gather(1, idx)
        weights = picked / picked.sum(dim=1, keepdim=True).clamp_min(torch.finfo(picked.dtype).eps)
        # top2gating: mean(me * ce) * E * E, ce from the first choice only
        l_aux = _mean_me_ce(probs, _counts(first, num_experts), num_tokens) * num_experts * num_experts
        return Routing(idx, weights, l_aux, _counts(idx, num_experts))

    picked, idx = torch.topk(probs, k=k, dim=1)
    weights = picked / picked.sum(dim=1, keepdim=True).clamp_min(torch.finfo(picked.dtype).eps)
    exp_counts = _counts(idx, num_experts)
    # topkgating: mean(me * ce) * E * E / k
    l_aux = _mean_me_ce(probs, exp_counts, num_tokens) * num_experts * num_experts / k
    return Routing(idx, weights, l_aux, exp_counts)


def _mean_me_ce(probs: torch.Tensor, counts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``mean_e(me_e * ce_e)``: ``me`` = mean of ``probs [S, E]`` over tokens, ``ce`` = ``counts [E] / S``.

    ``0`` (still attached to ``probs``, so the gate gets a zero gradient) when ``S == 0``, where DeepSpeed's
    formula would give NaN.
    """
    if num_tokens == 0:
        return probs.sum() * 0.0
    me = probs.mean(dim=0)
    ce = counts.to(probs.dtype) / num_tokens
    return (me * ce).mean()
