"""Whether the normal kernels' blocks can all be resident at once.

The intranode kernels wait on each other across blocks (senders for receivers, and across ranks), so every one of
their ``num_sms`` blocks must run at the same time. A block takes a whole SM (1024 threads at up to 64 registers
each fill its register file), so ``num_sms`` above the SMs this process may use can never finish: refuse it with
an error that says so, instead of a timeout that names a peer. Under MPS a client may use only
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` of the SMs. Another persistent kernel on the GPU cannot be seen from here;
the kernels' timeout message names that possibility.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional

from ..errors import DeepEPInputError


def usable_sms(sm_count: int, env: Optional[Mapping[str, str]] = None) -> tuple[int, str]:
    """``(SMs this process may keep blocks resident on, why that many)``; MPS's percentage rounded up, so only a
    count that certainly cannot fit is refused."""
    env = os.environ if env is None else env
    raw = env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    if raw:
        try:
            pct = float(raw)
        except ValueError:
            pct = 100.0
        if 0 < pct < 100:
            usable = max(1, math.ceil(sm_count * pct / 100))
            return usable, f"{usable} of the GPU's {sm_count} SMs (MPS: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={raw})"
    return sm_count, f"the GPU's {sm_count} SMs"


def check_resident(what: str, num_sms: int, usable: tuple[int, str]) -> None:
    """Raise ``DeepEPInputError`` when ``num_sms`` blocks of one SM each cannot all be resident."""
    if num_sms > usable[0]:
        raise DeepEPInputError(
            f"{what}: config num_sms={num_sms} needs all its blocks resident at once (one per SM), but this process "
            f"may use {usable[1]}; pass a Config (or Buffer.set_num_sms) with at most {usable[0]} SMs")
