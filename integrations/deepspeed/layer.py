"""``DeepEPMOELayer``: DeepSpeed's ``MOELayer`` with a dropless, token-level dispatch/combine.

DeepSpeed's ``MOELayer`` packs every token into a ``[E, C, M]`` capacity buffer (dropping what does not fit,
or padding every expert to the busiest one) and exchanges the whole buffer twice with ``all_to_all_single``.
This subclass keeps everything of the layer (its gate, its ``Experts``, its EP group, its parameter tags and
checkpoint keys) and replaces only ``forward``:

1. route each token to ``gate.k`` experts with no capacity (``gating.route``; DeepSpeed's ``l_aux`` and
   ``exp_counts`` are kept);
2. ``deepep_plugin.autograd.dispatch``: each token travels once to every rank that owns one of its experts
   (expert ``e`` lives on EP rank ``e // L`` as local expert ``e % L``, ``L = num_local_experts``, which is
   DeepSpeed's placement and checkpoint numbering), optionally as FP8;
3. ``deepep_plugin.permute``: the received rows are grouped by local expert; every local expert runs once on
   its own rows (also on zero rows, so its gradients exist on every rank);
4. each expert output row is weighted by its routing weight (float32), the rows of one received token are
   summed, and ``deepep_plugin.autograd.combine`` sums the copies back on the token's source rank.

With ``wall_clock_breakdown`` on (DeepSpeed config), the layer fills DeepSpeed's timers as its own layer does:
``gate.gate_time`` (routing), ``time_falltoall`` (dispatch), ``time_salltoall`` (combine), ``time_moe`` (all).

Install it with :func:`integrations.deepspeed.apply` (per MoE module, driven by the JSON config): it swaps the
class of existing ``MOELayer`` instances, so no state is created or renamed.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from deepspeed.moe.sharded_moe import (
    FIRST_ALLTOALL_TIMER,
    MOE_TIMER,
    SECOND_ALLTOALL_TIMER,
    TOPK_GATE_TIMER,
    MOELayer,
)
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

import deepep_plugin.autograd as ep_autograd
from deepep_plugin.errors import DeepEPError, expect
from deepep_plugin.permute import permute, unpermute

from .buffers import group_buffer
from .config import SECTION, PluginOptions
from .gating import route


class UnsupportedSetupError(DeepEPError, NotImplementedError):
    """A DeepSpeed setup the plugin layer cannot run correctly (it refuses instead of running wrongly)."""


def check_parallelism() -> None:
    """Refuse tensor-parallel setups (raise :class:`UnsupportedSetupError`), which this layer does not handle.

    With non-expert tensor parallelism DeepSpeed drops the duplicate tokens of the TP ranks before its
    all-to-all and gathers them after; with expert tensor parallelism it also gathers the tokens around the
    experts. The plugin layer does neither yet, so it would compute every token ``tp`` times.
    """
    tp = bwc_tensor_model_parallel_world_size(groups.mpu)
    if tp > 1:
        raise UnsupportedSetupError(
            f"{SECTION}: tensor-parallel non-expert layers (tensor parallel size {tp}) are not supported by the "
            f"plugin's MoE layer; disable the plugin ({SECTION}.enabled = false) or run without tensor parallelism"
        )
    etp = groups._get_expert_model_parallel_world_size()
    if etp > 1:
        raise UnsupportedSetupError(
            f"{SECTION}: expert tensor parallelism (size {etp}, enable_expert_tensor_parallelism=True) is not "
            f"supported by the plugin's MoE layer; disable one of them"
        )


class DeepEPMOELayer(MOELayer):
    """A ``deepspeed.moe.sharded_moe.MOELayer`` whose forward routes without capacity and dispatches with
    deepep_plugin. Created by class swap (:func:`integrations.deepspeed.apply`), which also sets
    ``deepep_options`` (a :class:`~integrations.deepspeed.config.PluginOptions`).
    """

    deepep_options: PluginOptions

    def forward(self, *inputs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """MoE forward, DeepSpeed's contract.

        Args:
            inputs: ``(hidden_states, used_token)``: ``hidden_states [..., M]`` floating (any leading shape, any
                device); ``used_token`` optional ``[S]`` 0/1 mask over the ``S`` flattened tokens (top-1 only,
                as in DeepSpeed), or ``None``.

        Returns:
            ``[..., M]``, the shape, dtype and device of ``hidden_states``. Sets ``self.l_aux`` (``[]`` float32,
            differentiable) and ``self.exp_counts`` (``[E]`` int64, this rank's routes per expert).
        """
        hidden_states = inputs[0]
        used_token: Optional[torch.Tensor] = inputs[1] if len(inputs) > 1 else None
        options = self.deepep_options
        expect(
            self.ep_group is not None or self.ep_size == 1,
            f"{type(self).__name__}: the layer has no expert-parallel group; call deepspeed.initialize(...) or "
            "MoE.set_deepspeed_parallelism() before the first forward",
        )
        check_parallelism()
        if self.wall_clock_breakdown:
            self.timers(MOE_TIMER).start()

        hidden = hidden_states.shape[-1]
        tokens = hidden_states.reshape(-1, hidden)
        if self.gate.wall_clock_breakdown:
            self.gate.timers(TOPK_GATE_TIMER).start()
        routing = route(self.gate, tokens, used_token, options.group_limited_gating)
        if self.gate.wall_clock_breakdown:
            self.gate.timers(TOPK_GATE_TIMER).stop()
            self.gate.gate_time = self.gate.timers(TOPK_GATE_TIMER).elapsed(reset=False)
        self.l_aux, self.exp_counts = routing.l_aux, routing.exp_counts
        num_experts = self.ep_size * self.num_local_experts

        if self.wall_clock_breakdown:
            self.timers(FIRST_ALLTOALL_TIMER).start()
        distributed = self.ep_group is not None and self.ep_size > 1
        if distributed:
            comm = group_buffer(self.ep_group, hidden * max(tokens.element_size(), 2), options.backend,
                                options.num_sms)
            recv_x, recv_idx, recv_weights, counts, handle = ep_autograd.dispatch(
                comm.buffer, tokens, routing.topk_idx.contiguous(), routing.topk_weights.contiguous(), num_experts,
                fp8=options.fp8_dispatch, config=comm.dispatch_config)
        else:  # one EP rank: every expert is local and nothing is sent (so nothing is cast to FP8 either)
            recv_x, recv_idx, recv_weights, counts = tokens, routing.topk_idx, routing.topk_weights, None
        if self.wall_clock_breakdown:
            self.timers(FIRST_ALLTOALL_TIMER).stop()
            self.time_falltoall = self.timers(FIRST_ALLTOALL_TIMER).elapsed(reset=False)

        rows = self._run_experts(recv_x, recv_idx, recv_weights, counts)

        if self.wall_clock_breakdown:
            self.timers(SECOND_ALLTOALL_TIMER).start()
        combined = ep_autograd.combine(comm.buffer, rows, handle, config=comm.combine_config) if distributed else rows
        if self.wall_clock_breakdown:
            self.timers(SECOND_ALLTOALL_TIMER).stop()
            self.time_salltoall = self.timers(SECOND_ALLTOALL_TIMER).elapsed(reset=False)

        out = combined.reshape(hidden_states.shape)
        if self.wall_clock_breakdown:
            self.timers(MOE_TIMER).stop()
            self.time_moe = self.timers(MOE_TIMER).elapsed(reset=False)
        return out

    def _run_experts(self, recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_weights: torch.Tensor,
                     counts: Optional[list]) -> torch.Tensor:
        """Weighted sum of the local experts' outputs for each received row.

        Args:
            recv_x: ``[N, M]`` received token rows.
            recv_idx: ``[N, k]`` int64 local expert ids (``-1`` = expert on another rank or unused slot).
            recv_weights: ``[N, k]`` float32 routing weights (differentiable).
            counts: rows per local expert (``[L]`` ints) when known, else ``None`` (read from the permutation).

        Returns:
            ``[N, M]`` in ``recv_x.dtype``: ``sum_j recv_weights[n, j] * expert[recv_idx[n, j]](recv_x[n])``,
            accumulated in float32.
        """
        perm = permute(recv_x, recv_idx, self.num_local_experts, recv_weights)
        sizes = counts if counts is not None else perm.tokens_per_expert.tolist()
        outputs = []
        for expert, expert_rows in zip(self.experts.deepspeed_experts, perm.x.split(sizes, dim=0)):
            out = expert(expert_rows)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        expert_out = torch.cat(outputs, dim=0)
        weighted = expert_out.float() * perm.probs.unsqueeze(1)
        return unpermute(weighted, perm, recv_x.size(0)).to(recv_x.dtype)
