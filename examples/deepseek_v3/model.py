"""A small DeepSeek-V3-style decoder whose MoE layers run expert parallel through ``deepep_plugin``.

Pieces (each a reusable ``nn.Module``):

* :class:`MultiHeadLatentAttention` (MLA): queries (optionally through a low-rank latent), keys and values
  rebuilt from one ``kv_lora_rank`` latent per token, plus a rotary key shared by all heads; causal.
* :class:`SwiGLU`: the dense MLP, also used for the shared experts.
* :class:`Router`: sigmoid scores, group-limited top-k (``deepep_plugin.routing.group_limited_topk``), the
  aux-loss-free expert bias (a buffer, updated by :meth:`DeepSeekV3Model.update_expert_biases`) and the routed
  scaling factor.
* :class:`LocalExperts`: the routed experts this rank owns, as stacked SwiGLU weights.
* :class:`MoE`: router -> ``deepep_plugin.autograd.dispatch`` -> ``deepep_plugin.permute.permute`` (rows grouped
  by local expert) -> local experts -> rows times their routing weight -> ``permute.unpermute`` ->
  ``deepep_plugin.autograd.combine`` (unweighted sum of the copies), plus the shared experts.

Expert parallelism: with ``R`` ranks, rank ``r`` owns routed experts ``[r * E / R, (r + 1) * E / R)``; every
other parameter is replicated. ``ExpertParallel(buffer=None)`` keeps all experts in one process and skips the
communication (the single-process reference the distributed model must match).

Initialisation is a pure function of ``(seed, parameter name)``, where an expert's name uses its *global*
index, so the model -- and its first-step loss -- is the same whatever the number of ranks.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import deepep_plugin
from deepep_plugin import autograd as ep_autograd
from deepep_plugin import fp8 as ep_fp8
from deepep_plugin import permute as ep_permute
from deepep_plugin import routing
from deepep_plugin.errors import expect

from .configs import ModelConfig
from .timing import CommTimer, maybe_timer


@dataclass
class ExpertParallel:
    """How the routed experts are spread.

    Attributes:
        buffer: the ``deepep_plugin.Buffer`` of the EP group, or ``None`` for all experts in this process (then
            ``size`` must be 1).
        rank: this rank's index in the EP group.
        size: ``R``, ranks in the EP group; must divide ``n_routed_experts``.
        timer: optional :class:`CommTimer` that measures dispatch and combine.
        comm_dtype: dtype of the tokens sent by dispatch and combine (``None``: the activations' dtype). The CUDA
            kernels move BF16; the CPU reference moves any dtype.
        sync_free: read nothing from the GPU in the MoE layers (with grouped GEMM experts): dispatch pads to
            ``worst_tokens`` rows, the permutation has a static size and the expert counts stay on the device, so
            a layer can be captured in a CUDA graph (``tests/gpu/test_cuda_graph_moe_cuda.py``). On the GPU the
            experts must run as grouped GEMMs (else the layer raises: the per-expert loop splits on the host).
        worst_tokens: rows a rank can receive at most under ``sync_free``; ``None``: tokens x ``size`` (every
            token of every rank, the worst case when all ranks hold the same number of tokens).
    """

    buffer: Optional["deepep_plugin.Buffer"] = None
    rank: int = 0
    size: int = 1
    timer: Optional[CommTimer] = None
    comm_dtype: Optional[torch.dtype] = None
    sync_free: bool = False
    worst_tokens: Optional[int] = None


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, computed in float32, returned in ``x``'s dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of ``x [B, S, n, D]`` (``D`` even) by position along dim 1 (half-split form)."""
    seq, dim = x.size(1), x.size(-1)
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = torch.arange(seq, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [S, D/2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention for training (no KV cache), causal.

    Input and output ``[B, S, hidden]``. Per head the query/key dim is ``qk_nope_head_dim + qk_rope_head_dim``
    and the value dim ``v_head_dim``; the rotary part of the key is one vector per token shared by the heads.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, nh = cfg.hidden_size, cfg.num_heads
        qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, nh * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(h, nh * qk_dim, bias=False)
        self.wkv_a = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(nh * cfg.v_head_dim, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, s, _ = x.shape
        nh, nope, rope, vd = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = self.wq_b(self.q_norm(self.wq_a(x))) if cfg.q_lora_rank > 0 else self.wq(x)
        q = q.view(b, s, nh, nope + rope)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        kv_latent, k_pe = self.wkv_a(x).split([cfg.kv_lora_rank, rope], dim=-1)
        kv = self.wkv_b(self.kv_norm(kv_latent)).view(b, s, nh, nope + vd)
        k_nope, v = kv.split([nope, vd], dim=-1)
        k_pe = rotary(k_pe.unsqueeze(2), cfg.rope_theta).expand(b, s, nh, rope)
        q = torch.cat([q_nope, rotary(q_pe, cfg.rope_theta)], dim=-1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=1.0 / math.sqrt(nope + rope)
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, nh * vd))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: ``[..., hidden] -> [..., hidden]``."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Router(nn.Module):
    """DeepSeek-V3 gating: sigmoid scores, group-limited top-k, aux-loss-free bias, routed scaling factor.

    ``forward(x [T, H]) -> (topk_idx int64 [T, K], topk_weights float32 [T, K])``, both on ``x``'s device; the
    weights are differentiable with respect to the router weight. The logits are computed in float32.
    ``expert_bias`` (float32 ``[E]``, a buffer) steers selection only; ``last_counts`` (float32 ``[E]``) holds the
    tokens routed to each expert by the last forward, for the bias update.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.last_counts: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        topk_idx, topk_weights = routing.group_limited_topk(
            logits, cfg.num_experts_per_tok, num_groups=cfg.n_group, topk_group=cfg.topk_group,
            score_function="sigmoid", expert_bias=self.expert_bias,
            routed_scaling_factor=cfg.routed_scaling_factor, normalize=cfg.norm_topk_prob,
        )
        with torch.no_grad():
            counts = torch.zeros(cfg.n_routed_experts, dtype=torch.float32, device=x.device)
            self.last_counts = counts.index_add_(0, topk_idx.flatten(), torch.ones_like(topk_idx.flatten(),
                                                                                      dtype=torch.float32))
        return topk_idx.contiguous(), topk_weights


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``x [T, H]`` cast to FP8 (per token, per 128 channels) and back, with a straight-through gradient: exactly
    the rows FP8 dispatch delivers, for the single-process model to match the expert-parallel one."""
    rounded = ep_fp8.per_token_cast_back(*ep_fp8.per_token_cast_to_fp8(x.detach()), dtype=x.dtype)
    return rounded + (x - x.detach())


#: Rows per expert block are padded to a multiple of this for ``torch._grouped_mm`` (its BF16 kernels on sm90
#: want 16-byte-aligned group starts; 16 rows cover every dtype it takes).
GROUPED_GEMM_ALIGNMENT = 16


class LocalExperts(nn.Module):
    """The ``E_loc`` routed SwiGLU experts of this rank, stacked: ``gate_up [E_loc, 2I, H]``, ``down [E_loc, H, I]``.

    ``forward(x [M, H], tokens_per_expert)`` runs expert ``e`` on the ``tokens_per_expert[e]`` consecutive rows of
    block ``e`` (rows grouped by local expert, as ``deepep_plugin.permute.permute`` lays them out) and returns
    ``[M, H]`` in the same order. ``tokens_per_expert`` is a list of ints (the per-expert loop), or, on the grouped
    GEMM path (:meth:`use_grouped_gemm`), an int64 ``[E_loc]`` tensor on ``x``'s device (no host sync).
    ``first_expert`` is the global id of local expert 0.
    """

    def __init__(self, num_local: int, hidden: int, intermediate: int, first_expert: int,
                 grouped_gemm: bool = True) -> None:
        super().__init__()
        self.num_local, self.first_expert, self.grouped_gemm = num_local, first_expert, grouped_gemm
        self.gate_up = nn.Parameter(torch.empty(num_local, 2 * intermediate, hidden))
        self.down = nn.Parameter(torch.empty(num_local, hidden, intermediate))

    def use_grouped_gemm(self, x: torch.Tensor) -> bool:
        """True when ``x`` will be computed with ``torch._grouped_mm``: enabled, CUDA sm90+, BF16 compute (BF16
        input or BF16 autocast), and rows whose byte strides are multiples of 16."""
        if not (self.grouped_gemm and x.is_cuda and hasattr(torch, "_grouped_mm")):
            return False
        if torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
        dims_ok = all(d % 8 == 0 for d in self.down.shape[1:])
        return dims_ok and self._compute_dtype(x) == torch.bfloat16

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def forward(self, x: torch.Tensor, tokens_per_expert: Union[List[int], torch.Tensor]) -> torch.Tensor:
        if isinstance(tokens_per_expert, torch.Tensor):
            return self._grouped(x, tokens_per_expert)
        expect(len(tokens_per_expert) == self.num_local and sum(tokens_per_expert) == x.size(0),
               f"tokens_per_expert must list {self.num_local} counts summing to x.size(0)={x.size(0)}, "
               f"got {tokens_per_expert}")
        outs = []
        for e, rows in enumerate(x.split(tokens_per_expert)):
            gate, up = F.linear(rows, self.gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.down[e]))
        return torch.cat(outs) if outs else x.new_empty(0, x.size(1))

    def _grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype(x)
        offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)  # end row of each expert's block
        h = torch._grouped_mm(x.to(dtype), self.gate_up.to(dtype).transpose(1, 2), offs=offsets)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, self.down.to(dtype).transpose(1, 2), offs=offsets)


class MoE(nn.Module):
    """DeepSeek-V3 MoE layer, expert parallel: ``[B, S, H] -> [B, S, H]`` (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, ep: ExpertParallel) -> None:
        super().__init__()
        expect(cfg.n_routed_experts % ep.size == 0,
               f"n_routed_experts ({cfg.n_routed_experts}) must be a multiple of the EP size ({ep.size})")
        expect(ep.buffer is not None or ep.size == 1, "ExpertParallel.buffer=None (no communication) needs size 1")
        self.cfg, self.ep = cfg, ep
        self.num_local = cfg.n_routed_experts // ep.size
        self.router = Router(cfg)
        self.experts = LocalExperts(self.num_local, cfg.hidden_size, cfg.moe_intermediate_size,
                                    ep.rank * self.num_local, cfg.grouped_gemm)
        self.shared = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                       if cfg.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.size(-1))
        out = self.shared(tokens) if self.shared is not None else torch.zeros_like(tokens)
        topk_idx, topk_weights = self.router(tokens)
        routed = self._routed(tokens, topk_idx, topk_weights)
        return (out + routed.to(out.dtype)).view_as(x)

    def _routed(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Routed-expert output of ``x [T, H]``: ``sum_k w[t, k] * expert_{idx[t, k]}(x[t])``, ``[T, H]``."""
        ep, timer = self.ep, maybe_timer(self.ep.timer)
        comm_dtype = ep.comm_dtype or x.dtype
        worst = 0
        if ep.buffer is None:  # all experts here: local ids are the global ids, nothing to send
            recv_x = fp8_round_trip(x) if self.cfg.fp8_dispatch else x  # what FP8 dispatch would deliver
            recv_idx, recv_w = topk_idx, topk_weights
            counts = None
        else:
            if ep.sync_free:  # fixed output rows: dispatch reads no receive count
                worst = ep.worst_tokens or x.size(0) * ep.size
            send_x = timer.backward_end(x.to(comm_dtype), "dispatch/bwd")
            with timer.region("dispatch/fwd"):
                recv_x, recv_idx, recv_w, counts, handle = ep_autograd.dispatch(
                    ep.buffer, send_x, topk_idx, topk_weights, self.cfg.n_routed_experts,
                    fp8=self.cfg.fp8_dispatch, num_worst_tokens=worst,
                )
            recv_x = timer.backward_start(recv_x, "dispatch/bwd")
        grouped = self.experts.use_grouped_gemm(x)
        # The per-expert loop splits the rows on the host: on the GPU that reads the counts, which sync_free promises
        # not to do (on the CPU there is no device to wait for).
        expect(not (worst and x.is_cuda and not grouped),
               "ExpertParallel(sync_free=True) on the GPU needs the grouped GEMM experts (ModelConfig.grouped_gemm, "
               "torch._grouped_mm on an sm90+ GPU, BF16 inputs or BF16 autocast, expert sizes that are multiples of "
               "8); the per-expert loop would read the expert counts from the GPU")
        align = GROUPED_GEMM_ALIGNMENT if grouped else 1
        rows = None
        if worst:  # the worst case, static (no device read)
            rows = ep_permute.worst_case_rows(recv_x.size(0), recv_idx.size(1), self.num_local, align)
        perm = ep_permute.permute(recv_x, recv_idx, self.num_local, recv_w, alignment=align, num_out_rows=rows)
        if grouped:
            counts = perm.tokens_per_expert  # stays on the device; rows past the last block are padding
        elif counts is None or worst:
            counts = perm.tokens_per_expert.tolist()  # the per-expert loop splits on the host
            if rows is not None:
                counts[-1] += rows - sum(counts)  # the static padding rows join the last block
        y = self.experts(perm.x.to(x.dtype), counts)
        y = y * perm.probs.unsqueeze(1)  # float32 weights: the weighted sum is formed in float32
        out = ep_permute.unpermute(y, perm, recv_x.size(0))
        if ep.buffer is None:
            return out
        send_y = timer.backward_end(out.to(comm_dtype), "combine/bwd")
        with timer.region("combine/fwd"):
            combined = ep_autograd.combine(ep.buffer, send_y, handle)
        return timer.backward_start(combined, "combine/bwd")


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``+ mlp(norm(.))`` with a dense MLP or the MoE."""

    def __init__(self, cfg: ModelConfig, layer_id: int, ep: ExpertParallel) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MultiHeadLatentAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (SwiGLU(cfg.hidden_size, cfg.intermediate_size) if layer_id < cfg.first_k_dense_replace
                               else MoE(cfg, ep))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class DeepSeekV3Model(nn.Module):
    """Token ids ``[B, S]`` int64 -> logits ``[B, S, vocab]`` (dtype of the computation).

    Args:
        cfg: the architecture.
        ep: expert parallelism (default: all experts local, no communication).
        seed: parameters are ``init_parameters(seed)``; the same on every rank for replicated ones.
    """

    def __init__(self, cfg: ModelConfig, ep: Optional[ExpertParallel] = None, seed: int = 0) -> None:
        super().__init__()
        cfg.validate()
        self.cfg, self.ep = cfg, ep or ExpertParallel()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.ep) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_parameters(seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy (float32 scalar) of ``tokens [B, S + 1]``: inputs ``[:, :-1]``."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))

    # ----------------------------------------------------------------------------------------------------------
    # Parameters
    def moe_layers(self) -> List[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters owned by this rank alone (the routed experts); their gradients are not all-reduced."""
        for m in self.modules():
            if isinstance(m, LocalExperts):
                yield from m.parameters()

    def replicated_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every rank holds a copy of; their gradients are averaged across the EP group."""
        expert = {id(p) for p in self.expert_parameters()}
        return (p for p in self.parameters() if id(p) not in expert)

    @torch.no_grad()
    def init_parameters(self, seed: int) -> None:
        """Initialise every parameter from ``(seed, its global name)``: norms to 1, matrices ``N(0, init_std)``.

        Routed expert ``g`` (global id) draws from its own stream, so rank ``r`` of ``R`` holds exactly the
        experts a single process would hold at indices ``[r E / R, (r + 1) E / R)``.
        """
        std = self.cfg.init_std

        def normal(shape: torch.Size, key: str) -> torch.Tensor:
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))
            return torch.randn(shape, generator=g) * std

        for name, module in self.named_modules():
            if isinstance(module, LocalExperts):
                for pname, p in module.named_parameters():
                    for e in range(module.num_local):
                        p[e].copy_(normal(p.shape[1:], f"{name}.{module.first_expert + e}.{pname}"))
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (nn.Linear, nn.Embedding, Router)):
                module.weight.copy_(normal(module.weight.shape, f"{name}.weight"))

    @torch.no_grad()
    def update_expert_biases(self, group: Optional[torch.distributed.ProcessGroup] = None) -> Optional[torch.Tensor]:
        """Aux-loss-free balancing after a step: sum every MoE layer's token counts over the EP group (one
        all-reduce) and move each expert bias by ``bias_update_speed`` towards the mean load.

        Returns the global counts, float32 ``[num_moe_layers, E]`` (``None`` before any forward or without MoE).
        """
        routers = [m.router for m in self.moe_layers()]
        if not routers or any(r.last_counts is None for r in routers):
            return None
        counts = torch.stack([r.last_counts for r in routers])  # type: ignore[misc]
        if self.ep.size > 1:
            torch.distributed.all_reduce(counts, group=group)
        biases = torch.stack([r.expert_bias for r in routers])
        biases = routing.update_expert_bias(biases, counts, self.cfg.bias_update_speed)
        for router, bias in zip(routers, biases):
            router.expert_bias.copy_(bias)
        return counts
