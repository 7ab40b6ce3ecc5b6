"""Per-process bodies of ``test_cuda_graph_moe_cuda.py``: a sync-free MoE layer on the intranode kernels, its
forward and backward captured in one CUDA graph and replayed on new inputs, against the same step run eagerly.

Two layers, both with ``num_worst_tokens`` dispatch (static shapes, ``tokens_per_expert`` on the device):

* the plain recipe's MoE layer (``examples.deepseek_v3.model.MoE`` with ``ExpertParallel(sync_free=True)``: sigmoid
  group-limited router, grouped-GEMM experts, one shared expert), fp32 parameters under BF16 autocast, as the recipe
  trains; built by ``deepep_plugin.bench.graph_moe`` (whose benchmark times this same step);
* a megatron-core ``MoELayer`` whose flex dispatcher is the plugin's (``dispatcher`` mode, ``sync_free``), BF16,
  with Megatron's own ``SequentialMLP`` of one local expert per rank (the only stock experts that read no count:
  see ``integrations/megatron/dispatcher.py: host_count_reader``) and a softmax top-1 router, so the routing, and
  with it every received count, follows the input.

Every worker, per rank (2 processes, which may share one GPU; gloo group):

1. eager step on inputs A (a fresh leaf input, parameter gradients set to ``None``: no accumulation);
2. ``mode="default"``: the eager step reads nothing from the GPU: it runs under
   ``torch.cuda.set_sync_debug_mode("error")`` (any synchronising PyTorch call raises), the runtime's count of
   host waits does not move, and issued behind a sleep kernel it returns while the sleep still runs;
   ``mode="deterministic"``: a second eager step on A equals the first bit for bit (so a difference below is the
   graph's, not run-to-run noise);
3. capture (``GraphedStep``: warm-up steps on a side stream, gradients set to ``None`` before the capture, so the
   captured backward produces them instead of accumulating), replay on inputs B, whose routing differs from A's,
   and compare with an eager step on B; replay on A again and compare with step 1.

Comparison: output, input gradient and every parameter gradient.
* ``deterministic``: ``torch.use_deterministic_algorithms(True)`` (with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``), and
  the replay must equal eager **bit for bit**: the graph replays the very kernels of the eager step on the same
  data.
* ``default``: within ``REL_TOL`` of each tensor's largest magnitude. The same kernels run, but two of them sum in a
  varying order: ``unpermute``'s ``index_add`` (float32 atomics: a received row's copies from several local
  experts) and the backward of ``permute``'s row gather (BF16 atomics: the gradient of a received row from each of
  its local experts). Either sum changes by a few BF16 ulps (2**-8 relative) from run to run, eager or replayed;
  2**-5 of the tensor's largest value keeps a margin of 4 and still fails on a wrong routing, a stale input or a
  missing contribution (errors of the order of the values themselves). Every compared value must be finite.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Tuple

import torch
import torch.distributed as dist
from gpu_env import bits, take_device
from sync_workers import waits_for_gpu

import deepep_plugin as dp
from deepep_plugin.bench import graph_moe as gm
from deepep_plugin.config import set_timeout_s

#: The plain layer: small, with the recipe's routing shape (16 experts, top-4 within 2 of 4 groups, 1 shared).
PLAIN = dict(hidden=256, num_experts=16, topk=4, n_group=4, topk_group=2, intermediate=128, shared=1)
#: Tokens per rank: unequal, so the ranks receive different counts; the worst case is their sum.
PLAIN_TOKENS = (96, 160)
#: Megatron layer: [S, B] tokens per rank (unequal), hidden size.
MEGATRON_SHAPES = {0: (24, 4), 1: (16, 5)}
MEGATRON_HIDDEN = 128
REL_TOL = 2.0 ** -5
#: ~500 ms at an H200's 1.98 GHz: far longer than a layer step's host time, so a host wait cannot hide.
_SLEEP_CYCLES = int(0.5 * 1.98e9)

Inputs = gm.Inputs  # (layer input, gradient of the layer output)


def _set_mode(deterministic: bool) -> None:
    """Before any CUDA work of the worker: deterministic algorithms (cuBLAS needs the workspace setting before its
    first call in the process) or the defaults."""
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True)


def _inputs(seed: int, rank: int, shape: Tuple[int, ...], x_dtype: torch.dtype, out_dtype: torch.dtype,
            dev: torch.device) -> Tuple[Inputs, Inputs]:
    """Inputs A and B of this rank (drawn on the CPU): standard-normal tokens and output gradients."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    drawn = [(torch.randn(shape, generator=g).to(dev, x_dtype), torch.randn(shape, generator=g).to(dev, out_dtype))
             for _ in range(2)]
    return drawn[0], drawn[1]


# ---------------------------------------------------------------------------------------------------------------
# Checks


def assert_reads_nothing(step: Callable[[], Any], buffer: dp.Buffer, rank: int, what: str) -> None:
    """``step`` makes no synchronising PyTorch call, no host wait of the kernels, and returns before earlier GPU
    work finishes."""
    kernels = buffer.runtime.intranode
    assert kernels is not None, f"rank {rank}: the Buffer has no intranode runtime"
    waits = kernels.host_waits()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert kernels.host_waits() == waits, f"rank {rank}: {what}: the kernels waited on the host for the GPU"
    assert not waits_for_gpu(step, _SLEEP_CYCLES), (
        f"rank {rank}: {what} returned only after earlier GPU work finished (a host read)")


def assert_steps_match(got: gm.StepResult, want: gm.StepResult, rank: int, what: str, exact: bool) -> None:
    """Bit for bit (``exact``) or within ``REL_TOL`` of the largest magnitude, tensor by tensor; all finite."""
    problems = []
    for (name, a), (_, b) in zip(got.tensors(), want.tensors()):
        if a is None or b is None:
            if (a is None) != (b is None):
                problems.append(f"{name}: {'replay' if a is None else 'eager'} has none")
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name}: {tuple(a.shape)} {a.dtype} != {tuple(b.shape)} {b.dtype}")
            continue
        if not bool(torch.isfinite(b).all()):
            problems.append(f"{name}: eager has non-finite values")
            continue
        if exact:
            if not torch.equal(bits(a), bits(b)):
                differ = int((a != b).sum())
                problems.append(f"{name}: {differ} of {b.numel()} values differ (max |diff| "
                                f"{(a.float() - b.float()).abs().max().item():.3e})")
            continue
        diff = (a.float() - b.float()).abs().max().item()
        bound = REL_TOL * b.float().abs().max().item()
        if not diff <= bound:  # also catches NaN
            problems.append(f"{name}: max |diff| {diff:.3e} > {bound:.3e}")
    assert not problems, f"rank {rank}: {what}: " + "; ".join(problems)


def graph_against_eager(forward: Callable[[torch.Tensor], torch.Tensor], params: gm.Params, a: Inputs, b: Inputs,
                        buffer_of: Callable[[], dp.Buffer], rank: int, deterministic: bool) -> None:
    """Steps 1-3 of the module docstring. ``buffer_of()``: the layer's Buffer (known after the first step)."""
    want_a = gm.eager_step(forward, params, *a).clone()
    if deterministic:
        assert_steps_match(gm.eager_step(forward, params, *a).clone(), want_a, rank, "eager twice", exact=True)
    else:
        assert_reads_nothing(lambda: gm.eager_step(forward, params, *b), buffer_of(), rank,
                             "the sync-free layer's forward and backward")
    graph = gm.GraphedStep(forward, params, *a, warmup=3, barrier=dist.barrier)
    got_b = graph.replay(*b).clone()
    want_b = gm.eager_step(forward, params, *b).clone()
    got_a = graph.replay(*a).clone()
    torch.cuda.synchronize()
    assert_steps_match(got_b, want_b, rank, "replay on new inputs against eager", exact=deterministic)
    assert_steps_match(got_a, want_a, rank, "replay on the first inputs against eager", exact=deterministic)
    buffer_of().runtime.check_error()
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Workers


def plain_worker(rank: int, world: int, *, seed: int, deterministic: bool) -> None:
    """The plain recipe's MoE layer with ``sync_free`` (see the module docstring)."""
    _set_mode(deterministic)
    dev = take_device(rank)
    set_timeout_s(120.0)  # a peer may still be loading kernels when this rank's first dispatch waits for it
    buffer = dp.Buffer.sized_for(dist.group.WORLD, PLAIN["hidden"] * 2, backend="cuda")  # strict: no fallback
    assert buffer.served_by("dispatch") == "intranode"
    assert buffer.served_by("combine", dtype=torch.bfloat16) == "intranode"
    cfg = gm.moe_config(**PLAIN)
    tokens = PLAIN_TOKENS[rank]
    layer = gm.plain_moe_layer(cfg, buffer, rank, world, worst_tokens=sum(PLAIN_TOKENS[:world]), seed=seed,
                               device=dev)
    a, b = _inputs(seed, rank, (tokens, PLAIN["hidden"]), torch.float32, torch.bfloat16, dev)
    with gm.autocast_bf16():
        assert layer.experts.use_grouped_gemm(a[0]), \
            f"rank {rank}: the experts do not run as grouped GEMMs here (needs sm90+): the layer is not sync-free"
    with torch.no_grad():  # new routing: the router's choice follows the input
        idx_a, _ = layer.router(a[0])
        idx_b, _ = layer.router(b[0])
    assert not torch.equal(idx_a, idx_b), f"rank {rank}: inputs A and B route the same"

    def forward(x: torch.Tensor) -> torch.Tensor:
        with gm.autocast_bf16():
            return layer(x)

    graph_against_eager(forward, list(layer.named_parameters()), a, b, lambda: buffer, rank, deterministic)


def megatron_worker(rank: int, world: int, *, seed: int, deterministic: bool) -> None:
    """A megatron-core ``MoELayer`` on the plugin's dispatcher with ``sync_free`` (see the module docstring)."""
    _set_mode(deterministic)
    import megatron_cuda_workers as mw
    import megatron_shims as shims

    from deepep_plugin.integrations import megatron as dpm

    dev = mw.setup_device(rank, "cuda")  # also: TF32 off, Megatron's jit_fuser eager
    os.environ["DEEPEP_PLUGIN_BACKEND"] = "cuda"  # strict: every Buffer the layer builds runs the kernels
    set_timeout_s(120.0)
    shims.init_megatron_parallel(world)
    worst = sum(s * bsz for s, bsz in list(MEGATRON_SHAPES.values())[:world])
    dpm.enable(None, mode="dispatcher", sync_free=True, worst_tokens=worst)
    try:
        case = mw.Case(mode="dispatcher", dtype="bfloat16", hidden=MEGATRON_HIDDEN)
        layer = mw.build_layer(case, "flex", dev, seed=seed, num_experts=world, topk=1,
                               moe_router_pre_softmax=True, moe_router_load_balancing_type="none",
                               moe_aux_loss_coeff=0.0)
        dispatcher = layer.token_dispatcher
        assert type(dispatcher) is dpm.DeepEPPluginTokenDispatcher and dispatcher.settings.sync_free, \
            type(dispatcher)
        assert layer.num_local_experts == 1
        shape = (*MEGATRON_SHAPES[rank], MEGATRON_HIDDEN)
        a, b = _inputs(seed, rank, shape, torch.bfloat16, torch.bfloat16, dev)
        with torch.no_grad():
            _, map_a = layer.router(a[0])
            _, map_b = layer.router(b[0])
        assert not torch.equal(map_a, map_b), f"rank {rank}: inputs A and B route the same"

        def forward(x: torch.Tensor) -> torch.Tensor:
            out, bias = layer(x)
            assert bias is None
            return out

        params = list(layer.named_parameters())
        with mw.recording() as traffic:  # the first step builds the Buffer; check it and that nothing fell back
            gm.eager_step(forward, params, *a)
            torch.cuda.synchronize()
        traffic.check("cuda", rank, combine_on_kernel=True, dispatch_dtype=torch.bfloat16)
        graph_against_eager(forward, params, a, b, lambda: traffic.buffers[0], rank, deterministic)
    finally:
        dpm.disable()
