"""Internode normal kernels (network hop once per node, then NVLink) against the reference backend.

Nodes are emulated on one host by a node size smaller than the group: 2 ranks = 2 nodes of 1, 4 ranks = 2 nodes
of 2 (processes may share one GPU; the "network" hop then runs over P2P stores or, with ``puts``, NVSHMEM puts).
These tests check correctness; they say nothing about RDMA speed.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402
from gpu_env import SPAWN, missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu

if missing_kernels("_nvshmem_C"):  # the NVSHMEM extension holds the internode kernels
    pytest.skip(missing_kernels("_nvshmem_C"), allow_module_level=True)

import internode_workers as w  # noqa: E402

#: (ranks, ranks per node): 2 nodes of 1 rank, 2 nodes of 2.
TOPOLOGIES = [pytest.param(2, 1, id="2x1-ranks"), pytest.param(4, 2, id="2x2-ranks")]


@pytest.mark.parametrize("world,per_node", TOPOLOGIES)
@pytest.mark.parametrize("kind", ["node_limited", "imbalanced", "zero_tokens", "one_rank"])
def test_internode_matches_reference(world: int, per_node: int, kind: str) -> None:
    run_distributed(w.dispatch_combine_worker, world, per_node=per_node, kind=kind, seed=61, hidden=512, num_topk=6,
                    num_sms=8, **SPAWN)


@pytest.mark.parametrize("world,per_node", TOPOLOGIES)
def test_internode_over_nvshmem_puts(world: int, per_node: int) -> None:
    # The RDMA code path: other nodes reached with one NVSHMEM put (and signal) per chunk of 3 records.
    run_distributed(w.dispatch_combine_worker, world, per_node=per_node, kind="node_limited", seed=62, hidden=1024,
                    num_topk=8, num_sms=4, puts=True, rdma_chunk=3, **SPAWN)


def test_internode_deepseek_hidden_top8_one_channel_chunk_of_one() -> None:
    # One channel (2 SMs): every stream holds all of a node's records; progress after every record.
    run_distributed(w.dispatch_combine_worker, 4, per_node=2, kind="random", seed=63, hidden=7168, num_topk=8,
                    num_sms=2, rdma_chunk=1, **SPAWN)


@pytest.mark.parametrize("puts", [False, True], ids=["stores", "puts"])
def test_internode_rings_wrap(puts: bool) -> None:
    # One channel, 32-slot RDMA rings and 16-row NVL rings: a node's 20-90 tokens per rank wrap each ring several
    # times, so senders wait for their readers (dispatch), pushers for their forwarders and forwarders for their
    # sources (combine), in the same fixed buffers.
    run_distributed(w.dispatch_combine_worker, 4, per_node=2, kind="node_limited", seed=66, hidden=256, num_topk=8,
                    num_sms=2, puts=puts, rdma_chunk=4, ring_slots=32, nvl_slots=16, **SPAWN)


def test_internode_eight_ranks_four_nodes_small_rings() -> None:
    # 4 nodes, 2 channels: up to 45 records per (node, channel) stream in 32-slot rings, chunks of 2.
    run_distributed(w.dispatch_combine_worker, 8, per_node=2, kind="node_limited", seed=67, hidden=128, num_topk=4,
                    num_sms=4, rdma_chunk=2, ring_slots=32, nvl_slots=24, **SPAWN)


def test_internode_eight_ranks_four_nodes() -> None:
    run_distributed(w.dispatch_combine_worker, 8, per_node=2, kind="node_limited", seed=65, hidden=256, num_topk=4,
                    num_sms=6, rdma_chunk=4, **SPAWN)


def test_internode_worst_tokens_in_cuda_graph() -> None:
    run_distributed(w.graph_worker, 4, per_node=2, seed=64, **SPAWN)


def test_internode_timeout_names_rank_and_wait() -> None:
    run_distributed(w.timeout_worker, 2, per_node=1, **SPAWN)
