"""A smaller GPU fuzz run: ``Buffer(backend="cuda")`` against the reference, bit for bit, over 2 and 4 ranks
sharing the GPUs there are (``python -m deepep_plugin.bench fuzz`` runs the full 1000 cases)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_env import missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu

if missing_kernels("_intranode_C"):
    pytest.skip(missing_kernels("_intranode_C"), allow_module_level=True)

# Without the NVSHMEM extension (internode and low-latency kernels) only the intranode kinds run.
NVSHMEM_MISSING = missing_kernels("_nvshmem_C")


def test_fuzz_cuda_matches_reference(tmp_path) -> None:
    from deepep_plugin.bench import fuzz

    kinds = ["--kinds", "intranode"] if NVSHMEM_MISSING else []
    summary = fuzz.run_fuzz(["--cases", "100", "--ranks", "2,4", "--seed", "2024", "--out",
                             str(tmp_path / "fuzz.json"), *kinds])
    assert summary["mismatches"] == 0, _failures(summary)
    assert summary["cases"] == 100 and summary["not_run"] == 0, summary["batches"]


def _failures(summary: dict) -> str:
    import json

    return json.dumps(summary["failures"][:5], indent=1)
