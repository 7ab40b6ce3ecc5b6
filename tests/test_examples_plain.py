"""The plain-PyTorch DeepSeek-V3-style example (examples/deepseek_v3): model pieces, EP equivalence, the recipe.

The distributed model must be *the same model* as the single-process one: same parameters from the same seed,
same first-step loss, and -- with the recipe's gradient convention -- the same gradients, expert slices included.
"""

from __future__ import annotations

import importlib
import math
import os
import struct
import sys
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: examples/

from dist_utils import run_distributed  # noqa: E402

from deepep_plugin import routing  # noqa: E402
from deepep_plugin.errors import DeepEPInputError  # noqa: E402
from examples.deepseek_v3 import train  # noqa: E402
from examples.deepseek_v3.configs import ModelConfig, load_preset  # noqa: E402
from examples.deepseek_v3.data import MarkovCorpus  # noqa: E402
from examples.deepseek_v3.model import GROUPED_GEMM_ALIGNMENT, DeepSeekV3Model, ExpertParallel, LocalExperts, MoE  # noqa: E402,E501
from examples.deepseek_v3.reporting import _raster_curve, _write_png  # noqa: E402


def small_config(**kw: object) -> ModelConfig:
    """A model small enough for a unit test, with every DeepSeek-V3 feature on (MLA with a query latent too)."""
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, first_k_dense_replace=1, intermediate_size=48,
                num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, num_experts_per_tok=3, n_group=4,
                topk_group=2, routed_scaling_factor=2.5, bias_update_speed=0.01, init_std=0.2)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------
# Single process (the GPU test is at the end of the file)
def test_corpus_batches_are_a_pure_function_of_seed_and_index() -> None:
    a, b = MarkovCorpus(50, 12, seed=3), MarkovCorpus(50, 12, seed=3)
    assert torch.equal(a.batch(7, 5), b.batch(7, 5))
    assert not torch.equal(a.batch(7, 5), a.batch(8, 5))
    assert not torch.equal(a.batch(7, 5), a.batch(7, 5, stream="eval"))


def test_corpus_follows_its_chain_and_states_its_entropy() -> None:
    corpus = MarkovCorpus(40, 30, seed=11, branching=3)
    tokens = corpus.batch(0, 64)
    assert tokens.shape == (64, 31) and tokens.dtype == torch.int64
    prev, nxt = tokens[:, :-1].reshape(-1), tokens[:, 1:].reshape(-1)
    assert (corpus.successors[prev] == nxt[:, None]).any(dim=1).all()
    p = torch.tensor([1.0, 1 / 2, 1 / 3], dtype=torch.float64)
    p = p / p.sum()
    assert corpus.entropy == pytest.approx(float(-(p * p.log()).sum()), rel=1e-12)
    assert corpus.uniform_loss == pytest.approx(math.log(40))


def test_local_moe_equals_the_per_token_weighted_sum_of_experts() -> None:
    torch.manual_seed(0)
    cfg = small_config()
    moe = MoE(cfg, ExpertParallel())
    model = DeepSeekV3Model(cfg)  # only to reuse its deterministic initialisation on this MoE
    moe.load_state_dict(model.layers[1].mlp.state_dict())
    moe.router.expert_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.05)  # bias steers selection
    x = torch.randn(3, 5, cfg.hidden_size)
    out = moe(x)

    tokens = x.reshape(-1, cfg.hidden_size)
    idx, w = routing.group_limited_topk(tokens @ moe.router.weight.T, cfg.num_experts_per_tok, num_groups=cfg.n_group,
                                        topk_group=cfg.topk_group, score_function="sigmoid",
                                        expert_bias=moe.router.expert_bias,
                                        routed_scaling_factor=cfg.routed_scaling_factor)
    expected = moe.shared(tokens).clone()
    for t in range(tokens.size(0)):
        for k in range(cfg.num_experts_per_tok):
            e = int(idx[t, k])
            gate, up = (moe.experts.gate_up[e] @ tokens[t]).chunk(2)
            expected[t] += w[t, k] * (moe.experts.down[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(out.reshape(-1, cfg.hidden_size), expected, rtol=1e-5, atol=1e-6)


def test_expert_slices_and_replicated_parameters_do_not_depend_on_the_ep_size() -> None:
    cfg = small_config()
    full = DeepSeekV3Model(cfg, seed=5)
    sentinel = object()  # construction only: no communication happens
    for rank in range(4):
        part = DeepSeekV3Model(cfg, ExpertParallel(buffer=sentinel, rank=rank, size=4), seed=5)  # type: ignore[arg-type]
        for (name, p), (_, q) in zip(full.named_parameters(), part.named_parameters()):
            if ".experts." in name:
                torch.testing.assert_close(q, p[2 * rank:2 * rank + 2], rtol=0, atol=0)
            else:
                torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_bad_configs_are_rejected_with_the_field_named() -> None:
    with pytest.raises(DeepEPInputError, match="hidden_size"):
        load_preset("tiny", overrides={"hidden_size": "96", "fp8_dispatch": "true"})
    with pytest.raises(DeepEPInputError, match="unknown config field 'hiden_size'"):
        load_preset("tiny", overrides={"hiden_size": "96"})
    with pytest.raises(DeepEPInputError, match="n_group"):
        small_config(n_group=3).validate()


def test_builtin_png_writer_round_trips_the_image() -> None:
    img = _raster_curve([3.0, 2.0, 1.5, 1.2], floor=1.0, width=120, height=80)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dsv3_png_{os.getpid()}.png")
    _write_png(path, img)
    data = open(path, "rb").read()
    os.remove(path)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    assert struct.unpack(">II", header[:8]) == (120, 80)
    rows = zlib.decompress(idat)
    decoded = torch.frombuffer(bytearray(rows), dtype=torch.uint8).view(80, 1 + 120 * 3)
    assert (decoded[:, 0] == 0).all()
    assert torch.equal(decoded[:, 1:].reshape(80, 120, 3), torch.from_numpy(img))


# ------------------------------------------------------------------------------------------------------------
# Placement of the recipe's ranks on GPUs (decided before any process starts; no GPU needed to check it)
def test_one_visible_gpu_gets_two_ranks_sharing_it_over_gloo_by_default() -> None:
    placement = train.plan_placement("cuda", visible_gpus=1)
    assert (placement.nprocs, placement.num_gpus, placement.dist_backend) == (2, 1, "gloo")
    assert placement.shares_gpus and [placement.gpu_of(r) for r in range(2)] == [0, 0]


def test_one_rank_per_gpu_uses_nccl() -> None:
    placement = train.plan_placement("cuda", visible_gpus=8, nprocs=4)
    assert (placement.nprocs, placement.num_gpus, placement.dist_backend) == (4, 4, "nccl")
    assert not placement.shares_gpus and [placement.gpu_of(r) for r in range(4)] == [0, 1, 2, 3]
    assert train.plan_placement("cuda", visible_gpus=2).nprocs == 2  # default: one per GPU


def test_more_ranks_than_gpus_in_use_share_them_round_robin_over_gloo() -> None:
    placement = train.plan_placement("cuda", visible_gpus=2, nprocs=4)
    assert placement.dist_backend == "gloo" and placement.shares_gpus
    assert [placement.gpu_of(r) for r in range(4)] == [0, 1, 0, 1]
    asked = train.plan_placement("cuda", visible_gpus=2, gpus=1)  # --gpus 1 on a two-GPU machine
    assert (asked.nprocs, asked.num_gpus, asked.dist_backend) == (2, 1, "gloo")


def test_nccl_is_refused_for_ranks_sharing_a_gpu() -> None:
    with pytest.raises(SystemExit, match="one GPU per process"):
        train.plan_placement("cuda", visible_gpus=1, nprocs=2, dist_backend="nccl")
    with pytest.raises(SystemExit, match="--gpus must be in"):
        train.plan_placement("cuda", visible_gpus=2, gpus=3)


def test_help_lists_the_placement_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--gpus" in text and "--dist-backend" in text and "(hidden % 128 == 0)" in text


def test_cpu_placement_is_two_gloo_processes_by_default() -> None:
    placement = train.plan_placement("cpu", visible_gpus=0)
    assert (placement.nprocs, placement.num_gpus, placement.dist_backend) == (2, 0, "gloo")
    assert not placement.shares_gpus
    assert train.plan_placement("cpu", visible_gpus=0, nprocs=4).nprocs == 4


# ------------------------------------------------------------------------------------------------------------
# Two processes: the EP model is the single-process model
def _first_step(rank: int, world_size: int, fp8: bool, sync_free: bool = False) -> None:
    cfg = small_config(hidden_size=128, fp8_dispatch=fp8) if fp8 else small_config()
    corpus = MarkovCorpus(cfg.vocab_size, 9, seed=2)
    batches = [corpus.batch(r, 3 + r) for r in range(world_size)]  # unequal batches: rank r has 3 + r sequences
    # The reference: one process, all experts, the union of the batches (tokens weighted as the ranks weight them);
    # with fp8_dispatch it rounds the MoE inputs to FP8 as dispatch does.
    ref = DeepSeekV3Model(cfg, seed=9)
    ref_loss = sum(ref.loss(b) for b in batches) / world_size
    ref_loss.backward()
    if fp8:  # the rounding is real: without it the same model gives another loss
        plain = DeepSeekV3Model(small_config(hidden_size=cfg.hidden_size), seed=9)
        assert abs(float(sum(plain.loss(b) for b in batches) / world_size) - float(ref_loss)) > 1e-4
    ref_counts = torch.zeros(cfg.n_routed_experts)
    for b in batches:
        ref(b[:, :-1])
        ref_counts += ref.layers[1].mlp.router.last_counts

    buffer = train.make_buffer(dist.group.WORLD, cfg.hidden_size, torch.float32)
    assert buffer.backend_name == "reference"
    # sync_free: worst-case shapes; the ranks hold different token counts, so the worst case is given.
    worst = sum(b[:, :-1].numel() for b in batches) if sync_free else None
    model = DeepSeekV3Model(cfg, ExpertParallel(buffer=buffer, rank=rank, size=world_size, sync_free=sync_free,
                                                worst_tokens=worst), seed=9)
    loss = model.loss(batches[rank])
    loss.backward()
    train.sync_gradients(model, world_size)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world_size

    tol = dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mean_loss, ref_loss.detach(), **tol)
    e_loc = cfg.n_routed_experts // world_size
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        expected = p.grad[rank * e_loc:(rank + 1) * e_loc] if ".experts." in name else p.grad
        torch.testing.assert_close(q.grad, expected, **tol, msg=lambda m, n=name: f"{n}: {m}")

    # Aux-loss-free bias update: counts summed over the ranks, the same bias on every rank.
    counts = model.update_expert_biases()
    torch.testing.assert_close(counts[0], ref_counts, rtol=0, atol=0)
    expected_bias = cfg.bias_update_speed * torch.sign(ref_counts.mean() - ref_counts)
    torch.testing.assert_close(model.layers[1].mlp.router.expert_bias, expected_bias)


def _start_method() -> str:
    # Autograd cannot run in a child forked after CUDA work (a GPU test earlier in this pytest process).
    return "spawn" if torch.cuda.is_initialized() else "fork"


def test_ep2_first_step_loss_and_gradients_equal_the_single_process_model() -> None:
    run_distributed(_first_step, 2, False, start_method=_start_method(), timeout=120)


def test_ep2_sync_free_first_step_equals_the_single_process_model() -> None:
    run_distributed(_first_step, 2, False, True, start_method=_start_method(), timeout=120)


def test_ep2_fp8_dispatch_first_step_equals_the_single_process_model_with_fp8_rounding() -> None:
    run_distributed(_first_step, 2, True, start_method=_start_method(), timeout=120)


# ------------------------------------------------------------------------------------------------------------
# The recipe, as a user runs it (its own 2 processes, reference backend on CPU)
def test_recipe_trains_on_two_cpu_processes_and_its_loss_falls(tmp_path: "os.PathLike[str]") -> None:
    summary = train.main(["--preset", "tiny", "--steps", "30", "--batch-size", "8", "--nprocs", "2",
                          "--device", "cpu", "--threads", "1", "--no-progress", "--out-dir", str(tmp_path)])
    assert summary is not None
    assert summary["world_size"] == 2 and summary["backend"] == "reference" and summary["device"] == "cpu"
    assert len(summary["losses"]) == 30
    assert summary["first_loss"] == pytest.approx(summary["uniform_loss"], abs=0.2)  # knows nothing at step 1
    assert summary["last_loss"] < summary["first_loss"] - 1.5
    assert summary["eval_loss"] < summary["first_loss"] - 1.5
    assert summary["tokens_per_s"] > 0 and summary["dispatch_ms_per_step"] > 0 and summary["combine_ms_per_step"] > 0
    with open(summary["loss_curve_png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
def test_grouped_gemm_experts_equal_the_per_expert_loop_on_a_hopper_gpu() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a CUDA GPU of compute capability 9.0 or newer")
    torch.manual_seed(4)
    experts = LocalExperts(6, 128, 64, first_expert=0).cuda()
    with torch.no_grad():
        experts.gate_up.normal_(0, 0.05)
        experts.down.normal_(0, 0.05)
    counts = [32, 0, 16, 48, 0, 16]  # blocks padded to GROUPED_GEMM_ALIGNMENT, two experts without rows
    assert all(c % GROUPED_GEMM_ALIGNMENT == 0 for c in counts)
    x = torch.randn(sum(counts), 128, device="cuda", requires_grad=True)
    grads = []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert experts.use_grouped_gemm(x)
        for arg in (torch.tensor(counts, device="cuda"), counts):  # grouped GEMM, then the loop
            y = experts(x, arg)
            (y.float() * torch.linspace(-1, 1, 128, device="cuda")).sum().backward()
            grads.append((y.float(), x.grad.clone(), experts.gate_up.grad.clone(), experts.down.grad.clone()))
            x.grad, experts.gate_up.grad, experts.down.grad = None, None, None
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def _intranode_kernels_built() -> bool:
    try:
        importlib.import_module("deepep_plugin._intranode_C")
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _intranode_kernels_built(), reason="needs CUDA and deepep_plugin._intranode_C")
def test_recipe_with_two_ranks_sharing_one_gpu_trains_on_the_cuda_kernels(tmp_path: "os.PathLike[str]") -> None:
    seed, batch, seq = 99, 8, 64
    summary = train.main(["--preset", "tiny", "--steps", "30", "--batch-size", str(batch), "--seq-len", str(seq),
                          "--seed", str(seed), "--nprocs", "2", "--gpus", "1", "--device", "cuda",
                          "--backend", "cuda", "--no-progress", "--out-dir", str(tmp_path)])
    assert summary is not None
    assert (summary["world_size"], summary["num_gpus"], summary["dist_backend"]) == (2, 1, "gloo")
    assert summary["ranks_share_gpus"] and summary["backend"] == "cuda" and summary["device"] == "cuda"
    # Step 1 is the single-process float32 model on the ranks' first batches, up to BF16 autocast on the GPU.
    cfg, train_cfg = load_preset("tiny")
    corpus = MarkovCorpus(cfg.vocab_size, seq, seed, train_cfg.markov_branching)
    with torch.no_grad():
        model = DeepSeekV3Model(cfg, seed=seed)
        expected = float(sum(model.loss(corpus.batch(r, batch)) for r in range(2)) / 2)
    assert summary["first_loss"] == pytest.approx(expected, abs=2e-2)
    assert summary["last_loss"] < summary["first_loss"] - 1.5
    assert summary["dispatch_ms_per_step"] > 0 and summary["combine_ms_per_step"] > 0
