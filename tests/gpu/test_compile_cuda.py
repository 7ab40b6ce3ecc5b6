"""torch.compile over ``deepep_plugin.autograd`` with the intranode kernels: with ``num_worst_tokens`` the step
compiles with ``fullgraph=True``; without, with a graph break at the dispatch; both equal eager bit for bit."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402
from gpu_env import SPAWN, missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu

if missing_kernels("_intranode_C"):
    pytest.skip(missing_kernels("_intranode_C"), allow_module_level=True)

import compile_workers as w  # noqa: E402


@pytest.mark.parametrize("worst", [True, False], ids=["fullgraph-worst-tokens", "graph-break"])
def test_compiled_step_on_the_kernels_equals_eager(worst: bool) -> None:
    run_distributed(w.compile_worker, 2, worst=worst, **SPAWN)
