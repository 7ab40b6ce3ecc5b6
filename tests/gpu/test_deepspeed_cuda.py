"""The plugin's DeepSpeed MoE layer on the GPU (``"backend": "cuda"``) against DeepSpeed's own ``MOELayer``.

2 processes (they may share one GPU) over one gloo group; each builds DeepSpeed's ``MoE`` (EP = 2, 8 experts,
hidden 64, every expert distinct) and an identical copy running the plugin with the CUDA backend, and compares
outputs, input and parameter gradients, ``l_aux`` and ``exp_counts`` for k = 1, 2, 3 (bodies and the DeepSpeed
setup in ``deepspeed_cuda_workers.py``). Each test also checks that the plugin's ``Buffer`` is the CUDA backend
and that its NVLink kernels ran the dispatches (float32) and the combines too (BF16: the combine kernel reduces
BF16 only).

DeepSpeed's layer, the oracle, runs on the GPU too (``DS_ACCELERATOR=cuda``, its all-to-all over gloo); set
``DEEPEP_TEST_DS_ORACLE_DEVICE=cpu`` to run it on the CPU instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402
from gpu_env import SPAWN, missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu
#: Where DeepSpeed's own layer runs: the plugin's device (default) or "cpu".
ORACLE_DEVICE = os.environ.get("DEEPEP_TEST_DS_ORACLE_DEVICE") or None


def _missing() -> str:
    if missing_kernels("_intranode_C"):
        return missing_kernels("_intranode_C")
    if importlib.util.find_spec("deepspeed") is None:
        return "needs deepspeed (tools/ci_install_deepspeed.sh, or the lead's wheels on the GPU machine)"
    return ""


_MISSING = _missing()
needs_gpu_and_deepspeed = pytest.mark.skipif(bool(_MISSING), reason=_MISSING or "ready")


@needs_gpu_and_deepspeed
@pytest.mark.parametrize("k", [1, 2, 3])
def test_float32_layer_on_cuda_matches_deepspeed(k: int) -> None:
    """Float32, DeepSpeed's capacity mode with room for every token: every quantity equals DeepSpeed's within
    3e-5 of its largest magnitude; the CUDA kernels ran both dispatches."""
    import deepspeed_cuda_workers as w

    run_distributed(w.float32_worker, 2, k=k, seed=100 + k, device="cuda", plugin_backend="cuda",
                    oracle_device=ORACLE_DEVICE, **SPAWN)


@needs_gpu_and_deepspeed
@pytest.mark.parametrize("k", [1, 2, 3])
def test_bfloat16_layer_on_cuda_is_as_accurate_as_deepspeed(k: int) -> None:
    """BF16, DeepSpeed's dropless mode, unequal token counts: within twice DeepSpeed's own BF16 error of the
    float32 result; ``l_aux`` and ``exp_counts`` equal; the CUDA kernels ran every dispatch and combine."""
    import deepspeed_cuda_workers as w

    run_distributed(w.bfloat16_worker, 2, k=k, seed=200 + k, device="cuda", plugin_backend="cuda",
                    oracle_device=ORACLE_DEVICE, **SPAWN)
