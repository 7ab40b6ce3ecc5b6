"""``Config``: the tuning knobs of the normal (high-throughput) kernels, and the buffer-size formulas.

``Config`` keeps DeepEP V1's constructor, validation and size hints, so buffers sized for ``deep_ep`` are sized
right for us, and adds what DeepEP lacks: readable fields and a ``repr``.

Every constant that tunes performance lives here, with the measurement that chose it beside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import DeepEPInputError, expect
from .limits import MAX_NVL_PEERS as NUM_MAX_NVL_PEERS
from .limits import TOPK_IDX_BYTES

#: The size hints assume at most this many top-k slots and 128-channel scale groups per token.
HINT_MAX_TOPK = 128
HINT_MAX_SCALES = 128
#: Bytes of the per-token source metadata of the internode kernels.
SOURCE_META_BYTES = 8


_CONFIG_FIELDS = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                  "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens")


def _roundup(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(init=False, repr=True, eq=True)
class Config:
    """Tuning of the normal kernels, as DeepEP V1's ``Config``.

    Args (positional or keyword, DeepEP's order and defaults):
        num_sms: SMs (thread blocks) the normal kernels may use; two per channel, so ``num_sms / 2``
            channels. Must be even and ``>= 2``.
        num_max_nvl_chunked_send_tokens: most tokens a sender moves into an NVLink queue per step.
        num_max_nvl_chunked_recv_tokens: capacity in tokens of each (channel, peer) NVLink queue.
        num_max_rdma_chunked_send_tokens: the same for the RDMA queues (internode only).
        num_max_rdma_chunked_recv_tokens: capacity of each RDMA queue; rounded up to a multiple of the send
            chunk, as DeepEP does.
    """

    num_sms: int
    num_max_nvl_chunked_send_tokens: int
    num_max_nvl_chunked_recv_tokens: int
    num_max_rdma_chunked_send_tokens: int
    num_max_rdma_chunked_recv_tokens: int

    def __init__(
        self,
        num_sms: int = 20,
        num_max_nvl_chunked_send_tokens: int = 6,
        num_max_nvl_chunked_recv_tokens: int = 256,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 256,
    ) -> None:
        values = (num_sms, num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
                  num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens)
        if not all(type(v) is int for v in values):  # messages only on failure: Config is built per call
            for name, value in zip(_CONFIG_FIELDS, values):
                expect(isinstance(value, int) and not isinstance(value, bool),
                       f"Config: {name} must be an int, got {value!r}")
        nvl_send, nvl_recv = num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens
        rdma_send, rdma_recv = num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens
        rdma_recv = _roundup(rdma_recv, rdma_send) if rdma_send > 0 else rdma_recv
        if not (num_sms >= 0 and num_sms % 2 == 0 and 0 < nvl_send < nvl_recv and rdma_send > 0 and rdma_recv > 0
                and rdma_send < rdma_recv and rdma_send <= rdma_recv // 2):
            expect(num_sms >= 0, f"Config: num_sms must be >= 0, got {num_sms}")
            expect(num_sms % 2 == 0, f"Config: num_sms must be even (two SMs per channel), got {num_sms}")
            expect(nvl_send > 0, f"Config: num_max_nvl_chunked_send_tokens must be > 0, got {nvl_send}")
            expect(nvl_recv > 0, f"Config: num_max_nvl_chunked_recv_tokens must be > 0, got {nvl_recv}")
            expect(
                nvl_send < nvl_recv,
                f"Config: num_max_nvl_chunked_send_tokens ({nvl_send}) must be smaller than "
                f"num_max_nvl_chunked_recv_tokens ({nvl_recv})",
            )
            expect(rdma_send > 0, f"Config: num_max_rdma_chunked_send_tokens must be > 0, got {rdma_send}")
            expect(rdma_recv > 0, f"Config: num_max_rdma_chunked_recv_tokens must be > 0, got {rdma_recv}")
            expect(
                False,
                f"Config: num_max_rdma_chunked_send_tokens ({rdma_send}) must be at most half of "
                f"num_max_rdma_chunked_recv_tokens ({rdma_recv} after rounding up to a multiple of the send chunk)",
            )
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = nvl_send
        self.num_max_nvl_chunked_recv_tokens = nvl_recv
        self.num_max_rdma_chunked_send_tokens = rdma_send
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    @property
    def num_channels(self) -> int:
        """Channels of the normal kernels: ``num_sms / 2`` (at least 1)."""
        return max(self.num_sms // 2, 1)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer the normal kernels need for rows of ``hidden_bytes`` over ``num_ranks`` ranks.

        Same formula as DeepEP V1 (so a buffer sized for DeepEP suffices here). Pass
        ``hidden_bytes = hidden * max(element_size, 2)`` to cover BF16 and FP8 with one buffer.
        """
        expect(num_ranks > 0, f"get_nvl_buffer_size_hint: num_ranks must be > 0, got {num_ranks}")
        expect(
            num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0,
            f"get_nvl_buffer_size_hint: num_ranks must be < 8 or a multiple of 8, got {num_ranks}",
        )
        c = self.num_channels
        nr = max(num_ranks // NUM_MAX_NVL_PEERS, 1)
        nn = min(num_ranks, NUM_MAX_NVL_PEERS)
        q = self.num_max_nvl_chunked_recv_tokens
        size = c * nn * (2 * nr + 3) * 4
        size += c * nn * q * hidden_bytes
        size += c * nn * q * SOURCE_META_BYTES
        size += c * nn * q * HINT_MAX_TOPK * TOPK_IDX_BYTES
        size += c * nn * q * HINT_MAX_TOPK * 4
        size += c * nn * q * HINT_MAX_SCALES * 4
        return _roundup(size, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, *,
                                  num_ranks_per_node: int = NUM_MAX_NVL_PEERS) -> int:
        """Bytes of RDMA (NVSHMEM) buffer the internode normal kernels need; ``0`` within one node.

        DeepEP's formula, for nodes of ``num_ranks_per_node`` ranks (DeepEP's are always 8; a smaller node size
        emulates several nodes on one host).
        """
        expect(isinstance(num_ranks_per_node, int) and 1 <= num_ranks_per_node <= NUM_MAX_NVL_PEERS,
               f"get_rdma_buffer_size_hint: num_ranks_per_node must be in [1, {NUM_MAX_NVL_PEERS}], "
               f"got {num_ranks_per_node!r}")
        if num_ranks <= num_ranks_per_node:
            return 0
        expect(
            num_ranks % num_ranks_per_node == 0,
            f"get_rdma_buffer_size_hint: num_ranks must be a multiple of {num_ranks_per_node} above it, "
            f"got {num_ranks}",
        )
        c = self.num_channels
        nr = num_ranks // num_ranks_per_node
        p = self.num_max_rdma_chunked_recv_tokens
        size = c * nr * 18 * 2 * 4
        per_token = hidden_bytes + SOURCE_META_BYTES + HINT_MAX_TOPK * (TOPK_IDX_BYTES + 4) + HINT_MAX_SCALES * 4 + 16
        size += 2 * c * nr * p * per_token
        return _roundup(size, 128)


# DeepEP V1's default configs per EP size: (nvl_send, nvl_recv, rdma_send, rdma_recv).
# Kept identical to DeepEP's table so that code tuned for it behaves the same; the intranode CUDA kernels
# read only ``num_sms`` and the NVLink chunk sizes.
_DISPATCH_TABLE: dict[int, tuple[int, int, int, int]] = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
    96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
_COMBINE_TABLE: dict[int, tuple[int, int, int, int]] = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
    96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


def _table_config(table: dict[int, tuple[int, int, int, int]], num_ranks: int, num_sms: int, what: str) -> Config:
    if num_ranks in table:
        return Config(num_sms, *table[num_ranks])
    # Beyond DeepEP: other EP sizes (3, 5, 6, 7 ranks in one node) get the nearest larger entry
    # instead of an assertion failure.
    larger = [r for r in sorted(table) if r >= num_ranks]
    if not larger:
        raise DeepEPInputError(f"{what}: num_ranks must be at most {max(table)}, got {num_ranks}")
    return Config(num_sms, *table[larger[0]])


def dispatch_config(num_ranks: int, num_sms: int) -> Config:
    """Default dispatch ``Config`` for ``num_ranks`` ranks (DeepEP's table)."""
    return _table_config(_DISPATCH_TABLE, num_ranks, num_sms, "get_dispatch_config")


def combine_config(num_ranks: int, num_sms: int) -> Config:
    """Default combine ``Config`` for ``num_ranks`` ranks (DeepEP's table)."""
    return _table_config(_COMBINE_TABLE, num_ranks, num_sms, "get_combine_config")


# ----------------------------------------------------------------------------------------------------------
# Timeouts: every wait on a peer (GPU spin-wait or host wait) gives up after this many seconds and raises
# DeepEPTimeoutError naming the rank and what it waited for. A few seconds is far above any healthy wait
# (microseconds to milliseconds) yet short enough that a dead peer is reported before a user gives up.
DEFAULT_TIMEOUT_S = 10.0
_timeout_s: float | None = None


def get_timeout_s() -> float:
    """Seconds a wait on a peer may take before it fails (``DEEPEP_PLUGIN_TIMEOUT_S``, default 10)."""
    if _timeout_s is not None:
        return _timeout_s
    raw = os.environ.get("DEEPEP_PLUGIN_TIMEOUT_S")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise DeepEPInputError(f"DEEPEP_PLUGIN_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    expect(value > 0, f"DEEPEP_PLUGIN_TIMEOUT_S must be > 0, got {raw!r}")
    return value


def set_timeout_s(seconds: float | None) -> None:
    """Set the wait timeout for buffers created afterwards (``None`` restores the environment/default)."""
    global _timeout_s
    if seconds is not None:
        expect(seconds > 0, f"set_timeout_s: seconds must be > 0, got {seconds}")
    _timeout_s = None if seconds is None else float(seconds)
