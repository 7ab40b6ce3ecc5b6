"""deepep_plugin inside real Megatron-Core MoE layers: both modes against Megatron's own alltoall dispatcher.

Every test runs 2 gloo processes (EP=2, 8 experts, 4 per rank). Each builds a reference ``MoELayer`` with Megatron's
``alltoall`` dispatcher, copies its weights (``state_dict``) into a ``flex`` layer that the plugin serves, feeds both
the same input (a different token count on each rank), and compares the forward output, the input gradient and
every parameter gradient (router and each local expert's fc1/fc2). Two routers: Megatron's default (softmax top-2,
aux loss) and a DeepSeek-V3-style one (sigmoid, expert bias, 8 groups of which 4 are kept, scaling 2.5, top-4).

The only difference in arithmetic is the order in which a token's expert outputs are summed (per rank, then over
ranks, instead of all at once), so results agree within 1e-6, not bit for bit. The CUDA-only spots of Megatron's
MoE path are patched in the workers by ``megatron_shims`` (test harness, not library).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is installed by tools/ci_install_megatron.sh")

import megatron_shims as shims  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

WORLD = 2
ATOL = 1e-6
STYLES = {"default": dict(topk=2), "deepseek_v3": dict(topk=4)}
#: Tokens per rank as [S, B]: unequal, so the ranks send and receive different amounts.
SHAPES = {0: (7, 2), 1: (3, 3)}


def _inputs(rank: int, seed: int, hidden: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100 + rank)
    s, b = SHAPES[rank]
    return torch.randn(s, b, hidden, generator=g)


def _step(layer, x: torch.Tensor):
    """Forward and backward of one layer on a fresh copy of ``x``; returns (output, x.grad, {param: grad})."""
    x = x.clone().requires_grad_(True)
    out, bias = layer(x)
    assert bias is None
    g = torch.Generator().manual_seed(7)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rank: int, atol: float = ATOL) -> None:
    assert got.shape == want.shape, f"rank {rank}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    assert diff <= atol, f"rank {rank}: {name} differs from Megatron's alltoall by {diff:.3e} (> {atol})"


def _compare_with_alltoall(rank: int, style: str, seed: int, *, plugin: dict, hidden: int = 32,
                           atol: float = ATOL, config_overrides: dict | None = None,
                           while_enabled: Callable[[Any], None] | None = None,
                           prepare: Callable[[Any], None] | None = None):
    """Build both layers, run one step each, compare everything; returns (plugin_layer, reference_layer).

    ``prepare(reference_layer)`` may edit the reference's weights/buffers before both are used (the plugin layer
    gets a copy). ``while_enabled(plugin_layer)`` runs after the plugin layer's step, before the plugin is
    disabled again.
    """
    from deepep_plugin.integrations import megatron as dpm

    shims.apply_cpu_shims()
    shims.init_megatron_parallel(WORLD)
    overrides = dict(config_overrides or {})
    ref_cfg = shims.moe_config("alltoall", style=style, hidden_size=hidden, **STYLES[style], **overrides)
    ref = shims.build_moe_layer(ref_cfg, seed=seed)
    if prepare is not None:
        with torch.no_grad():
            prepare(ref)
    x = _inputs(rank, seed, hidden)
    want_out, want_xg, want_pg = _step(ref, x)

    dpm.enable(None, **plugin)
    try:
        cfg = shims.moe_config("flex", style=style, hidden_size=hidden, **STYLES[style],
                               moe_flex_dispatcher_backend="deepep", **overrides)
        layer = shims.build_moe_layer(cfg, state_dict=ref.state_dict())
        got_out, got_xg, got_pg = _step(layer, x)
        if while_enabled is not None:
            while_enabled(layer)
    finally:
        dpm.disable()
    _assert_close("output", got_out, want_out, rank, atol)
    _assert_close("input grad", got_xg, want_xg, rank, atol)
    assert got_pg.keys() == want_pg.keys()
    for name in want_pg:
        _assert_close(f"grad of {name}", got_pg[name], want_pg[name], rank, atol)
    return layer, ref


# ---------------------------------------------------------------------------------------------------------------
# compat mode: Megatron's own flex/DeepEP code on deepep_plugin.Buffer


def _compat_matches(rank: int, world: int, style: str, seed: int) -> None:
    from megatron.core.transformer.moe import fused_a2a, token_dispatcher

    import deepep_plugin

    def uses_plugin(layer) -> None:
        assert type(layer.token_dispatcher) is token_dispatcher.MoEFlexTokenDispatcher  # Megatron's own dispatcher
        assert isinstance(fused_a2a._buffer, deepep_plugin.Buffer), "compat's get_buffer did not build our Buffer"
        assert "deep_ep" not in sys.modules, "compat mode must not register a deep_ep module"

    _compare_with_alltoall(rank, style, seed, plugin=dict(mode="compat"), while_enabled=uses_plugin)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_compat_mode_matches_megatron_alltoall(style: str) -> None:
    run_distributed(_compat_matches, WORLD, style, 11)


def test_compat_mode_is_refused_by_megatron_without_binding() -> None:
    """Without ``enable`` the flex/deepep layer cannot be built here (no deep_ep), so the test above is real."""
    run_distributed(_flex_without_plugin_fails, WORLD)


def _flex_without_plugin_fails(rank: int, world: int) -> None:
    shims.apply_cpu_shims()
    shims.init_megatron_parallel(WORLD)
    cfg = shims.moe_config("flex", moe_flex_dispatcher_backend="deepep")
    with pytest.raises(ImportError, match="DeepEP is not installed"):
        shims.build_moe_layer(cfg)


# ---------------------------------------------------------------------------------------------------------------
# dispatcher mode: deepep_plugin's MoETokenDispatcher


def _dispatcher_matches(rank: int, world: int, style: str, seed: int) -> None:
    from deepep_plugin.integrations.megatron import DeepEPPluginTokenDispatcher

    layer, _ = _compare_with_alltoall(rank, style, seed, plugin=dict(mode="dispatcher"))
    assert type(layer.token_dispatcher) is DeepEPPluginTokenDispatcher
    # Nothing of the step outlives it: no tensor, no autograd graph (the router's probs would keep its parameters'
    # gradient accumulators, and the stream they were made on, alive into the next step or a CUDA-graph capture).
    state = layer.token_dispatcher._comm_manager
    kept = [name for name in type(state).__slots__ if getattr(state, name) is not None]
    assert not kept, f"rank {rank}: the dispatcher keeps {kept} after the step"


@pytest.mark.parametrize("style", sorted(STYLES))
def test_dispatcher_mode_matches_megatron_alltoall(style: str) -> None:
    run_distributed(_dispatcher_matches, WORLD, style, 12)


def _one_rank_receives_nothing(rank: int, world: int, mode: str, seed: int) -> None:
    def steer_to_rank0(ref) -> None:
        # The expert bias steers selection only: -100 on rank 1's experts (4..7) sends every token to rank 0.
        ref.router.expert_bias[4:] = -100.0

    def rank1_idle(layer) -> None:
        grads = [p.grad for n, p in layer.named_parameters() if "local_experts" in n]
        if rank == 1:  # no token reached rank 1's experts
            assert all(float(g.abs().sum()) == 0.0 for g in grads)
        else:
            assert all(float(g.abs().sum()) > 0.0 for g in grads)

    _compare_with_alltoall(rank, "deepseek_v3", seed, plugin=dict(mode=mode), prepare=steer_to_rank0,
                           while_enabled=rank1_idle)


@pytest.mark.parametrize("mode", ["compat", "dispatcher"])
def test_rank_whose_experts_receive_no_tokens(mode: str) -> None:
    run_distributed(_one_rank_receives_nothing, WORLD, mode, 16)


def _dispatcher_pads_experts(rank: int, world: int, alignment: int, seed: int) -> None:
    captured = {}
    layer, ref = None, None

    def capture(module, args):
        captured["rows"], captured["tokens_per_expert"], captured["probs"] = args

    from megatron.core.transformer.moe.experts import SequentialMLP

    original = SequentialMLP.forward

    def forward(self, *args):
        capture(self, args)
        return original(self, *args)

    SequentialMLP.forward = forward
    try:
        layer, ref = _compare_with_alltoall(rank, "deepseek_v3", seed,
                                            plugin=dict(mode="dispatcher", expert_alignment=alignment,
                                                        tokens_per_expert_device="cpu"))
    finally:
        SequentialMLP.forward = original
    counts = captured["tokens_per_expert"]
    assert counts.device.type == "cpu" and counts.dtype == torch.int64
    assert all(c % alignment == 0 for c in counts.tolist()), counts
    assert int(counts.sum()) == captured["rows"].size(0) == captured["probs"].size(0)
    # Real rows per expert, counted from the routing the layer saw: the padding is the round-up only.
    real = torch.zeros(layer.num_local_experts, dtype=torch.int64)
    start = 0
    for e, c in enumerate(counts.tolist()):
        block = captured["probs"][start:start + c]
        real[e] = int((block != 0).sum())
        start += c
    assert torch.equal(counts, (real + alignment - 1) // alignment * alignment)


def test_dispatcher_mode_pads_each_expert_block_and_still_matches() -> None:
    run_distributed(_dispatcher_pads_experts, WORLD, 8, 13)


def _fp8_dispatch(rank: int, world: int, seed: int) -> None:
    from megatron.core.transformer.moe.experts import SequentialMLP

    from deepep_plugin import fp8

    shims.apply_cpu_shims()
    shims.init_megatron_parallel(WORLD)
    from deepep_plugin.integrations import megatron as dpm

    hidden = 256
    cfg = shims.moe_config("flex", style="default", hidden_size=hidden, ffn_hidden_size=64, topk=2,
                           moe_flex_dispatcher_backend="deepep")
    x = _inputs(rank, seed, hidden)
    seen = []
    original = SequentialMLP.forward

    def forward(self, rows, tokens_per_expert, probs):
        seen.append(rows.detach().clone())
        return original(self, rows, tokens_per_expert, probs)

    SequentialMLP.forward = forward
    results = []
    try:
        state = None
        for use_fp8 in (False, True):
            dpm.enable(None, mode="dispatcher", fp8_dispatch=use_fp8)
            layer = shims.build_moe_layer(cfg, seed=seed, state_dict=state)
            state = layer.state_dict()
            results.append(_step(layer, x))
            dpm.disable()
    finally:
        SequentialMLP.forward = original
        dpm.disable()
    plain_rows, fp8_rows = seen
    # The experts saw exactly the per-token FP8 round trip of the unquantised rows (cast once, before sending).
    q, s = fp8.per_token_cast_to_fp8(plain_rows)
    torch.testing.assert_close(fp8_rows, fp8.per_token_cast_back(q, s, dtype=plain_rows.dtype), rtol=0, atol=0)
    assert not torch.equal(fp8_rows, plain_rows)
    (out0, xg0, _), (out1, xg1, _) = results
    # Output within FP8 (e4m3, 3 mantissa bits) error of the unquantised one; the input gradient passes straight
    # through the cast, so it differs only through the experts' activations.
    assert (out1 - out0).abs().max() <= 0.1 * out0.abs().max()
    assert (xg1 - xg0).abs().max() <= 0.1 * xg0.abs().max()


def test_dispatcher_mode_fp8_dispatch_quantises_once_per_token() -> None:
    run_distributed(_fp8_dispatch, WORLD, 14)


def _split_phase_matches(rank: int, world: int, seed: int) -> None:
    """Megatron's EP-overlap schedule (fine_grained_callables.py) calls the MoELayer phases one by one and swaps
    detached probs into ``token_dispatcher._comm_manager.token_probs`` before dispatch and ``.dispatched_probs``
    before the experts; the plugin's dispatcher must read both from there."""
    from deepep_plugin.integrations import megatron as dpm

    shims.apply_cpu_shims()
    shims.init_megatron_parallel(WORLD)
    cfg = shims.moe_config("flex", style="deepseek_v3", topk=4, moe_flex_dispatcher_backend="deepep")
    x = _inputs(rank, seed, 32)
    dpm.enable(None, mode="dispatcher")
    try:
        layer = shims.build_moe_layer(cfg, seed=seed)
        want, _ = layer(x)
        manager = layer.token_dispatcher._comm_manager
        assert layer.token_dispatcher.cudagraph_attrs == ["_comm_manager.token_probs", "_comm_manager.token_indices"]
        probs, routing_map = layer.route(x)
        tokens, probs = layer.preprocess(x, probs, routing_map)
        # Doubling the probs at each swap point scales the (probs-linear) expert output by exactly 4.
        manager.token_probs = probs.detach() * 2
        dispatched, dispatched_probs = layer.dispatch(tokens, probs)
        manager.dispatched_probs = dispatched_probs.detach() * 2
        out, _ = layer.routed_experts_compute(dispatched, dispatched_probs)
        got = layer.postprocess(layer.combine(out), None)
    finally:
        dpm.disable()
    _assert_close("split-phase output", got.detach(), 4 * want.detach(), rank, 0.0)


def test_dispatcher_mode_reads_probs_where_megatron_ep_overlap_writes_them() -> None:
    run_distributed(_split_phase_matches, WORLD, 15)


def _group_layout(rank: int, world: int) -> None:
    import os

    from deepep_plugin.integrations import megatron as dpm

    shims.apply_cpu_shims()
    shims.init_megatron_parallel(WORLD)
    os.environ["LOCAL_WORLD_SIZE"] = "1"  # pretend each rank is a node: node-limited routing is then rank-limited
    dpm.enable(None, mode="dispatcher")
    try:
        aligned = shims.build_moe_layer(shims.moe_config("flex", style="deepseek_v3", topk=4,
                                                         moe_flex_dispatcher_backend="deepep"))
        # 8 groups of 1 expert; rank r (= node r) holds experts 4r..4r+3.
        assert aligned.token_dispatcher.group_nodes == [0, 0, 0, 0, 1, 1, 1, 1]
        straddling = shims.build_moe_layer(shims.moe_config("flex", style="deepseek_v3", topk=2,
                                                            moe_router_num_groups=1, moe_router_group_topk=1,
                                                            moe_flex_dispatcher_backend="deepep"))
        assert straddling.token_dispatcher.group_nodes is None  # one group spans both nodes: warned, not refused
    finally:
        dpm.disable()


def test_dispatcher_mode_maps_router_groups_onto_nodes() -> None:
    run_distributed(_group_layout, WORLD)


@pytest.mark.parametrize("mode", ["compat", "dispatcher"])
def test_megatron_adapter_gives_a_two_node_group_rdma_bytes(mode: str) -> None:
    """The Megatron adapter builds its Buffer with ``Buffer.sized_for``: over two emulated nodes it gets RDMA
    bytes (on the GPU, ``tests/gpu/test_selection_cuda.py`` sees the internode kernels run), and the layer still
    matches Megatron's alltoall (here on the CPU, reference backend)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
    import selection_workers

    run_distributed(selection_workers.megatron_two_node_worker, 4, mode=mode, seed=31, device="cpu",
                    plugin_backend="reference")


def _sync_free_matches(rank: int, world: int, style: str, alignment: int, seed: int) -> None:
    from megatron.core.transformer.moe.experts import SequentialMLP

    seen = {}
    original = SequentialMLP.forward

    def forward(self, rows, tokens_per_expert, probs):
        seen["rows"], seen["counts"] = rows.size(0), tokens_per_expert
        return original(self, rows, tokens_per_expert, probs)

    SequentialMLP.forward = forward
    try:
        # The ranks hold different token counts here, so the default (tokens x EP size) is not the worst case.
        _compare_with_alltoall(rank, style, seed, plugin=dict(mode="dispatcher", sync_free=True, worst_tokens=96,
                                                              expert_alignment=alignment))
    finally:
        SequentialMLP.forward = original
    # Static shapes: worst-case rows (every token of every rank, in up to min(K, L) local experts), blocks that
    # cover them all on the tokens' device, each block but the last a multiple of the alignment.
    counts = seen["counts"]
    assert counts.device.type == "cpu" and int(counts.sum()) == seen["rows"]
    assert all(c % alignment == 0 for c in counts.tolist()), counts


@pytest.mark.parametrize("style,alignment", [("default", 1), ("deepseek_v3", 8)])
def test_dispatcher_mode_sync_free_matches_megatron_alltoall(style: str, alignment: int) -> None:
    run_distributed(_sync_free_matches, WORLD, style, alignment, 17)


def test_sync_free_names_megatron_experts_that_read_the_counts_on_the_host() -> None:
    """Under sync_free the dispatcher warns about Megatron's own experts that call tokens_per_expert.tolist()."""
    from types import SimpleNamespace

    from deepep_plugin.integrations.megatron.dispatcher import host_count_reader

    assert "grouped-GEMM" in host_count_reader(SimpleNamespace(moe_grouped_gemm=True), 1)
    assert "4 local experts" in host_count_reader(SimpleNamespace(moe_grouped_gemm=False), 4)
    assert host_count_reader(SimpleNamespace(moe_grouped_gemm=False), 1) == ""  # one SequentialMLP expert: no read


def test_sync_free_settings_are_checked() -> None:
    from deepep_plugin.errors import DeepEPInputError
    from deepep_plugin.integrations.megatron import PluginSettings

    for kwargs, pattern in ((dict(worst_tokens=64), "set sync_free"), (dict(sync_free=True, mode="compat"),
                            "needs mode 'dispatcher'"), (dict(sync_free=True, tokens_per_expert_device="cpu"),
                                                         "keeps tokens_per_expert on the device")):
        with pytest.raises(DeepEPInputError, match=pattern):
            PluginSettings(**kwargs)
