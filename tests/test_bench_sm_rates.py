"""``python -m deepep_plugin.bench sm-rates`` on the CPU: the NVLink store model and the EP2 prediction it records
(the measurement itself needs a GPU: ``tools/gpu_check.sh``)."""

from __future__ import annotations

import pytest

from deepep_plugin.bench import __main__ as bench_main
from deepep_plugin.bench.sm_rates import NVLINK_STORE_GBPS, nvlink_store_gbps, predict_ep2


def test_store_model_passes_through_the_measured_points_and_is_monotonic() -> None:
    for sms, gbps in NVLINK_STORE_GBPS.items():
        assert nvlink_store_gbps(sms) == pytest.approx(gbps)
    rates = [nvlink_store_gbps(s) for s in range(1, 140)]
    assert all(b >= a for a, b in zip(rates, rates[1:]))
    assert nvlink_store_gbps(4) == pytest.approx(NVLINK_STORE_GBPS[8] / 2)


def test_prediction_takes_the_slower_side() -> None:
    row = 7168 * 2
    slow = predict_ep2(10.0, 24, row, 4096)  # 12 receivers at 10 GB/s: 120 GB/s for 2x the bytes
    assert slow["bound"] == "receivers"
    assert slow["us"] == pytest.approx(2 * 4096 * row / 120e9 * 1e6)
    fast = predict_ep2(1000.0, 24, row, 4096)  # receivers never limit: NVLink stores from 12 SMs do
    assert fast["bound"] == "NVLink stores"
    assert fast["gbps"] == pytest.approx(2 * nvlink_store_gbps(12))


def test_local_split_moves_a_quarter_of_the_bytes_from_receivers_to_senders() -> None:
    row = 7168 * 2
    plain = predict_ep2(10.0, 24, row, 4096)
    split = predict_ep2(10.0, 24, row, 4096, local_split=True)
    assert split["bound"] == "receivers"
    assert split["us"] == pytest.approx(plain["us"] * 0.75)
    # Fast copies: the senders' NVLink stores plus their quarter of the local copy set the time.
    fast = predict_ep2(1000.0, 24, row, 4096, local_split=True)
    t_send = 4096 * row / (nvlink_store_gbps(12) * 1e9) + 0.5 * 4096 * row / (1000.0 * 12 * 1e9)
    assert fast["bound"] == "NVLink stores"
    assert fast["us"] == pytest.approx(t_send * 1e6)


def test_listed_in_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    bench_main.main([])
    assert "sm-rates" in capsys.readouterr().out
