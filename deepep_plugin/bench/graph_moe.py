"""``python -m deepep_plugin.bench graph-moe``: a sync-free MoE layer's training step replayed from a CUDA graph,
against the same step run eagerly.

The layer is the plain recipe's DeepSeek-V3 MoE layer (``examples.deepseek_v3.model.MoE``: sigmoid group-limited
router, dispatch, grouped-GEMM experts, combine, shared experts) with ``ExpertParallel(sync_free=True)`` on the
intranode kernels (``Buffer(backend="cuda")``, strict: nothing falls back). Every rank holds ``T`` tokens, so
``num_worst_tokens = T x ranks``. One step is the layer's forward and backward (input and parameter gradients)
under BF16 autocast, fp32 parameters, as the recipe trains. Per token count it times ``--iters`` back-to-back
steps, with CUDA events around each (median; the slowest rank's):

* ``eager, host sync``: the same layer without ``sync_free``, for reference (dispatch reads the receive counts on
  the host and the permutation's size follows them);
* ``eager``: the sync-free layer, run eagerly;
* ``graph``: the sync-free step captured once in a CUDA graph (:class:`GraphedStep`) and replayed, new inputs
  copied into its static input tensors before each replay;

and the host microseconds per step. Each row also says how far the replayed step's output and gradients are from
the eager step's on the same inputs (the largest difference relative to the tensor's largest value; not zero by
design: the permutation's sums are float atomics, whose order varies from run to run).

The recipe is not installed with the package: run from the repository root. Ranks that share a GPU run
concurrently only under MPS: as ``compare`` does (its MPS helper), the benchmark starts the MPS daemon when ranks
share a GPU and none runs, and stops it after (``--no-mps``: time-sliced). Results: a table on stdout, ``--json``
(``{"rows": [...], "device", "date", "command", ...}``) and, with ``--results``, a markdown section appended to that
file.

:class:`GraphedStep`, :func:`eager_step`, :func:`moe_config` and :func:`plain_moe_layer` are also what the GPU test
``tests/gpu/test_cuda_graph_moe_cuda.py`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import zlib
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

DEFAULT_JSON = "benchmarks/results/cuda_graph_moe.json"
#: Row keys that are times of the slowest rank (merged with max) and host costs (merged with the mean).
TIME_KEYS = ("eager_sync_us", "eager_us", "graph_us")
HOST_KEYS = ("host_eager_sync_us", "host_eager_us", "host_graph_us")

_RECIPE_HINT = ("the MoE layer is the plain recipe's (examples/deepseek_v3), which is not installed with the "
                "package: run from the repository root")


# ----------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------
def _recipe() -> Tuple[Any, Any]:
    """``(examples.deepseek_v3.model, examples.deepseek_v3.configs)``; ``ImportError`` saying where they live."""
    try:
        from examples.deepseek_v3 import configs, model
    except ImportError as e:
        raise ImportError(f"deepep_plugin.bench.graph_moe: {_RECIPE_HINT} ({e})") from e
    return model, configs


def moe_config(hidden: int, num_experts: int, topk: int, n_group: int, topk_group: int, intermediate: int,
               shared: int = 1) -> Any:
    """The recipe's ``ModelConfig`` for one MoE layer (validated): ``num_experts`` routed experts over all ranks,
    top-``topk`` within ``topk_group`` of ``n_group`` groups, ``shared`` shared experts, each expert's hidden size
    ``intermediate``; grouped GEMM experts, BF16 dispatch."""
    _, configs = _recipe()
    cfg = configs.ModelConfig(hidden_size=hidden, n_routed_experts=num_experts, num_experts_per_tok=topk,
                              n_group=n_group, topk_group=topk_group, moe_intermediate_size=intermediate,
                              n_shared_experts=shared, grouped_gemm=True, fp8_dispatch=False)
    cfg.validate()
    return cfg


@torch.no_grad()
def init_moe_parameters(layer: nn.Module, seed: int) -> None:
    """Fill every parameter of a recipe ``MoE`` with ``N(0, 1 / fan_in)`` (fan-in: the last dim), drawn from
    ``(seed, name)``, and each routed expert's slices from ``(seed, name, global expert id)``: the replicated
    parameters are the same on every rank, and an expert's weights do not depend on the number of ranks."""
    first = layer.experts.first_expert
    for name, p in layer.named_parameters():
        is_expert = name.startswith("experts.")
        for e in range(p.size(0)) if is_expert else [None]:
            key = f"{seed}/{name}" if e is None else f"{seed}/{name}/{first + e}"
            target = p if e is None else p[e]
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            target.copy_(torch.randn(target.shape, generator=g) / math.sqrt(target.shape[-1]))


def plain_moe_layer(cfg: Any, buffer: Any, rank: int, world: int, *, sync_free: bool = True,
                    worst_tokens: Optional[int] = None, seed: int = 0,
                    device: Optional[torch.device] = None) -> nn.Module:
    """The recipe's MoE layer for rank ``rank`` of ``world`` over ``buffer`` (``None``: all experts here, ``world``
    must be 1), BF16 dispatch and combine, parameters from :func:`init_moe_parameters`, on ``device``.

    ``sync_free``/``worst_tokens`` as ``ExpertParallel``: with ``worst_tokens=None`` the worst case is the layer
    input's tokens x ``world`` (ranks holding equal token counts).
    """
    model, _ = _recipe()
    ep = model.ExpertParallel(buffer=buffer, rank=rank, size=world, comm_dtype=torch.bfloat16, sync_free=sync_free,
                              worst_tokens=worst_tokens)
    layer = model.MoE(cfg, ep)
    init_moe_parameters(layer, seed)
    return layer.to(device) if device is not None else layer


@contextlib.contextmanager
def autocast_bf16(device_type: str = "cuda") -> Iterator[None]:
    """BF16 autocast as the recipe trains, without the autocast weight-cast cache: a cache filled outside a CUDA
    graph capture must not be read inside it (PyTorch's CUDA-graph notes), and eager and graphed steps then run the
    same kernels."""
    with torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False):
        yield


# ----------------------------------------------------------------------------------------------------------
# One step, eagerly and from a CUDA graph
# ----------------------------------------------------------------------------------------------------------
class StepResult(NamedTuple):
    """What one training step of a layer produced."""

    out: torch.Tensor
    x_grad: Optional[torch.Tensor]
    grads: Dict[str, Optional[torch.Tensor]]  # parameter name -> gradient (None where the step gave none)

    def clone(self) -> "StepResult":
        def c(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.detach().clone()

        return StepResult(c(self.out), c(self.x_grad), {n: c(g) for n, g in self.grads.items()})

    def tensors(self) -> Iterator[Tuple[str, Optional[torch.Tensor]]]:
        """``(name, tensor)``: the output, the input gradient, then each parameter gradient (``grad of <name>``)."""
        yield "output", self.out
        yield "input grad", self.x_grad
        for name, g in self.grads.items():
            yield f"grad of {name}", g


Params = Sequence[Tuple[str, nn.Parameter]]
Inputs = Tuple[torch.Tensor, torch.Tensor]  # (layer input, gradient of the layer output)


def _backward(out: torch.Tensor, grad_out: torch.Tensor) -> None:
    torch.autograd.backward(out, grad_out.to(out.dtype))


def eager_step(forward: Callable[[torch.Tensor], torch.Tensor], params: Params, x: torch.Tensor,
               grad_out: torch.Tensor) -> StepResult:
    """``out = forward(x)`` on a fresh leaf copy of ``x``, then the backward pass from ``grad_out``; parameter
    gradients are set to ``None`` first, so they hold this step's alone. Returns the step's own tensors (the
    parameters' ``.grad`` until the next step; clone to keep)."""
    for _, p in params:
        p.grad = None
    leaf = x.detach().clone().requires_grad_(True)
    out = forward(leaf)
    _backward(out, grad_out)
    return StepResult(out.detach(), leaf.grad, {name: p.grad for name, p in params})


class GraphedStep:
    """One training step of a layer -- ``out = forward(x)``, then the backward pass from ``grad_out`` -- captured
    in a CUDA graph and replayed on new inputs.

    Args:
        forward: ``x -> out``, the layer call with its autocast (see :func:`autocast_bf16`). It must read nothing
            from the GPU (no ``.item()``, no data-dependent shape): a read during the capture is an error.
        params: the ``(name, parameter)`` pairs whose gradients the step produces (``named_parameters()``).
        x: an example input; it is copied into :attr:`static_x` (a leaf that requires grad), which the graph reads.
        grad_out: an example gradient of ``out``; copied into :attr:`static_grad`, which the graph reads.
        warmup: eager steps run on a side stream before the capture, as PyTorch's recipe asks (they load the
            kernels and settle the caching allocator and the cuBLAS workspaces).
        barrier: called after the warm-up and after the capture (``torch.distributed.barrier`` when the ranks of a
            group capture together), so that the ranks enter the capture together.

    The parameters' (and ``static_x``'s) gradients are set to ``None`` before the capture, so the captured backward
    allocates them in the graph's memory pool instead of adding into earlier tensors: a replay *produces* the
    gradients, it does not accumulate them. After each :meth:`replay`, :attr:`out`, :attr:`x_grad` and
    :attr:`grads` hold that replay's results (the graph's own tensors, overwritten by the next replay: clone them
    to keep). An eager step in between rebinds the parameters' ``.grad`` attributes; :meth:`bind_grads` points them
    back at the graph's tensors (e.g. for an optimizer). In an expert-parallel group every rank must replay the same
    number of times, in the same order relative to its eager calls of the layer: the kernels pair calls across ranks.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], params: Params, x: torch.Tensor,
                 grad_out: torch.Tensor, *, warmup: int = 3, barrier: Optional[Callable[[], Any]] = None) -> None:
        if not (x.is_cuda and grad_out.is_cuda):
            raise ValueError("GraphedStep: x and grad_out must be CUDA tensors (a CUDA graph replays GPU work)")
        if warmup < 1:
            raise ValueError(f"GraphedStep: warmup must be >= 1 (PyTorch needs eager steps before a capture), "
                             f"got {warmup}")
        self.params = list(params)
        self.static_x = x.detach().clone().requires_grad_(True)
        self.static_grad = grad_out.detach().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._clear_grads()
                _backward(forward(self.static_x), self.static_grad)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        if barrier is not None:
            barrier()
        self._clear_grads()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = forward(self.static_x)
            _backward(out, self.static_grad)
        if barrier is not None:
            barrier()
        self.out: torch.Tensor = out.detach()
        self.x_grad: Optional[torch.Tensor] = self.static_x.grad
        self.grads: Dict[str, Optional[torch.Tensor]] = {name: p.grad for name, p in self.params}

    def _clear_grads(self) -> None:
        self.static_x.grad = None
        for _, p in self.params:
            p.grad = None

    def replay(self, x: Optional[torch.Tensor] = None, grad_out: Optional[torch.Tensor] = None) -> StepResult:
        """Copy ``x`` / ``grad_out`` (when given) into the static inputs and replay the step on the current stream;
        returns :meth:`result` (valid once the stream reaches it)."""
        with torch.no_grad():
            if x is not None:
                self.static_x.copy_(x)
            if grad_out is not None:
                self.static_grad.copy_(grad_out)
        self.graph.replay()
        return self.result()

    def result(self) -> StepResult:
        """The graph's output and gradient tensors (see the class docstring)."""
        return StepResult(self.out, self.x_grad, dict(self.grads))

    def bind_grads(self) -> None:
        """Point every parameter's ``.grad`` at the graph's gradient tensor."""
        for name, p in self.params:
            p.grad = self.grads[name]


def max_relative_difference(got: StepResult, want: StepResult) -> float:
    """Over every tensor of two steps: ``max |got - want| / max |want|`` (0 for tensors that are 0 in both; inf
    when one side has a tensor the other lacks or a value is not finite)."""
    worst = 0.0
    for (_, a), (_, b) in zip(got.tensors(), want.tensors()):
        if a is None or b is None:
            if (a is None) != (b is None):
                return math.inf
            continue
        if a.numel() == 0:
            continue
        diff = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item()
        if not (math.isfinite(diff) and math.isfinite(scale)):
            return math.inf
        if diff > 0:
            worst = max(worst, diff / scale if scale > 0 else math.inf)
    return worst


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def parse_tokens(text: str) -> List[int]:
    """``"256,1024"`` -> ``[256, 1024]``; ``ValueError`` unless every entry is a positive int."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"tokens must be comma-separated positive ints, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"tokens must be comma-separated positive ints, got {text!r}")
    return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The benchmark's options (``--help``); exits with a usage error for values the layer cannot take."""
    p = argparse.ArgumentParser(prog="python -m deepep_plugin.bench graph-moe",
                                description="A sync-free MoE layer's training step (forward + backward) replayed from "
                                            "a CUDA graph, against the same step run eagerly.")
    p.add_argument("--tokens", type=str, default="256,1024", help="comma-separated tokens per rank")
    p.add_argument("--ranks", type=int, default=2, help="EP ranks (processes; they share the GPUs there are)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--num-experts", type=int, default=64, help="routed experts over all ranks")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--groups", type=int, default=8, help="expert groups of the router (n_group)")
    p.add_argument("--topk-groups", type=int, default=4, help="groups a token may use (topk_group)")
    p.add_argument("--intermediate", type=int, default=512, help="hidden size of each expert (moe_intermediate_size)")
    p.add_argument("--shared-experts", type=int, default=1)
    p.add_argument("--num-sms", type=int, default=0, help="SMs of the normal kernels (0: Buffer.num_sms)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each timed series")
    p.add_argument("--iters", type=int, default=50, help="timed back-to-back steps per series")
    p.add_argument("--graph-warmup", type=int, default=3, help="eager steps before the capture")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="deepep_plugin's wait timeout (s)")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds the whole run may take")
    p.add_argument("--no-mps", action="store_true", help="do not start the MPS daemon when ranks share a GPU")
    p.add_argument("--json", type=str, default=DEFAULT_JSON, help="where the rows go ('' to skip)")
    p.add_argument("--results", type=str, default="", help="markdown file to append a section to ('' to skip)")
    p.add_argument("--command", type=str, default="", help="the command line to record in the results")
    args = p.parse_args(list(argv))
    try:
        args.tokens = parse_tokens(args.tokens)
    except ValueError as e:
        p.error(str(e))
    for name in ("ranks", "hidden", "num_experts", "topk", "groups", "topk_groups", "intermediate", "iters",
                 "graph_warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.shared_experts < 0:
        p.error("--warmup and --shared-experts must be >= 0")
    if args.num_sms < 0 or args.num_sms % 2:
        p.error(f"--num-sms must be an even number of SMs (or 0), got {args.num_sms}")
    if args.num_experts % args.ranks:
        p.error(f"--num-experts ({args.num_experts}) must be a multiple of --ranks ({args.ranks})")
    if args.num_experts % args.groups or args.topk_groups > args.groups:
        p.error(f"--groups ({args.groups}) must divide --num-experts ({args.num_experts}) and be >= --topk-groups "
                f"({args.topk_groups})")
    if args.topk > args.topk_groups * (args.num_experts // args.groups):
        p.error(f"--topk ({args.topk}) exceeds the experts of --topk-groups ({args.topk_groups}) groups")
    if args.hidden % 8 or args.intermediate % 8:
        p.error("--hidden and --intermediate must be multiples of 8 (the grouped GEMM's alignment)")
    return args


# ----------------------------------------------------------------------------------------------------------
# Measuring (inside a rank)
# ----------------------------------------------------------------------------------------------------------
def time_steps(step: Callable[[], Any], warmup: int, iters: int,
               barrier: Optional[Callable[[], Any]] = None) -> Tuple[float, float]:
    """``(median GPU us, median host us)`` per call of ``step`` over ``iters`` back-to-back calls, CUDA events
    recorded around each (the host runs ahead of the GPU where the step lets it), after ``warmup`` calls."""
    from .common import runahead_us

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    if barrier is not None:
        barrier()
    return runahead_us(step, iters)


def _measure(layer: nn.Module, args: argparse.Namespace, tokens: int, rank: int, world: int,
             barrier: Callable[[], Any]) -> dict:
    """One row (this rank's) for ``tokens`` tokens per rank."""
    dev = next(layer.parameters()).device
    g = torch.Generator().manual_seed(args.seed * 1000 + 17 * rank + tokens)
    inputs = [(torch.randn(tokens, args.hidden, generator=g).to(dev),
               torch.randn(tokens, args.hidden, generator=g).to(dev, torch.bfloat16)) for _ in range(2)]
    params = list(layer.named_parameters())

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast_bf16():
            return layer(x)

    sync_free_ep = layer.ep
    layer.ep = dataclasses.replace(sync_free_ep, sync_free=False)
    try:
        eager_sync = time_steps(lambda: eager_step(forward, params, *inputs[0]), args.warmup, args.iters, barrier)
    finally:
        layer.ep = sync_free_ep
    eager = time_steps(lambda: eager_step(forward, params, *inputs[0]), args.warmup, args.iters, barrier)
    replayed, diff = _replayed(forward, params, inputs, args, barrier)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the graph's pool is free again
    return {"tokens": tokens, "worst_tokens": tokens * world, "eager_sync_us": eager_sync[0], "eager_us": eager[0],
            "graph_us": replayed[0], "host_eager_sync_us": eager_sync[1], "host_eager_us": eager[1],
            "host_graph_us": replayed[1], "max_rel_diff": diff}


def _replayed(forward: Callable[[torch.Tensor], torch.Tensor], params: Params, inputs: Sequence[Inputs],
              args: argparse.Namespace, barrier: Callable[[], Any]) -> Tuple[Tuple[float, float], float]:
    """Capture the step on ``inputs[0]``; ``((median GPU us, median host us) per replay, the replay's difference
    from eager on ``inputs[1]``, other inputs than the capture's, with another routing)``."""
    graph = GraphedStep(forward, params, *inputs[0], warmup=args.graph_warmup, barrier=barrier)
    times = time_steps(lambda: graph.replay(*inputs[0]), args.warmup, args.iters, barrier)
    got = graph.replay(*inputs[1]).clone()
    want = eager_step(forward, params, *inputs[1]).clone()
    torch.cuda.synchronize()
    return times, max_relative_difference(got, want)


def _worker(rank: int, world: int, args: argparse.Namespace) -> Optional[Tuple[List[dict], dict]]:
    """One rank (GPU and gloo group set up by ``spawn_ranks``): this rank's rows, merged on rank 0."""
    import torch.distributed as dist

    import deepep_plugin
    from deepep_plugin.config import set_timeout_s

    from .common import rank_device

    dev = rank_device()
    set_timeout_s(args.timeout)
    if args.num_sms:
        deepep_plugin.Buffer.set_num_sms(args.num_sms)
    buffer = deepep_plugin.Buffer.sized_for(dist.group.WORLD, args.hidden * 2, backend="cuda")
    cfg = moe_config(args.hidden, args.num_experts, args.topk, args.groups, args.topk_groups, args.intermediate,
                     args.shared_experts)
    layer = plain_moe_layer(cfg, buffer, rank, world, sync_free=True, seed=args.seed, device=dev)
    with autocast_bf16():
        probe = torch.zeros(1, args.hidden, device=dev)
        if not layer.experts.use_grouped_gemm(probe):
            raise RuntimeError(f"graph-moe: the experts cannot run as grouped GEMMs on "
                               f"{torch.cuda.get_device_name(dev)} (torch._grouped_mm needs an sm90+ GPU and BF16), "
                               "so the layer is not sync-free")
    rows = []
    for tokens in args.tokens:
        row = _measure(layer, args, tokens, rank, world, dist.barrier)
        rows.append(row)
        if rank == 0:
            print(f"graph-moe: T={tokens} eager(host sync) {row['eager_sync_us']:.0f} us, eager {row['eager_us']:.0f}"
                  f" us, graph {row['graph_us']:.0f} us (rank 0)", flush=True)
    buffer.runtime.check_error()
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    dist.barrier()
    if rank != 0:
        return None
    meta = {"device": torch.cuda.get_device_name(dev), "gpus": torch.cuda.device_count(),
            "num_sms": deepep_plugin.Buffer.num_sms,
            "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))}
    return merge_ranks(gathered), meta


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------
def merge_ranks(gathered: Sequence[Sequence[dict]]) -> List[dict]:
    """One row per token count from every rank's rows (same order on every rank): times are the slowest rank's,
    host costs the mean over ranks, ``max_rel_diff`` the largest; adds ``speedup`` (eager / graph)."""
    merged = []
    for per_rank in zip(*gathered):
        row = dict(per_rank[0])
        for key in TIME_KEYS:
            row[key] = max(r[key] for r in per_rank)
        for key in HOST_KEYS:
            row[key] = sum(r[key] for r in per_rank) / len(per_rank)
        row["max_rel_diff"] = max(r["max_rel_diff"] for r in per_rank)
        row["speedup"] = row["eager_us"] / row["graph_us"] if row["graph_us"] > 0 else math.nan
        merged.append(row)
    return merged


def table(rows: Sequence[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| tokens/rank | worst rows | eager, host sync (us) | eager (us) | graph replay (us) | eager / replay "
             "| host us per step: eager, host sync / eager / replay | replay vs eager |",
             "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['worst_tokens']} | {r['eager_sync_us']:.0f} | {r['eager_us']:.0f} | "
                     f"{r['graph_us']:.0f} | {r['speedup']:.2f}x | {r['host_eager_sync_us']:.0f} / "
                     f"{r['host_eager_us']:.0f} / {r['host_graph_us']:.0f} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def results_document(rows: Sequence[dict], args: argparse.Namespace, meta: dict, command: str,
                     date: Optional[str] = None) -> dict:
    """The JSON document: ``{"rows", "device", "date", "command", "ranks", "gpus", "mps", "layer"}``."""
    layer = {"hidden": args.hidden, "num_experts": args.num_experts, "topk": args.topk, "groups": args.groups,
             "topk_groups": args.topk_groups, "intermediate": args.intermediate, "shared_experts": args.shared_experts,
             "num_sms": meta.get("num_sms"), "iters": args.iters}
    return {"rows": list(rows), "device": meta.get("device", "?"),
            "date": date or datetime.datetime.now().isoformat(timespec="minutes"), "command": command,
            "ranks": args.ranks, "gpus": meta.get("gpus"), "mps": meta.get("mps"), "layer": layer}


def markdown(doc: dict) -> str:
    """A RESULTS.md section for the document of :func:`results_document`."""
    lay = doc["layer"]
    shared = doc["gpus"] is not None and doc["ranks"] > doc["gpus"]
    title = (f"## Sync-free MoE layer, CUDA-graph replay against eager: EP{doc['ranks']} on {doc['gpus']}x "
             f"{doc['device']} ({doc['date']})")
    text = [title, "",
            f"Command: `{doc['command']}`. The plain recipe's MoE layer: hidden {lay['hidden']}, {lay['num_experts']} "
            f"routed experts top-{lay['topk']} within {lay['topk_groups']}/{lay['groups']} groups, expert hidden "
            f"{lay['intermediate']}, {lay['shared_experts']} shared; BF16 autocast, fp32 parameters, intranode "
            f"kernels with {lay['num_sms']} SMs, `num_worst_tokens` = tokens x ranks. One step = forward + backward "
            "(input and parameter gradients). Median of CUDA-event times around each of "
            f"{lay['iters']} back-to-back steps, slowest rank; host = Python time per step (mean of ranks). "
            "'replay vs eager': largest difference of output and gradients relative to the largest value, on inputs "
            "other than the capture's (float atomics in the permutation's sums make it nonzero)."]
    if shared:
        how = "concurrently under MPS" if doc["mps"] else "time-sliced (no MPS)"
        text += ["", f"Note: {doc['ranks']} processes share {doc['gpus']} GPU(s) and run {how}: the ranks share one "
                 "GPU's SMs and HBM, so the times measure the layer's kernels and launches, not NVLink."]
    text += ["", table(doc["rows"]), ""]
    return "\n".join(text)


def main(argv: Sequence[str]) -> None:
    """Run the benchmark (module docstring); ``argv`` are the arguments after ``graph-moe``."""
    args = parse_args(argv)
    from .common import spawn_ranks
    from .compare import _gpu_count, _Mps

    gpus = _gpu_count()
    if gpus == 0:
        raise SystemExit("graph-moe: needs CUDA GPUs (nvidia-smi lists none)")
    try:
        _recipe()
    except ImportError as e:
        raise SystemExit(str(e)) from None
    mps = _Mps()
    try:
        if args.ranks > gpus and not args.no_mps:
            mps.start()
        rows, meta = spawn_ranks(_worker, args.ranks, args, "graph-moe", timeout=args.run_timeout)
    finally:
        mps.stop()
    command = args.command or "python -m deepep_plugin.bench graph-moe " + " ".join(argv)
    doc = results_document(rows, args, meta, command)
    section = markdown(doc)
    print(section)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"graph-moe: {len(rows)} rows -> {args.json}", flush=True)
    if args.results:
        os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
        with open(args.results, "a") as f:
            f.write("\n" + section)
        print(f"graph-moe: appended to {args.results}", flush=True)
