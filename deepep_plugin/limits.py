"""Limits, mailbox statuses and wait codes: the one place they are written down.

The Python side imports them from here; the kernels include ``csrc/common/limits.h``, which
``python tools/gen_limits.py`` writes from this file (``tests/test_limits_header.py`` fails when the committed
header differs from what the generator writes, so the two cannot drift apart).
"""

from __future__ import annotations

from typing import NamedTuple

# ---------------------------------------------------------------------------------------------------------------
# Limits. (C++ name, value, what it bounds.)
# ---------------------------------------------------------------------------------------------------------------
#: Ranks of one node the NVLink kernels connect (DeepEP's ``NUM_MAX_NVL_PEERS``); also the default node size.
MAX_NVL_PEERS = 8
#: Channels of the normal kernels (``num_sms / 2``).
MAX_CHANNELS = 128
#: Experts per rank (DeepEP's ``NUM_MAX_LOCAL_EXPERTS``).
MAX_LOCAL_EXPERTS = 1024
#: Top-k slots per token: normal kernels within one node, normal kernels across nodes, low-latency kernels.
MAX_TOPK_INTRANODE = 32
MAX_TOPK_INTERNODE = 16
MAX_TOPK_LOW_LATENCY = 16
#: Nodes of an internode group (a node index is one lane of a warp).
MAX_NODES = 32
#: Ranks of a normal-mode group (DeepEP's bound: 20 nodes of 8).
MAX_NORMAL_RANKS = 160
#: Largest ``num_max_dispatch_tokens_per_rank`` of the low-latency kernels (16-bit token and row fields).
MAX_LOW_LATENCY_TOKENS_PER_RANK = 65535
#: Entries of one low-latency message header: the distinct local experts of one token on one rank.
MAX_LOW_LATENCY_ENTRIES = 16
#: Channels per FP8 scale.
FP8_GROUP = 128
#: Bytes of a top-k index (``topk_idx_t`` is ``torch.int64``).
TOPK_IDX_BYTES = 8

LIMITS: tuple[tuple[str, str, str], ...] = (
    ("MAX_NVL_PEERS", "kMaxNvlPeers", "ranks of one node the NVLink kernels connect"),
    ("MAX_CHANNELS", "kMaxChannels", "channels of the normal kernels (num_sms / 2)"),
    ("MAX_LOCAL_EXPERTS", "kMaxLocalExperts", "experts per rank"),
    ("MAX_TOPK_INTRANODE", "kMaxTopkIntranode", "top-k slots per token, normal kernels within one node"),
    ("MAX_TOPK_INTERNODE", "kMaxTopkInternode", "top-k slots per token, normal kernels across nodes"),
    ("MAX_TOPK_LOW_LATENCY", "kMaxTopkLowLatency", "top-k slots per token, low-latency kernels"),
    ("MAX_NODES", "kMaxNodes", "nodes of an internode group (a node index is one lane)"),
    ("MAX_NORMAL_RANKS", "kMaxNormalRanks", "ranks of a normal-mode group"),
    ("MAX_LOW_LATENCY_TOKENS_PER_RANK", "kMaxLowLatencyTokensPerRank",
     "num_max_dispatch_tokens_per_rank of the low-latency kernels (16-bit fields)"),
    ("MAX_LOW_LATENCY_ENTRIES", "kMaxLowLatencyEntries", "entries of one low-latency message header"),
    ("FP8_GROUP", "kFp8Group", "channels per FP8 scale"),
    ("TOPK_IDX_BYTES", "kTopkIdxBytes", "bytes of a top-k index (int64)"),
)


# ---------------------------------------------------------------------------------------------------------------
# Mailbox statuses: what a kernel reports to the host (csrc/common/mailbox.h describes the protocol).
# ---------------------------------------------------------------------------------------------------------------
class Code(NamedTuple):
    value: int
    cpp: str
    message: str


MAILBOX_STATUSES: tuple[Code, ...] = (
    Code(0, "kMailboxEmpty", "nothing reported"),
    Code(1, "kMailboxTimeout", "a spin-wait ran out of time; the buffer's queues are in an unknown state"),
    Code(2, "kMailboxOverflow", "more rows arrived than the output holds (num_worst_tokens too small); no write "
                                "went out of bounds and the buffer stays consistent"),
    Code(3, "kMailboxBadInput", "an input value was out of range (peer = token, channel = top-k slot, detail = the "
                                "value, observed = num_experts); the entry selected nothing and the buffer stays "
                                "consistent"),
    Code(4, "kMailboxRefused", "an operation was refused before it did any work (detail, observed: what it "
                               "found); every rank refuses the same one, so no peer waits for it"),
)
MAILBOX_EMPTY, MAILBOX_TIMEOUT, MAILBOX_OVERFLOW, MAILBOX_BAD_INPUT, MAILBOX_REFUSED = (
    c.value for c in MAILBOX_STATUSES)

# ---------------------------------------------------------------------------------------------------------------
# Wait codes: what a kernel waited for (or found wrong) when it reported. Append; never renumber.
# 1-63: intranode normal kernels and shared codes; 64-79: low-latency kernels; 80-95: internode normal kernels.
# ---------------------------------------------------------------------------------------------------------------
WAITS: tuple[Code, ...] = (
    Code(0, "kWaitNone", "nothing"),
    Code(1, "kWaitNotifyBarrier", "dispatch notify barrier (the peer's token counts; did it call dispatch?)"),
    Code(2, "kWaitDispatchSlots", "dispatch send: free slots in the peer's receive queue"),
    Code(3, "kWaitDispatchTokens", "dispatch receive: tokens from the peer"),
    Code(4, "kWaitDispatchDrain", "dispatch send: the peer to consume the last tokens"),
    Code(5, "kWaitCombineSlots", "combine send: free slots in the peer's receive queue"),
    Code(6, "kWaitCombineTokens", "combine receive: rows from the peer"),
    Code(7, "kWaitCombineDrain", "combine send: the peer to consume the last rows"),
    Code(8, "kWaitWorstTokens", "dispatch: received rows beyond num_worst_tokens"),
    Code(9, "kWaitBadExpertId", "topk_idx: an expert id outside [-1, num_experts)"),
    Code(10, "kWaitCombineRound", "combine receive: an earlier round of the channel to be released by the "
                                  "channel's other block (shared rounds)"),
    Code(64, "kWaitLLDispatchRecv", "dispatch receive: the peer's tokens (did it call low_latency_dispatch?)"),
    Code(65, "kWaitLLCombineRecv", "combine receive: the peer's expert outputs (did it call low_latency_combine?)"),
    Code(66, "kWaitLLParity", "low-latency parity guard: an op used the same buffer half as the op before it"),
    Code(80, "kWaitBarrier", "the operation barrier (did the peer make the same call?)"),
    Code(81, "kWaitNotify", "dispatch notify: the peer's token counts (did it call dispatch?)"),
    Code(82, "kWaitRingSpace", "dispatch send: free ring slots at the forwarder (its node's readers' consumption)"),
    Code(83, "kWaitForwarded", "dispatch receive: a forwarder's records from one source node"),
    Code(84, "kWaitPushed", "combine forward: a node peer's expert-output rows in the NVL ring (did it call "
                            "combine?)"),
    Code(85, "kWaitPartials", "combine receive: partial sums from a node's forwarder"),
    Code(86, "kWaitPartialSpace", "combine forward: free ring slots at the source (its consumption of partial rows)"),
    Code(87, "kWaitNvlSpace", "combine push: free NVL ring slots at a node peer (its forwarder's consumption)"),
)
WAIT_MESSAGES: dict[int, str] = {c.value: c.message for c in WAITS}


def wait_message(code: int) -> str:
    """The sentence for wait code ``code`` (``wait code N`` for one this version does not know)."""
    return WAIT_MESSAGES.get(code, f"wait code {code}")


def cpp_header() -> str:
    """The text of ``csrc/common/limits.h`` (written by ``tools/gen_limits.py``)."""
    values = globals()
    out = [
        "// Generated by tools/gen_limits.py from deepep_plugin/limits.py: edit that file, then run",
        "// `python tools/gen_limits.py`. Limits, mailbox statuses and wait codes shared by the kernels and the",
        "// Python side. Plain C++ (no CUDA, no torch).",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace deepep {",
        "",
    ]
    for py_name, cpp_name, doc in LIMITS:
        out.append(f"constexpr int {cpp_name} = {values[py_name]};  // {doc}")
    out += ["", "enum MailboxStatus : int32_t {"]
    out += [f"  {c.cpp} = {c.value},  // {c.message}" for c in MAILBOX_STATUSES]
    out += ["};", "", "enum WaitKind : int32_t {"]
    out += [f"  {c.cpp} = {c.value},  // {c.message}" for c in WAITS]
    out += ["};", "", "// The sentence the host prints for a wait code.",
            "inline const char* wait_name(int32_t what) {", "  switch (what) {"]
    out += [f"    case {c.cpp}: return \"{c.message}\";" for c in WAITS if c.value]
    out += ["    default: return \"unknown wait\";", "  }", "}", "", "}  // namespace deepep", ""]
    return "\n".join(out)
