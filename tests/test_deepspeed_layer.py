"""The plugin's DeepSpeed MoE layer against DeepSpeed's own ``MOELayer``, on 2 gloo processes.

Each rank builds DeepSpeed's ``MoE`` (EP = 2, 6 experts, 3 per rank, hidden 16; every expert distinct) and an
identical copy, swaps the copy's ``MOELayer`` for the plugin's (``apply`` with the JSON section), feeds both the
same input (7x2 tokens on rank 0, 5x1 on rank 1) and compares the output, the input gradient, every parameter
gradient (gate and each local expert), ``l_aux`` and ``exp_counts``. DeepSpeed runs with a capacity large
enough that nothing is dropped, so both compute the same function; the only difference is the order in which a
token's expert outputs are summed, hence agreement to ~1e-6 rather than bit for bit. The random draws of the
noisy policies come from DeepSpeed's samplers in DeepSpeed's order, so a fixed seed gives both layers the
same noise.

In bf16 the two layers round at different points, so each is compared with DeepSpeed's float32 result: the
plugin's error must stay within twice DeepSpeed's own.

Where DeepSpeed cannot serve as the oracle (a rank with no tokens, FP8 dispatch, group-limited gating), the
expected values come from ``deepspeed_harness.dense_moe``: every route computed separately with all experts.
"""

from __future__ import annotations

import deepspeed_harness as h  # noqa: I001  (sets DS_ACCELERATOR before deepspeed is imported)
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed", reason="deepspeed is installed by tools/ci_install_deepspeed.sh")

import deepspeed.moe.layer  # noqa: E402,F401  (imported once here, not in every forked worker)
from dist_utils import run_distributed  # noqa: E402

from deepep_plugin import fp8  # noqa: E402
from deepep_plugin.integrations import deepspeed as ep_ds  # noqa: E402
from deepep_plugin.routing import group_limited_topk  # noqa: E402

WORLD = 2
HIDDEN, FFN, EXPERTS = 16, 24, 6
#: Tokens per rank ([B, S] before flattening). DeepSpeed's capacity mode needs the same count on every rank (each
#: rank sizes its all-to-all from its own count); its dropless mode and the plugin take any counts.
SHAPES = {0: (7, 2), 1: (5, 1)}
EQUAL_SHAPES = {0: (6, 2), 1: (6, 2)}
SECTION = {"deepep_plugin": {"enabled": True, "backend": "reference"}}


def _x(rank: int, seed: int, shape=None, hidden: int = HIDDEN, positive: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 31 + rank)
    x = torch.randn(*(shape if shape is not None else SHAPES[rank]), hidden, generator=g)
    return x.abs() if positive else x


def _step(moe, x: torch.Tensor, seed: int, used_token=None):
    """Forward + backward of ``(out * r).sum() + 0.1 * l_aux``; returns (out, l_aux, exp_counts, x.grad, grads)."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the noisy gate policies draw from the global generator
    out, l_aux, exp_counts = moe(x, used_token)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    ((out * r).sum() + 0.1 * l_aux).backward()
    return out.detach(), l_aux.detach(), exp_counts, x.grad, h.grads_of(moe)


def _pair(rank: int, k: int, seed: int, ep_size: int = WORLD, plugin: dict | None = None, **moe_kwargs):
    """DeepSpeed's MoE and an identical copy running the plugin, both bound to the EP group."""
    rank_in_ep = rank % ep_size
    ref = h.build_moe(HIDDEN, FFN, EXPERTS, ep_size, k, seed, rank_in_ep, **moe_kwargs)
    mine = h.build_moe(HIDDEN, FFN, EXPERTS, ep_size, k, seed, rank_in_ep, **moe_kwargs)
    ref.set_deepspeed_parallelism()
    mine.set_deepspeed_parallelism()
    names = ep_ds.apply(mine, plugin or SECTION)
    assert names == ["deepspeed_moe"], names
    assert type(ref.deepspeed_moe).__name__ == "MOELayer"
    return ref, mine


def _compare(rank: int, ref_result, my_result, atol: float = 1e-5) -> None:
    ref_out, ref_laux, ref_counts, ref_xg, ref_grads = ref_result
    out, laux, counts, xg, grads = my_result
    rtol = max(atol, 1e-5)
    h.assert_close(out, ref_out, f"rank {rank} output", atol=atol, rtol=rtol)
    h.assert_close(xg, ref_xg, f"rank {rank} input gradient", atol=atol, rtol=rtol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        h.assert_close(grads[name], ref_grads[name], f"rank {rank} gradient of {name}", atol=atol, rtol=rtol)
    h.assert_close(laux, ref_laux, f"rank {rank} l_aux", atol=1e-6)
    assert counts.dtype == ref_counts.dtype == torch.int64
    assert torch.equal(counts, ref_counts), f"rank {rank} exp_counts {counts.tolist()} != {ref_counts.tolist()}"


# ------------------------------------------------------------------------------------------------------------
# Against DeepSpeed's MOELayer
# ------------------------------------------------------------------------------------------------------------
CASES = {
    # DeepSpeed defaults (top-2 samples its 2nd expert with Gumbel noise), capacity large enough for no drops
    "default": dict(capacity_factor=float(EXPERTS), drop_tokens=True),
    # DeepSpeed's own dropless mode (capacity = busiest expert, all-reduced)
    "dropless": dict(drop_tokens=False),
    # noisy gates: RSample (k = 1) or input Jitter (k >= 2), training mode
    "noisy": dict(capacity_factor=float(EXPERTS), drop_tokens=True),
}


def _parity_worker(rank: int, world: int, k: int, case: str, seed: int) -> None:
    h.init_deepspeed_comm()
    kwargs = dict(CASES[case], min_capacity=0)
    if case == "noisy":
        kwargs["noisy_gate_policy"] = "RSample" if k == 1 else "Jitter"
    ref, mine = _pair(rank, k, seed, **kwargs)
    x = _x(rank, seed, SHAPES[rank] if case == "dropless" else EQUAL_SHAPES[rank])
    _compare(rank, _step(ref, x, seed), _step(mine, x, seed))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_deepspeed_moe_layer(k: int, case: str) -> None:
    run_distributed(_parity_worker, WORLD, k, case, 10 * k + len(case))


def _bf16_worker(rank: int, world: int, k: int, seed: int) -> None:
    h.init_deepspeed_comm()
    kwargs = dict(drop_tokens=False, top2_2nd_expert_sampling=False)
    exact, _ = _pair(rank, k, seed, **kwargs)  # DeepSpeed in float32: the value both bf16 layers approximate
    ref, mine = _pair(rank, k, seed, **kwargs)
    ref.to(torch.bfloat16)
    mine.to(torch.bfloat16)
    x = _x(rank, seed, EQUAL_SHAPES[rank])
    want = _step(exact, x, seed)
    ds, got = _step(ref, x.bfloat16(), seed), _step(mine, x.bfloat16(), seed)
    assert got[0].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    assert torch.equal(got[2], ds[2]), f"rank {rank} exp_counts {got[2].tolist()} != {ds[2].tolist()}"
    h.assert_close(got[1], ds[1], f"rank {rank} l_aux", atol=1e-6)
    # The two bf16 layers round at different points, so they are not compared with each other element by
    # element: the plugin must be as close to the float32 result as DeepSpeed's bf16 layer is (within 2x).
    quantities = [("output", got[0], ds[0], want[0]), ("input gradient", got[3], ds[3], want[3])]
    quantities += [(f"gradient of {n}", got[4][n], ds[4][n], want[4][n]) for n in want[4]]
    for what, mine_v, ds_v, exact_v in quantities:
        ds_err = (ds_v.float() - exact_v).abs().max().item()
        err = (mine_v.float() - exact_v).abs().max().item()
        bound = 2 * ds_err + 2 ** -8 * exact_v.abs().max().item()
        assert err <= bound, f"rank {rank} {what}: bf16 error {err:.3g} > {bound:.3g} (DeepSpeed's {ds_err:.3g})"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bfloat16_is_as_accurate_as_deepspeed(k: int) -> None:
    """A bf16 model: outputs and gradients stay bf16, and their error against the float32 result is within
    twice DeepSpeed's own bf16 error; l_aux and exp_counts equal DeepSpeed's."""
    run_distributed(_bf16_worker, WORLD, k, 80 + k)


def _skewed_worker(rank: int, world: int, k: int, seed: int) -> None:
    h.init_deepspeed_comm()
    local = EXPERTS // WORLD
    ref, mine = _pair(rank, k, seed, skew_to=local, drop_tokens=False, top2_2nd_expert_sampling=False)
    # equal counts: DeepSpeed's dropless top-1 clips its capacity to the local token count, so unequal counts
    # give the ranks different all-to-all sizes when one expert takes most tokens (its bug, not the plugin's)
    x = _x(rank, seed, EQUAL_SHAPES[rank], positive=True)
    want, got = _step(ref, x, seed), _step(mine, x, seed)
    total = got[2].clone()
    dist.all_reduce(total)
    assert total[local:].sum() == 0, f"routing was meant to leave rank 1's experts idle, got {total.tolist()}"
    _compare(rank, want, got)


@pytest.mark.parametrize("k", [1, 3])
def test_matches_deepspeed_when_one_rank_receives_nothing(k: int) -> None:
    """Every token picks rank 0's experts: rank 1 receives zero rows and still runs (and differentiates) its
    experts on empty input, giving zero gradients like DeepSpeed's padded buffer."""
    run_distributed(_skewed_worker, WORLD, k, 40 + k)


def _used_token_worker(rank: int, world: int, seed: int) -> None:
    h.init_deepspeed_comm()
    ref, mine = _pair(rank, 1, seed, capacity_factor=float(EXPERTS), drop_tokens=True, min_capacity=0)
    x = _x(rank, seed, EQUAL_SHAPES[rank])
    g = torch.Generator().manual_seed(seed + rank)
    used = (torch.rand(x.shape[0] * x.shape[1], generator=g) < 0.6).long()
    _compare(rank, _step(ref, x, seed, used), _step(mine, x, seed, used))


def test_matches_deepspeed_with_used_token_mask() -> None:
    """Top-1 with ``used_token``: masked tokens are neither sent nor counted, and their output is zero."""
    run_distributed(_used_token_worker, WORLD, 53)


def _ep1_worker(rank: int, world: int, k: int, seed: int) -> None:
    h.init_deepspeed_comm()
    ref, mine = _pair(rank, k, seed, ep_size=1, drop_tokens=False)
    x = _x(rank, seed)
    _compare(rank, _step(ref, x, seed), _step(mine, x, seed))


def test_matches_deepspeed_with_expert_parallel_size_one() -> None:
    """ep_size = 1 (every expert local, data parallel over 2 ranks): no communication, same results."""
    run_distributed(_ep1_worker, WORLD, 2, 61)


# ------------------------------------------------------------------------------------------------------------
# Against the dense reference
# ------------------------------------------------------------------------------------------------------------
def _dense_worker(rank: int, world: int, mode: str, seed: int) -> None:
    h.init_deepspeed_comm()
    hidden = 128 if mode == "fp8" else HIDDEN
    num_experts, k = (8, 3) if mode == "group_limited" else (EXPERTS, 2)
    local = num_experts // WORLD
    section = {"enabled": True, "backend": "reference"}
    if mode == "fp8":
        section["fp8_dispatch"] = True
    gl = dict(num_groups=4, topk_group=2, score_function="sigmoid", routed_scaling_factor=2.5)
    if mode == "group_limited":
        section["group_limited_gating"] = gl
    moe = h.build_moe(hidden, FFN, num_experts, WORLD, k, seed, rank, top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism()
    ep_ds.apply(moe, {"deepep_plugin": section})
    shape = (0, 3) if (mode == "empty_rank" and rank == 1) else SHAPES[rank]
    x = _x(rank, seed, shape, hidden)
    r = torch.randn(*shape, hidden, generator=torch.Generator().manual_seed(seed + 1))

    xg = x.clone().requires_grad_(True)
    out, l_aux, counts = moe(xg)
    ((out * r).sum() + 0.1 * l_aux).backward()

    # The reference: routing from the same gate weight, every route computed with its own expert.
    xr = x.clone().requires_grad_(True)
    wg = moe.deepspeed_moe.gate.wg.weight.detach().clone().requires_grad_(True)
    experts = [h.make_expert(hidden, FFN, seed, e) for e in range(num_experts)]
    tokens = xr.reshape(-1, hidden)
    logits = tokens.float() @ wg.t()
    n = max(tokens.size(0), 1)
    if mode == "group_limited":
        idx, w = group_limited_topk(logits, k, **gl)
        scores = logits.sigmoid()
        me = (scores / scores.sum(1, keepdim=True)).mean(0)
        ce = torch.bincount(idx.flatten(), minlength=num_experts).float() / n
        want_laux = (me * ce).mean() * num_experts * num_experts / k
    else:  # DeepSpeed top-2: renormalised weights, balance loss over first choices
        probs = logits.softmax(1)
        top, idx = probs.topk(k, dim=1)
        w = top / top.sum(1, keepdim=True)
        ce = torch.bincount(idx[:, 0], minlength=num_experts).float() / n
        want_laux = (probs.mean(0) * ce).mean() * num_experts * num_experts if tokens.size(0) else logits.sum() * 0
    expert_in = tokens
    if mode == "fp8":  # straight-through FP8 round trip of the token rows
        q = fp8.per_token_cast_back(*fp8.per_token_cast_to_fp8(tokens.detach()), dtype=tokens.dtype)
        expert_in = tokens + (q - tokens).detach()
    want = h.dense_moe(expert_in, idx, w, experts).reshape(x.shape)
    ((want * r).sum() + 0.1 * want_laux).backward()

    atol = 1e-4 if mode == "fp8" else 1e-5
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=num_experts)), counts
    h.assert_close(out.detach(), want.detach(), f"rank {rank} output", atol=atol)
    h.assert_close(l_aux.detach(), want_laux.detach(), f"rank {rank} l_aux", atol=1e-6)
    h.assert_close(xg.grad, xr.grad, f"rank {rank} input gradient", atol=atol)
    h.assert_close(moe.deepspeed_moe.gate.wg.weight.grad, wg.grad, f"rank {rank} gate gradient", atol=atol)
    # An expert's gradient sums over the tokens of every rank: add up the ranks' reference gradients.
    want_grads = [[q.grad if q.grad is not None else torch.zeros_like(q) for q in e.parameters()] for e in experts]
    for grads in want_grads:
        for g in grads:
            dist.all_reduce(g)
    for i, mine in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
        for (name, p), want_grad in zip(mine.named_parameters(), want_grads[rank * local + i]):
            assert p.grad is not None, f"rank {rank} local expert {i} {name} got no gradient"
            h.assert_close(p.grad, want_grad, f"rank {rank} local expert {i} {name} gradient", atol=atol)


@pytest.mark.parametrize("mode", ["empty_rank", "fp8", "group_limited"])
def test_matches_dense_reference(mode: str) -> None:
    """``empty_rank``: rank 1 has no tokens at all (DeepSpeed's own layer cannot run that); ``fp8``: tokens
    travel as FP8 and the experts see the dequantised rows (gradient straight through); ``group_limited``:
    DeepSeek-V3 gating (8 experts in 4 groups, 2 kept, sigmoid, scaling 2.5, k = 3) with its balance loss."""
    run_distributed(_dense_worker, WORLD, mode, 70 + len(mode))
