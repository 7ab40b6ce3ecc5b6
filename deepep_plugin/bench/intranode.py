"""``python -m deepep_plugin.bench intranode``: bandwidth of the intranode kernels, side by side with NCCL.

For every (SM count, tokens per rank) it times, on every rank, with CUDA events (median after warm-up):
  * dispatch BF16 and dispatch FP8 (cached handle, as DeepEP's tuning loop does: no host sync inside the
    timed region), and combine BF16;
  * NCCL ``all_to_all_single`` moving the same bytes (only with one process per GPU; skipped with a printed
    note when processes share a GPU, where NCCL refuses to run);
  * the copy ceiling: a device-to-device copy of the same bytes on one GPU, and a peer copy between two GPUs
    when there are two.
Metric: DeepEP's bottleneck bandwidth = bytes received by a rank (its own tokens included; FP8 counts 1 byte
per element plus 4 bytes per scale) / time; the table shows the minimum over ranks. Results go to stdout, a
PNG plot and ``benchmarks/RESULTS.md`` (appended).

Processes sharing one GPU run time-sliced unless MPS is running (``MPS=1 bash tools/gpu_check.sh intranode-bench``
starts it): their numbers test the kernels' machinery, not NVLink.
"""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from .common import median_ms, rank_device, spawn_ranks


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepep_plugin.bench intranode", description=__doc__.split("\n")[0])
    p.add_argument("--num-processes", type=int, default=0,
                   help="EP ranks (default: number of GPUs, at least 2; processes share GPUs when fewer)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--sms", type=str, default="8,16,24,32", help="comma-separated SM counts (even)")
    p.add_argument("--tokens", type=str, default="512,1024,2048,4096,8192,16384")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--queue-tokens", type=int, default=256, help="num_max_nvl_chunked_recv_tokens")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--plot", type=str, default="benchmarks/intranode.png")
    p.add_argument("--results", type=str, default="benchmarks/RESULTS.md")
    return p.parse_args(argv)


def _worker(rank: int, world: int, args: argparse.Namespace) -> Any:
    dev = rank_device()
    ngpu = torch.cuda.device_count()
    own_gpu = ngpu >= world
    nccl = dist.new_group(backend="nccl") if own_gpu else None

    from deepep_plugin.backends.cuda_intranode import IntranodeRuntime
    from deepep_plugin.config import Config

    sms_list = [int(s) for s in args.sms.split(",")]
    tokens_list = [int(t) for t in args.tokens.split(",")]
    H, E, K = args.hidden, args.num_experts, args.topk
    nbytes = max(Config(s, 6, args.queue_tokens).get_nvl_buffer_size_hint(H * 2, world) for s in sms_list)
    rt = IntranodeRuntime(dist.group.WORLD, rank, world, nbytes, dev, args.timeout)
    rows = []
    for T in tokens_list:
        g = torch.Generator(device=dev).manual_seed(1234 + rank)
        x = torch.randn(T, H, device=dev, generator=g).to(torch.bfloat16)
        scores = torch.rand(T, E, device=dev, generator=g)
        topk_idx = scores.topk(K, dim=1).indices.to(torch.int64)
        topk_w = torch.rand(T, K, device=dev, generator=g)
        x_fp8 = (x.float() * 0.25).to(torch.float8_e4m3fn)
        x_scales = torch.rand(T, H // 128, device=dev, generator=g)
        for sms in sms_list:
            rows.append(_measure_point(rt, args, T, sms, x, x_fp8, x_scales, topk_idx, topk_w, nccl, world))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    dist.barrier()
    rt.destroy()
    return (gathered, own_gpu, ngpu, torch.cuda.get_device_name(dev)) if rank == 0 else None


def _measure_point(rt: Any, args: argparse.Namespace, T: int, sms: int, x: torch.Tensor, x_fp8: torch.Tensor,
                   x_scales: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, nccl: Any,
                   world: int) -> dict:
    """Time dispatch BF16/FP8, combine, NCCL and the copy ceilings for one (tokens, SMs) point on this rank."""
    from deepep_plugin.config import Config

    H, E = args.hidden, args.num_experts
    dev = x.device
    ngpu = torch.cuda.device_count()
    cfg = Config(sms, 6, args.queue_tokens)
    lay = rt.get_dispatch_layout(topk_idx, E)
    res = rt.dispatch(x, None, None, lay, topk_idx, topk_w, 1, 0, cfg)
    n_recv = res.recv_x.size(0)
    handle = res.handle
    dist.barrier()
    t_bf16 = median_ms(lambda: rt.dispatch(x, None, handle, None, None, None, 1, 0, cfg), args.warmup, args.iters)
    dist.barrier()
    t_fp8 = median_ms(lambda: rt.dispatch(x_fp8, x_scales, handle, None, None, None, 1, 0, cfg),
                     args.warmup, args.iters)
    dist.barrier()
    y = res.recv_x
    t_comb = median_ms(lambda: rt.combine(y, handle, None, None, None, cfg), args.warmup, args.iters)
    torch.cuda.synchronize()
    rt.check_error()
    bf16_bytes = n_recv * H * 2
    fp8_bytes = n_recv * (H + 4 * (H // 128))
    t_nccl = float("nan")
    if nccl is not None:
        send = torch.empty((bf16_bytes // 2) // world * world, dtype=torch.bfloat16, device=dev)
        recv = torch.empty_like(send)
        dist.barrier()
        t_nccl = median_ms(lambda: dist.all_to_all_single(recv, send, group=nccl), args.warmup, args.iters)
    src = torch.empty(bf16_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy = median_ms(lambda: dst.copy_(src), args.warmup, args.iters)
    t_peer = float("nan")
    if ngpu >= 2 and dev.index == 0:
        other = torch.empty(bf16_bytes, dtype=torch.uint8, device=torch.device("cuda", 1))
        t_peer = median_ms(lambda: other.copy_(src), args.warmup, args.iters)
    gb = 1e6  # bytes / ms -> GB/s
    return dict(tokens=T, sms=sms, n_recv=n_recv, dispatch_bf16=bf16_bytes / t_bf16 / gb,
                dispatch_fp8=fp8_bytes / t_fp8 / gb, combine=bf16_bytes / t_comb / gb, nccl=bf16_bytes / t_nccl / gb,
                copy=bf16_bytes / t_copy / gb, peer_copy=bf16_bytes / t_peer / gb,
                t_dispatch_us=t_bf16 * 1e3, t_combine_us=t_comb * 1e3)


def _summarise(gathered: list[list[dict]]) -> list[dict]:
    """Per (tokens, sms): bandwidths as the minimum over ranks (the bottleneck rank)."""
    out = []
    for i, row in enumerate(gathered[0]):
        merged = dict(row)
        for key in ("dispatch_bf16", "dispatch_fp8", "combine", "nccl", "copy"):
            merged[key] = min(g[i][key] for g in gathered)
        out.append(merged)
    return out


def _table(rows: list[dict]) -> str:
    head = ("| tokens | SMs | recv rows | dispatch BF16 GB/s | dispatch FP8 GB/s | combine GB/s | NCCL a2a GB/s "
            "| D2D copy GB/s | peer copy GB/s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        def f(v: float) -> str:
            return "n/a" if v != v else f"{v:.0f}"
        lines.append(f"| {r['tokens']} | {r['sms']} | {r['n_recv']} | {f(r['dispatch_bf16'])} | "
                     f"{f(r['dispatch_fp8'])} | {f(r['combine'])} | {f(r['nccl'])} | {f(r['copy'])} | "
                     f"{f(r['peer_copy'])} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, key, name in zip(axes, ("dispatch_bf16", "dispatch_fp8", "combine"),
                             ("dispatch BF16", "dispatch FP8", "combine")):
        for sms in sorted({r["sms"] for r in rows}):
            sel = [r for r in rows if r["sms"] == sms]
            ax.plot([r["tokens"] for r in sel], [r[key] for r in sel], marker="o", label=f"{sms} SMs")
        sel = [r for r in rows if r["sms"] == rows[0]["sms"]]
        if any(r["nccl"] == r["nccl"] for r in sel):
            ax.plot([r["tokens"] for r in sel], [r["nccl"] for r in sel], "k--", label="NCCL all_to_all")
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("tokens per rank")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("bottleneck bandwidth (GB/s)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str]) -> None:
    """Run the intranode benchmark (see the module docstring); ``argv`` excludes the program name."""
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("intranode benchmark: no CUDA device; nothing to measure")
        return
    ngpu = torch.cuda.device_count()
    world = args.num_processes or max(ngpu, 2)
    gathered, own_gpu, ngpu, name = spawn_ranks(_worker, world, args, "intranode")
    rows = _summarise(gathered)
    title = (f"intranode EP{world} on {ngpu}x {name}: hidden {args.hidden}, top-{args.topk} of "
             f"{args.num_experts} experts")
    notes = []
    if not own_gpu:
        if os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
            how = ("run concurrently under MPS: 'remote' stores are same-GPU HBM writes through the IPC mapping "
                   "and the ranks share one GPU's SMs and HBM, so these numbers measure the kernels' pipeline, "
                   "not NVLink")
        else:
            how = "are time-sliced (no MPS), so these numbers test the machinery, not NVLink"
        notes.append(f"{world} processes share {ngpu} GPU(s) and {how}; NCCL all_to_all_single skipped (NCCL "
                     "needs one GPU per process).")
    table = _table(rows)
    print(title)
    for n in notes:
        print("note:", n)
    print(table)
    plotted = _plot(rows, args.plot, title)
    if plotted:
        print(f"plot: {args.plot}")
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    with open(args.results, "a") as f:
        f.write(f"\n## {title} ({datetime.datetime.now().isoformat(timespec='minutes')})\n\n")
        f.write("Dispatch timed with a cached handle; bandwidth = received bytes (own tokens included; FP8 = 1 "
                "byte/element + 4 bytes/scale) / median CUDA-event time, minimum over ranks.\n")
        for n in notes:
            f.write(f"\nNote: {n}\n")
        f.write("\n" + table + "\n")
    print(f"appended to {args.results}")
