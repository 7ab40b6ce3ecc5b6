"""Test-harness helpers that let megatron-core 0.16.1 MoE layers run on a CPU-only machine (gloo).

Megatron's MoE path assumes CUDA in a few places that have nothing to do with token dispatch.
``apply_cpu_shims()`` patches exactly those, inside the calling (worker) process only, so the tests can build real
``MoELayer``s and compare dispatchers:

1. ``torch.cuda.current_device()`` returns ``"cpu"`` (the router moves its weights there on every forward; the
   tensor-parallel mappings allocate their outputs there);
2. ``torch.cuda.Stream`` / ``current_stream`` / ``stream`` become inert stand-ins (the alltoall dispatcher creates a
   device-to-host copy stream and records events on it);
3. ``moe_utils.te_general_gemm = None`` (0.16.1 leaves the name unbound without TransformerEngine, so the router
   gating GEMM raises ``NameError``; fixed upstream after 0.16.1);
4. the alltoall dispatcher's ``maybe_move_tensor_to_cpu`` also turns CPU split-size tensors into numpy arrays when
   asked (it only converts CUDA tensors, and gloo's ``all_to_all_single`` wants Python/numpy split sizes).

It also turns ``torch.compile`` off (Megatron's ``jit_fuser``), which changes no result and saves the compile time.
None of this lives in the library: ``deepep_plugin.integrations.megatron`` itself never patches CUDA behaviour.

On a GPU only item 3 and the ``torch.compile`` switch apply: ``apply_gpu_shims()`` makes exactly those and leaves
``torch.cuda`` alone (the GPU tests in ``tests/gpu/test_megatron_cuda.py`` use it).

``build_moe_layer(...)`` and ``init_megatron_parallel(...)`` build the layers the tests and the example compare.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional

import torch

# The CPU stand-ins for CUDA streams and events are the example recipe's (examples/megatron/cpu_shims.py).
from examples.megatron.cpu_shims import InertStream

_APPLIED = False
_GPU_APPLIED = False


def _quiet_eager_megatron() -> None:
    """Run Megatron's ``jit_fuser`` functions eagerly and silence its CPU/TransformerEngine warnings."""
    import torch._dynamo

    torch._dynamo.config.disable = True  # Megatron's jit_fuser is torch.compile, applied at import time
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _bind_missing_te_gemm() -> None:
    """Item 3: bind ``moe_utils.te_general_gemm`` to ``None`` where 0.16.1 leaves it unbound (no TE)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply_gpu_shims() -> None:
    """The device-independent part of :func:`apply_cpu_shims` (idempotent): eager ``jit_fuser`` and item 3.

    For workers that run Megatron's MoE layers on a real GPU without TransformerEngine; ``torch.cuda`` is left
    untouched, so CUDA streams, devices and Megatron's device-to-host copies are the real ones.
    """
    global _GPU_APPLIED
    if _GPU_APPLIED:
        return
    _quiet_eager_megatron()
    _bind_missing_te_gemm()
    _GPU_APPLIED = True


def apply_cpu_shims() -> None:
    """Patch the CUDA-only spots of megatron-core's MoE path in this process (idempotent). Call in workers only."""
    global _APPLIED
    if _APPLIED:
        return
    _quiet_eager_megatron()

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.Stream = InertStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda device=None: InertStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]

    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    _bind_missing_te_gemm()
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def move_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        out = original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and torch.is_tensor(out):
            out = out.numpy()
        return out

    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu
    _APPLIED = True


def init_megatron_parallel(expert_model_parallel_size: int, expert_tensor_parallel_size: int = 1) -> None:
    """Initialise Megatron's parallel state over the already-initialised default (gloo) group."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )


def destroy_megatron_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def moe_config(dispatcher_type: str, *, style: str = "default", hidden_size: int = 32, ffn_hidden_size: int = 64,
               num_experts: int = 8, topk: int = 2, **overrides: Any):
    """A small fp32 CPU ``TransformerConfig`` for one MoE layer.

    ``style="default"``: softmax router with aux loss. ``style="deepseek_v3"``: sigmoid scores, expert bias
    (aux-loss-free balancing), group-limited routing (``num_groups`` groups, ``group_topk`` kept), routed
    scaling factor 2.5, sequence aux loss, as Megatron's DeepSeek-V3 proxy config.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw: dict[str, Any] = dict(
        num_layers=1, hidden_size=hidden_size, num_attention_heads=4, ffn_hidden_size=ffn_hidden_size,
        num_moe_experts=num_experts, moe_router_topk=topk, moe_token_dispatcher_type=dispatcher_type,
        use_cpu_initialization=True, add_bias_linear=False, params_dtype=torch.float32,
        moe_router_dtype="fp32", bf16=False, fp16=False, gradient_accumulation_fusion=False,
        expert_model_parallel_size=int(torch.distributed.get_world_size()) if torch.distributed.is_initialized()
        else 1,
    )
    if style == "default":
        kw.update(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2)
    elif style == "deepseek_v3":
        kw.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                  moe_router_bias_update_rate=1e-3, moe_router_num_groups=8, moe_router_group_topk=4,
                  moe_router_topk_scaling_factor=2.5, moe_router_pre_softmax=True,
                  moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-4)
    else:
        raise ValueError(f"style must be 'default' or 'deepseek_v3', got {style!r}")
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_moe_layer(config: Any, *, seed: int = 1234, state_dict: Optional[dict] = None):
    """Build a ``MoELayer`` (local SequentialMLP experts, no TransformerEngine) from ``config``.

    The weights come from ``torch.manual_seed(seed)`` (identical on every rank), or from ``state_dict``.
    """
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import build_module

    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    torch.manual_seed(seed)
    # Up to 0.16 the spec is a ModuleSpec for build_module; from 0.19 it is a builder (a partial of MoELayer).
    layer = build_module(spec, config=config) if hasattr(spec, "module") else spec(config=config)
    assert isinstance(layer, MoELayer)
    if state_dict is not None:
        layer.load_state_dict(state_dict)
    return layer
