"""``python -m deepep_plugin.bench fuzz``: random cases, ``Buffer(backend="cuda")`` against ``backend="reference"``.

Every case runs the same calls on two Buffers of the same ranks: the kernels (``backend="cuda"``, GPU tensors) and
the reference (``backend="reference"``, CPU copies of the same inputs), and compares every output bit for bit:
layout, received rows and scales, received top-k ids and weights, per-expert counts, handle tensors, combined rows
and weights, low-latency counts, rows, source info and combined output. Only rows no promise covers are left out
(padding rows of ``num_worst_tokens`` outputs, low-latency rows beyond ``recv_count``).

Cases are grouped in batches, one per (mode, ranks, node size): the ranks are spawned once per batch (processes
share the GPUs there are) and build one kernel Buffer and one reference Buffer, sized for the largest case of
the batch; every case of the batch then runs on them, so queue counters carry over between cases as in training.
Modes: ``intranode`` (one node), ``internode`` (nodes emulated by ``num_ranks_per_node`` smaller than the group;
the 2-rank batch reaches its other "node" with NVSHMEM puts) and ``low_latency``; NVSHMEM starts once per process,
so internode and low-latency batches are separate spawns.

Case parameters come from a generator seeded with ``(seed, case number)`` only, so every rank draws the same ones;
each rank's data comes from ``(seed, case number, rank)``. A failing comparison, or an exception in a case, is
recorded and the batch goes on; a timeout (or any error that leaves a Buffer unusable) ends the batch. Each
failure is printed with its parameters and the command that replays it (``--only-case``).

Combine inputs: the kernels sum a token's copies in a fixed order (intranode: bias, bias, ranks in order, as the
reference) but the internode kernels round one partial sum per node to BF16. Internode combine rows are therefore
small integers times a power of two (every partial sum is exact in BF16, so any order gives the same bits);
intranode cases use such rows or plain random ones.

``--device cpu`` runs the same harness with ``backend="reference"`` on both sides (CI without GPUs);
``--corrupt-one`` flips one byte of one compared output in the first case, to show that a difference is caught.

Writes ``benchmarks/results/fuzz.json`` (``--out``); exits with status 1 when a case mismatched or a batch died.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import spawn

NORMAL_KINDS = ("bf16", "fp8_rowmajor", "fp8_colmajor", "ue8m0", "worst_tokens", "cached")
LL_KINDS = ("bf16", "fp8", "fp8_round_scale", "ue8m0", "zero_copy", "hook")
MODES = {"intranode": NORMAL_KINDS, "internode": NORMAL_KINDS, "low_latency": LL_KINDS}
ALL_KINDS = tuple(f"{mode}/{kind}" for mode, kinds in MODES.items() for kind in kinds)

MAX_HIDDEN = 8192
MAX_SMS = 48
MAX_TOKENS = 256
#: Elements of one rank's normal-mode input at most (tokens x hidden), so that most cases stay small.
MAX_INPUT_ELEMENTS = 1 << 20
#: Low-latency batches: num_max_dispatch_tokens_per_rank, the RDMA bytes of each Buffer, and the most bytes of one
#: [E_loc, R * N_ll, H] BF16 receive tensor (bounds experts x hidden of a case).
LL_TOKENS = 256
LL_RDMA_BYTES = 160 << 20
LL_MAX_RECV_BYTES = 32 << 20
#: A case's buffer-size hint stays below this fraction of its batch's buffer.
FIT = 0.9
NOTABLE_HIDDEN = (16, 24, 40, 56, 128, 136, 264, 520, 1000, 1024, 2048, 2880, 4096, 5120, 7168, 8192)
NOTABLE_HIDDEN_128 = (128, 256, 384, 640, 1152, 2048, 2944, 4096, 5120, 7168, 8192)
FORMATS = ("bf16", "fp8_row", "fp8_col", "ue8m0_row", "ue8m0_col")
PHASES = ("setup", "layout", "dispatch", "cached dispatch", "combine", "low-latency dispatch",
          "low-latency combine", "sync")
MAX_FAILURES_KEPT = 20
#: Share of the cases each batch gets, by (mode, ranks, node size); other batches get 1.
WEIGHTS = {("intranode", 2, 2): 3.0, ("intranode", 4, 4): 2.5, ("intranode", 8, 8): 2.0,
           ("internode", 2, 1): 1.2, ("internode", 4, 2): 1.5, ("internode", 8, 4): 1.0, ("internode", 8, 2): 1.0,
           ("low_latency", 2, 2): 1.5, ("low_latency", 4, 4): 1.2, ("low_latency", 8, 8): 1.0}


# ----------------------------------------------------------------------------------------------------------------
# Batches and case parameters (pure Python: the parent and every rank compute the same ones)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """One spawn: its mode, group, node size, kinds and buffer sizes."""

    mode: str
    ranks: int
    per_node: int
    weight: float
    kinds: tuple
    puts: bool = False
    nvl_bytes: int = 0
    rdma_bytes: int = 0
    n_ll: int = 0

    @property
    def label(self) -> str:
        text = f"{self.mode} {self.ranks} ranks"
        if self.mode == "internode":
            text += f" as {self.ranks // self.per_node}x{self.per_node}" + (" (puts)" if self.puts else "")
        return text


def _kind_selected(kind: str, filters: Optional[list]) -> bool:
    """``kind`` (``mode/name``) matches a filter that names it, its mode, or a glob (``*/cached``)."""
    if not filters:
        return True
    return any(kind == f or kind.startswith(f + "/") or fnmatch.fnmatch(kind, f) for f in filters)


def _sizes(mode: str, ranks: int, per_node: int) -> tuple[int, int]:
    """(nvl_bytes, rdma_bytes) of a batch's Buffers: ``Buffer.sized_for(group, MAX_HIDDEN * 2, num_sms=48)``'s
    numbers (the internode NVL part for the node size), a fixed size for low-latency."""
    from ..config import combine_config, dispatch_config

    if mode == "low_latency":
        return 0, LL_RDMA_BYTES
    configs = (dispatch_config(ranks, MAX_SMS), combine_config(ranks, MAX_SMS))
    hidden_bytes = MAX_HIDDEN * 2
    if mode == "intranode":
        return max(c.get_nvl_buffer_size_hint(hidden_bytes, ranks) for c in configs), 0
    nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, per_node) for c in configs)
    rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, ranks, num_ranks_per_node=per_node) for c in configs)
    return nvl, rdma


def plan_batches(ranks: list, filters: Optional[list]) -> list:
    """The batches for these rank counts, in run order, keeping only kinds that pass ``filters``."""
    batches = []
    for mode in MODES:
        for r in ranks:
            if mode == "internode":
                # Nodes of G ranks: 2 = 2x1 (over NVSHMEM puts), 4 = 2x2, 8 = 2x4 and 4x2; else the largest G.
                shapes = {2: [1], 4: [2], 8: [4, 2]}.get(r) or [max(g for g in range(1, r) if r % g == 0)]
            else:
                shapes = [r]
            kinds = tuple(k for k in MODES[mode] if _kind_selected(f"{mode}/{k}", filters))
            if not kinds:
                continue
            for g in shapes:
                nvl, rdma = _sizes(mode, r, g)
                w = WEIGHTS.get((mode, r, g), 1.0)
                batches.append(Batch(mode, r, g, w, kinds, puts=(mode == "internode" and g == 1), nvl_bytes=nvl,
                                     rdma_bytes=rdma, n_ll=LL_TOKENS if mode == "low_latency" else 0))
    return batches


def allot(total: int, batches: list) -> list:
    """Case numbers of each batch: ``total`` split by weight (largest remainder), contiguous, in batch order."""
    weights = [b.weight for b in batches]
    s = sum(weights) or 1.0
    exact = [total * w / s for w in weights]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(batches)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def _log_int(rng: random.Random, lo: int, hi: int) -> int:
    """An int in [lo, hi], log-uniform (small values as likely per octave as large ones)."""
    if hi <= lo:
        return lo
    return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


def _hidden(rng: random.Random, align: int) -> int:
    """A hidden size, a multiple of ``align`` elements in [max(16, align), MAX_HIDDEN]."""
    if rng.random() < 0.35:
        return rng.choice(NOTABLE_HIDDEN_128 if align == 128 else NOTABLE_HIDDEN)
    lo = max(16, align)
    return max(lo, _log_int(rng, lo, MAX_HIDDEN) // align * align)


def _topk(rng: random.Random, most: int) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.randint(1, min(8, most))
    if r < 0.8:
        return rng.randint(1, min(16, most))
    return rng.randint(1, most)


def _tokens(rng: random.Random, ranks: int, cap: int, least: int = 0) -> list:
    """Tokens of every rank: mostly small, some ranks (rarely all) with none."""
    r = rng.random()
    hi = min(cap, 32 if r < 0.6 else 128 if r < 0.9 else MAX_TOKENS)
    counts = [rng.randint(least, max(least, hi)) for _ in range(ranks)]
    u = rng.random()
    if u < 0.03:
        counts = [0] * ranks
    elif u < 0.28:
        for j in rng.sample(range(ranks), rng.randint(1, ranks - 1)):
            counts[j] = 0
    return counts


def _routing(rng: random.Random, internode: bool) -> dict:
    patterns = ["random"] * 4 + ["minus_one", "one_rank", "imbalanced", "duplicates"] + (["node_limited"] * 2
                                                                                         if internode else [])
    pattern = rng.choice(patterns)
    drop = rng.uniform(0.5, 0.95) if pattern == "minus_one" else rng.choice([0.0, 0.0, 0.05, 0.2, 0.4])
    return {"routing": pattern, "drop": round(drop, 3), "shuffle_slots": rng.random() < 0.5}


def _roundup(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _config(rng: random.Random, num_sms: int, internode: bool) -> list:
    """Random valid ``Config`` fields: nvl_send < nvl_recv, rdma_send <= rdma_recv / 2 (internode: >= 32 slots
    and >= 16 NVL rows)."""
    if not internode and rng.random() < 0.1:
        nvl_recv = rng.randint(2, 8)
    else:
        nvl_recv = _log_int(rng, 16 if internode else 8, 512)
    nvl_send = rng.randint(1, min(nvl_recv - 1, 32))
    rdma_send = rng.randint(1, 16)
    rdma_recv = _roundup(rng.randint(max(32, 2 * rdma_send), 256), rdma_send)
    return [num_sms, nvl_send, nvl_recv, rdma_send, rdma_recv]


def _fit_config(cfg: list, batch: Batch, hidden_bytes: int) -> list:
    """Shrink the queues of ``cfg`` until its size hints fit the batch's buffers (sized for 48 SMs and the
    default queues, so the SM count never has to change: cached dispatch and combine keep the handle's)."""
    from ..config import Config

    internode = batch.mode == "internode"
    cfg = list(cfg)
    for _ in range(64):
        c = Config(*cfg)
        nvl_ok = c.get_nvl_buffer_size_hint(hidden_bytes, batch.per_node) <= FIT * batch.nvl_bytes
        rdma_ok = not internode or c.get_rdma_buffer_size_hint(
            hidden_bytes, batch.ranks, num_ranks_per_node=batch.per_node) <= FIT * batch.rdma_bytes
        if nvl_ok and rdma_ok:
            return cfg
        if not nvl_ok:
            cfg[2] = max(16 if internode else 2, cfg[2] // 2)
            cfg[1] = max(1, min(cfg[1], cfg[2] - 1))
        if not rdma_ok:
            cfg[4] = _roundup(max(32, cfg[4] // 2), cfg[3])
    raise RuntimeError(f"fuzz: no config fits the batch buffers ({cfg}, hidden bytes {hidden_bytes})")


def case_params(seed: int, case: int, batch: Batch) -> dict:
    """Every parameter of case ``case`` (a JSON-able dict; the same on every rank and in the parent)."""
    rng = random.Random(f"deepep-fuzz:{seed}:{case}")
    kind = rng.choice(batch.kinds)
    p: dict = {"case": case, "kind": f"{batch.mode}/{kind}", "seed": seed, "mode": batch.mode, "ranks": batch.ranks,
               "num_ranks_per_node": batch.per_node, "puts": batch.puts}
    if batch.mode == "low_latency":
        p.update(_ll_params(rng, kind, batch))
    else:
        p.update(_normal_params(rng, kind, batch))
    return p


def _normal_params(rng: random.Random, kind: str, batch: Batch) -> dict:
    internode = batch.mode == "internode"
    fmt = {"bf16": "bf16", "fp8_rowmajor": "fp8_row", "fp8_colmajor": "fp8_col"}.get(kind)
    if kind == "ue8m0":
        fmt = rng.choice(["ue8m0_row", "ue8m0_col"])
    if fmt is None:  # worst_tokens, cached: any payload
        fmt = rng.choice(["bf16", "bf16"] + list(FORMATS[1:]))
    hidden = _hidden(rng, 8 if fmt == "bf16" else 128)
    num_sms = 2 * rng.randint(1, MAX_SMS // 2)
    ranks = batch.ranks
    tokens = _tokens(rng, ranks, max(1, min(MAX_TOKENS, MAX_INPUT_ELEMENTS // hidden)))
    worst = kind == "worst_tokens"
    cached = kind == "cached" or (worst and rng.random() < 0.5)
    cached_fmt = rng.choice(FORMATS) if hidden % 128 == 0 else "bf16"
    hb = hidden * 2
    p = {"format": fmt, "round_scale": fmt.startswith("ue8m0") or (fmt != "bf16" and rng.random() < 0.3),
         "special_values": fmt == "bf16" and rng.random() < 0.1, "hidden": hidden,
         "topk": _topk(rng, 16 if internode else 32), "experts_per_rank": _log_int(rng, 1, 64), "tokens": tokens,
         **_routing(rng, internode), "target_rank": rng.randrange(ranks),
         "dispatch_config": _fit_config(_config(rng, num_sms, internode), batch, hb),
         "expert_alignment": rng.choice([1, 1, 1, 2, 3, 4, 8, 16, 128]),
         "num_worst_tokens": max(1, sum(tokens) + rng.randint(0, 16)) if worst else 0,
         "dispatch_stream": rng.choice(["sync", "sync", "async", "async_comm"]),
         "cached": cached, "cached_format": cached_fmt,
         "cached_round_scale": cached_fmt.startswith("ue8m0") or (cached_fmt != "bf16" and rng.random() < 0.3),
         "cached_config": _fit_config(_config(rng, num_sms, internode), batch, hb),
         "combine_config": _fit_config(_config(rng, num_sms, internode), batch, hb),
         "combine_data": "exact" if internode else rng.choice(["exact", "random"]),
         "combine_weights": rng.random() < 0.8, "bias": rng.choice(["none", "one", "pair"]),
         "combine_stream": rng.choice(["sync", "sync", "async", "async_comm"])}
    p["num_experts"] = p["experts_per_rank"] * ranks
    return p


def _ll_params(rng: random.Random, kind: str, batch: Batch) -> dict:
    from ..buffer import Buffer

    ranks, n_ll = batch.ranks, batch.n_ll
    hidden = _hidden(rng, 128)
    while hidden > 128 and ranks * n_ll * hidden * 2 > LL_MAX_RECV_BYTES:
        hidden = max(128, hidden // 2 // 128 * 128)
    most = max(1, min(64, LL_MAX_RECV_BYTES // (ranks * n_ll * hidden * 2)))
    e_loc = _log_int(rng, 1, most)
    while e_loc > 1 and Buffer.get_low_latency_rdma_size_hint(n_ll, hidden, ranks, e_loc * ranks) > \
            FIT * batch.rdma_bytes:
        e_loc -= 1
    use_fp8 = kind not in ("bf16",) and (kind not in ("zero_copy", "hook") or rng.random() < 0.6)
    round_scale = kind in ("fp8_round_scale", "ue8m0") or (use_fp8 and kind in ("zero_copy", "hook")
                                                           and rng.random() < 0.4)
    use_ue8m0 = kind == "ue8m0" or (round_scale and kind in ("zero_copy", "hook") and rng.random() < 0.5)
    if kind == "hook":
        d_hook, c_hook = rng.choice([(True, True), (True, False), (False, True)])
    else:
        d_hook, c_hook = rng.random() < 0.15, rng.random() < 0.15
    r = rng.random()
    hi = 16 if r < 0.5 else 128 if r < 0.8 else n_ll
    tokens = [rng.randint(1, hi) for _ in range(ranks)]
    if rng.random() < 0.2:
        for j in rng.sample(range(ranks), rng.randint(1, ranks - 1)):
            tokens[j] = 0
    return {"hidden": hidden, "topk": _topk(rng, 16), "experts_per_rank": e_loc, "num_experts": e_loc * ranks,
            "num_max_dispatch_tokens_per_rank": n_ll, "tokens": tokens, **_routing(rng, False),
            "target_rank": rng.randrange(ranks), "use_fp8": use_fp8, "round_scale": round_scale,
            "use_ue8m0": use_ue8m0, "zero_copy": kind == "zero_copy" or rng.random() < 0.2,
            "dispatch_hook": d_hook, "combine_hook": c_hook,
            "dispatch_async": not d_hook and rng.random() < 0.2, "combine_async": not c_hook and rng.random() < 0.2,
            "out": rng.random() < 0.3, "recv_stats": rng.random() < 0.3}


# ----------------------------------------------------------------------------------------------------------------
# Inputs (CPU; each rank its own)
# ----------------------------------------------------------------------------------------------------------------
def _data_gen(p: dict, rank: int, salt: str) -> torch.Generator:
    digest = hashlib.sha256(f"deepep-fuzz-data:{p['seed']}:{p['case']}:{rank}:{salt}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def _tokens_x(num_tokens: int, hidden: int, gen: torch.Generator, special: bool = False) -> torch.Tensor:
    """BF16 rows with magnitudes over four decades; ``special``: some NaN, +-inf and -0.0 entries."""
    mag = torch.pow(10.0, torch.rand(num_tokens, 1, generator=gen) * 4 - 2)
    x = (torch.randn(num_tokens, hidden, generator=gen) * mag).to(torch.bfloat16)
    if special and x.numel():
        flat = x.view(-1)
        picks = torch.randint(0, flat.numel(), (min(16, flat.numel()),), generator=gen)
        values = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=torch.bfloat16)
        flat[picks] = values[torch.arange(picks.numel()) % 4]
    return x


def _routing_of(p: dict, rank: int, num_tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_idx [T, K] int64, topk_weights [T, K] float32)`` of ``rank`` for the case's routing pattern."""
    ranks, k, e = p["ranks"], p["topk"], p["num_experts"]
    e_loc = e // ranks
    scores = torch.rand(num_tokens, e, generator=gen)
    allowed = torch.ones(num_tokens, e, dtype=torch.bool)
    pattern = p["routing"]
    if pattern == "one_rank":  # every token only to the experts of target_rank
        allowed[:] = False
        allowed[:, p["target_rank"] * e_loc:(p["target_rank"] + 1) * e_loc] = True
    elif pattern == "imbalanced":
        scores = scores * torch.linspace(4.0, 0.05, e)
    elif pattern == "node_limited":  # DeepSeek-V3 style: each token within min(2, N) nodes
        g = p["num_ranks_per_node"]
        nodes = ranks // g
        keep = torch.rand(num_tokens, nodes, generator=gen).topk(min(2, nodes), dim=1).indices
        node_mask = torch.zeros(num_tokens, nodes, dtype=torch.bool).scatter_(1, keep, True)
        allowed = node_mask.repeat_interleave(g * e_loc, dim=1)
    n_allowed = int(allowed[0].sum()) if num_tokens else e
    kk = min(k, n_allowed)
    scores = scores.masked_fill(~allowed, -1.0)
    idx = scores.topk(kk, dim=1).indices if num_tokens else torch.empty(0, kk, dtype=torch.long)
    if kk < k:
        idx = torch.cat([idx, torch.full((num_tokens, k - kk), -1, dtype=torch.long)], 1)
    idx = torch.where(torch.rand(num_tokens, k, generator=gen) < p["drop"], torch.full_like(idx, -1), idx)
    if pattern == "minus_one" and num_tokens:
        idx[torch.rand(num_tokens, generator=gen) < 0.2] = -1  # tokens sent nowhere
    if pattern == "duplicates" and k >= 2:
        idx[:, 1] = idx[:, 0]
    if p["shuffle_slots"] and num_tokens:
        idx = idx.gather(1, torch.rand(num_tokens, k, generator=gen).argsort(1))
    weights = torch.rand(num_tokens, k, generator=gen)
    return idx.long().contiguous(), weights.float().contiguous()


def _payload(x: torch.Tensor, fmt: str, round_scale: bool) -> Any:
    """``x`` itself (BF16) or the FP8 pair with float32 / packed UE8M0 scales, row- or column-major."""
    from ..fp8 import per_token_cast_to_fp8

    if fmt == "bf16":
        return x
    data, scales = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=fmt.startswith("ue8m0"))
    if fmt.endswith("_col"):
        scales = scales.t().contiguous().t()
    return data, scales


def _to(payload: Any, dev: torch.device) -> Any:
    """A device copy that keeps the strides (column-major scales stay column-major)."""
    if isinstance(payload, tuple):
        return tuple(_to(t, dev) for t in payload)
    if payload is None:
        return None
    if payload.dim() == 2 and not payload.is_contiguous() and payload.t().is_contiguous():
        return payload.t().to(dev).t()
    return payload.to(dev)


def _combine_rows(rows: int, hidden: int, how: str, gen: torch.Generator, scale: float) -> torch.Tensor:
    """BF16 combine inputs: ``random`` normal values, or ``exact``: integers in [-15, 15] times ``scale``, one power
    of two shared by every input of the case (rows and biases), so that every sum of up to 10 of them is exact in
    BF16 (and FP32) whatever the order."""
    if how == "random":
        return torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
    return (torch.randint(-15, 16, (rows, hidden), generator=gen).float() * scale).to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------------
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _elements(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of every element, as an integer tensor of the same shape (NaN-safe)."""
    t = t.contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view(_INT_OF_SIZE[t.element_size()])


class Checker:
    """Collects the differences of one case on one rank; ``corrupt`` flips a byte of the first non-empty output
    it compares (``--corrupt-one``)."""

    def __init__(self, corrupt: bool = False) -> None:
        self.failures: list = []
        self.corrupt = corrupt

    def fail(self, what: str, detail: str) -> None:
        self.failures.append({"what": what, "detail": detail})

    def value(self, what: str, got: Any, want: Any) -> None:
        if got != want:
            self.fail(what, f"got {got!r}, reference {want!r}")

    def tensor(self, what: str, got: Optional[torch.Tensor], want: Optional[torch.Tensor],
               values: bool = False) -> None:
        """Bit-exact comparison of ``got`` (any device) with ``want`` (CPU); ``values``: compare after casting
        ``want`` to ``got``'s dtype (handle bookkeeping, whose integer widths may differ)."""
        if got is None or want is None:
            if (got is None) != (want is None):
                self.fail(what, f"got {'None' if got is None else 'a tensor'}, reference "
                                f"{'None' if want is None else 'a tensor'}")
            return
        g = got.detach().cpu()
        if values and g.dtype != want.dtype:
            want = want.to(g.dtype)
        if tuple(g.shape) != tuple(want.shape) or g.dtype != want.dtype:
            self.fail(what, f"got {g.dtype} {list(g.shape)}, reference {want.dtype} {list(want.shape)}")
            return
        gi, wi = _elements(g), _elements(want)
        if self.corrupt and gi.numel():
            gi = gi.clone()
            gi.view(-1).view(torch.uint8)[0] ^= 0xFF
            self.corrupt = False
            if g.dtype != torch.bool:
                g = gi.view(g.dtype)
        diff = gi != wi
        if bool(diff.any()):
            first = [int(v) for v in torch.nonzero(diff)[0]]
            where = tuple(first)
            self.fail(what, f"{int(diff.sum())} of {diff.numel()} elements differ, first at {list(where)}: got "
                            f"{g[where].item()!r} (bits {int(gi[where]):#x}), reference {want[where].item()!r} "
                            f"(bits {int(wi[where]):#x}); shape {list(g.shape)} {g.dtype}")


def _split(recv: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return recv if isinstance(recv, tuple) else (recv, None)


def _stream_kwargs(mode: str) -> dict:
    import deepep_plugin as dp

    if mode == "async":
        return {"async_finish": True}
    if mode == "async_comm":
        return {"async_finish": True, "previous_event": dp.Buffer.capture(), "allocate_on_comm_stream": True}
    return {}


def _wait(mode: str, event: Any) -> None:
    if mode != "sync":
        event.current_stream_wait()


# ----------------------------------------------------------------------------------------------------------------
# One case on one rank
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Rank:
    rank: int
    ranks: int
    dev: torch.device
    gpu: Any  # the Buffer under test (backend "cuda", or "reference" with --device cpu)
    ref: Any  # the reference Buffer (CPU tensors)
    phase: str = "setup"


def _recv_rows(handle: Any, rank: int) -> int:
    """Rows a (reference) handle's dispatch received, padding excluded."""
    import deepep_plugin as dp

    if isinstance(handle, dp.IntranodeHandle):
        return int(handle.rank_prefix_matrix[-1, rank])
    return int(handle.recv_gbl_rank_prefix_sum[-1])


def _normal_case(ctx: _Rank, p: dict, chk: Checker) -> None:
    import deepep_plugin as dp

    rank, dev, gpu, ref = ctx.rank, ctx.dev, ctx.gpu, ctx.ref
    gen = _data_gen(p, rank, "inputs")
    t, h, e = p["tokens"][rank], p["hidden"], p["num_experts"]
    intranode = p["mode"] == "intranode"
    x = _tokens_x(t, h, gen, p["special_values"])
    idx, w = _routing_of(p, rank, t, gen)
    payload = _payload(x, p["format"], p["round_scale"])
    idx_d, w_d = idx.to(dev), w.to(dev)

    ctx.phase = "layout"
    lay_g = gpu.get_dispatch_layout(idx_d, e)
    lay_r = ref.get_dispatch_layout(idx, e)
    for name, a, b in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                           "is_token_in_rank"), lay_g[:4], lay_r[:4]):
        chk.tensor(f"layout.{name}", a, b)

    ctx.phase = "dispatch"
    cfg = dp.Config(*p["dispatch_config"])
    worst = p["num_worst_tokens"]
    common = dict(expert_alignment=p["expert_alignment"], num_worst_tokens=worst, config=cfg)
    out_g = gpu.dispatch(_to(payload, dev), None, lay_g[0], lay_g[1], lay_g[3], lay_g[2], topk_idx=idx_d,
                         topk_weights=w_d, **common, **_stream_kwargs(p["dispatch_stream"]))
    _wait(p["dispatch_stream"], out_g[5])
    out_r = ref.dispatch(payload, None, lay_r[0], lay_r[1], lay_r[3], lay_r[2], topk_idx=idx, topk_weights=w,
                         **common)
    n = _recv_rows(out_r[4], rank)
    valid = slice(0, n) if worst else slice(None)  # padding rows of num_worst_tokens outputs carry no promise
    (xg, sg), (xr, sr) = _split(out_g[0]), _split(out_r[0])
    chk.value("recv_x.shape", tuple(xg.shape), tuple(xr.shape))
    chk.tensor("recv_x", xg[valid], xr[valid])
    chk.tensor("recv_x_scales", None if sg is None else sg[valid], None if sr is None else sr[valid])
    chk.tensor("recv_topk_idx", out_g[1], out_r[1])
    wvalid = valid if intranode else slice(None)
    chk.tensor("recv_topk_weights", None if out_g[2] is None else out_g[2][wvalid],
               None if out_r[2] is None else out_r[2][wvalid])
    chk.value("num_recv_tokens_per_expert_list", out_g[3], out_r[3])
    chk.value("handle type", type(out_g[4]).__name__, type(out_r[4]).__name__)
    if type(out_g[4]) is type(out_r[4]):
        for name, a, b in zip(out_r[4]._fields, out_g[4], out_r[4]):
            if worst and intranode and name == "recv_src_idx":
                a, b = a[:n], b[:n]
            chk.tensor(f"handle.{name}", a, b, values=True)

    if p["cached"]:
        ctx.phase = "cached dispatch"
        x2 = _tokens_x(t, h, _data_gen(p, rank, "cached"))
        payload2 = _payload(x2, p["cached_format"], p["cached_round_scale"])
        ccfg = dp.Config(*p["cached_config"])
        c_g = gpu.dispatch(_to(payload2, dev), handle=out_g[4], num_worst_tokens=worst, config=ccfg,
                           **_stream_kwargs(p["dispatch_stream"]))
        _wait(p["dispatch_stream"], c_g[5])
        c_r = ref.dispatch(payload2, handle=out_r[4], num_worst_tokens=worst, config=ccfg)
        (xg, sg), (xr, sr) = _split(c_g[0]), _split(c_r[0])
        chk.value("cached recv_x.shape", tuple(xg.shape), tuple(xr.shape))
        chk.tensor("cached recv_x", xg[valid], xr[valid])
        chk.tensor("cached recv_x_scales", None if sg is None else sg[valid], None if sr is None else sr[valid])
        chk.value("cached returns (x, None, None, None, None, event)", [v is None for v in c_g[1:5]], [True] * 4)

    ctx.phase = "combine"
    gen = _data_gen(p, rank, "combine")
    rows = _split(out_r[0])[0].size(0)
    scale = 2.0 ** ((p["seed"] * 7919 + p["case"]) % 17 - 8)  # the same on every rank: copies sum exactly
    y = _combine_rows(rows, h, p["combine_data"], gen, scale)
    bias: Any = None
    if p["bias"] != "none":
        b = [_combine_rows(t, h, p["combine_data"], gen, scale) for _ in range(1 if p["bias"] == "one" else 2)]
        bias = b[0] if len(b) == 1 else tuple(b)
    cw = out_r[2] if p["combine_weights"] else None
    kcfg = dp.Config(*p["combine_config"])
    comb_g = gpu.combine(y.to(dev), out_g[4], None if cw is None else cw.to(dev), bias=_to(bias, dev), config=kcfg,
                         **_stream_kwargs(p["combine_stream"]))
    _wait(p["combine_stream"], comb_g[2])
    comb_r = ref.combine(y, out_r[4], cw, bias=bias, config=kcfg)
    chk.tensor("combined_x", comb_g[0], comb_r[0])
    chk.tensor("combined_topk_weights", comb_g[1], comb_r[1])


def _ll_case(ctx: _Rank, p: dict, chk: Checker) -> None:
    rank, ranks, dev, gpu, ref = ctx.rank, ctx.ranks, ctx.dev, ctx.gpu, ctx.ref
    gen = _data_gen(p, rank, "inputs")
    t, h, e, n_ll = p["tokens"][rank], p["hidden"], p["num_experts"], p["num_max_dispatch_tokens_per_rank"]
    e_loc, slots = e // ranks, ranks * n_ll
    x = _tokens_x(t, h, gen)
    idx, w = _routing_of(p, rank, t, gen)
    x_d, idx_d, w_d = x.to(dev), idx.to(dev), w.to(dev)
    stats_g = torch.zeros(e_loc, dtype=torch.int32, device=dev) if p["recv_stats"] else None
    stats_r = torch.zeros(e_loc, dtype=torch.int32) if p["recv_stats"] else None
    kw = dict(use_fp8=p["use_fp8"], round_scale=p["round_scale"], use_ue8m0=p["use_ue8m0"])

    ctx.phase = "low-latency dispatch"
    d_g = gpu.low_latency_dispatch(x_d, idx_d, n_ll, e, cumulative_local_expert_recv_stats=stats_g,
                                   async_finish=p["dispatch_async"], return_recv_hook=p["dispatch_hook"], **kw)
    # With the hook, the reference runs while the kernels' data is in flight; the hook then receives.
    d_r = ref.low_latency_dispatch(x, idx, n_ll, e, cumulative_local_expert_recv_stats=stats_r, **kw)
    if p["dispatch_hook"]:
        d_g[4]()
    if p["dispatch_async"]:
        d_g[3].current_stream_wait()
    count_r = d_r[1]
    chk.tensor("recv_count", d_g[1], count_r)
    hg, hr = d_g[2], d_r[2]
    chk.value("handle (N_ll, hidden, num_experts)", tuple(hg[2:]), tuple(hr[2:]))
    chk.tensor("handle.layout_range", hg.layout_range, hr.layout_range)
    chk.tensor("cumulative_local_expert_recv_stats", stats_g, stats_r)
    if torch.equal(d_g[1].cpu(), count_r):  # rows beyond recv_count carry no promise
        mask = torch.arange(slots)[None, :] < count_r.long()[:, None]  # [E_loc, R * N_ll]
        (xg, sg), (xr, sr) = _split(d_g[0]), _split(d_r[0])
        chk.value("recv_x dtype/shape", (str(xg.dtype), tuple(xg.shape)), (str(xr.dtype), tuple(xr.shape)))
        if tuple(xg.shape) == tuple(xr.shape):
            chk.tensor("recv_x (valid rows)", xg.cpu()[mask], xr[mask])
            chk.tensor("recv_x_scales (valid rows)", None if sg is None else sg.cpu()[mask],
                       None if sr is None else sr[mask])
            chk.tensor("handle.src_info (valid rows)", hg.src_info.cpu()[mask], hr.src_info[mask])

    ctx.phase = "low-latency combine"
    gen = _data_gen(p, rank, "combine")
    # Expert outputs: random in the valid rows, a sentinel elsewhere (never read).
    y = torch.full((e_loc, slots, h), 3.0, dtype=torch.bfloat16)
    valid_rows = torch.arange(slots)[None, :] < count_r.long()[:, None]
    nvalid = int(valid_rows.sum())
    y[valid_rows] = torch.randn(nvalid, h, generator=gen).to(torch.bfloat16)
    y_d = y.to(dev)
    if p["zero_copy"]:
        gpu.get_next_low_latency_combine_buffer(hg).copy_(y_d)
        ref.get_next_low_latency_combine_buffer(hr).copy_(y)
    out_g = torch.empty(t, h, dtype=torch.bfloat16, device=dev) if p["out"] else None
    out_r = torch.empty(t, h, dtype=torch.bfloat16) if p["out"] else None
    c_g = gpu.low_latency_combine(y_d, idx_d, w_d, hg, zero_copy=p["zero_copy"], async_finish=p["combine_async"],
                                  return_recv_hook=p["combine_hook"], out=out_g)
    c_r = ref.low_latency_combine(y, idx, w, hr, zero_copy=p["zero_copy"], out=out_r)
    if p["combine_hook"]:
        c_g[2]()
    if p["combine_async"]:
        c_g[1].current_stream_wait()
    chk.tensor("combined_x", c_g[0], c_r[0])
    if out_g is not None:
        chk.value("combined_x is out", c_g[0].data_ptr() == out_g.data_ptr(), True)


# ----------------------------------------------------------------------------------------------------------------
# One rank of one batch
# ----------------------------------------------------------------------------------------------------------------
def _breaks_buffer(e: BaseException) -> bool:
    """True when ``e`` leaves a Buffer unusable (a timed-out wait, a dead CUDA context)."""
    from ..errors import DeepEPTimeoutError

    text = str(e)
    return isinstance(e, DeepEPTimeoutError) or "can no longer be used" in text or "unusable" in text or \
        "CUDA error" in text or "illegal memory access" in text


def _last_line(limit: int = 500) -> str:
    lines = traceback.format_exc().strip().splitlines()
    return (lines[-1] if lines else "?")[:limit]


def _agree(status: int, phase: int, group: Any, timeout_s: float) -> list:
    """Every rank's (status, phase) of the case just run, over the control group."""
    mine = torch.tensor([status, phase], dtype=torch.int64)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group, async_op=True).wait(timeout=datetime.timedelta(seconds=timeout_s))
    return [tuple(int(v) for v in t) for t in parts]


def _build_buffers(batch: Batch, device: str, test_group: Any, ref_group: Any) -> tuple[Any, Any]:
    """The Buffer under test and the reference Buffer, each on a group of its own."""
    import deepep_plugin as dp

    backend = "cuda" if device == "cuda" else "reference"
    kw = dict(num_ranks_per_node=batch.per_node)
    if batch.mode == "low_latency":
        gpu = dp.Buffer(test_group, 0, batch.rdma_bytes, low_latency_mode=True, backend=backend,
                        explicitly_destroy=True, **kw)
        ref = dp.Buffer(ref_group, 0, batch.rdma_bytes, low_latency_mode=True, backend="reference", **kw)
    else:
        gpu = dp.Buffer(test_group, batch.nvl_bytes, batch.rdma_bytes, backend=backend,
                        explicitly_destroy=True, **kw)
        ref = dp.Buffer(ref_group, batch.nvl_bytes, batch.rdma_bytes, backend="reference", **kw)
    return gpu, ref


def _rank_main(rank: int, world: int, spec: dict) -> dict:
    """Body of one rank: build the Buffers, run the batch's cases, log one JSON line per case to ``spec['log']``."""
    import deepep_plugin as dp

    batch = Batch(**spec["batch"])
    device = spec["device"]
    if spec["wait_timeout"] is not None:
        dp.set_timeout_s(spec["wait_timeout"])
    if batch.puts:
        os.environ["DEEPEP_PLUGIN_INTERNODE_PUTS"] = "1"
    ctl_timeout = max(120.0, 6 * dp.get_timeout_s())
    t0 = time.perf_counter()
    # A group for each Buffer and one for the harness: a call one rank skipped cannot cross-match another's
    # collectives, and the world group stays clean for spawn's final barrier.
    test_group, ref_group, ctl_group = (dist.new_group(list(range(world)), backend="gloo") for _ in range(3))
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    log = open(os.path.join(spec["log"], f"rank{rank}.jsonl"), "a", buffering=1)
    gpu, ref = _build_buffers(batch, device, test_group, ref_group)
    setup_s = time.perf_counter() - t0
    ctx = _Rank(rank, world, dev, gpu, ref)
    stopped, done, t1 = None, 0, time.perf_counter()
    cases = spec["cases"]
    every = max(1, len(cases) // 5)
    try:
        for i, case in enumerate(cases):
            p = case_params(spec["seed"], case, batch)
            chk = Checker(corrupt=(case == spec["corrupt_case"] and rank == 0))
            status, started = 0, time.perf_counter()
            ctx.phase = "setup"
            try:
                (_ll_case if batch.mode == "low_latency" else _normal_case)(ctx, p, chk)
                ctx.phase = "sync"
                if device == "cuda":
                    torch.cuda.synchronize()
                    gpu.runtime.check_error()
            except Exception as e:  # noqa: BLE001 - a failure of this case, recorded
                chk.fail(f"exception in {ctx.phase}", _last_line())
                if spec["tracebacks"]:
                    print(f"[fuzz] rank {rank}, case {case}, {ctx.phase}:\n{traceback.format_exc()}", file=sys.stderr,
                          flush=True)
                status = 2 if _breaks_buffer(e) else 1
            log.write(json.dumps({"case": case, "kind": p["kind"], "seconds": round(time.perf_counter() - started, 4),
                                  "failures": chk.failures}) + "\n")
            done += 1
            peers = _agree(status, PHASES.index(ctx.phase), ctl_group, ctl_timeout)
            # A rank that skipped a call its peers made leaves them waiting until their wait times out, so by
            # now any rank out of step reports status 2: only then is the batch over.
            broken = [r for r, (s, _) in enumerate(peers) if s == 2]
            if broken:
                stopped = (f"case {case}: ranks {broken} left their Buffer unusable (timeout or CUDA error; phases "
                           f"{[PHASES[ph] for _, ph in peers]})")
                log.write(json.dumps({"stopped": stopped}) + "\n")
                break
            if rank == 0 and ((i + 1) % every == 0 or i + 1 == len(cases)):
                print(f"[fuzz]   {batch.label}: {i + 1}/{len(cases)} cases, {time.perf_counter() - t1:.1f} s",
                      flush=True)
    finally:
        log.close()
    cases_s = time.perf_counter() - t1
    if stopped is None:
        gpu.destroy()
    else:  # an unusable Buffer is left to the process exit, on purpose
        warnings.filterwarnings("ignore", message=".*explicitly_destroy=True was not destroyed")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": name, "setup_s": setup_s, "cases_s": cases_s, "done": done, "stopped": stopped}


# ----------------------------------------------------------------------------------------------------------------
# The parent: plan, spawn, collect, report
# ----------------------------------------------------------------------------------------------------------------
def _read_logs(log_dir: str, ranks: int) -> tuple[dict, list]:
    """Per case: kind, per-rank failures and the ranks that logged it; and the stop reasons."""
    cases: dict = {}
    stops: list = []
    for r in range(ranks):
        path = os.path.join(log_dir, f"rank{r}.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed rank
                if "stopped" in rec:
                    stops.append(rec["stopped"])
                    continue
                entry = cases.setdefault(rec["case"], {"kind": rec["kind"], "failures": [], "ranks": set(),
                                                       "seconds": 0.0})
                entry["ranks"].add(r)
                entry["seconds"] = max(entry["seconds"], rec["seconds"])
                entry["failures"].extend(dict(f, rank=r) for f in rec["failures"])
    return cases, stops


def _plugin_env() -> dict[str, str]:
    """The DEEPEP_PLUGIN_* environment: the kernels' tunings (e.g. DEEPEP_PLUGIN_EARLY_DISPATCH=1 fuzzes the
    split-launch dispatch), which a replay needs too."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("DEEPEP_PLUGIN_")}


def _replay_command(args: argparse.Namespace, case: int) -> str:
    tunings = [f"{k}={shlex.quote(v)}" for k, v in _plugin_env().items()]
    parts = [*tunings, "python -m deepep_plugin.bench fuzz", f"--seed {args.seed}", f"--cases {args.cases}",
             f"--ranks {args.ranks}", f"--only-case {case}"]
    if args.kinds:
        parts.append(f"--kinds {args.kinds}")
    if args.device != "cuda":
        parts.append(f"--device {args.device}")
    return " ".join(parts)


def _parse_args(argv: Optional[list]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m deepep_plugin.bench fuzz",
                                 description="Random cases: Buffer(backend='cuda') against the reference, bit for bit.")
    ap.add_argument("--cases", type=int, default=1000, help="total cases, split over the batches (default 1000)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the case parameters (default: random)")
    ap.add_argument("--ranks", default="2,4,8", help="rank counts, comma-separated (default 2,4,8)")
    ap.add_argument("--kinds", default="", help="comma-separated kinds, modes or globs, e.g. 'intranode,*/cached' "
                                                f"(kinds: {', '.join(ALL_KINDS)})")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "fuzz.json"), help="JSON result path")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds each batch may take (default 600)")
    ap.add_argument("--wait-timeout", type=float, default=None,
                    help="DEEPEP_PLUGIN_TIMEOUT_S of the ranks: seconds a wait on a peer may take")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: backend='reference' on both sides (tests the harness without a GPU)")
    ap.add_argument("--only-case", default="", help="run only these case numbers (comma-separated; same --seed, "
                                                    "--cases, --ranks and --kinds as the run that found them)")
    ap.add_argument("--tracebacks", action="store_true", help="print the full traceback of every exception in a case")
    ap.add_argument("--corrupt-one", action="store_true",
                    help="debug: flip one byte of one output of the first case (the run must report 1 mismatch)")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    return args


def run_fuzz(argv: Optional[list] = None) -> dict:
    """Run the fuzzer with command-line ``argv``; print progress and failures, write the JSON, return it."""
    args = _parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    if not ranks or any(r < 2 or r > 8 for r in ranks):
        raise SystemExit(f"fuzz: --ranks must list rank counts in [2, 8], got {args.ranks!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fuzz: CUDA is not available here; --device cpu runs the harness on the reference backend")
    filters = [k.strip() for k in args.kinds.split(",") if k.strip()]
    batches = plan_batches(ranks, filters)
    if not batches:
        raise SystemExit(f"fuzz: no kind matches --kinds {args.kinds!r} (kinds: {', '.join(ALL_KINDS)})")
    allotted = allot(args.cases, batches)
    only = {int(c) for c in args.only_case.split(",") if c.strip()}
    if only:
        allotted = [[c for c in cs if c in only] for cs in allotted]
    runnable = [c for cs in allotted for c in cs]
    if only and not runnable:
        raise SystemExit(f"fuzz: --only-case {args.only_case}: no such case among the {args.cases} of this plan")
    corrupt_case = min(runnable) if (args.corrupt_one and runnable) else -1
    print(f"[fuzz] seed {args.seed}: {len(runnable)} cases in {sum(1 for cs in allotted if cs)} batches on "
          f"{args.device}", flush=True)

    device_name = "cpu" if args.device == "cpu" else "unknown"
    by_kind: dict = {}
    failures: list = []
    batch_reports: list = []
    total = mismatched = skipped = died = 0
    started = time.perf_counter()
    for batch, cases in zip(batches, allotted):
        if not cases:
            continue
        log_dir = tempfile.mkdtemp(prefix="deepep-fuzz-")
        spec = {"batch": asdict(batch), "device": args.device, "seed": args.seed, "cases": cases, "log": log_dir,
                "corrupt_case": corrupt_case, "wait_timeout": args.wait_timeout,
                "tracebacks": args.tracebacks}
        print(f"[fuzz] {batch.label}: {len(cases)} cases (#{cases[0]}..#{cases[-1]}), kinds "
              f"{', '.join(batch.kinds)}", flush=True)
        t0 = time.perf_counter()
        error, result = None, None
        threads = max(1, (os.cpu_count() or 2) // batch.ranks)
        try:
            results = spawn.run(_rank_main, batch.ranks, (spec,), backend="gloo", gpus=args.device == "cuda",
                                threads=threads, start_method="spawn" if args.device == "cuda" else None,
                                timeout=args.timeout)
            result = results[0]
            device_name = result["device"]
        except spawn.RankError as e:
            lines = [ln for ln in (e.child_traceback or str(e)).strip().splitlines() if ln.strip()]
            error = (f"rank {e.rank}: " if e.rank is not None else "") + (lines[-1] if lines else str(e))[:500]
        elapsed = time.perf_counter() - t0
        logged, stops = _read_logs(log_dir, batch.ranks)
        shutil.rmtree(log_dir, ignore_errors=True)
        if error is not None:
            died += 1
            lost = [c for c in cases if c not in logged]
            if lost:  # the case in progress when the batch died is a failure too
                p = case_params(args.seed, lost[0], batch)
                logged[lost[0]] = {"kind": p["kind"], "ranks": set(), "seconds": 0.0,
                                   "failures": [{"rank": -1, "what": "batch died", "detail": error}]}
        n_bad = 0
        for case in sorted(logged):
            entry = logged[case]
            k = by_kind.setdefault(entry["kind"], {"cases": 0, "mismatches": 0})
            k["cases"] += 1
            total += 1
            if not entry["failures"]:
                continue
            k["mismatches"] += 1
            n_bad += 1
            config = case_params(args.seed, case, batch)
            print(f"[fuzz] FAIL case {case} ({entry['kind']}, {batch.label}):", flush=True)
            for f in entry["failures"]:
                who = f"rank {f['rank']}" if f["rank"] >= 0 else "batch"
                print(f"         {who}: {f['what']}: {f['detail']}")
                if len(failures) < MAX_FAILURES_KEPT:
                    failures.append({"kind": entry["kind"], "case": case, "rank": f["rank"], "what": f["what"],
                                     "detail": f["detail"], "config": config})
            print(f"       config: {json.dumps(config, sort_keys=True)}")
            print(f"       replay: {_replay_command(args, case)}", flush=True)
        mismatched += n_bad
        not_run = len(cases) - len(logged)
        skipped += not_run
        per_case = sum(e["seconds"] for e in logged.values()) / max(len(logged), 1) * 1e3
        setup = f"start-up and buffers {result['setup_s']:.1f} s, " if result else ""
        stop = error or (stops[0] if stops else None)
        print(f"[fuzz] {batch.label}: {len(logged)}/{len(cases)} cases, {n_bad} mismatched, {elapsed:.1f} s "
              f"({setup}{per_case:.0f} ms per case)" + (f"; STOPPED: {stop}" if stop else ""), flush=True)
        batch_reports.append({"batch": batch.label, "mode": batch.mode, "ranks": batch.ranks,
                              "num_ranks_per_node": batch.per_node, "cases": len(logged), "mismatches": n_bad,
                              "not_run": not_run, "seconds": round(elapsed, 2), "stopped": stop})

    summary = {"cases": total, "mismatches": mismatched, "by_kind": dict(sorted(by_kind.items())),
               "device": device_name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"), "seed": args.seed, "failures": failures, "not_run": skipped,
               "batches_died": died,
               "seconds": round(time.perf_counter() - started, 1), "batches": batch_reports,
               "command": "python -m deepep_plugin.bench fuzz " + " ".join(argv if argv is not None else sys.argv[1:]),
               "env": _plugin_env()}
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    print(f"[fuzz] seed {args.seed}: {total} cases, {mismatched} mismatched, {skipped} not run, "
          f"{summary['seconds']:.0f} s; wrote {args.out}", flush=True)
    return summary


def main(argv: Optional[list] = None) -> None:
    """Entry point of ``python -m deepep_plugin.bench fuzz``: exit status 1 when a case mismatched or a batch's
    ranks died (or ran past ``--timeout``)."""
    summary = run_fuzz(argv)
    if summary["mismatches"] > 0 or summary["batches_died"] > 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
