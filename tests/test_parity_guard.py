"""The host side of the low-latency parity guard (the kernels' side runs in tests/gpu/test_graphs_cuda.py): a
refusal reported through the mailbox raises once with what happened and what to do, later low-latency calls of the
runtime raise it too, and other reports keep their meaning."""

from __future__ import annotations

from typing import Optional

import pytest

from deepep_plugin.backends.cuda_low_latency import LowLatencyRuntime
from deepep_plugin.errors import DeepEPError, DeepEPInputError
from deepep_plugin.limits import MAILBOX_BAD_INPUT, MAILBOX_REFUSED


class _Mailbox:
    """Stands in for the extension's SymmetricBuffer: hands out one report."""

    def __init__(self, report: Optional[tuple]) -> None:
        self.report = report

    def take_report(self) -> Optional[tuple]:
        report, self.report = self.report, None
        return report


def _runtime(report: Optional[tuple]) -> LowLatencyRuntime:
    rt = LowLatencyRuntime.__new__(LowLatencyRuntime)  # no GPU: only the host-side state check_error uses
    rt._alive, rt._sym, rt._parity, rt._refused, rt.timeout_s = True, _Mailbox(report), 0, None, 10.0
    return rt


def test_a_refusal_raises_once_with_the_cause_and_the_remedy() -> None:
    rt = _runtime((MAILBOX_REFUSED, 1, -1, 66, 0, 0, -1))
    with pytest.raises(DeepEPError) as e:
        rt.check_error()
    message = str(e.value)
    for part in ("rank 1", "buffer half 0", "odd number of low-latency ops", "CUDA graph", "dispatch + combine pairs",
                 "clean_low_latency_buffer()"):
        assert part in message, (part, message)
    rt.check_error()  # the report was taken: check_error (and so Buffer's other calls, clean included) go on


def test_after_a_refusal_low_latency_calls_raise_until_clean() -> None:
    rt = _runtime((MAILBOX_REFUSED, 0, -1, 66, 1, 1, -1))
    with pytest.raises(DeepEPError):
        rt.check_error()
    for op in ("low_latency_dispatch", "low_latency_combine"):
        with pytest.raises(DeepEPError, match=f"^{op}: .*refused"):
            rt._next_parity(op)
    assert rt._parity == 0, "a refused call must not move the host's toggle"


def test_a_bad_expert_id_report_is_not_a_refusal() -> None:
    rt = _runtime((MAILBOX_BAD_INPUT, 0, 3, 9, 99, 8, 1))
    with pytest.raises(DeepEPInputError, match=r"topk_idx\[3, 1\] = 99"):
        rt.check_error()
    assert rt._refused is None
    assert rt._next_parity("low_latency_dispatch") == 0
