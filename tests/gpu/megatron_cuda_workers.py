"""Per-process bodies of ``test_megatron_cuda.py``: real megatron-core ``MoELayer``s served by deepep_plugin's
CUDA backend, against Megatron's own ``alltoall`` dispatcher on the same device.

Every worker is ``fn(rank, world_size, *, ..., seed, device="cuda", plugin_backend="cuda")`` (keyword arguments;
``backend`` would name ``run_distributed``'s process-group backend): the defaults are the GPU test; ``device="cpu"``
with ``plugin_backend="reference"`` runs the very same body on a CPU-only machine (with
``megatron_shims.apply_cpu_shims``), which is how this file is checked without a GPU.

The oracle runs on the GPU too: gloo carries CUDA tensors in every collective Megatron's alltoall path makes
(``all_to_all_single``, ``all_gather_into_tensor`` and ``all_reduce`` stage them through host memory), so both
layers see the same device, the same kernels for routing and experts, and the same inputs. TF32 is off.

What is compared, per rank: the layer output, the input gradient and every parameter gradient (router and each
local expert's fc1/fc2). Which runtime moved the tokens is recorded (:class:`Traffic`) and checked, so a silent
fallback to the reference backend fails the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import megatron_shims as shims
import torch

WORLD = 2
NUM_EXPERTS = 8
TOPK = {"default": 2, "deepseek_v3": 4}
#: Tokens per rank as [S, B]: unequal, so the ranks send and receive different amounts, and more tokens than the
#: kernels have channels (10 with Megatron's default 20 SMs), so every channel carries some.
SHAPES = {0: (33, 4), 1: (17, 5)}

#: fp32 against fp32 on one device, TF32 off. The expert GEMMs see the same rows in the same order in both layers
#: (tokens grouped by local expert, then source rank, then token index); what differs is the order of additions: a
#: token's weighted expert outputs are summed per rank and then over ranks instead of in one scatter-add (whose
#: order on the GPU is that of its atomics). Every compared value is a sum of a few terms of magnitude <= 2, so a
#: reordering moves it by a few fp32 ulps of 1 (~1e-7; on the CPU the largest difference is 7e-9 at values ~0.1).
#: 1e-6 absolute + 1e-5 relative keeps a margin of 10 and still fails on a 1e-4 relative change of one weight.
FP32_TOL = dict(atol=1e-6, rtol=1e-5)
#: bf16 layers: the plugin rounds each rank's partial sum to bf16 before the cross-rank sum (FP32 accumulation in
#: the combine kernel, one rounding at the end), Megatron's scatter-add rounds after every addition; either side
#: is within a few bf16 ulps (2**-8 relative) of the exact sum. Bound: 2**-5 of the tensor's largest magnitude.
BF16_REL = 2.0 ** -5
#: FP8 dispatch: every element is rounded to E4M3 (3 mantissa bits: at most 2**-4 relative) and fc1 mixes 256 such
#: errors; the output and input gradient stay within 10% of the largest fp32 value (~3% observed, as on the CPU).
FP8_REL = 0.1


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer configuration.

    Attributes:
        mode: the plugin mode, ``"compat"`` or ``"dispatcher"``.
        style: the router, ``"default"`` (softmax top-2, aux loss) or ``"deepseek_v3"`` (sigmoid, expert bias,
            8 groups of which 4 kept, scaling 2.5, top-4), as ``megatron_shims.moe_config``.
        dtype: ``"float32"`` or ``"bfloat16"`` (parameters, activations and dispatched tokens).
        idle_rank: steer every token to rank 0's experts through the expert bias (``deepseek_v3`` only), so
            rank 1 receives no token at all.
        hidden: hidden size (a multiple of 128 for FP8 dispatch).
    """

    mode: str
    style: str = "default"
    dtype: str = "float32"
    idle_rank: bool = False
    hidden: int = 64

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Set-up


def setup_device(rank: int, device: str) -> torch.device:
    """Select this rank's device and patch what Megatron needs there; returns the device the layers run on."""
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())  # one shared GPU: both ranks on device 0
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        shims.apply_gpu_shims()
        return torch.device("cuda", torch.cuda.current_device())
    if device != "cpu":
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    shims.apply_cpu_shims()
    return torch.device("cpu")


def tokens(rank: int, seed: int, case: Case, device: torch.device) -> torch.Tensor:
    """``[S, B, H]`` standard-normal tokens of this rank (drawn on the CPU, so every device gets the same)."""
    s, b = SHAPES[rank]
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randn(s, b, case.hidden, generator=g).to(device, case.torch_dtype)


def build_layer(case: Case, dispatcher: str, device: torch.device, *, seed: int = 0,
                state_dict: Optional[dict] = None, **overrides: Any):
    """A ``MoELayer`` with ``dispatcher`` ("alltoall" or "flex"), built on the CPU then moved to ``device``."""
    kw: Dict[str, Any] = dict(style=case.style, hidden_size=case.hidden, ffn_hidden_size=2 * case.hidden,
                              num_experts=NUM_EXPERTS, topk=TOPK[case.style])
    if case.dtype == "bfloat16":
        kw.update(bf16=True, params_dtype=torch.bfloat16)
    if dispatcher == "flex":
        kw.update(moe_flex_dispatcher_backend="deepep")
    kw.update(overrides)
    layer = shims.build_moe_layer(shims.moe_config(dispatcher, **kw), seed=seed, state_dict=state_dict)
    return layer.to(device)


Step = Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]


def step(layer: Any, x: torch.Tensor, seed: int) -> Step:
    """One forward and backward on a fresh leaf copy of ``x`` with a seeded random output gradient.

    Returns CPU copies of (output ``[S, B, H]``, input gradient ``[S, B, H]``, ``{parameter name: gradient}``).
    """
    x = x.detach().clone().requires_grad_(True)
    out, bias = layer(x)
    assert bias is None
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 7)).to(out.device, out.dtype)
    (out * g).sum().backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in layer.named_parameters()}
    return out.detach().cpu(), x.grad.detach().cpu(), grads


# ---------------------------------------------------------------------------------------------------------------
# Which runtime moved the tokens


@dataclasses.dataclass
class Traffic:
    """What went through deepep_plugin while recording: the ``Buffer``s built and each runtime call.

    ``calls`` holds ``(runtime, op, dtype)`` with runtime ``"kernel"`` (``IntranodeRuntime``, the CUDA kernels)
    or ``"reference"`` (``ReferenceBackend``, also the CUDA backend's fallback), op ``"dispatch"`` (cached
    dispatches included) or ``"combine"``, and the dtype of the rows moved.
    """

    buffers: List[Any] = dataclasses.field(default_factory=list)
    calls: List[Tuple[str, str, torch.dtype]] = dataclasses.field(default_factory=list)

    def count(self, runtime: str, op: str, dtype: Optional[torch.dtype] = None) -> int:
        return sum(1 for r, o, d in self.calls if r == runtime and o == op and (dtype is None or d == dtype))

    def check(self, backend: str, rank: int, *, combine_on_kernel: bool, dispatch_dtype: torch.dtype) -> None:
        """Every Buffer runs ``backend``; with "cuda", every dispatch (the forward one and the cached one in the
        backward of combine) ran on the kernels, and so did every combine when ``combine_on_kernel``."""
        assert self.buffers, f"rank {rank}: the layer built no deepep_plugin.Buffer"
        names = sorted({b.backend_name for b in self.buffers})
        assert names == [backend], f"rank {rank}: Buffer backends {names}, expected [{backend!r}]"
        if backend == "cuda":
            assert all(b.runtime.intranode is not None for b in self.buffers), \
                f"rank {rank}: a CUDA Buffer has no intranode runtime (NVLink buffer not allocated)"
            assert self.count("kernel", "dispatch", dispatch_dtype) >= 1, (rank, self.calls)
            assert self.count("kernel", "dispatch") >= 2, (rank, self.calls)  # + the backward of combine
            assert self.count("reference", "dispatch") == 0, (rank, self.calls)
            if combine_on_kernel:
                assert self.count("kernel", "combine") >= 2, (rank, self.calls)  # + the backward of dispatch
                assert self.count("reference", "combine") == 0, (rank, self.calls)
        else:
            assert self.count("reference", "dispatch", dispatch_dtype) >= 1, (rank, self.calls)
            assert self.count("reference", "combine") >= 2, (rank, self.calls)


@contextlib.contextmanager
def recording() -> Iterator[Traffic]:
    """Record (see :class:`Traffic`) by wrapping the runtimes' methods in this process; restored on exit."""
    import deepep_plugin
    from deepep_plugin.backends.cuda_intranode import IntranodeRuntime
    from deepep_plugin.backends.reference import ReferenceBackend

    traffic = Traffic()
    saved: List[Tuple[type, str, Callable[..., Any]]] = []

    def wrap(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        original = cls.__dict__[name]
        saved.append((cls, name, original))
        setattr(cls, name, make(original))

    def counted(runtime: str, op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def method(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                traffic.calls.append((runtime, op, x.dtype))
                return original(self, x, *args, **kwargs)
            return method
        return make

    def recorded_init(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            traffic.buffers.append(self)
        return __init__

    wrap(deepep_plugin.Buffer, "__init__", recorded_init)
    for cls, runtime in ((IntranodeRuntime, "kernel"), (ReferenceBackend, "reference")):
        for op in ("dispatch", "combine"):
            wrap(cls, op, counted(runtime, op))
    try:
        yield traffic
    finally:
        for cls, name, original in reversed(saved):
            setattr(cls, name, original)


# ---------------------------------------------------------------------------------------------------------------
# Comparisons


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rank: int, dtype: str) -> None:
    """fp32: elementwise ``FP32_TOL``; bf16: max abs difference <= ``BF16_REL`` x the largest magnitude."""
    assert got.shape == want.shape, f"rank {rank}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"rank {rank}: {name} dtype {got.dtype} != {want.dtype}"
    if got.numel() == 0:
        return
    if dtype == "float32":
        torch.testing.assert_close(got, want, **FP32_TOL,
                                   msg=lambda m: f"rank {rank}: {name} differs from Megatron's alltoall: {m}")
        return
    diff = (got.float() - want.float()).abs().max().item()
    bound = BF16_REL * want.float().abs().max().item()
    assert diff <= bound, f"rank {rank}: {name} differs from Megatron's alltoall by {diff:.3e} (> {bound:.3e})"


def assert_steps_match(got: Step, want: Step, rank: int, dtype: str) -> None:
    assert_close("output", got[0], want[0], rank, dtype)
    assert_close("input grad", got[1], want[1], rank, dtype)
    assert got[2].keys() == want[2].keys(), (sorted(got[2]), sorted(want[2]))
    for name in want[2]:
        assert_close(f"grad of {name}", got[2][name], want[2][name], rank, dtype)


def _assert_plugin_serves(layer: Any, mode: str) -> None:
    from megatron.core.transformer.moe import token_dispatcher

    from deepep_plugin.integrations.megatron import DeepEPPluginTokenDispatcher

    expected = token_dispatcher.MoEFlexTokenDispatcher if mode == "compat" else DeepEPPluginTokenDispatcher
    assert type(layer.token_dispatcher) is expected, type(layer.token_dispatcher)


# ---------------------------------------------------------------------------------------------------------------
# Workers


def parity_worker(rank: int, world_size: int, *, case: Case, seed: int, device: str = "cuda",
                  plugin_backend: str = "cuda") -> None:
    """A flex layer served by the plugin (``case.mode``, ``plugin_backend``) equals Megatron's alltoall layer."""
    from deepep_plugin.integrations import megatron as dpm

    dev = setup_device(rank, device)
    os.environ["DEEPEP_PLUGIN_BACKEND"] = plugin_backend  # what every Buffer the layer builds runs on
    shims.init_megatron_parallel(world_size)
    ref = build_layer(case, "alltoall", dev, seed=seed)
    if case.idle_rank:
        with torch.no_grad():  # the bias steers selection only: -100 on rank 1's experts sends all tokens to rank 0
            ref.router.expert_bias[NUM_EXPERTS // world_size:] = -100.0
    x = tokens(rank, seed, case, dev)
    want = step(ref, x, seed)

    with recording() as traffic:
        dpm.enable(None, mode=case.mode)
        try:
            layer = build_layer(case, "flex", dev, state_dict=ref.state_dict())
            _assert_plugin_serves(layer, case.mode)
            got = step(layer, x, seed)
        finally:
            dpm.disable()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    traffic.check("reference" if plugin_backend == "reference" else "cuda", rank,
                  combine_on_kernel=case.dtype == "bfloat16", dispatch_dtype=case.torch_dtype)
    assert_steps_match(got, want, rank, case.dtype)
    if case.idle_rank:
        expert_grads = [g for n, g in got[2].items() if "local_experts" in n]
        received = [bool(g.abs().sum() > 0) for g in expert_grads]
        assert received == [rank == 0] * len(expert_grads), f"rank {rank}: expert grads non-zero: {received}"


def fp8_worker(rank: int, world_size: int, *, seed: int, device: str = "cuda", plugin_backend: str = "cuda") -> None:
    """Dispatcher mode with ``fp8_dispatch``: the experts see exactly the per-token FP8 round trip of the rows the
    unquantised run gives them, and the layer stays within FP8 error of Megatron's alltoall layer."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from deepep_plugin import fp8
    from deepep_plugin.integrations import megatron as dpm

    dev = setup_device(rank, device)
    os.environ["DEEPEP_PLUGIN_BACKEND"] = plugin_backend
    shims.init_megatron_parallel(world_size)
    case = Case(mode="dispatcher", hidden=256)
    ref = build_layer(case, "alltoall", dev, seed=seed)
    x = tokens(rank, seed, case, dev)
    want = step(ref, x, seed)

    seen: List[torch.Tensor] = []
    original = SequentialMLP.forward

    def forward(self: Any, rows: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor) -> Any:
        seen.append(rows.detach().clone())
        return original(self, rows, tokens_per_expert, probs)

    runs = []
    SequentialMLP.forward = forward
    try:
        for use_fp8 in (False, True):
            with recording() as traffic:
                dpm.enable(None, mode="dispatcher", fp8_dispatch=use_fp8)
                try:
                    layer = build_layer(case, "flex", dev, state_dict=ref.state_dict())
                    runs.append(step(layer, x, seed))
                finally:
                    dpm.disable()
            traffic.check("reference" if plugin_backend == "reference" else "cuda", rank, combine_on_kernel=False,
                          dispatch_dtype=torch.float8_e4m3fn if use_fp8 else torch.float32)
    finally:
        SequentialMLP.forward = original
    plain_rows, fp8_rows = seen
    q, s = fp8.per_token_cast_to_fp8(plain_rows)
    expected_rows = fp8.per_token_cast_back(q, s, dtype=plain_rows.dtype)
    assert torch.equal(fp8_rows, expected_rows), f"rank {rank}: the experts did not see the FP8 round trip"
    assert not torch.equal(fp8_rows, plain_rows)
    assert_steps_match(runs[0], want, rank, "float32")  # the unquantised run is the plain parity case
    (out, xg, _), (want_out, want_xg, _) = runs[1], want
    for name, got_t, want_t in (("output", out, want_out), ("input grad", xg, want_xg)):
        diff = (got_t - want_t).abs().max().item()
        bound = FP8_REL * want_t.abs().max().item()
        assert diff <= bound, f"rank {rank}: FP8 {name} differs from Megatron's alltoall by {diff:.3e} > {bound:.3e}"
