"""``python -m deepep_plugin.bench fuzz`` on CPU (``--device cpu``: the reference backend on both sides).

A clean run records every case and no mismatch; ``--corrupt-one`` (one flipped byte of one output) is caught as
exactly one mismatch and printed with the configuration that replays it. Case parameters depend only on
``(seed, case)`` and the batch, and are always valid.
"""

from __future__ import annotations

import datetime
import json

import pytest

import deepep_plugin as dp
from deepep_plugin.bench import fuzz

ARGS = ["--device", "cpu", "--ranks", "2", "--kinds", "intranode", "--cases", "20", "--seed", "123"]


def test_clean_cpu_run_records_every_case(tmp_path) -> None:
    out = tmp_path / "fuzz.json"
    summary = fuzz.run_fuzz(ARGS + ["--out", str(out)])
    data = json.loads(out.read_text())
    assert {"cases", "mismatches", "by_kind", "device", "date", "seed", "failures"} <= set(data)
    assert data["cases"] == 20 and data["mismatches"] == 0 and data["failures"] == [], data["failures"]
    assert data["seed"] == 123 and data["device"] == "cpu" and data["not_run"] == 0
    assert sum(k["cases"] for k in data["by_kind"].values()) == 20
    assert all(kind.startswith("intranode/") and v["mismatches"] == 0 for kind, v in data["by_kind"].items())
    datetime.datetime.fromisoformat(data["date"])
    assert summary["cases"] == data["cases"]


def test_corrupt_one_is_exactly_one_mismatch_with_its_config(tmp_path, capsys) -> None:
    out = tmp_path / "fuzz.json"
    with pytest.raises(SystemExit) as exit_info:
        fuzz.main(ARGS + ["--out", str(out), "--corrupt-one"])
    assert exit_info.value.code == 1
    data = json.loads(out.read_text())
    assert data["cases"] == 20 and data["mismatches"] == 1
    (failure,) = data["failures"]
    assert failure["case"] == 0 and failure["rank"] == 0 and failure["kind"].startswith("intranode/")
    config = failure["config"]
    assert config["kind"] == failure["kind"] and config["seed"] == 123
    assert {"hidden", "topk", "tokens", "dispatch_config", "combine_config", "routing"} <= set(config)
    printed = capsys.readouterr().out
    assert "FAIL case 0" in printed and "seed 123" in printed
    assert json.dumps(config, sort_keys=True) in printed and "--only-case 0" in printed


def test_only_case_replays_one_case(tmp_path) -> None:
    summary = fuzz.run_fuzz(ARGS + ["--out", str(tmp_path / "one.json"), "--only-case", "7"])
    assert summary["cases"] == 1 and summary["mismatches"] == 0


def test_case_parameters_are_deterministic_and_valid() -> None:
    batches = fuzz.plan_batches([2, 4, 8], None)
    assert {b.mode for b in batches} == {"intranode", "internode", "low_latency"}
    assert {(b.ranks, b.per_node) for b in batches if b.mode == "internode"} == {(2, 1), (4, 2), (8, 4), (8, 2)}
    allotted = fuzz.allot(1000, batches)
    assert sorted(c for cs in allotted for c in cs) == list(range(1000))
    for batch, cases in zip(batches, allotted):
        for case in cases[:40]:
            p = fuzz.case_params(9, case, batch)
            assert p == fuzz.case_params(9, case, batch)
            assert p["kind"].split("/")[1] in batch.kinds and len(p["tokens"]) == batch.ranks
            assert p["num_experts"] == p["experts_per_rank"] * batch.ranks and 1 <= p["experts_per_rank"] <= 64
            if batch.mode == "low_latency":
                assert p["hidden"] % 128 == 0 and max(p["tokens"]) <= p["num_max_dispatch_tokens_per_rank"]
                assert 1 <= p["topk"] <= 16
                continue
            assert p["hidden"] % 8 == 0 and 16 <= p["hidden"] <= 8192
            assert p["format"] == "bf16" or p["hidden"] % 128 == 0
            assert 1 <= p["topk"] <= (16 if batch.mode == "internode" else 32)
            configs = [dp.Config(*p[k]) for k in ("dispatch_config", "cached_config", "combine_config")]
            assert len({c.num_sms for c in configs}) == 1 and 2 <= configs[0].num_sms <= 48
            if batch.mode == "internode":
                assert all(c.num_max_rdma_chunked_recv_tokens >= 32 for c in configs)
                assert configs[2].num_max_nvl_chunked_recv_tokens >= 16
