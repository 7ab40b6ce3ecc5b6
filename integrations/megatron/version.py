"""Which megatron-core versions the adapter supports, and the check that runs before anything is bound.

The dispatcher contract this adapter relies on (``MoETokenDispatcher``'s six hooks, the flex dispatcher's
constructor, ``fused_a2a``'s ``FusedDispatch``/``FusedCombine`` and its ``EventHandle``/``EventOverlap`` use) first
appeared in core_v0.13 and is unchanged up to the 0.20 development line; 0.16.1 is what CI runs.
"""

from __future__ import annotations

import inspect
from types import ModuleType

from packaging.version import Version

from deepep_plugin.errors import DeepEPError

#: Oldest megatron-core whose MoE dispatcher contract matches this adapter.
MIN_MEGATRON_CORE = Version("0.13.0")
#: First megatron-core version not checked against this adapter (newer ones are refused, not guessed at).
MAX_MEGATRON_CORE_EXCLUSIVE = Version("0.21.0")

#: Parameters of ``fused_a2a.FusedDispatch.forward`` that compat mode depends on, in order.
_FUSED_DISPATCH_PARAMS = ("ctx", "x", "token_indices", "token_probs", "num_experts", "group", "async_finish",
                          "allocate_on_comm_stream")


class MegatronVersionError(DeepEPError, ImportError):
    """megatron-core is missing, or its version or MoE internals differ from what the adapter was written for."""


def megatron_core() -> ModuleType:
    """Import ``megatron.core`` and check its version; returns the module.

    Raises:
        MegatronVersionError: megatron-core is not installed or its version is outside
            [``MIN_MEGATRON_CORE``, ``MAX_MEGATRON_CORE_EXCLUSIVE``).
    """
    try:
        import megatron.core as mcore
    except ImportError as e:
        raise MegatronVersionError(
            "deepep_plugin.integrations.megatron needs megatron-core (pip install megatron-core)") from e
    raw = getattr(mcore, "__version__", None)
    if raw is None:
        raise MegatronVersionError("deepep_plugin.integrations.megatron: megatron.core has no __version__; "
                                   f"cannot check it is >= {MIN_MEGATRON_CORE}")
    version = Version(raw)
    if not (MIN_MEGATRON_CORE <= Version(version.base_version) < MAX_MEGATRON_CORE_EXCLUSIVE):
        raise MegatronVersionError(
            f"deepep_plugin.integrations.megatron supports megatron-core >= {MIN_MEGATRON_CORE} and "
            f"< {MAX_MEGATRON_CORE_EXCLUSIVE}; found {raw}")
    return mcore


def check_fused_a2a(fused_a2a: ModuleType) -> None:
    """Check that ``fused_a2a`` exposes what compat mode rebinds, with the expected signatures."""
    for name in ("FusedDispatch", "FusedCombine", "get_buffer"):
        if not hasattr(fused_a2a, name):
            raise MegatronVersionError(f"deepep_plugin compat mode: megatron.core.transformer.moe.fused_a2a has no "
                                       f"{name!r}; this megatron-core is not supported, use mode 'dispatcher'")
    params = tuple(inspect.signature(fused_a2a.FusedDispatch.forward).parameters)
    if params[:len(_FUSED_DISPATCH_PARAMS)] != _FUSED_DISPATCH_PARAMS:
        raise MegatronVersionError(
            f"deepep_plugin compat mode: fused_a2a.FusedDispatch.forward takes {params}, expected "
            f"{_FUSED_DISPATCH_PARAMS}; this megatron-core is not supported, use mode 'dispatcher'")
