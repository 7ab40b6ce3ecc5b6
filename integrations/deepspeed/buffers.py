"""One ``deepep_plugin.Buffer`` per expert-parallel group, shared by every MoE layer that uses the group.

A ``Buffer`` is collective to build and holds the communication memory, so layers do not own one each: the
first forward of any layer on a group builds it, sized for the widest rows seen so far, and later layers reuse
it. A layer whose rows need more room (a wider hidden size or dtype) rebuilds it, collectively, on all ranks of
the group (they all run the same layer at the same time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch.distributed as dist

from deepep_plugin import Buffer
from deepep_plugin.config import Config, combine_config, dispatch_config


@dataclass
class GroupBuffer:
    """A ``Buffer`` and the dispatch/combine ``Config`` its layers pass to every call."""

    buffer: Buffer
    dispatch_config: Config
    combine_config: Config
    hidden_bytes: int


_BUFFERS: Dict[Tuple[int, str, int], GroupBuffer] = {}


def group_buffer(group: dist.ProcessGroup, hidden_bytes: int, backend: str, num_sms: int) -> GroupBuffer:
    """The shared ``Buffer`` of ``group`` for rows of ``hidden_bytes`` bytes (collective when it is built).

    Args:
        group: the expert-parallel process group (``MOELayer.ep_group``).
        hidden_bytes: bytes of one token row (``hidden * max(element_size, 2)``, so FP8 and BF16 share it).
        backend: ``"auto"``, ``"reference"`` or ``"cuda"`` (the ``Buffer`` backend).
        num_sms: SMs the normal kernels may use (sets the channel count of both configs).
    """
    key = (id(group), backend, num_sms)
    cached = _BUFFERS.get(key)
    if cached is not None and cached.buffer.group is group and cached.hidden_bytes >= hidden_bytes:
        return cached
    num_ranks = dist.get_world_size(group)
    configs = (dispatch_config(num_ranks, num_sms), combine_config(num_ranks, num_sms))
    buffer = Buffer.sized_for(group, hidden_bytes, num_sms=num_sms, backend=backend)
    entry = GroupBuffer(buffer, configs[0], configs[1], hidden_bytes)
    _BUFFERS[key] = entry
    return entry


def release_buffers() -> None:
    """Drop every cached ``Buffer`` (their memory is freed when no layer call holds them)."""
    _BUFFERS.clear()
