"""torch.compile of an expert-parallel step over the autograd dispatch/combine custom ops, against eager.

Two ranks over gloo, the reference backend (intranode and, with one rank per node, internode handles). The step:
dispatch -> per-row linear -> combine -> loss. With ``num_worst_tokens`` it compiles with ``fullgraph=True``; without,
with one graph break, at the dispatch whose received row count depends on the routing (none with dynamo's unbacked
captures on). Outputs and gradients equal eager's bit for bit (inductor's loss sum: to rounding). ``opcheck`` checks
each op's fake implementation against the real one.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from routing_cases import make_case

import deepep_plugin as dp
from deepep_plugin import autograd as ep
from deepep_plugin.config import set_timeout_s

HIDDEN = 64
WORLD = 2


class _Step(torch.nn.Module):
    """A MoE-like step: a linear map of the tokens, dispatch, one linear map of each received row's features and
    top-k weights, combine (the copies summed), loss. Matrix products only, so the compiler's code and eager's
    round alike."""

    def __init__(self, buffer: dp.Buffer, num_experts: int, num_topk: int, num_worst_tokens: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w_in = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5)
        self.weight = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5)
        self.proj = torch.nn.Parameter(torch.randn(num_topk, HIDDEN, generator=g))
        self.buffer, self.num_experts, self.num_worst_tokens = buffer, num_experts, num_worst_tokens

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                grad_seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = ep.dispatch(self.buffer, x @ self.w_in, topk_idx, topk_weights, self.num_experts,
                          num_worst_tokens=self.num_worst_tokens)
        rows = out.recv_x @ self.weight + out.recv_topk_weights @ self.proj
        y = ep.combine(self.buffer, rows, out.handle)
        return (y * grad_seed).sum(), y


def _run(step: torch.nn.Module, fn: Callable[..., Any], case: Any, rank: int) -> dict[str, torch.Tensor]:
    """Forward and backward of ``fn`` (``step`` or its compiled form) on fresh leaves; what to compare."""
    step.zero_grad(set_to_none=True)
    x = case.x.clone().requires_grad_()
    w = case.topk_weights.clone().requires_grad_()
    seed = torch.randn(case.num_tokens, HIDDEN, generator=torch.Generator().manual_seed(500 + rank))
    loss, y = fn(x, case.topk_idx, w, seed)
    loss.backward()
    return {"y": y.detach(), "loss": loss.detach(), "x.grad": x.grad, "topk_weights.grad": w.grad,
            "w_in.grad": step.w_in.grad, "weight.grad": step.weight.grad, "proj.grad": step.proj.grad}


def _assert_identical(got: dict, want: dict, backend: str) -> None:
    for name, value in want.items():
        if name == "loss" and backend == "inductor":
            # Inductor sums the loss in its own order (the only reduction outside a matrix product): close, not equal.
            torch.testing.assert_close(got[name], value, rtol=1e-6, atol=0)
            continue
        assert got[name] is not None and torch.equal(got[name], value), f"{name} differs from eager"


def _setup(rank: int, world_size: int, worst: bool, ranks_per_node: int) -> tuple[Any, _Step]:
    set_timeout_s(300.0)  # a peer may still be compiling when this rank reaches a collective
    torch._dynamo.reset()
    cases = [make_case("random", 83, r, world_size, hidden=HIDDEN, dtype=torch.float32) for r in range(world_size)]
    # The worst case: every token of every rank comes here.
    num_worst_tokens = sum(c.num_tokens for c in cases) if worst else 0
    buf = dp.Buffer.sized_for(dist.group.WORLD, HIDDEN * 4, num_ranks_per_node=ranks_per_node)
    me = cases[rank]
    return me, _Step(buf, me.num_experts, me.num_topk, num_worst_tokens)


def _explain(step: torch.nn.Module, case: Any) -> Any:
    return torch._dynamo.explain(step)(case.x, case.topk_idx, case.topk_weights, torch.zeros(case.num_tokens, HIDDEN))


def _check(rank: int, world_size: int, backend: str, ranks_per_node: int, worst: bool, graphs: int,
           dynamo_config: dict) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    me, step = _setup(rank, world_size, worst, ranks_per_node)
    want = _run(step, step, me, rank)
    counter = CompileCounterWithBackend(backend)
    with torch._dynamo.config.patch(**dynamo_config):
        compiled = torch.compile(step, fullgraph=graphs == 1, backend=counter)
        for _ in range(2):  # the second call reuses the compiled graphs
            _assert_identical(_run(step, compiled, me, rank), want, backend)
        assert counter.frame_count == graphs, counter.frame_count
        explained = _explain(step, me)
    assert explained.graph_count == graphs and explained.graph_break_count == graphs - 1, explained
    if graphs == 2:  # the one break: the dispatch, whose received row count depends on the routing
        reason = explained.break_reasons[0].reason
        assert "deepep_plugin.dispatch" in reason and "output shape depends on input Tensor data" in reason, reason


# (backend, ranks per node): inductor within one node; the fast aot_eager also with the internode handle.
BACKENDS = [("aot_eager", WORLD), ("aot_eager", 1), ("inductor", WORLD)]


@pytest.mark.parametrize("backend,ranks_per_node", BACKENDS)
def test_num_worst_tokens_compiles_fullgraph_and_matches_eager(backend: str, ranks_per_node: int) -> None:
    run_distributed(_check, WORLD, backend, ranks_per_node, worst=True, graphs=1, dynamo_config={})


@pytest.mark.parametrize("backend,ranks_per_node", BACKENDS)
def test_without_num_worst_tokens_one_graph_break_and_matches_eager(backend: str, ranks_per_node: int) -> None:
    # Two graphs: up to the dispatch, and from it on; the dispatch runs eagerly between them.
    run_distributed(_check, WORLD, backend, ranks_per_node, worst=False, graphs=2, dynamo_config={})


def test_without_num_worst_tokens_unbacked_sizes_need_no_break() -> None:
    # With both captures on, the fake's unbacked row count and the traced count read keep everything in one graph.
    run_distributed(_check, WORLD, "aot_eager", WORLD, worst=False, graphs=1,
                    dynamo_config={"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True})


def _check_ops(rank: int, world_size: int, ranks_per_node: int) -> None:
    """``torch.library.opcheck`` of the three ops: schema, autograd registration, fake against real outputs (shapes,
    dtypes, strides), AOT tracing. Every check runs the op the same number of times on each rank."""
    cases = [make_case("random", 89, r, world_size, hidden=HIDDEN, dtype=torch.float32) for r in range(world_size)]
    me = cases[rank]
    buf = dp.Buffer.sized_for(dist.group.WORLD, HIDDEN * 4, num_ranks_per_node=ranks_per_node)
    key = ep._buffer_key(buf)
    for num_worst_tokens in (sum(c.num_tokens for c in cases), 0):
        x = me.x.clone().requires_grad_()
        w = me.topk_weights.clone().requires_grad_()
        torch.library.opcheck(torch.ops.deepep_plugin.dispatch.default,
                              (x, me.topk_idx, w, key, me.num_experts, False, False, False, 1, num_worst_tokens, [],
                               dp.Buffer.num_sms))
        out = ep.dispatch(buf, me.x, me.topk_idx, me.topk_weights, me.num_experts, num_worst_tokens=num_worst_tokens)
        handle = list(out.handle)
        rows = (out.recv_x * 2).requires_grad_()
        for weights in (None, out.recv_topk_weights):
            torch.library.opcheck(torch.ops.deepep_plugin.combine.default, (rows, weights, handle, key, []))
        torch.library.opcheck(torch.ops.deepep_plugin.cached_dispatch.default, (me.x, handle, key, rows.size(0)))


@pytest.mark.parametrize("ranks_per_node", [WORLD, 1])
def test_ops_pass_opcheck(ranks_per_node: int) -> None:
    run_distributed(_check_ops, WORLD, ranks_per_node)
