"""``python -m deepep_plugin.bench timeline`` on synthetic timelines of two ranks: kernel classes by name (ours and
DeepEP's), the per-step numbers, the cross-rank notify skew and the command's table. The timelines themselves come
from ``compare --trace-dir`` on a GPU."""

from __future__ import annotations

import json
import os

from deepep_plugin.bench.timeline import kernel_kind, load, main, rank_steps, summarize


def test_kernel_classes_of_both_libraries() -> None:
    assert kernel_kind("void deepep::intranode::(anonymous namespace)::notify_kernel(deepep::intranode::NotifyArgs)") \
        == "notify"
    assert kernel_kind("void deepep::intranode::(anonymous namespace)::dispatch_kernel<8>("
                       "deepep::intranode::DispatchArgs)") == "dispatch"
    assert kernel_kind("void deep_ep::intranode::cached_notify_combine<2>(void**, int*, int, int, int, int)") \
        == "notify_combine"
    assert kernel_kind("void deep_ep::layout::get_dispatch_layout<256, 32, 8>(long const*, int*)") == "layout"
    assert kernel_kind("void deep_ep::intranode::combine<__nv_bfloat16, 2, 768, 4096>(int4*)") == "combine"
    assert kernel_kind("Memset (Device)") is None
    assert kernel_kind("step::dispatch") is None


def _trace(rank: int, steps: int = 4) -> dict:
    cpu, gpu = [], []
    for i in range(steps):
        t0 = 1000.0 * i
        cpu += [["step::layout", t0, 20.0, -1], ["step::dispatch", t0 + 25, 60.0, -1],
                ["step::combine", t0 + 90, 25.0, -1]]
        launches = {"layout": (t0 + 5, 10 * i + 1), "notify": (t0 + 30, 10 * i + 2),
                    "dispatch": (t0 + 70, 10 * i + 3), "combine": (t0 + 95, 10 * i + 4)}
        cpu += [["cudaLaunchKernel", at, 3.0, corr] for at, corr in launches.values()]
        gpu += [["layout_kernel(LayoutArgs)", t0 + 10, 5.0, 10 * i + 1],
                # rank 1 starts its notify 7 us later; both end together (the early rank waited inside)
                ["notify_kernel(NotifyArgs)", t0 + 35 + 7 * rank, 25.0 - 7 * rank, 10 * i + 2],
                ["Memset (Device)", t0 + 61, 1.0, 10 * i + 2],
                ["dispatch_kernel<8>(DispatchArgs)", t0 + 80, 30.0, 10 * i + 3],
                ["combine_kernel(CombineArgs)", t0 + 115, 25.0, 10 * i + 4],
                # the profiler's GPU mirror of a host range, whose id may equal a launch's: never a kernel
                ["step::dispatch", t0 + 35, 75.0, 10 * i + 2]]
    return {"cpu": sorted(cpu, key=lambda t: t[1]), "gpu": sorted(gpu, key=lambda t: t[1])}


def test_per_step_numbers_and_cross_rank_skew() -> None:
    steps = rank_steps(_trace(1))
    assert len(steps) == 4
    s = steps[1]
    assert s["host_dispatch_us"] == 60.0 and s["host_period_us"] == 1000.0 and s["gpu_period_us"] == 1000.0
    assert s["gpu_notify_us"] == 18.0 and s["count_gap_us"] == 20.0 and s["launch_to_start_dispatch_us"] == 10.0
    assert "split_gap_us" not in s
    assert "notify_start_skew_us" not in summarize({0: _trace(0)})  # a skew needs two ranks
    summary = summarize({0: _trace(0), 1: _trace(1)})
    assert summary["steps"] == 3.0
    assert summary["notify_start_skew_us"] == 7.0 and summary["notify_end_skew_us"] == 0.0
    assert summary["gpu_notify_us"] == (25.0 + 18.0) / 2  # mean over ranks
    assert summary["count_gap_us"] == 20.0
    # Per rank: from its notify's end (t0 + 60) to its next notify's launch (t0 + 1030).
    assert s["host_chain_us"] == 970.0
    assert summary["r0_host_chain_us"] == summary["r1_host_chain_us"] == 970.0
    assert summary["r1_gpu_notify_us"] == 18.0 and summary["r0_host_dispatch_us"] == 60.0


def test_split_launch_dispatch_counts_both_kernels() -> None:
    trace = _trace(0)
    for i in range(4):  # a second dispatch kernel per step: phase 1 at once after notify, phase 2 after the count read
        t0 = 1000.0 * i
        trace["cpu"].append(["cudaLaunchKernel", t0 + 40, 3.0, 10 * i + 5])
        trace["gpu"].append(["dispatch_kernel<8>(DispatchArgs)", t0 + 61, 6.0, 10 * i + 5])
    trace["cpu"].sort(key=lambda t: t[1])
    trace["gpu"].sort(key=lambda t: t[1])
    s = rank_steps(trace)[1]
    assert s["gpu_dispatch_us"] == 36.0 and s["count_gap_us"] == 1.0 and s["split_gap_us"] == 13.0
    assert s["launch_to_start_dispatch_us"] == 21.0


def test_command_reads_a_trace_dir(tmp_path, capsys) -> None:
    for lib in ("deepep_plugin", "deep_ep"):
        for rank in range(2):
            with open(os.path.join(tmp_path, f"{lib}_R2_T256_S24_r{rank}.json"), "w") as f:
                json.dump(_trace(rank), f)
    assert set(load(str(tmp_path))) == {("deepep_plugin", 2, 256, 24), ("deep_ep", 2, 256, 24)}
    out_json = os.path.join(tmp_path, "summary.json")
    main([str(tmp_path), "--json", out_json])
    text = capsys.readouterr().out
    assert "count_gap" in text and "host_chain" in text and text.count(" 256 ") == 2 + 4  # + a line per rank
    with open(out_json) as f:
        rows = json.load(f)["rows"]
    assert {r["lib"] for r in rows} == {"deepep_plugin", "deep_ep"} and all(r["count_gap_us"] == 20.0 for r in rows)


class _Event:
    """A profiler event with only the methods torch 2.11's Kineto events have (no ``activity_type``)."""

    def __init__(self, name: str, start_us: float, dur_us: float, corr: int, cuda: bool) -> None:
        self._v = (name, start_us, dur_us, corr, cuda)

    def name(self) -> str:
        return self._v[0]

    def start_ns(self) -> int:
        return int(self._v[1] * 1000)

    def duration_ns(self) -> int:
        return int(self._v[2] * 1000)

    def correlation_id(self) -> int:
        return self._v[3]

    def device_type(self):  # noqa: ANN201 - torch.autograd.DeviceType
        from torch.autograd import DeviceType

        return DeviceType.CUDA if self._v[4] else DeviceType.CPU


def test_timeline_records_from_events_without_activity_type() -> None:
    # What compare --trace-dir keeps of a profile, on events as old as the GPU machine's torch gives them (the first
    # GPU run failed on every timeline: it asked for activity_type).
    from deepep_plugin.bench.compare import timeline_records

    events = [_Event("step::dispatch", 30.0, 50.0, 7, False), _Event("cudaLaunchKernel", 35.0, 4.0, 11, False),
              _Event("aten::empty", 36.0, 1.0, 12, False), _Event("cudaStreamSynchronize", 40.0, 9.0, 13, False),
              _Event("step::layout", 10.0, 15.0, 5, False), _Event("notify_kernel", 41.0, 10.0, 11, True),
              _Event("step::dispatch", 30.5, 49.0, 99, True)]
    rec = timeline_records(events)
    assert rec["cpu"] == [["step::layout", 10.0, 15.0, 5], ["step::dispatch", 30.0, 50.0, 7],
                          ["cudaLaunchKernel", 35.0, 4.0, 11], ["cudaStreamSynchronize", 40.0, 9.0, 13]]
    assert rec["gpu"] == [["notify_kernel", 41.0, 10.0, 11]]  # the GPU mirror of step::dispatch is left out
