"""Run megatron-core 0.16.1's MoE GPT on a CPU-only machine (gloo), for trying the recipe without a GPU.

Megatron's MoE path assumes CUDA in a few places unrelated to token dispatch; this patches exactly those in the
calling process: ``torch.cuda.current_device()`` -> ``"cpu"``, inert ``torch.cuda`` streams, the
``te_general_gemm`` name 0.16.1 leaves unbound without TransformerEngine, CPU split sizes for the alltoall
dispatcher, a CPU stand-in for the CUDA RNG tracker's ``fork``, and ``torch.compile`` (Megatron's ``jit_fuser``)
off. deepep_plugin itself needs none of it. Not for GPU runs.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any


class InertStream:
    """Stands in for ``torch.cuda.Stream`` on CPU: every operation is a no-op (tests/megatron_shims.py uses it too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "InertEvent":
        return InertEvent()

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InertStream)

    def __hash__(self) -> int:
        return 0


class InertEvent:
    """Stands in for ``torch.cuda.Event`` on CPU: already complete."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True


def apply_cpu_shims() -> None:
    """Patch the CUDA-only spots of megatron-core's MoE GPT path in this process."""
    import torch
    import torch._dynamo

    torch._dynamo.config.disable = True
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = InertStream
    torch.cuda.current_stream = lambda device=None: InertStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()

    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # Attention forks the CUDA RNG tracker around its dropout; on CPU the default generator serves instead.
    tp_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def move_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        out = original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)
        return out.numpy() if as_numpy and torch.is_tensor(out) else out

    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu
