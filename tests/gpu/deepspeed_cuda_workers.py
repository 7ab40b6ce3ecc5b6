"""Per-process bodies of the DeepSpeed GPU parity tests (``tests/gpu/test_deepspeed_cuda.py``).

Each worker runs as ``fn(rank, world_size, **kwargs)`` inside ``dist_utils.run_distributed`` over one gloo group
(both processes may share one GPU, which NCCL refuses). Every process builds DeepSpeed's ``MoE`` (EP = 2,
8 experts, 4 per rank, hidden 64; every expert distinct, see ``deepspeed_harness.build_moe``) as the oracle and an
identical copy whose ``MOELayer`` is swapped for the plugin's ``DeepEPMOELayer`` with ``"backend": "cuda"``, runs
forward and backward of ``(out * r).sum() + 0.1 * l_aux`` through both and compares the output, the input gradient,
every parameter gradient (gate and local experts), ``l_aux`` and ``exp_counts``.

DeepSpeed on a GPU machine, in this setting:

* ``DS_ACCELERATOR`` is fixed before DeepSpeed is first imported in the process (it picks its accelerator then):
  ``cuda`` for a GPU run, ``cpu`` for a CPU run. Nothing imports DeepSpeed at module level here, so the choice
  is made in :func:`setup`, whatever the parent process (or ``deepspeed_harness``) put in the environment.
* ``deepspeed.init_distributed(dist_backend="gloo")`` wraps the gloo group ``run_distributed`` created (it does
  not create one). With the ``cuda`` accelerator it builds no op at all (its ``ShareMemCommBuilder`` exists only
  for the ``cpu`` accelerator, which JIT-compiles it), so a pure-Python DeepSpeed wheel (``DS_BUILD_OPS=0``) works.
* DeepSpeed's MoE all-to-all (``_AllToAll`` -> ``deepspeed.comm.all_to_all_single``) and the MAX all-reduce of
  its dropless capacity reach torch's ``ProcessGroupGloo`` with CUDA tensors, which stages them through pinned
  host memory (``AsyncAlltoallCUDAWork``), so DeepSpeed's own layer runs on the GPU as the oracle.
  ``oracle_device="cpu"`` runs it on the CPU instead (same weights, results compared on the CPU).

TF32 is off, so both layers compute in IEEE float32. The routing is deterministic (no Gumbel sampling of the
second expert), so both layers route every token identically even when the oracle runs on another device.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any, Dict, NamedTuple, Optional, Tuple

import deepspeed_harness as h
import torch
import torch.distributed as dist

HIDDEN, FFN, EXPERTS = 64, 96, 8
#: Tokens per rank ([B, S] before flattening). DeepSpeed's capacity mode sizes its all-to-all from the local
#: count, so it needs equal counts; its dropless mode and the plugin take any counts.
EQUAL_SHAPES = {0: (4, 40), 1: (4, 40)}
UNEQUAL_SHAPES = {0: (4, 48), 1: (3, 40)}


# ------------------------------------------------------------------------------------------------------------
# Process setup
# ------------------------------------------------------------------------------------------------------------
def setup(rank: int, device: str) -> torch.device:
    """Bind this process to its device, choose DeepSpeed's accelerator, bind ``deepspeed.comm`` to the gloo group.

    Args:
        rank: this process's rank (GPU ``rank % device_count`` is used).
        device: ``"cuda"`` or ``"cpu"``: where the plugin layer runs (and DeepSpeed's accelerator).

    Returns:
        The device of the plugin layer.
    """
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.environ["DS_ACCELERATOR"] = dev.type
    if "deepspeed" in sys.modules:  # only when a forked worker inherits an imported DeepSpeed
        from deepspeed.accelerator import get_accelerator

        assert get_accelerator().device_name() == dev.type, (
            f"DeepSpeed was imported with accelerator {get_accelerator().device_name()!r} before this worker "
            f"could choose {dev.type!r}; run the worker with start_method='spawn'")
    h.init_deepspeed_comm()
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == dev.type, get_accelerator().device_name()
    return dev


class CallLog:
    """Counts the ``dispatch`` / ``combine`` calls that reach each runtime class of the ``Buffer`` backends.

    ``CallLog(backend)`` wraps the methods of ``ReferenceBackend`` (the PyTorch path) and, for ``"cuda"``, of
    ``IntranodeRuntime`` (the NVLink kernels): after it, ``calls["IntranodeRuntime.dispatch"]`` is the number of
    dispatches the kernels ran in this process. The wrappers stay for the life of the (spawned) process.
    """

    def __init__(self, backend: str) -> None:
        from deepep_plugin.backends.reference import ReferenceBackend

        self.calls: Counter = Counter()
        classes: list = [ReferenceBackend]
        if backend == "cuda":
            from deepep_plugin.backends.cuda_intranode import IntranodeRuntime

            classes.append(IntranodeRuntime)
        for cls in classes:
            for op in ("dispatch", "combine"):
                setattr(cls, op, self._counted(getattr(cls, op), f"{cls.__name__}.{op}"))

    def _counted(self, method: Any, key: str) -> Any:
        def counted(runtime: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls[key] += 1
            return method(runtime, *args, **kwargs)

        return counted


def expected_calls(backend: str, dtype: torch.dtype) -> Counter:
    """Runtime calls of one forward + backward of the plugin layer with EP = 2.

    Dispatch runs twice (the forward, and the backward of combine: a cached dispatch of the gradient) and so
    does combine (the forward, and the backward of dispatch). With ``"cuda"`` the NVLink kernels run every
    dispatch; they combine BF16 rows only, so float32 rows are combined by the reference path of the CUDA
    backend (``CudaBackend.combine``: host copies over gloo).
    """
    if backend == "reference":
        return Counter({"ReferenceBackend.dispatch": 2, "ReferenceBackend.combine": 2})
    combine = "IntranodeRuntime.combine" if dtype == torch.bfloat16 else "ReferenceBackend.combine"
    return Counter({"IntranodeRuntime.dispatch": 2, combine: 2})


def check_plugin_backend(log: CallLog, backend: str, dtype: torch.dtype) -> None:
    """The plugin layer built one ``Buffer`` with ``backend`` and its calls took the expected runtimes."""
    from deepep_plugin.integrations.deepspeed import buffers

    names = [entry.buffer.backend_name for entry in buffers._BUFFERS.values()]
    assert names == [backend], f"the plugin layer's Buffer backends are {names}, expected [{backend!r}]"
    want = expected_calls(backend, dtype)
    assert log.calls == want, f"runtime calls {dict(log.calls)} != {dict(want)}"


# ------------------------------------------------------------------------------------------------------------
# Layers and one training step
# ------------------------------------------------------------------------------------------------------------
def build(rank: int, k: int, seed: int, device: torch.device, backend: Optional[str], **moe_kwargs: Any):
    """DeepSpeed's ``MoE`` on ``device``, bound to the EP group; with ``backend`` its layer runs the plugin."""
    from deepep_plugin.integrations import deepspeed as ep_ds

    moe = h.build_moe(HIDDEN, FFN, EXPERTS, dist.get_world_size(), k, seed, rank, **moe_kwargs).to(device)
    moe.set_deepspeed_parallelism()
    if backend is None:
        assert type(moe.deepspeed_moe).__name__ == "MOELayer"
    else:
        names = ep_ds.apply(moe, {"deepep_plugin": {"enabled": True, "backend": backend}})
        assert names == ["deepspeed_moe"], names
    return moe


def tokens(rank: int, seed: int, shape: Tuple[int, int]) -> torch.Tensor:
    """``[B, S, HIDDEN]`` float32 CPU tokens of ``rank``, seeded."""
    g = torch.Generator().manual_seed(seed * 31 + rank)
    return torch.randn(*shape, HIDDEN, generator=g)


class StepResult(NamedTuple):
    """One forward + backward, every tensor moved to the CPU (``device`` is where ``out`` was computed)."""

    out: torch.Tensor
    l_aux: torch.Tensor
    exp_counts: torch.Tensor
    x_grad: torch.Tensor
    grads: Dict[str, torch.Tensor]
    device: torch.device


def step(moe: torch.nn.Module, x: torch.Tensor, seed: int) -> StepResult:
    """Forward + backward of ``(out * r).sum() + 0.1 * l_aux`` on ``x``'s device (``r`` float32, seeded)."""
    x = x.clone().requires_grad_(True)
    out, l_aux, exp_counts = moe(x)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.device)
    ((out * r).sum() + 0.1 * l_aux).backward()
    grads = {n: g.cpu() for n, g in h.grads_of(moe).items()}
    return StepResult(out.detach().cpu(), l_aux.detach().cpu(), exp_counts.cpu(), x.grad.cpu(), grads, out.device)


# ------------------------------------------------------------------------------------------------------------
# Workers
# ------------------------------------------------------------------------------------------------------------
def float32_worker(rank: int, world: int, *, k: int, seed: int, device: str = "cuda", plugin_backend: str = "cuda",
                   oracle_device: Optional[str] = None, rel: float = 3e-5) -> None:
    """Float32, DeepSpeed's default capacity mode with a capacity no expert can overflow (factor = E), equal
    token counts. Every quantity agrees with DeepSpeed's within ``rel`` of its largest magnitude (the layers
    sum a token's expert outputs in different orders and run the experts on differently shaped batches)."""
    dev = setup(rank, device)
    oracle = torch.device(oracle_device) if oracle_device else dev
    log = CallLog(plugin_backend)
    kwargs = dict(capacity_factor=float(EXPERTS), drop_tokens=True, min_capacity=0, top2_2nd_expert_sampling=False)
    ref = build(rank, k, seed, oracle, None, **kwargs)
    mine = build(rank, k, seed, dev, plugin_backend, **kwargs)
    x = tokens(rank, seed, EQUAL_SHAPES[rank])

    want = step(ref, x.to(oracle), seed)
    got = step(mine, x.to(dev), seed)

    assert got.device == dev and want.device == oracle, (got.device, want.device)
    check_plugin_backend(log, plugin_backend, torch.float32)
    assert got.out.dtype == torch.float32
    quantities = [("output", got.out, want.out), ("input gradient", got.x_grad, want.x_grad)]
    assert got.grads.keys() == want.grads.keys()
    quantities += [(f"gradient of {n}", got.grads[n], want.grads[n]) for n in want.grads]
    for what, mine_v, ref_v in quantities:
        atol = rel * max(ref_v.abs().max().item(), 1.0)
        h.assert_close(mine_v, ref_v, f"rank {rank} {what}", atol=atol, rtol=rel)
    h.assert_close(got.l_aux, want.l_aux, f"rank {rank} l_aux", atol=1e-6, rtol=1e-5)
    assert got.exp_counts.dtype == want.exp_counts.dtype == torch.int64
    assert torch.equal(got.exp_counts, want.exp_counts), \
        f"rank {rank} exp_counts {got.exp_counts.tolist()} != {want.exp_counts.tolist()}"


def bfloat16_worker(rank: int, world: int, *, k: int, seed: int, device: str = "cuda", plugin_backend: str = "cuda",
                    oracle_device: Optional[str] = None) -> None:
    """BF16 model, DeepSpeed's dropless mode, unequal token counts. The two BF16 layers round at different
    points, so each is measured against DeepSpeed in float32 on the same BF16 tokens: the plugin's error must stay
    within twice DeepSpeed's own BF16 error plus ``2^-8`` of the quantity's largest magnitude. ``l_aux`` and
    ``exp_counts`` equal DeepSpeed's BF16 layer's."""
    dev = setup(rank, device)
    oracle = torch.device(oracle_device) if oracle_device else dev
    log = CallLog(plugin_backend)
    kwargs = dict(drop_tokens=False, top2_2nd_expert_sampling=False)
    exact = build(rank, k, seed, oracle, None, **kwargs)
    ref = build(rank, k, seed, oracle, None, **kwargs).to(torch.bfloat16)
    mine = build(rank, k, seed, dev, plugin_backend, **kwargs).to(torch.bfloat16)
    x = tokens(rank, seed, UNEQUAL_SHAPES[rank]).bfloat16()

    want = step(exact, x.float().to(oracle), seed)
    ds = step(ref, x.to(oracle), seed)
    got = step(mine, x.to(dev), seed)

    assert got.device == dev and ds.device == oracle, (got.device, ds.device)
    check_plugin_backend(log, plugin_backend, torch.bfloat16)
    assert got.out.dtype == torch.bfloat16 and got.x_grad.dtype == torch.bfloat16
    assert torch.equal(got.exp_counts, ds.exp_counts), \
        f"rank {rank} exp_counts {got.exp_counts.tolist()} != {ds.exp_counts.tolist()}"
    h.assert_close(got.l_aux, ds.l_aux, f"rank {rank} l_aux", atol=1e-6, rtol=1e-5)
    quantities = [("output", got.out, ds.out, want.out), ("input gradient", got.x_grad, ds.x_grad, want.x_grad)]
    quantities += [(f"gradient of {n}", got.grads[n], ds.grads[n], want.grads[n]) for n in want.grads]
    for what, mine_v, ds_v, exact_v in quantities:
        ds_err = (ds_v.float() - exact_v).abs().max().item()
        err = (mine_v.float() - exact_v).abs().max().item()
        bound = 2 * ds_err + 2 ** -8 * exact_v.abs().max().item()
        assert err <= bound, f"rank {rank} {what}: bf16 error {err:.3g} > {bound:.3g} (DeepSpeed's {ds_err:.3g})"
