"""``python -m deepep_plugin.bench graph-moe`` on the CPU: its options, the eager step it times, the layer it
builds, and its bookkeeping (rows merged over ranks, the table, the JSON document and the RESULTS.md section). The
CUDA-graph capture and the timing need a GPU (``tests/gpu/test_cuda_graph_moe_cuda.py``,
``bash tools/gpu_check.sh graph-moe``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deepep_plugin.bench import __main__ as bench_main
from deepep_plugin.bench import graph_moe as gm


def test_defaults_are_the_issue_s_sizes() -> None:
    args = gm.parse_args([])
    assert args.tokens == [256, 1024]
    assert (args.hidden, args.num_experts, args.topk, args.groups, args.topk_groups) == (2048, 64, 8, 8, 4)
    assert args.ranks == 2 and args.json == "benchmarks/results/cuda_graph_moe.json" and args.results == ""
    assert gm.parse_args(["--tokens", "128, 512,", "--num-sms", "24"]).tokens == [128, 512]


@pytest.mark.parametrize("argv,message", [
    (["--tokens", "0,256"], "positive ints"),
    (["--tokens", "abc"], "positive ints"),
    (["--num-experts", "63"], "multiple of --ranks"),
    (["--groups", "5"], "must divide --num-experts"),
    (["--topk", "40"], "exceeds the experts"),
    (["--hidden", "2044"], "multiples of 8"),
    (["--num-sms", "7"], "even number"),
    (["--iters", "0"], "--iters must be >= 1"),
])
def test_bad_options_are_usage_errors(argv: list, message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        gm.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_bench_command_knows_graph_moe(capsys: pytest.CaptureFixture) -> None:
    bench_main.main([])
    assert "graph-moe" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench_main.main(["graph-moe", "--help"])
    assert e.value.code == 0
    assert "--tokens" in capsys.readouterr().out


def test_without_gpus_the_benchmark_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepep_plugin.bench import compare

    monkeypatch.setattr(compare, "_gpu_count", lambda: 0)
    with pytest.raises(SystemExit, match="needs CUDA GPUs"):
        gm.main(["--tokens", "256"])


def _layer(seed: int = 3) -> torch.nn.Module:
    cfg = gm.moe_config(hidden=64, num_experts=8, topk=2, n_group=4, topk_group=2, intermediate=32, shared=1)
    return gm.plain_moe_layer(cfg, None, 0, 1, sync_free=False, seed=seed)


def test_the_layer_is_the_recipe_s_moe_with_seeded_parameters() -> None:
    from examples.deepseek_v3.model import MoE

    a, b, c = _layer(), _layer(), _layer(seed=4)
    assert isinstance(a, MoE) and a.ep.comm_dtype == torch.bfloat16
    for (name, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, r), name
        std = p.detach().float().std().item() * math.sqrt(p.shape[-1])  # N(0, 1 / fan_in)
        assert 0.8 < std < 1.2, (name, std)


def test_the_eager_step_gives_this_step_s_gradients_alone() -> None:
    layer = _layer()
    params = list(layer.named_parameters())
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(12, 64, generator=g), torch.randn(12, 64, generator=g)
    first = gm.eager_step(layer, params, x, grad).clone()
    again = gm.eager_step(layer, params, x, grad)  # no accumulation into the first step's gradients
    assert gm.max_relative_difference(again, first) == 0.0
    assert first.x_grad is not None and first.x_grad.shape == x.shape and x.grad is None
    assert set(first.grads) == {n for n, _ in params} and all(v is not None for v in first.grads.values())
    # The reference: the same step by hand.
    leaf = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    layer(leaf).backward(grad)
    assert torch.equal(leaf.grad, first.x_grad)
    assert all(torch.equal(p.grad, first.grads[n]) for n, p in params)
    other = gm.eager_step(layer, params, 2 * x, grad)
    assert 0 < gm.max_relative_difference(other, first) < math.inf


def test_relative_difference_flags_missing_and_non_finite_tensors() -> None:
    one = gm.StepResult(torch.ones(2), torch.ones(2), {"w": torch.ones(2)})
    assert gm.max_relative_difference(one, one) == 0.0
    assert gm.max_relative_difference(gm.StepResult(torch.ones(2), torch.ones(2), {"w": None}), one) == math.inf
    nan = gm.StepResult(torch.tensor([1.0, math.nan]), torch.ones(2), {"w": torch.ones(2)})
    assert gm.max_relative_difference(nan, one) == math.inf
    off = gm.StepResult(torch.ones(2), torch.tensor([1.0, 1.5]), {"w": torch.ones(2)})
    assert gm.max_relative_difference(off, one) == 0.5


def _rank_rows(rank: int) -> list:
    return [{"tokens": t, "worst_tokens": 2 * t, "eager_sync_us": 900.0 + rank, "eager_us": 600.0 + 10 * rank,
             "graph_us": 200.0 + 100 * rank, "host_eager_sync_us": 800.0 + 2 * rank, "host_eager_us": 500.0,
             "host_graph_us": 20.0 + 2 * rank, "max_rel_diff": 1e-3 * (rank + 1)} for t in (256, 1024)]


def test_rows_merge_over_ranks_and_report() -> None:
    rows = gm.merge_ranks([_rank_rows(0), _rank_rows(1)])
    assert [r["tokens"] for r in rows] == [256, 1024]
    r = rows[0]
    assert (r["eager_us"], r["graph_us"], r["eager_sync_us"]) == (610.0, 300.0, 901.0)  # the slowest rank
    assert (r["host_eager_sync_us"], r["host_graph_us"]) == (801.0, 21.0)  # the mean of ranks
    assert r["max_rel_diff"] == 2e-3 and r["speedup"] == pytest.approx(610.0 / 300.0)
    assert "| 256 | 512 | 901 | 610 | 300 | 2.03x | 801 / 500 / 21 | 2.0e-03 |" in gm.table(rows)

    args = gm.parse_args(["--command", "bash tools/gpu_check.sh graph-moe"])
    meta = {"device": "NVIDIA H200", "gpus": 1, "num_sms": 20, "mps": True}
    doc = gm.results_document(rows, args, meta, args.command, date="2026-12-01T00:00")
    assert json.loads(json.dumps(doc)) == doc
    assert set(doc) >= {"rows", "device", "date", "command"} and doc["device"] == "NVIDIA H200"
    text = gm.markdown(doc)
    assert text.startswith("## Sync-free MoE layer, CUDA-graph replay against eager: EP2 on 1x NVIDIA H200")
    assert "concurrently under MPS" in text and "`bash tools/gpu_check.sh graph-moe`" in text
    assert "| 1024 | 2048 |" in text
