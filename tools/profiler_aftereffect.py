"""Does a process launch more slowly after it has run torch.profiler? One GPU, one process.

    python tools/profiler_aftereffect.py [--launches 2000]

Times a launch-bound loop (small elementwise kernels issued back to back) three times: before any profiler pass,
after one ``torch.profiler.profile`` with CPU and CUDA activities, and again later. Prints host us per launch and GPU
us per launch (CUDA events) for each. Kineto leaves CUPTI attached after profiling unless TEARDOWN_CUPTI=1, so a
benchmark that profiles and then times charges that to whatever it times afterwards (bench compare times first).
"""
import argparse
import time

import torch


def loop(n: int, x: torch.Tensor) -> tuple[float, float]:
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    s.record()
    for _ in range(n):
        x.add_(1.0)
    e.record()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host, s.elapsed_time(e) * 1e3 / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--launches", type=int, default=2000)
    args = p.parse_args()
    x = torch.zeros(256, device="cuda")
    loop(args.launches, x)  # warm
    rows = [("before profiling", *loop(args.launches, x))]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        loop(100, x)
    rows.append(("after one profiler pass", *loop(args.launches, x)))
    rows.append(("again", *loop(args.launches, x)))
    for name, host, gpu in rows:
        print(f"{name:26s} host {host:6.2f} us/launch   gpu {gpu:6.2f} us/launch")


if __name__ == "__main__":
    main()
