"""``python -m deepep_plugin.bench internode``: the internode kernels (network hop once per node, then NVLink).

For every (SM count, tokens per rank) it times on every rank, with CUDA events (median after warm-up), through the
public ``Buffer(backend="cuda", num_ranks_per_node=G)``: dispatch BF16 and dispatch FP8 with a cached handle (no
host sync in the timed region), and combine BF16. Routing is DeepSeek-V3's node-limited top-k (experts grouped by
node, each token on at most ``--topk-group`` nodes).

Metrics, as DeepEP's internode test reports them, minimum over ranks:
  * RDMA bandwidth = bytes of the records this rank sends to the forwarders of all nodes (one per token and
    destination node; FP8: 1 byte/element + 4 bytes/scale) / time;
  * NVL bandwidth = bytes this rank receives into its outputs / time.

On one host the nodes are emulated (``G`` smaller than the group): the "network" hop is NVLink P2P (or NVSHMEM
puts over it with ``DEEPEP_PLUGIN_INTERNODE_PUTS=1``), and processes sharing a GPU run time-sliced unless MPS is
on. These numbers are labelled emulated: they test the kernels' machinery, not RDMA.
"""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from .common import host_us, median_ms, rank_device, spawn_ranks

MB = 1 << 20


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepep_plugin.bench internode", description=__doc__.split("\n")[0])
    p.add_argument("--num-processes", type=int, default=4, help="ranks (processes); they may share GPUs")
    p.add_argument("--ranks-per-node", type=int, default=2, help="emulated node size G")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--topk-group", type=int, default=2, help="nodes a token may reach")
    p.add_argument("--sms", type=str, default="8,24")
    p.add_argument("--tokens", type=str, default="512,2048,4096")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rdma-mb", type=int, default=384, help="num_rdma_bytes in MiB")
    p.add_argument("--nvl-mb", type=int, default=384, help="num_nvl_bytes in MiB")
    p.add_argument("--results", type=str, default="benchmarks/RESULTS.md")
    return p.parse_args(argv)


def _worker(rank: int, world: int, args: argparse.Namespace) -> Any:
    dev = rank_device()
    ngpu = torch.cuda.device_count()

    import deepep_plugin as dp
    from deepep_plugin.fp8 import per_token_cast_to_fp8
    from deepep_plugin.routing import group_limited_topk

    G = args.ranks_per_node
    nodes = world // G
    H, E, K = args.hidden, args.num_experts, args.topk
    buf = dp.Buffer(dist.group.WORLD, args.nvl_mb * MB, args.rdma_mb * MB, backend="cuda", num_ranks_per_node=G,
                    explicitly_destroy=True)
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        g = torch.Generator(device=dev).manual_seed(4321 + rank)
        x = torch.randn(T, H, device=dev, generator=g).to(torch.bfloat16)
        logits = torch.randn(T, E, device=dev, generator=g)
        idx, w = group_limited_topk(logits, K, num_groups=nodes, topk_group=min(args.topk_group, nodes),
                                    score_function="sigmoid")
        x_fp8 = per_token_cast_to_fp8(x)
        for sms in [int(s) for s in args.sms.split(",")]:
            cfg = dp.Config(sms, 8, 256, 16, 128)
            per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
            recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w,
                                                           config=cfg)
            y = recv_x.clone()

            def run_bf16(x=x, handle=handle, cfg=cfg):
                buf.dispatch(x, handle=handle, config=cfg)

            def run_fp8(x=x_fp8, handle=handle, cfg=cfg):
                buf.dispatch(x, handle=handle, config=cfg)

            def run_combine(y=y, handle=handle, cfg=cfg):
                buf.combine(y, handle, config=cfg)

            t_bf16 = median_ms(run_bf16, args.warmup, args.iters, before=dist.barrier)
            t_fp8 = median_ms(run_fp8, args.warmup, args.iters, before=dist.barrier)
            t_comb = median_ms(run_combine, args.warmup, args.iters, before=dist.barrier)

            def run_fresh(x=x, cfg=cfg, idx=idx, w=w):
                lay = buf.get_dispatch_layout(idx, E)
                buf.dispatch(x, None, lay[0], lay[1], lay[3], lay[2], idx, w, config=cfg)

            def synced() -> None:
                torch.cuda.synchronize()
                dist.barrier()

            host = {name: host_us(fn, 1, args.iters, before=synced) for name, fn in
                    (("fresh", run_fresh), ("cached", run_bf16), ("combine", run_combine))}
            buf.runtime.check_error()
            records = int(per_rdma.sum())
            n_recv = recv_x.size(0)
            fp8_row = H + 4 * (H // 128)
            rows.append({"tokens": T, "sms": sms, "n_recv": n_recv, "records": records,
                         "rdma_bf16": records * H * 2 / t_bf16 / 1e6, "nvl_bf16": n_recv * H * 2 / t_bf16 / 1e6,
                         "rdma_fp8": records * fp8_row / t_fp8 / 1e6, "nvl_fp8": n_recv * fp8_row / t_fp8 / 1e6,
                         "rdma_comb": records * H * 2 / t_comb / 1e6, "nvl_comb": n_recv * H * 2 / t_comb / 1e6,
                         "t_bf16_us": t_bf16 * 1e3, "t_fp8_us": t_fp8 * 1e3, "t_comb_us": t_comb * 1e3,
                         "host_fresh_us": host["fresh"], "host_cached_us": host["cached"],
                         "host_combine_us": host["combine"]})
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    dist.barrier()
    buf.destroy()
    return (gathered, ngpu, torch.cuda.get_device_name(dev)) if rank == 0 else None


def _summarise(gathered: list[list[dict]]) -> list[dict]:
    """Per (tokens, SMs): bandwidths as the minimum over ranks, times as the maximum."""
    out = []
    for i, row in enumerate(gathered[0]):
        merged = dict(row)
        for key in row:
            if key.startswith(("rdma", "nvl")):
                merged[key] = min(g[i][key] for g in gathered)
            elif key.startswith(("t_", "host_")):
                merged[key] = max(g[i][key] for g in gathered)
        out.append(merged)
    return out


def _table(rows: list[dict]) -> str:
    lines = ["| tokens | SMs | dispatch BF16 RDMA / NVL GB/s (us) | dispatch FP8 RDMA / NVL GB/s (us) | "
             "combine RDMA / NVL GB/s (us) | host us per call: layout + fresh dispatch / cached / combine |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['sms']} | "
                     f"{r['rdma_bf16']:.0f} / {r['nvl_bf16']:.0f} ({r['t_bf16_us']:.0f}) | "
                     f"{r['rdma_fp8']:.0f} / {r['nvl_fp8']:.0f} ({r['t_fp8_us']:.0f}) | "
                     f"{r['rdma_comb']:.0f} / {r['nvl_comb']:.0f} ({r['t_comb_us']:.0f}) | "
                     f"{r['host_fresh_us']:.0f} / {r['host_cached_us']:.0f} / {r['host_combine_us']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Run the internode benchmark (see the module docstring); ``argv`` excludes the program name."""
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("internode benchmark: no CUDA device; nothing to measure")
        return
    world = args.num_processes
    if world % args.ranks_per_node or world // args.ranks_per_node < 2:
        raise SystemExit(f"--num-processes {world} must be a multiple of --ranks-per-node {args.ranks_per_node} "
                         "making at least 2 nodes")
    gathered, ngpu, name = spawn_ranks(_worker, world, args, "internode")
    rows = _summarise(gathered)
    nodes = world // args.ranks_per_node
    title = (f"internode EP{world} as {nodes} emulated nodes of {args.ranks_per_node} on {ngpu}x {name}: hidden "
             f"{args.hidden}, top-{args.topk} of {args.num_experts} experts, <= {min(args.topk_group, nodes)} nodes "
             "per token")
    how = "run concurrently under MPS" if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") else "are time-sliced (no MPS)"
    note = (f"EMULATED: one host; the network hop runs over NVLink P2P (or NVSHMEM puts over it), and {world} "
            f"processes on {ngpu} GPU(s) {how}. This checks the kernels' machinery, not RDMA speed.")
    table = _table(rows)
    print(title)
    print("note:", note)
    print(table)
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    with open(args.results, "a") as f:
        f.write(f"\n## {title} ({datetime.datetime.now().isoformat(timespec='minutes')})\n\n")
        f.write("Cached-handle dispatch and combine; RDMA = record bytes sent to forwarders, NVL = bytes received "
                "(FP8 = 1 byte/element + 4 bytes/scale), each over the median CUDA-event time, minimum over ranks; "
                "times are the slowest rank's.\n")
        f.write(f"\nNote: {note}\n\n{table}\n")
    print(f"appended to {args.results}")
