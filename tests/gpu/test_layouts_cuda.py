"""The Python mirrors of the NVSHMEM layouts (used only to size buffers on machines without the kernels) say
exactly what the extension's headers say (``csrc/low_latency/layout.h``, ``csrc/internode/layout.h``)."""

from __future__ import annotations

import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_env import missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu

if missing_kernels("_nvshmem_C"):
    pytest.skip(missing_kernels("_nvshmem_C"), allow_module_level=True)

from deepep_plugin.backends import cuda_internode as inter  # noqa: E402
from deepep_plugin.backends import cuda_low_latency as ll  # noqa: E402


def test_low_latency_mirror_matches_the_extension() -> None:
    for n, h, r, e_loc in itertools.product((1, 7, 128, 256), (128, 2880 // 128 * 128, 7168), (1, 2, 8, 16),
                                            (1, 2, 9, 32)):
        e = e_loc * r
        assert ll.required_rdma_bytes(n, h, r, e) == ll._required_bytes_without_extension(n, h, r, e), (n, h, r, e)


def test_internode_mirror_matches_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = [(r, n) for r in (4, 8, 16, 64) for n in (2, 4, 8, 16) if r % n == 0 and r // n <= 8]
    cases = [(r, n, rdma, nvl) for (r, n) in groups for rdma in (0, 1 << 20, 123456789) for nvl in (0, 1 << 16)]
    sizes = list(itertools.product((256, 7168 * 2), (0, 56), (1, 8, 16), (1, 2, 8)))
    with_ext = ([inter.buffer_layout(*c) for c in cases], [inter.record_bytes(*s) for s in sizes],
                [inter.combine_row_bytes(s[0], s[2]) for s in sizes])
    monkeypatch.setattr(inter, "extension_if_built", lambda: None)
    mirror = ([inter.buffer_layout(*c) for c in cases], [inter.record_bytes(*s) for s in sizes],
              [inter.combine_row_bytes(s[0], s[2]) for s in sizes])
    for case, got, want in zip(cases, with_ext[0], mirror[0]):
        for field in want._fields:
            assert getattr(got, field) == getattr(want, field), (case, field)
        assert got.total_bytes == want.total_bytes, case
        assert got.ring_bytes(12, 128, 14400, True) == want.ring_bytes(12, 128, 14400, True), case
        assert got.nvl_ring_bytes(12, 256, 14400) == want.nvl_ring_bytes(12, 256, 14400), case
    assert with_ext[1] == mirror[1] and with_ext[2] == mirror[2]
