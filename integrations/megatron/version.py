"""Which megatron-core versions the adapter supports, and the check that runs before anything is bound.

The dispatcher contract this adapter relies on (``MoETokenDispatcher``'s six hooks, the flex dispatcher's
constructor, ``fused_a2a``'s ``FusedDispatch``/``FusedCombine`` and its ``EventHandle``/``EventOverlap`` use) first
appeared in core_v0.13 and is unchanged up to the 0.20 development line. Tested: 0.16.1 in CI (CPU, Python 3.11);
0.19.2 (Python 3.12) on the CPU tests and on one H100 on 2026-12-07: the GPU layer tests against Megatron's
all-to-all dispatcher (``tests/gpu/test_megatron_cuda.py``: dispatcher mode 5 of 5, compat mode 4 of 4) and the
Megatron recipe on the kernels pass. From 0.17 on the SM count lives in ``moe_flex_dispatcher_num_sms`` and
both it and ``moe_deepep_num_sms`` default to ``None`` (``settings.megatron_num_sms`` reads either). The sync-free
MoE layer (dispatcher mode) captured in a CUDA graph, forward and backward, and replayed on new inputs equals eager on
0.19.2 (``tests/gpu/test_cuda_graph_moe_cuda.py``, one H100, 2026-12-07 night), since the dispatcher drops the step's
routing probs at the end of the layer: kept, they held the router's gradient accumulators, and with them the first
eager step's legacy stream, into the capture (``cudaErrorStreamCaptureImplicit``).
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
