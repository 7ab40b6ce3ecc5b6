"""The side-by-side benchmark runs end to end on a GPU (without DeepEP, against the reference backend): a small
sweep writes its rows, every plugin row's outputs are equal to the reference's, and the step timelines it traces
(``--trace-dir``) are read back by ``bench timeline`` with the kernels of every class in every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_env import missing_kernels  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(bool(missing_kernels("_intranode_C")), reason=missing_kernels("_intranode_C") or "")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_compare_writes_rows_and_timelines(tmp_path) -> None:
    from deepep_plugin.bench.timeline import load, summarize

    traces = str(tmp_path / "timelines")
    rows_json = str(tmp_path / "rows.json")
    cmd = [sys.executable, "-m", "deepep_plugin.bench", "compare", "--ranks", "2", "--tokens", "96,160", "--sms", "8",
           "--hidden", "2048", "--num-experts", "32", "--iters", "3", "--synced-iters", "1", "--profile-iters", "1",
           "--warmup", "1", "--no-deepep", "--trace-dir", traces, "--host-stamps", "4", "--json", rows_json,
           "--plot", str(tmp_path / "rows.png"), "--results", ""]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(rows_json) as f:
        rows = json.load(f)["rows"]
    mine = [r for r in rows if r["lib"] == "deepep_plugin"]
    assert mine and all(r["outputs_equal"] for r in mine), [r.get("outputs_equal_by_op") for r in mine]
    # Both configurations' rows carry the profiler pass's numbers, which run after every timing of the run.
    assert {r["tokens"] for r in mine} == {96, 160}
    assert all(r["kernel_fwd_step_us"] > 0 and r["launches_fwd_step"] >= 4 for r in mine), mine
    # The unprofiled host stamps: the fresh dispatch's parts lie inside its call, in order (no negative segment).
    for r in mine:
        st = r["stamps_fwd_step"]
        parts = ("d_py_pre", "d_pre", "d_wait", "d_alloc", "d_launch", "d_post", "d_py_post")
        assert all(st[k] >= 0 for k in parts), st
        assert sum(st[k] for k in parts) <= st["dispatch"] * 1.5 + 5, st
        assert st["period"] > 0 and "host-stamps R=2 T=96" in done.stdout, st
    found = load(traces)
    assert set(found) == {("deepep_plugin", 2, 96, 8), ("deepep_plugin", 2, 160, 8)}
    assert set(found[("deepep_plugin", 2, 96, 8)]) == {0, 1}
    summary = summarize(found[("deepep_plugin", 2, 96, 8)])
    assert summary["steps"] >= 5
    for key in ("gpu_layout_us", "gpu_notify_us", "gpu_dispatch_us", "gpu_combine_us", "count_gap_us",
                "host_dispatch_us", "gpu_period_us", "notify_start_skew_us"):
        assert key in summary, f"{key} missing from the timeline summary {summary}"
    # Plausible: dispatch starts after notify ends; the kernels of a step fit in its period.
    assert summary["count_gap_us"] >= 0, summary
    busy = sum(summary[f"gpu_{k}_us"] for k in ("layout", "notify", "dispatch", "combine"))
    assert busy < summary["gpu_period_us"] * 1.05, summary
