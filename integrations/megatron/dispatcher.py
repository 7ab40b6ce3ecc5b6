"""Dispatcher mode: deepep_plugin's own ``MoETokenDispatcher``, built by ``MoELayer`` in place of the flex one.

``MoELayer`` looks the flex dispatcher class up in its module's globals when it is constructed, so binding
``megatron.core.transformer.moe.moe_layer.MoEFlexTokenDispatcher`` to :class:`DeepEPPluginTokenDispatcher` makes
every MoE layer built afterwards with ``moe_token_dispatcher_type="flex"`` use it; no Megatron file changes.

What it adds to Megatron's own DeepEP path:

* **FP8 dispatch**: with ``fp8_dispatch`` the tokens are cast to FP8 once (per token, per 128 channels) before
  they are sent and dequantised on arrival; the gradient passes straight through the cast.
* **Padding per expert** for grouped GEMMs: every local expert's token block is padded with zero rows (weight 0)
  to a multiple of ``expert_alignment`` inside the permutation, without Megatron's routing-map padding pass.
* **tokens_per_expert on the device** for experts that accept a device tensor: the counts come from the
  permutation, on the tokens' device, so the dispatcher adds no device-to-host copy of its own (a CPU tensor is
  built from the dispatch's host-side counts only for experts that need one, legacy ``GroupedMLP``). The
  permutation itself still reads its row count on the host.
* **Group-limited routing**: the routing map is turned into top-k indices from the map itself (dropped slots and
  tokens routed to fewer experts get ``-1``), and at construction the expert groups of a group-limited router are
  checked against the node layout, with a warning when a group straddles nodes (then group-limited routing no
  longer bounds the number of nodes a token reaches).
* the **EP-overlap attributes** Megatron's fine-grained A2A overlap writes (``_comm_manager.token_probs`` and
  ``.dispatched_probs``) and the CUDA-graph attribute list, as the flex dispatcher has.

Shapes (``T`` tokens on this rank, ``H`` hidden, ``E`` experts over the TPxEP group, ``L`` local experts, ``K`` =
TP x top-k, ``N`` tokens received, ``M`` permuted rows incl. padding):

    dispatch_preprocess:  [S, B, H] tokens, [T, E/TP] bool routing map, [T, E/TP] probs -> [T, H], [T, K] fp32 probs
    token_dispatch:       [T, H], _ -> [N, H] received tokens, [N, K] fp32 received probs
    dispatch_postprocess: [N, H], _ -> [M, H] permuted tokens, [L] int64 tokens_per_expert, [M] permuted probs
    combine_preprocess:   [M, H] expert output -> [N, H]
    token_combine:        [N, H] -> [T, H]
    combine_postprocess:  [T, H] -> [S, B, H]
"""

from __future__ import annotations

import logging
import os
from typing import Any, List, Optional, Tuple

import torch

from deepep_plugin.errors import expect

from .settings import PluginSettings, megatron_num_sms

logger = logging.getLogger(__name__)

#: Settings the dispatchers built from now on use; set by ``enable``.
_ACTIVE_SETTINGS: Optional[PluginSettings] = None


def set_active_settings(settings: Optional[PluginSettings]) -> None:
    global _ACTIVE_SETTINGS
    _ACTIVE_SETTINGS = settings


class _BufferPool:
    """One ``deepep_plugin.Buffer`` per process group (``Buffer.sized_for``), rebuilt when wider rows need more."""

    def __init__(self) -> None:
        self._buffers: List[Tuple[Any, int, Any]] = []

    def get(self, group: Any, hidden_bytes: int) -> Any:
        import deepep_plugin

        for i, (g, sized, buf) in enumerate(self._buffers):
            if g is group:
                if sized >= hidden_bytes:
                    return buf
                del self._buffers[i]
                break
        buf = deepep_plugin.Buffer.sized_for(group, hidden_bytes)
        self._buffers.append((group, hidden_bytes, buf))
        return buf

    def clear(self) -> None:
        self._buffers.clear()


BUFFERS = _BufferPool()


class DispatchState:
    """Per-step state shared between the hooks; Megatron's EP-overlap schedule overwrites its probs attributes.

    Attributes (all ``None`` between steps):
        token_indices: [T, K] int64 global (TPxEP-virtual) expert ids, -1 for unused slots.
        token_probs: [T, K] float32 routing weights (0 where the index is -1).
        dispatched_indices: [N, K] int64 local expert ids, -1 for experts on other ranks.
        dispatched_probs: [N, K] float32 received weights.
        handle: the dispatch handle, consumed by combine.
        buffer: the ``deepep_plugin.Buffer`` the handle belongs to.
        permutation: the ``deepep_plugin.permute.Permutation`` of the received rows.
        num_recv_tokens_per_expert: host-side per-local-expert counts from dispatch (Python list of length L).
    """

    __slots__ = ("token_indices", "token_probs", "dispatched_indices", "dispatched_probs", "handle", "buffer",
                 "permutation", "num_recv_tokens_per_expert", "num_received")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Drop every reference (the layer's end). The probs carry the router's autograd graph: kept past the step,
        they would keep its parameters' gradient accumulators alive from one step to the next, and those run on the
        stream current when they were made, e.g. an eager step's default stream inside a later CUDA-graph capture."""
        for name in self.__slots__:
            setattr(self, name, None)


def routing_map_to_topk(routing_map: torch.Tensor, probs: torch.Tensor, topk: int) -> Tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Turn Megatron's multi-hot routing into DeepEP's top-k form, on the input's device, without a host sync.

    Args:
        routing_map: [T, E] bool, ``True`` where token t goes to expert e (at most ``topk`` per row).
        probs: [T, E] float routing weights (read where ``routing_map`` is set).
        topk: slots per token.

    Returns:
        ``(topk_idx [T, topk] int64, topk_weights [T, topk] float32)``: each row's selected experts in increasing
        id order, then ``-1`` (weight 0) for unused slots. Differentiable in ``probs``.
    """
    num_experts = routing_map.size(1)
    expect(topk <= num_experts, f"routing_map_to_topk: topk={topk} exceeds the {num_experts} experts")
    selected, order = torch.sort(routing_map.to(torch.int8), dim=1, descending=True, stable=True)
    selected, order = selected[:, :topk].bool(), order[:, :topk]
    topk_idx = torch.where(selected, order, torch.full_like(order, -1))
    topk_weights = torch.where(selected, probs.gather(1, order).float(), torch.zeros((), dtype=torch.float32,
                                                                                     device=probs.device))
    return topk_idx, topk_weights


def _experts_need_cpu_counts(config: Any) -> bool:
    """Legacy ``GroupedMLP`` (grouped_gemm without TransformerEngine) needs ``tokens_per_expert`` on the CPU."""
    if not getattr(config, "moe_grouped_gemm", False):
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return True
    return False


def host_count_reader(config: Any, num_local_experts: int) -> str:
    """Why Megatron's own experts for ``config`` would read ``tokens_per_expert`` on the host ("" when they would
    not): under ``sync_free`` the dispatcher reads nothing from the GPU, but a layer whose experts call
    ``tokens_per_expert.tolist()`` still does (megatron-core 0.16.1: ``TEGroupedMLP`` always; ``SequentialMLP``
    with more than one local expert, to split its rows). Experts of a custom spec are not known here."""
    if getattr(config, "moe_grouped_gemm", False):
        return "its grouped-GEMM experts (TEGroupedMLP / GroupedMLP) take tokens_per_expert as a host list"
    if num_local_experts > 1:
        return (f"SequentialMLP splits its rows among its {num_local_experts} local experts with "
                "tokens_per_expert.tolist()")
    return ""


def _ranks_per_node(world: int) -> int:
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is not None and local.isdigit() and int(local) > 0 and world % int(local) == 0:
        return int(local)
    return world if world <= 8 else 8


def _base_class() -> type:
    from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

    return MoETokenDispatcher


#: Megatron's own flex dispatcher while dispatcher mode is bound (``binding.enable`` sets it): layers whose config
#: asks for another flex backend (``hybridep``, ``ncclep``) get it, so the plugin leaves those backends working.
_MEGATRON_FLEX: Optional[type] = None


class DeepEPPluginTokenDispatcher(_base_class()):  # type: ignore[misc]
    """Token dispatcher for Megatron-Core ``MoELayer`` over ``deepep_plugin`` (see the module docstring).

    Built by ``MoELayer`` as ``Cls(num_local_experts, local_expert_indices, config=..., pg_collection=...)``.
    Communicates over the expert-tensor x expert-parallel group (``pg_collection.tp_ep``); TP copies of an expert
    are separate virtual experts, so every TP rank of an expert receives the same tokens, as in Megatron's flex
    dispatcher. A config whose ``moe_flex_dispatcher_backend`` is not ``deepep`` gets Megatron's own flex
    dispatcher instead (its HybridEP or NCCL-EP backend), untouched.
    """

    def __new__(cls, *args: Any, config: Any = None, **kwargs: Any) -> Any:
        backend = getattr(config, "moe_flex_dispatcher_backend", "deepep")
        if _MEGATRON_FLEX is not None and backend not in (None, "deepep"):
            return _MEGATRON_FLEX(*args, config=config, **kwargs)
        return super().__new__(cls)

    def __init__(self, num_local_experts: int, local_expert_indices: List[int], config: Any,
                 pg_collection: Any = None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        settings = _ACTIVE_SETTINGS or PluginSettings()
        self.settings = settings
        self.num_local_experts = num_local_experts
        self.local_expert_indices = local_expert_indices
        self.group = self.tp_ep_group
        self.num_ranks = self.tp_size * self.ep_size
        self.num_experts = self.tp_size * config.num_moe_experts
        self.router_topk = self.tp_size * config.moe_router_topk
        expect(not getattr(config, "moe_pad_expert_input_to_capacity", False),
               "DeepEPPluginTokenDispatcher: moe_pad_expert_input_to_capacity is not supported (tokens are dropped "
               "by the router's capacity factor and never padded to capacity); unset it")
        hidden = getattr(config, "moe_latent_size", None) or config.hidden_size
        if settings.fp8_dispatch:
            expect(hidden % 128 == 0, f"DeepEPPluginTokenDispatcher: fp8_dispatch needs the hidden size to be a "
                                      f"multiple of 128 (one scale per 128 channels), got {hidden}")
        if settings.expert_alignment is not None:
            self.expert_alignment = settings.expert_alignment
        elif getattr(config, "moe_router_padding_for_quantization", False):
            from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization

            self.expert_alignment = get_align_size_for_quantization(config)
        else:
            self.expert_alignment = 1
        if settings.tokens_per_expert_device == "auto":
            self.tokens_per_expert_on_cpu = _experts_need_cpu_counts(config)
        else:
            self.tokens_per_expert_on_cpu = settings.tokens_per_expert_device == "cpu"
        expect(not (settings.sync_free and self.tokens_per_expert_on_cpu),
               "DeepEPPluginTokenDispatcher: sync_free needs experts that take tokens_per_expert on the device "
               "(legacy GroupedMLP without TransformerEngine reads it on the host)")
        if settings.sync_free:
            reason = host_count_reader(config, num_local_experts)
            if reason:
                logger.warning("deepep_plugin: sync_free: the dispatcher reads nothing from the GPU, but with "
                               "Megatron's own experts this layer still does: %s. For a CUDA graph, use experts that "
                               "take tokens_per_expert on the device (SequentialMLP with one local expert, or a "
                               "spec of your own)", reason)
        self.group_nodes = self._check_group_layout(config)

        import deepep_plugin

        deepep_plugin.Buffer.set_num_sms(settings.num_sms if settings.num_sms is not None
                                         else megatron_num_sms(config))
        self._comm_manager = DispatchState()
        self.cudagraph_attrs = ["_comm_manager.token_probs", "_comm_manager.token_indices"]
        self.hidden_shape: Optional[torch.Size] = None

    def _check_group_layout(self, config: Any) -> Optional[List[int]]:
        """For a group-limited router, the node of each expert group (``None`` if the router is not grouped)."""
        num_groups = config.moe_router_num_groups
        if not num_groups or self.tp_size != 1:
            return None
        from deepep_plugin.errors import DeepEPInputError
        from deepep_plugin.routing import check_node_limited_groups

        try:
            return check_node_limited_groups(config.num_moe_experts, num_groups, self.num_ranks,
                                             _ranks_per_node(self.num_ranks))
        except DeepEPInputError as e:
            logger.warning("deepep_plugin: the router's %d expert groups do not map onto nodes (%s); tokens may "
                           "reach more than moe_router_group_topk=%s nodes", num_groups, e,
                           config.moe_router_group_topk)
            return None

    def set_shared_experts(self, shared_experts: Any) -> None:
        raise NotImplementedError("deepep_plugin's token dispatcher does not overlap shared experts "
                                  "(moe_shared_expert_overlap needs moe_token_dispatcher_type='alltoall')")

    # -- dispatch -----------------------------------------------------------------------------------------------

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[S, B, H] tokens, [T, E/TP] routing map and probs -> ([T, H] tokens, [T, K] float32 probs)."""
        self.hidden_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, self.hidden_shape[-1])
        num_tokens = routing_map.size(0)
        if self.tp_size > 1:  # every TP rank of an expert is a virtual expert receiving the same tokens
            shape = (num_tokens, self.ep_size, 1, self.num_local_experts)
            routing_map = routing_map.reshape(shape).expand(-1, -1, self.tp_size, -1).reshape(num_tokens, -1)
            probs = probs.reshape(shape).expand(-1, -1, self.tp_size, -1).reshape(num_tokens, -1)
        state = self._comm_manager
        state.token_indices, state.token_probs = routing_map_to_topk(routing_map, probs, self.router_topk)
        return hidden_states, state.token_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: Optional[torch.Tensor] = None,
                       async_finish: bool = True, allocate_on_comm_stream: bool = True
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """[T, H] tokens -> ([N, H] received tokens, [N, K] float32 received probs).

        The probs sent are ``_comm_manager.token_probs`` (which the EP-overlap schedule may have replaced by a
        detached copy). ``async_finish``/``allocate_on_comm_stream`` are accepted for signature compatibility;
        the autograd dispatch orders itself on the current stream.
        """
        from deepep_plugin import autograd as ep_autograd

        state = self._comm_manager
        hidden_bytes = hidden_states.size(1) * max(hidden_states.element_size(), 2)
        buffer = BUFFERS.get(self.group, hidden_bytes)
        worst = 0
        if self.settings.sync_free:  # fixed output rows: no receive-count read (see PluginSettings.sync_free)
            worst = self.settings.worst_tokens or hidden_states.size(0) * self.num_ranks
        recv_x, recv_idx, recv_probs, counts, handle = ep_autograd.dispatch(
            buffer, hidden_states.contiguous(), state.token_indices, state.token_probs.float(), self.num_experts,
            fp8=self.settings.fp8_dispatch, num_worst_tokens=worst)
        state.handle, state.buffer = handle, buffer
        state.dispatched_indices = recv_idx
        state.dispatched_probs = recv_probs
        state.num_recv_tokens_per_expert = counts
        state.num_received = recv_x.size(0)
        return recv_x, recv_probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[N, H] received tokens -> ([M, H] rows grouped by local expert, padded per expert to
        ``expert_alignment``; [L] int64 tokens_per_expert incl. padding (CPU or the tokens' device, see
        ``tokens_per_expert_on_cpu``); [M] permuted probs (0 on padding rows; float64 with
        ``moe_router_dtype='fp64'``, else float32))."""
        from deepep_plugin.permute import permute, worst_case_rows

        state = self._comm_manager
        a = self.expert_alignment
        if self.settings.sync_free:
            rows = worst_case_rows(state.num_received, state.dispatched_indices.size(1), self.num_local_experts, a)
        else:
            # Dispatch already read the per-expert counts on the host: size the permutation from them (no read).
            rows = sum((c + a - 1) // a * a for c in state.num_recv_tokens_per_expert)
        perm = permute(hidden_states, state.dispatched_indices, self.num_local_experts,
                       recv_topk_weights=state.dispatched_probs, alignment=a, num_out_rows=rows)
        state.permutation = perm
        if self.tokens_per_expert_on_cpu:
            tokens_per_expert = torch.tensor([(c + a - 1) // a * a for c in state.num_recv_tokens_per_expert],
                                             dtype=torch.int64)
        elif self.settings.sync_free:
            # The rows past the real blocks (zeros, weight 0, dropped by unpermute) join the last expert's block,
            # so the blocks cover all `rows` as grouped GEMMs and torch.split expect; on the device, no read.
            tokens_per_expert = perm.tokens_per_expert.clone()
            tokens_per_expert[-1:] += rows - tokens_per_expert.sum()
        else:
            tokens_per_expert = perm.tokens_per_expert
        permuted_probs = perm.probs
        if self.config.moe_router_dtype == "fp64":
            permuted_probs = permuted_probs.to(torch.float64)
        return perm.x, tokens_per_expert, permuted_probs

    # -- combine ------------------------------------------------------------------------------------------------

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[M, H] expert output (probs already applied by the experts) -> [N, H], one row per received token."""
        from deepep_plugin.permute import unpermute

        state = self._comm_manager
        out = unpermute(hidden_states, state.permutation, state.num_received)
        state.permutation = None
        return out

    def token_combine(self, hidden_states: torch.Tensor, async_finish: bool = True,
                      allocate_on_comm_stream: bool = True) -> torch.Tensor:
        """[N, H] -> [T, H]: each token's rows summed over the ranks it was sent to."""
        from deepep_plugin import autograd as ep_autograd

        state = self._comm_manager
        expect(state.handle is not None, "DeepEPPluginTokenDispatcher.token_combine: no dispatch handle; "
                                         "token_dispatch must run before token_combine")
        out = ep_autograd.combine(state.buffer, hidden_states.contiguous(), state.handle)
        state.clear()  # nothing reads the state after combine (combine_postprocess clears it too: it may run alone)
        return out

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[T, H] -> the layer input's shape [S, B, H]; the step's state is dropped (``DispatchState.clear``)."""
        self._comm_manager.clear()
        return hidden_states.view(self.hidden_shape)
