"""DeepEP's ``deep_ep.utils`` surface: ``EventOverlap``, ``EventHandle`` and ``check_nvlink_connections``."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import DeepEPError
from .events import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap", "check_nvlink_connections"]


def check_nvlink_connections(group: dist.ProcessGroup) -> None:
    """On PCIe GPUs, check that every pair of GPUs of ``group`` has peer access (collective).

    SXM parts (H100/H200 SXM) always have NVLink between GPUs of one node; PCIe parts need an NVLink bridge, and
    the kernels need peer access. Raises :class:`DeepEPError` naming the pair that lacks it.
    """
    if not torch.cuda.is_available() or "PCIE" not in torch.cuda.get_device_name().upper():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(torch.cuda.device_count())))
    physical = [int(v) for v in visible.split(",") if v.strip()]
    mine = physical[torch.cuda.current_device()]
    devices: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(devices, mine, group=group)
    local = {d: physical.index(d) for d in devices if d in physical}
    for a in local:
        for b in local:
            if a != b and not torch.cuda.can_device_access_peer(local[a], local[b]):
                raise DeepEPError(f"check_nvlink_connections: GPUs {a} and {b} have no peer access (NVLink) "
                                  "between them; the intranode kernels need it (use backend='reference')")
