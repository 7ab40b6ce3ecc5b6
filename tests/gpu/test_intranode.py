"""Intranode CUDA kernels (``deepep_plugin.backends.cuda_intranode``) against plain-PyTorch expectations.

Runs 2 and 4 processes (they may share one GPU: peers' buffers are mapped with CUDA IPC either way). Each test
regenerates every rank's random inputs from its seed and checks one behaviour: layout, BF16 and FP8 dispatch
(bit-exact, handle included), cached dispatch, combine with weights and biases (FP32-accumulation
tolerance), ring wrap-around with a shallow queue, CUDA-graph replay of the num_worst_tokens path, the
timeout error and the buffer-size error.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402
from gpu_env import SPAWN, missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu

if missing_kernels("_intranode_C"):
    pytest.skip(missing_kernels("_intranode_C"), allow_module_level=True)

import intranode_workers as w  # noqa: E402


@pytest.mark.parametrize("world_size", [2, 4], ids="{}-ranks".format)
def test_layout_matches_plain_torch(world_size: int) -> None:
    run_distributed(w.layout_worker, world_size, seed=11, num_tokens=300, num_experts=64, topk=8, **SPAWN)


@pytest.mark.parametrize("world_size", [2, 4, 8], ids="{}-ranks".format)
def test_bf16_dispatch_and_combine(world_size: int) -> None:
    # hidden 7168 (DeepSeek-V3), top-8 of 64 experts, 4 channels, alignment 4, three rounds on one buffer.
    run_distributed(w.dispatch_combine_worker, world_size, seed=21, num_tokens=200, hidden=7168, num_experts=64,
                    topk=8, num_sms=8, queue_tokens=256, alignment=4, repeats=3, **SPAWN)


def test_odd_hidden_topk16_shallow_queue() -> None:
    # hidden 264 (a multiple of 8, not of 128), top-16, a 4-slot queue: the ring wraps many times.
    run_distributed(w.dispatch_combine_worker, 2, seed=22, num_tokens=150, hidden=264, num_experts=32, topk=16,
                    num_sms=6, queue_tokens=4, **SPAWN)


def test_one_channel_four_ranks_shallow_queue() -> None:
    run_distributed(w.dispatch_combine_worker, 4, seed=23, num_tokens=90, hidden=520, num_experts=16, topk=4,
                    num_sms=2, queue_tokens=7, alignment=3, **SPAWN)


@pytest.mark.parametrize("world_size", [2, 4], ids="{}-ranks".format)
def test_fp8_dispatch_with_strided_scales(world_size: int) -> None:
    run_distributed(w.dispatch_combine_worker, world_size, seed=31, num_tokens=160, hidden=1024, num_experts=32,
                    topk=6, num_sms=8, queue_tokens=64, fp8=True, **SPAWN)


@pytest.mark.parametrize("split,depth", [("0", "4"), ("0", "8"), ("1", "4")], ids=["receivers-4", "receivers-8",
                                                                                 "split-4"])
@pytest.mark.parametrize("world_size", [2, 3], ids="{}-ranks".format)
def test_dispatch_tuning_variants(world_size: int, split: str, depth: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default (local split, depth 8) runs in every other test; these are the environment's other choices, on an
    # odd rank count too (warps left idle by the split) and FP8 with 65 scales (past the 64 held in registers).
    monkeypatch.setenv("DEEPEP_PLUGIN_DISPATCH_LOCAL_SPLIT", split)
    monkeypatch.setenv("DEEPEP_PLUGIN_COPY_DEPTH", depth)
    run_distributed(w.dispatch_combine_worker, world_size, seed=24, num_tokens=170, hidden=8320, num_experts=24,
                    topk=8, num_sms=6, queue_tokens=16, fp8=True, **SPAWN)


@pytest.mark.parametrize("queue_tokens", [128, 64], ids=["all-split", "mixed"])
@pytest.mark.parametrize("world_size", [2, 3], ids="{}-ranks".format)
def test_early_dispatch(world_size: int, queue_tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # DEEPEP_PLUGIN_EARLY_DISPATCH=1: a rank whose sends fit in its queues (ceil(T / 3 channels) <= Q) runs its
    # senders before the count read and the rest after; with Q = 64 rank 0 (170 tokens) splits and rank 1 (207) does
    # not. BF16 and FP8 with 65 scales, a rank with no tokens at 3 ranks, three rounds on one buffer.
    monkeypatch.setenv("DEEPEP_PLUGIN_EARLY_DISPATCH", "1")
    for fp8 in (False, True):
        run_distributed(w.dispatch_combine_worker, world_size, seed=26, num_tokens=170, hidden=8320, num_experts=24,
                        topk=8, num_sms=6, queue_tokens=queue_tokens, fp8=fp8, repeats=3, **SPAWN)


@pytest.mark.parametrize("share,world_size,queue_tokens,num_tokens,num_sms", [
    ("1", 2, 16, 480, 6), ("1", 3, 16, 480, 6), ("1", 4, 16, 480, 6), ("1", 2, 256, 480, 6), ("1", 4, 256, 480, 6),
    ("1", 3, 4, 130, 6), ("1", 2, 64, 3, 16), ("0", 2, 16, 480, 6), ("0", 4, 256, 480, 6)],
    ids=["shared-2-ranks-ring-wraps", "shared-3-ranks-ring-wraps", "shared-4-ranks-ring-wraps",
         "shared-2-ranks-deep-queue", "shared-4-ranks-deep-queue", "shared-3-ranks-rounds-of-2",
         "shared-2-ranks-empty-channels", "receivers-2-ranks-ring-wraps", "receivers-4-ranks-deep-queue"])
def test_combine_round_sharing(share: str, world_size: int, queue_tokens: int, num_tokens: int, num_sms: int,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    # DEEPEP_PLUGIN_COMBINE_SHARE=1 (the default): a combine channel's sender block takes reduction rounds once its
    # sends are out; rounds are claimed by either block and released in order. 0: the receiver block does them all.
    # Two combines per iteration (without and with biases) and three iterations on one buffer: the round state must
    # be clear between calls, and each stream's recorded end right. 16 slots: the ring wraps many times with rounds
    # of 8; 4 slots: rounds of 2; 3 tokens on 8 channels: channels without tokens; 4 ranks: idle sender warps
    # (32 = 3 x 10 + 2).
    monkeypatch.setenv("DEEPEP_PLUGIN_COMBINE_SHARE", share)
    run_distributed(w.dispatch_combine_worker, world_size, seed=28, num_tokens=num_tokens, hidden=2048,
                    num_experts=48, topk=8, num_sms=num_sms, queue_tokens=queue_tokens, repeats=3, **SPAWN)


@pytest.mark.parametrize("share,small", [("1", "1"), ("0", "1"), ("1", "0")],
                         ids=["shared", "receivers", "one-warp-per-token"])
@pytest.mark.parametrize("world_size,num_tokens,queue_tokens", [(2, 40, 64), (3, 60, 64), (4, 20, 16)],
                         ids=["2-ranks-4-warps", "3-ranks-2-warps", "4-ranks-mixed-shallow"])
def test_combine_small_rounds(world_size: int, num_tokens: int, queue_tokens: int, share: str, small: str,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    # DEEPEP_PLUGIN_COMBINE_SMALL_ROUNDS=1 (the default; 0 is the one-warp path on the same small channels): a
    # channel of fewer than 32 tokens gives each token 2 (16-31 tokens) or 4 warps, in rounds of 16 or 8 tokens.
    # 3 channels per rank of 6 to 33 tokens (rank r has num_tokens + 37 r, the last of 3 or 4 ranks none): 4, 2
    # and 1 warps per token within one call. 64 slots: rounds of 8, 16 and 32 tokens; 16 slots: rounds of 8
    # whatever the warps per token.
    monkeypatch.setenv("DEEPEP_PLUGIN_COMBINE_SMALL_ROUNDS", small)
    monkeypatch.setenv("DEEPEP_PLUGIN_COMBINE_SHARE", share)
    run_distributed(w.dispatch_combine_worker, world_size, seed=29, num_tokens=num_tokens, hidden=7168,
                    num_experts=48, topk=8, num_sms=6, queue_tokens=queue_tokens, repeats=3, **SPAWN)


@pytest.mark.parametrize("early,queue_tokens", [("0", 32), ("1", 256)], ids=["one-launch", "split"])
@pytest.mark.parametrize("world_size", [2, 3], ids="{}-ranks".format)
def test_allocation_under_memory_pressure_keeps_the_buffer_in_step(world_size: int, early: str, queue_tokens: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The allocator's default configuration: the worker's caps rely on how it rounds, caches and retries.
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        pytest.skip("PYTORCH_CUDA_ALLOC_CONF is set; the memory-pressure cases assume the default caching allocator")
    monkeypatch.setenv("DEEPEP_PLUGIN_EARLY_DISPATCH", early)
    run_distributed(w.failed_output_allocation_worker, world_size, seed=27, num_tokens=700, hidden=7168,
                    num_experts=48, topk=8, queue_tokens=queue_tokens, **SPAWN)


def test_fp8_with_more_scales_than_registers_hold_three_ranks() -> None:
    run_distributed(w.dispatch_combine_worker, 3, seed=25, num_tokens=130, hidden=8320, num_experts=24, topk=8,
                    num_sms=4, queue_tokens=16, fp8=True, **SPAWN)


@pytest.mark.parametrize("world_size", [2, 4], ids="{}-ranks".format)
def test_worst_tokens_dispatch_combine_in_cuda_graph(world_size: int) -> None:
    run_distributed(w.worst_tokens_graph_worker, world_size, seed=41, num_tokens=120, hidden=2048, num_experts=32,
                    topk=4, num_sms=8, queue_tokens=64, replays=6, **SPAWN)


def test_timeout_names_rank_and_wait() -> None:
    run_distributed(w.timeout_worker, 2, timeout_s=2.0, **SPAWN)


def test_buffer_too_small_is_reported() -> None:
    run_distributed(w.buffer_too_small_worker, 2, **SPAWN)


@pytest.mark.parametrize("world_size", [2, 4, 8], ids="{}-ranks".format)
def test_matches_reference_backend(world_size: int) -> None:
    run_distributed(w.reference_match_worker, world_size, seed=51, num_tokens=140, hidden=1024, num_experts=32,
                    topk=6, num_sms=6, **SPAWN)
