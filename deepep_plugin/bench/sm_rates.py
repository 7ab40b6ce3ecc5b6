"""``python -m deepep_plugin.bench sm-rates``: what one SM of the intranode kernels moves, and what that predicts for
two NVLink GPUs.

With one rank only the local half of the kernels runs: dispatch copies every token from ``x`` into the output rows
(the local copy: ``num_sms`` blocks with the local split, DEEPEP_PLUGIN_DISPATCH_LOCAL_SPLIT=1, the default, else
the ``num_sms / 2`` receiver blocks) and combine reads the rows back into the output (``num_sms / 2`` receiver
blocks). Those blocks read and write local memory on a real NVLink pair too, so their rate per SM carries over.
For each SM count this times, with CUDA events (median after warm-up), on one process and one GPU:
  * cached dispatch BF16 and FP8 (bytes = rows x (row bytes + 4 bytes per scale)), and combine BF16 (bytes = rows
    x row bytes);
  * reference copies of the same bytes by as many blocks as dispatch's local copy uses
    (``_intranode_C.copy_probe``): the bulk-copy engine driven by one thread per block through 8 shared-memory
    stages (200 KB), and 16-byte register copies: 32 warps with 4 or 8 loads in flight per lane, 16 warps with 16.
Rates are GB/s (bytes copied once / time) in all and per copying block (one per SM).

Prediction for two GPUs at EP2 (top-8 of 256 experts: nearly every token goes to both ranks, so half of a rank's
received bytes are its own): the receiver blocks copy all received bytes at the measured per-SM rate, and the
sender blocks push the remote half over NVLink at the rate design.md measured for stores from that many SMs (299 /
333 / 350 / 365 GB/s from 8 / 16 / 24 / 132 SMs; proportionally less below 8). Predicted time = max of the two;
predicted bottleneck bandwidth = received bytes / that time (DeepEP's metric; its V1 reaches about 340 GB/s there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import Any

import torch
import torch.distributed as dist

from .common import median_ms, rank_device, spawn_ranks

#: NVLink bandwidth (GB/s) of remote 16-byte stores from this many SMs, one 1024-thread block each, on the project's
#: 2x H200 pair (design.md, "Facts measured").
NVLINK_STORE_GBPS = {8: 299.0, 16: 333.0, 24: 350.0, 132: 365.0}


def nvlink_store_gbps(sms: int) -> float:
    """NVLink store bandwidth from ``sms`` pushing SMs: measured points, linear in between, proportional below 8."""
    points = sorted(NVLINK_STORE_GBPS.items())
    if sms <= points[0][0]:
        return points[0][1] * sms / points[0][0]
    for (s0, b0), (s1, b1) in zip(points, points[1:]):
        if sms <= s1:
            return b0 + (b1 - b0) * (sms - s0) / (s1 - s0)
    return points[-1][1]


def predict_ep2(rate_per_recv_sm: float, num_sms: int, row_bytes: float, tokens: int,
                local_split: bool = False) -> dict:
    """Predicted EP2 dispatch on two NVLink GPUs: every token to both ranks (half of the received bytes local).

    Without the local split the receiver blocks copy every received byte; with it they copy the remote half and a
    quarter of the bytes (half the local copy), and the sender blocks copy the other quarter after their NVLink
    stores (counted one after the other: a bound, since the two share the SM).
    """
    half = tokens * row_bytes
    recv_bytes = 2.0 * half
    blocks = num_sms // 2
    t_recv = (1.5 if local_split else 2.0) * half / (rate_per_recv_sm * blocks * 1e9)
    t_send = half / (nvlink_store_gbps(blocks) * 1e9)
    if local_split:
        t_send += 0.5 * half / (rate_per_recv_sm * blocks * 1e9)
    t = max(t_recv, t_send)
    return dict(us=t * 1e6, gbps=recv_bytes / t / 1e9, bound="receivers" if t_recv >= t_send else "NVLink stores")


#: Reference copies of ``_intranode_C.copy_probe``: name -> mode.
PROBES = {"bulk_copy": 0, "register_copy": 1, "register_copy_d8": 2, "register_copy_d16": 3}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepep_plugin.bench sm-rates", description=__doc__.split("\n")[0])
    p.add_argument("--sms", type=str, default="4,8,12,16,24", help="comma-separated SM counts (even)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--json", type=str, default="benchmarks/results/sm_rates.json")
    p.add_argument("--results", type=str, default="", help="markdown file to append the table to ('' = none)")
    return p.parse_args(argv)


def _worker(rank: int, world: int, args: argparse.Namespace) -> Any:
    from deepep_plugin.backends.cuda_intranode import IntranodeRuntime, load_extension
    from deepep_plugin.config import Config

    dev = rank_device()
    ext = load_extension()
    T, H = args.tokens, args.hidden
    sms_list = [int(s) for s in args.sms.split(",")]
    nbytes = max(Config(s, 6, 256).get_nvl_buffer_size_hint(H * 2, 1) for s in sms_list)
    rt = IntranodeRuntime(dist.group.WORLD, 0, 1, nbytes, dev, 60.0)
    g = torch.Generator(device=dev).manual_seed(7)
    x = torch.randn(T, H, device=dev, generator=g).to(torch.bfloat16)
    x_fp8 = (x.float() * 0.25).to(torch.float8_e4m3fn)
    x_scales = torch.rand(T, H // 128, device=dev, generator=g)
    topk_idx = torch.rand(T, 256, device=dev, generator=g).topk(8, dim=1).indices
    topk_w = torch.rand(T, 8, device=dev, generator=g)
    rows = []
    for sms in sms_list:
        row = _measure(rt, ext, args, sms, x, x_fp8, x_scales, topk_idx, topk_w)
        rows.append(row)
        print(_line(row), flush=True)
    rt.destroy()
    return rows, torch.cuda.get_device_name(dev)


def _measure(rt: Any, ext: Any, args: argparse.Namespace, sms: int, x: torch.Tensor, x_fp8: torch.Tensor,
             x_scales: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> dict:
    """One SM count: the kernels' and the reference copies' times and rates, and the EP2 predictions."""
    from deepep_plugin.config import Config

    T, H = args.tokens, args.hidden
    cfg = Config(sms, 6, 256)
    res = rt.dispatch(x, None, None, rt.get_dispatch_layout(topk_idx, 256), topk_idx, topk_w, 1, 0, cfg)
    handle, n = res.handle, res.recv_x.size(0)
    assert torch.equal(res.recv_x, x), "1-rank dispatch must return x unchanged"
    t_bf16 = median_ms(lambda: rt.dispatch(x, None, handle, None, None, None, 1, 0, cfg), args.warmup, args.iters)
    t_fp8 = median_ms(lambda: rt.dispatch(x_fp8, x_scales, handle, None, None, None, 1, 0, cfg), args.warmup,
                      args.iters)
    t_comb = median_ms(lambda: rt.combine(res.recv_x, handle, None, None, None, cfg), args.warmup, args.iters)
    rt.check_error()
    src = x.view(torch.uint8).reshape(-1)
    dst = torch.empty_like(src)
    tuning = ext.dispatch_tuning()
    split = bool(tuning["local_split"])
    blocks = sms if split else sms // 2  # blocks of dispatch's local copy (combine: always sms // 2 receivers)
    t_probe = {}
    for name, mode in PROBES.items():
        dst.zero_()
        t_probe[name] = median_ms(lambda m=mode: ext.copy_probe(dst, src, blocks, m), args.warmup, args.iters)
        assert torch.equal(dst, src), f"{name} probe"
    bf16 = n * H * 2
    fp8 = n * (H + 4 * (H // 128))
    t = {"dispatch_bf16": t_bf16, "dispatch_fp8": t_fp8, "combine": t_comb, **t_probe}
    rate = {k: (fp8 if k == "dispatch_fp8" else bf16) / v / 1e6 for k, v in t.items()}
    per_sm = {k: v / (sms // 2 if k == "combine" else blocks) for k, v in rate.items()}
    row = {"num_sms": sms, "receiver_blocks": sms // 2, "copy_blocks": blocks, "tokens": T, "hidden": H,
           "local_split": split, "copy_depth": tuning["copy_depth"],
           "us": {k: v * 1e3 for k, v in t.items()}, "gbps": rate, "gbps_per_sm": per_sm}
    # On two GPUs the copying blocks are sms // 2 receivers (and, with the split, sms // 2 senders as well).
    row["predicted_ep2_dispatch_bf16"] = predict_ep2(per_sm["dispatch_bf16"], sms, H * 2, T, split)
    row["predicted_ep2_dispatch_fp8"] = predict_ep2(per_sm["dispatch_fp8"], sms, H + 4 * (H // 128), T, split)
    return row


def _line(r: dict) -> str:
    g, p = r["gbps_per_sm"], r["gbps"]
    pb, pf = r["predicted_ep2_dispatch_bf16"], r["predicted_ep2_dispatch_fp8"]
    rates = ", ".join(f"{k} {p[k]:.0f} ({g[k]:.1f})" for k in RATE_KEYS)
    return (f"SMs={r['num_sms']} (copy blocks {r['copy_blocks']}, local split {int(r['local_split'])}, depth "
            f"{r['copy_depth']}): GB/s in all (per block) {rates}; EP2 on 2 GPUs predicted: BF16 {pb['gbps']:.0f} "
            f"GB/s ({pb['us']:.0f} us, {pb['bound']}), FP8 {pf['gbps']:.0f} GB/s ({pf['us']:.0f} us, {pf['bound']})")


#: Columns of the line and the table, in order.
RATE_KEYS = ("dispatch_bf16", "dispatch_fp8", "combine", *PROBES)


def _table(rows: list[dict]) -> str:
    lines = ["| SMs | copy blocks | " + " | ".join(f"{k} GB/s (per SM)" for k in RATE_KEYS) +
             " | EP2 2-GPU prediction BF16 / FP8 GB/s (bound) |", "|" + "---|" * (len(RATE_KEYS) + 3)]
    for r in rows:
        p, g = r["gbps"], r["gbps_per_sm"]
        cells = [f"{p[k]:.0f} ({g[k]:.1f})" for k in RATE_KEYS]
        pb, pf = r["predicted_ep2_dispatch_bf16"], r["predicted_ep2_dispatch_fp8"]
        lines.append(f"| {r['num_sms']} | {r['copy_blocks']} | " + " | ".join(cells) +
                     f" | {pb['gbps']:.0f} / {pf['gbps']:.0f} ({pb['bound']} / {pf['bound']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parse(list(argv or []))
    if not torch.cuda.is_available():
        raise SystemExit("sm-rates benchmark: needs a CUDA GPU")
    rows, device = spawn_ranks(_worker, 1, args, "sm-rates", timeout=600)
    date = datetime.date.today().isoformat()
    out = {"device": device, "date": date, "ranks": 1, "rows": rows,
           "method": "CUDA-event medians; GB/s = bytes copied once / time; per SM = per copying block "
                                                "(combine: per receiver block)"}
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    table = _table(rows)
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"\n### Per-SM rates, 1 rank on {device} ({date}): hidden {args.hidden}, {args.tokens} tokens\n\n"
                    f"{table}\n")
