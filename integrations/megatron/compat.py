"""Compat mode: Megatron's own flex/DeepEP code path runs on ``deepep_plugin.Buffer``.

Megatron's ``fused_a2a`` module imports ``deep_ep`` once, at ``import megatron.core``; without it, its
``fused_dispatch``/``fused_combine``/``set_deepep_num_sms`` are ``None`` and the flex dispatcher refuses to build.
Compat mode binds them late, after Megatron is imported and before MoE layers are built, in the two module
namespaces where Megatron looks them up at call time (``fused_a2a`` and ``token_dispatcher``):

* ``fused_a2a.Buffer``/``EventHandle``/``EventOverlap`` become deepep_plugin's (its ``FusedDispatch``/``FusedCombine``
  autograd functions call them), and ``fused_a2a.get_buffer`` the plugin's pool (``Buffer.sized_for``, shared with
  dispatcher mode): Megatron's own sizing gives RDMA bytes only to nodes of 8, so emulated or smaller nodes would
  otherwise get none;
* ``fused_dispatch``/``fused_combine`` are bound to wrappers over those autograd functions, with Megatron's
  signatures; ``set_deepep_num_sms`` to ``Buffer.set_num_sms`` (or to the plugin's ``num_sms`` when set).

No ``deep_ep`` module is created, so an installed DeepEP is never shadowed: other code importing ``deep_ep`` still
gets the real one. Users keep Megatron's stock flags ``--moe-token-dispatcher-type flex
--moe-flex-dispatcher-backend deepep``; permutation stays Megatron's.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .settings import PluginSettings
from .version import check_fused_a2a

_BOUND_NAMES = ("Buffer", "EventHandle", "EventOverlap", "HAVE_DEEP_EP", "fused_dispatch", "fused_combine",
                "set_deepep_num_sms", "_buffer", "get_buffer")


def _make_entry_points(fused_a2a: Any, num_sms: Optional[int]) -> dict[str, Callable[..., Any]]:
    import deepep_plugin

    def fused_dispatch(x: torch.Tensor, token_indices: torch.Tensor, token_probs: torch.Tensor, num_experts: int,
                       group: Any, async_finish: bool = False, allocate_on_comm_stream: bool = False) -> Any:
        """Megatron's ``fused_dispatch``: ``FusedDispatch.apply`` on a contiguous ``x`` [T, H]."""
        return fused_a2a.FusedDispatch.apply(x.contiguous(), token_indices, token_probs, num_experts, group,
                                             async_finish, allocate_on_comm_stream)

    def fused_combine(x: torch.Tensor, group: Any, handle: Any, async_finish: bool = False,
                      allocate_on_comm_stream: bool = False) -> Any:
        """Megatron's ``fused_combine``: ``FusedCombine.apply``."""
        return fused_a2a.FusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)

    def set_deepep_num_sms(requested: int) -> None:
        """Megatron passes ``config.moe_deepep_num_sms``; the plugin's ``num_sms`` setting wins when given."""
        deepep_plugin.Buffer.set_num_sms(num_sms if num_sms is not None else requested)

    return {"fused_dispatch": fused_dispatch, "fused_combine": fused_combine, "set_deepep_num_sms": set_deepep_num_sms}


def bind(settings: PluginSettings) -> Callable[[], None]:
    """Bind Megatron's flex/DeepEP path to deepep_plugin; returns a function that restores the previous bindings."""
    from megatron.core.transformer.moe import fused_a2a, token_dispatcher

    import deepep_plugin
    from deepep_plugin import events

    check_fused_a2a(fused_a2a)
    modules = (fused_a2a, token_dispatcher)
    missing = object()
    saved = [(m, name, getattr(m, name, missing)) for m in modules for name in _BOUND_NAMES if hasattr(m, name)
             or m is fused_a2a]

    fused_a2a.Buffer = deepep_plugin.Buffer
    fused_a2a.EventHandle = events.EventHandle
    fused_a2a.EventOverlap = events.EventOverlap
    fused_a2a.HAVE_DEEP_EP = True
    fused_a2a._buffer = None  # never reuse a buffer that a real DeepEP (or an earlier binding) created
    from .dispatcher import BUFFERS

    def get_buffer(group: Any, hidden_bytes: int) -> Any:
        """Megatron's ``get_buffer``: the pool's Buffer for ``group``, kept where Megatron keeps its own."""
        fused_a2a._buffer = BUFFERS.get(group, hidden_bytes)
        return fused_a2a._buffer

    fused_a2a.get_buffer = get_buffer
    for name, fn in _make_entry_points(fused_a2a, settings.num_sms).items():
        setattr(fused_a2a, name, fn)
        setattr(token_dispatcher, name, fn)

    def restore() -> None:
        for module, name, value in saved:
            if value is missing:
                if hasattr(module, name):
                    delattr(module, name)
            else:
                setattr(module, name, value)

    return restore
