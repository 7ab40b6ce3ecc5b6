"""The intranode kernels need all their num_sms blocks resident at once: a count above the SMs this process may use
(MPS's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE included) is refused with an error that says so."""

from __future__ import annotations

import pytest

from deepep_plugin.backends.residency import check_resident, usable_sms
from deepep_plugin.errors import DeepEPInputError


def test_all_sms_without_mps() -> None:
    assert usable_sms(132, {}) == (132, "the GPU's 132 SMs")
    assert usable_sms(132, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100"})[0] == 132


def test_mps_percentage_rounds_up() -> None:
    count, why = usable_sms(132, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"})
    assert count == 33 and "MPS" in why and "25" in why
    assert usable_sms(132, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "10.5"})[0] == 14
    assert usable_sms(132, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "junk"})[0] == 132


def test_too_many_sms_is_refused_naming_the_limit() -> None:
    check_resident("dispatch", 24, (33, "x"))
    check_resident("dispatch", 33, (33, "x"))
    with pytest.raises(DeepEPInputError, match=r"num_sms=48 needs all its blocks resident.*at most 33 SMs"):
        check_resident("dispatch", 48, usable_sms(132, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}))
