"""The side-by-side benchmark's bookkeeping (``deepep_plugin.bench.compare``), on synthetic rows: the per-rank rows
merge into one row per (library, configuration, timing) with the slowest rank's times and the mean host cost, and
the RESULTS.md section reports plugin / DeepEP ratios. The timing itself needs GPUs (``bash tools/gpu_compare.sh``).
"""

from __future__ import annotations

from deepep_plugin.bench.compare import OPS, _fits_count, _median_rounds, _merge_ranks, markdown, notify_skew


def _row(rank: int, lib: str, timing: str, us: float, host: float, equal: bool = True) -> dict:
    row = {"lib": lib, "ranks": 2, "gpus": 1, "tokens": 256, "hidden": 7168, "topk": 8, "experts": 256,
           "num_sms": 24, "timing": timing, "device": "GPU", "date": "2026-12-02T00:00", "rank": rank}
    for op in OPS:
        row[f"{op}_us"] = us
        row[f"host_{op}_us"] = host
        row[f"syncs_{op}"] = 1.0 if op in ("dispatch_fresh", "dispatch_fresh_fp8", "fwd_step") else 0.0
    if lib == "deepep_plugin":
        row["outputs_equal"] = equal
        row["outputs_equal_by_op"] = {op: equal for op in OPS}
        row["compared_with"] = "deep_ep"
    return row


def test_rows_merge_over_ranks_with_the_slowest_time_and_the_mean_host_cost() -> None:
    per_rank = [[_row(r, lib, t, 100.0 + 10 * r, 20.0 + 2 * r, equal=(r == 0 or lib == "deep_ep"))
                 for lib in ("deepep_plugin", "deep_ep") for t in ("runahead", "synced")] for r in range(2)]
    rows = _merge_ranks(per_rank)
    assert len(rows) == 4 and all("rank" not in r for r in rows)
    mine = next(r for r in rows if r["lib"] == "deepep_plugin" and r["timing"] == "runahead")
    assert mine["fwd_step_us"] == 110.0 and mine["host_combine_us"] == 21.0
    assert mine["outputs_equal"] is False  # rank 1's outputs differed
    assert mine["outputs_equal_by_op"]["combine"] is False


def test_markdown_reports_ratios_against_deepep() -> None:
    rows = _merge_ranks([[_row(0, "deepep_plugin", t, 50.0, 10.0) for t in ("runahead", "synced")]
                         + [_row(0, "deep_ep", t, 100.0, 25.0) for t in ("runahead", "synced")]])
    text = markdown(rows, "python -m deepep_plugin.bench compare")
    assert "| 256 | 24 | 50 (0.50x) | 50 (0.50x) |" in text
    assert "10 / 10 (25 / 25)" in text


def test_sm_counts_that_cannot_be_resident_together_are_skipped() -> None:
    assert _fits_count(24, 2, 1, 132) and _fits_count(16, 8, 1, 132)
    assert not _fits_count(24, 8, 1, 132)  # 8 ranks x 24 blocks of 1024 threads > 132 SMs
    assert _fits_count(24, 8, 8, 132)  # one rank per GPU


def test_rounds_merge_to_medians_and_keep_the_first_rounds_flags_and_trace() -> None:
    def one(us: float, kernel: float, blocks: bool) -> dict:
        return {"fwd_step": {"runahead_us": us, "host_us": us / 2, "blocks_host": blocks,
                             "kernels": {"notify": kernel}, "notify_trace": [(0.0, us, us + 1)]}}
    got = _median_rounds([one(300.0, 40.0, True), one(100.0, 10.0, False), one(200.0, 12.0, False)])["fwd_step"]
    assert got["runahead_us"] == 200.0 and got["host_us"] == 100.0 and got["kernels"] == {"notify": 12.0}
    assert got["blocks_host"] is True and got["notify_trace"] == [(0.0, 300.0, 301.0)]


def test_notify_skew_names_the_late_rank_and_the_spreads() -> None:
    early = [(0.0, 10.0, 60.0), (200.0, 210.0, 260.0)]
    late = [(40.0, 50.0, 61.0), (230.0, 240.0, 262.0)]
    skew = notify_skew([early, late])
    assert skew["calls"] == 2 and skew["launch_spread_us"] == 35.0 and skew["start_spread_us"] == 35.0
    assert skew["end_spread_us"] == 1.5 and skew["late_rank_share"] == 1.0


def test_every_timing_of_a_run_comes_before_any_profiler_pass(tmp_path, monkeypatch) -> None:
    # compare's worker on one CPU rank with the measuring functions replaced by recorders and a stand-in DeepEP:
    # every configuration and round is timed (the libraries taking turns) before the first profiler pass, since a
    # process that has profiled launches more slowly; the profiler's kernel times still reach every row.
    import sys
    import types

    import torch
    import torch.distributed as dist

    import deepep_plugin
    from deepep_plugin.bench import common
    from deepep_plugin.bench import compare as cmp

    calls: list[tuple] = []

    class FakeBuffer:
        num_nvl_bytes = 1 << 20

        def __init__(self, *args, **kwargs) -> None:
            pass

    class FakeInputs:
        def __init__(self, rank: int, tokens: int, args, dev) -> None:
            self.x = torch.zeros(tokens, 4)

    def outputs() -> dict:
        return {op: [torch.arange(4)] for op in OPS if op != "bwd_step"}

    def measure_times(lib, buf, inp, sms, world, args, barrier):
        calls.append(("time", lib.__name__, inp.x.size(0), sms))
        return {op: {"runahead_us": 10.0, "host_us": 5.0, "synced_us": 12.0, "blocks_host": op == "fwd_step"}
                for op in OPS}, outputs()

    def measure_kernels(lib, buf, inp, sms, world, args, barrier, trace):
        calls.append(("kernels", lib.__name__, inp.x.size(0), sms, trace))
        m = {op: {"kernel_us": 3.0, "launches": 2.0, "api_syncs": 0.0, "kernels": {"k": 3.0}} for op in OPS}
        if trace:
            m["fwd_step"]["notify_trace"] = [(0.0, 1.0, 2.0)]
        return m

    fake_deep_ep = types.ModuleType("deep_ep")
    fake_deep_ep.Buffer = FakeBuffer
    fake_deep_ep.Config = deepep_plugin.Config
    monkeypatch.setitem(sys.modules, "deep_ep", fake_deep_ep)
    monkeypatch.setattr(deepep_plugin, "Buffer", FakeBuffer)
    monkeypatch.setattr(common, "rank_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cmp, "_fits", lambda sms, world: True)
    monkeypatch.setattr(cmp, "_Inputs", FakeInputs)
    monkeypatch.setattr(cmp, "_measure_times", measure_times)
    monkeypatch.setattr(cmp, "_measure_kernels", measure_kernels)
    args = cmp._parse(["--ranks", "1", "--tokens", "8,16", "--sms", "4,6", "--rounds", "2", "--trace-notify", "3",
                       "--json", str(tmp_path / "rows.json")])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rows = cmp._worker(0, 1, args)
    finally:
        dist.destroy_process_group()
    kinds = [c[0] for c in calls]
    assert kinds == ["time"] * 16 + ["kernels"] * 16, kinds  # 2 token counts x 2 SM counts x 2 rounds x 2 libs
    assert [c[1] for c in calls[:4]] == ["deepep_plugin", "deep_ep"] * 2  # the libraries take turns
    assert sum(1 for c in calls if c[0] == "kernels" and c[4]) == 8  # traced in the first round only
    assert rows is not None and len(rows) == 16  # 4 configurations x 2 libraries x 2 timings
    for r in rows:
        assert r["fwd_step_us"] == (10.0 if r["timing"] == "runahead" else 12.0)
        assert r["kernel_fwd_step_us"] == 3.0 and r["launches_combine"] == 2.0 and r["syncs_fwd_step"] == 1.0
    assert all(r["outputs_equal"] for r in rows if r["lib"] == "deepep_plugin")


def test_host_stamps_split_the_step_and_the_fresh_dispatch_at_the_runtime_stamps(monkeypatch) -> None:
    """``--host-stamps``: each segment is the difference of the right two clock readings (a fake clock that only the
    fake library's calls advance, by known amounts), and the layer timings call each layer."""
    import argparse
    import time
    import types

    import torch

    from deepep_plugin.bench import compare

    now = [0]
    monkeypatch.setattr(time, "perf_counter_ns", lambda: now[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    called: list[str] = []

    def tick(ns: int) -> int:
        now[0] += ns
        return now[0]

    class Runtime:  # the extension: its stamps inside the fresh dispatch
        stamps: list[int] = []

        def fresh_stamps(self) -> list[int]:
            return list(self.stamps)

        def combine(self, *args: object) -> None:
            called.append("combine_L2")
            tick(1000)

        def dispatch_cached(self, *args: object) -> None:
            called.append("cached_L2")
            tick(1500)

    class Backend:
        timeout_s = 30.0
        _rt = Runtime()

        def combine(self, *args: object) -> None:
            called.append("combine_L1")
            tick(2000)

        def dispatch(self, *args: object) -> None:
            called.append("cached_L1")
            tick(2500)

    handle = types.SimpleNamespace(rank_prefix_matrix=None, channel_prefix_matrix=None,
                                   recv_channel_prefix_matrix=None, send_head=None, is_token_in_rank=None,
                                   recv_src_idx=torch.zeros(5))
    config = types.SimpleNamespace(num_channels=12, num_max_nvl_chunked_recv_tokens=256)

    class Buf:
        runtime = types.SimpleNamespace(intranode=Backend())

        def get_dispatch_layout(self, idx: object, experts: int) -> tuple:
            tick(2000)
            return 1, 2, 3, 4, None

        def dispatch(self, x: object, handle_or_none: object, *args: object, **kwargs: object) -> tuple:
            if handle_or_none is not None:  # cached
                called.append("cached_L0")
                tick(3000)
                return x, None, None, None, None, None
            tick(500)  # Python before the extension
            Runtime.stamps = [now[0]] + [tick(ns) for ns in (1000, 7000, 3000, 4000, 600)]
            tick(400)  # Python after it
            return x, None, None, None, handle, None

        def combine(self, *args: object, **kwargs: object) -> None:
            tick(5000)

    lib = types.SimpleNamespace(Buffer=types.SimpleNamespace(get_dispatch_config=lambda w: config,
                                                             get_combine_config=lambda w: config))
    inp = types.SimpleNamespace(x=torch.zeros(4, 8), topk_idx=None, topk_weights=None)
    out = compare._host_stamps(lib, Buf(), inp, 2, argparse.Namespace(host_stamps=4, num_experts=8),
                               lambda: None)
    expect = {"layout": 2.0, "dispatch": 16.5, "combine": 5.0, "period": 23.5, "d_py_pre": 0.5, "d_pre": 1.0,
              "d_wait": 7.0, "d_alloc": 3.0, "d_launch": 4.0, "d_post": 0.6, "d_py_post": 0.4,
              "combine_L0": 5.0, "combine_L1": 2.0, "combine_L2": 1.0, "cached_L0": 3.0, "cached_L1": 2.5,
              "cached_L2": 1.5}
    assert out == expect
    assert {c: called.count(c) for c in set(called)} == {k: 4 for k in expect if k[-3:] in ("_L1", "_L2")} | {
        "cached_L0": 4}
