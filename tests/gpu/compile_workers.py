"""Per-process body of ``test_compile_cuda.py``: a BF16 expert-parallel step over ``deepep_plugin.autograd`` on the
intranode kernels, compiled (aot_eager: the same kernels as eager) against eager, bit for bit."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import deepep_plugin as dp
from deepep_plugin import autograd as ep
from deepep_plugin.config import set_timeout_s

HIDDEN = 128


def _step(buf: dp.Buffer, num_experts: int, num_worst_tokens: int, params: dict) -> Any:
    def step(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, seed: torch.Tensor) -> Any:
        out = ep.dispatch(buf, x @ params["w_in"], topk_idx, topk_weights, num_experts,
                          num_worst_tokens=num_worst_tokens)
        y = ep.combine(buf, out.recv_x @ params["weight"], out.handle)
        return (y.float() * seed).sum(), y
    return step


def compile_worker(rank: int, world: int, *, worst: bool) -> None:
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    set_timeout_s(300.0)  # a peer may still be compiling when this rank reaches a collective
    buf = dp.Buffer.sized_for(dist.group.WORLD, HIDDEN * 2, backend="cuda")  # strict: no call may fall back
    assert buf.served_by("dispatch") == "intranode" and buf.served_by("combine", dtype=torch.bfloat16) == "intranode"
    g = torch.Generator().manual_seed(11)
    params = {n: (torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5).to(dev, torch.bfloat16).requires_grad_()
              for n in ("w_in", "weight")}
    num_experts, tokens = 4 * world, [37, 0, 21, 64][:world]
    mine = torch.Generator().manual_seed(100 + rank)
    t = tokens[rank]
    x = torch.randn(t, HIDDEN, generator=mine).to(dev, torch.bfloat16)
    rows = [torch.randperm(num_experts, generator=mine)[:3] for _ in range(t)]
    idx = torch.stack(rows).long() if rows else torch.empty(0, 3, dtype=torch.long)
    idx[torch.rand(t, 3, generator=mine) < 0.2] = -1
    w = torch.rand(t, 3, generator=mine).to(dev)
    seed = torch.randn(t, HIDDEN, generator=mine).to(dev)
    step = _step(buf, num_experts, sum(tokens) if worst else 0, params)

    def run(fn: Any) -> dict:
        for p in params.values():
            p.grad = None
        xx = x.clone().requires_grad_()
        loss, y = fn(xx, idx.to(dev), w, seed)
        loss.backward()
        return {"y": y.detach().clone(), "x.grad": xx.grad.clone(),
                **{f"{n}.grad": p.grad.clone() for n, p in params.items()}}

    want = run(step)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=worst)
    for attempt in range(2):
        got = run(compiled)
        for name, value in want.items():
            assert torch.equal(got[name], value), f"rank {rank}: {name} differs from eager (run {attempt})"
    dist.barrier()
