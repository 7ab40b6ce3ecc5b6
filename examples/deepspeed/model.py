"""The DeepSeek-V3-style decoder of ``examples/deepseek_v3``, with DeepSpeed's own MoE layers.

Blocks: multi-head latent attention, then a dense SwiGLU (the first ``first_k_dense_replace`` layers) or an MoE
block: ``deepspeed.moe.layer.MoE`` (``n_routed_experts`` SwiGLU experts, ``num_experts_per_tok`` per token,
expert parallel over ``ep_size`` ranks) plus ``n_shared_experts`` shared SwiGLU experts every token uses.

The model itself knows nothing about deepep_plugin: the ``"deepep_plugin"`` section of the DeepSpeed config turns
the plugin on (its layers then route with DeepSeek-V3 group-limited sigmoid gating and dispatch without
capacity); without it the same model runs on DeepSpeed's capacity-based all-to-all.

Initialisation is exactly that of ``examples.deepseek_v3.model.DeepSeekV3Model``: every parameter is drawn from
the stream its counterpart in that model is drawn from (named by ``(seed, name in the plain model)``, a routed
expert by its global index). From the same seed the two recipes therefore hold the same weights -- whatever the
number of ranks -- and, with the plugin's group-limited sigmoid gating and the same data, compute the same
first-step loss (``tests/test_recipes_agree.py``).
"""

from __future__ import annotations

import zlib
from typing import Tuple

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn

from examples.deepseek_v3.configs import ModelConfig
from examples.deepseek_v3.model import MultiHeadLatentAttention, RMSNorm, SwiGLU


class MoEBlock(nn.Module):
    """``shared(x) + deepspeed_moe(x)``: ``[B, S, hidden] -> ([B, S, hidden], l_aux [])``."""

    def __init__(self, cfg: ModelConfig, ep_size: int) -> None:
        super().__init__()
        self.moe = MoE(
            cfg.hidden_size,
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size),
            num_experts=cfg.n_routed_experts,
            ep_size=ep_size,
            k=cfg.num_experts_per_tok,
            drop_tokens=False,  # without the plugin: DeepSpeed's dropless mode (capacity = busiest expert)
            min_capacity=0,
        )
        self.shared = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        routed, l_aux, _ = self.moe(x)
        return self.shared(x) + routed, l_aux


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``+ mlp(norm(.))``; returns ``(x, l_aux)`` (0 if dense)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, ep_size: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MultiHeadLatentAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = layer_id >= cfg.first_k_dense_replace
        self.mlp = MoEBlock(cfg, ep_size) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x))
        if self.is_moe:
            y, l_aux = self.mlp(self.mlp_norm(x))
            return x + y, l_aux
        return x + self.mlp(self.mlp_norm(x)), x.new_zeros(())


class DeepSeekV3DeepSpeedModel(nn.Module):
    """Token ids ``[B, S + 1]`` int64 -> ``(loss, cross_entropy, l_aux)``, float32 scalars.

    ``loss = cross_entropy + aux_loss_coef * sum of the MoE layers' l_aux``, where ``cross_entropy`` is the mean
    next-token loss of inputs ``[:, :-1]`` against targets ``[:, 1:]``.

    Args:
        cfg: the architecture (``examples.deepseek_v3.configs.ModelConfig``).
        ep_size: expert-parallel size (divides ``n_routed_experts``).
        rank_in_ep: this rank's index in its EP group (chooses which global experts it holds).
        seed: initialisation seed.
        aux_loss_coef: weight of DeepSpeed's load-balancing loss.
    """

    def __init__(self, cfg: ModelConfig, ep_size: int, rank_in_ep: int, seed: int, aux_loss_coef: float) -> None:
        super().__init__()
        cfg.validate()
        self.cfg, self.aux_loss_coef = cfg, aux_loss_coef
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ep_size) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._init_parameters(seed, rank_in_ep * (cfg.n_routed_experts // ep_size))

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.embed(tokens[:, :-1])
        l_aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, layer_aux = layer(x)
            l_aux = l_aux + layer_aux.float()
        logits = self.head(self.norm(x)).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
        return ce + self.aux_loss_coef * l_aux, ce.detach(), l_aux.detach()

    @torch.no_grad()
    def _init_parameters(self, seed: int, first_expert: int) -> None:
        """Norms to 1; every matrix ``N(0, init_std)`` from the stream ``seed/<key>`` where ``<key>`` is
        :func:`plain_init_key` of its name (local expert ``i`` of this rank is global expert ``first_expert + i``).
        """
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{plain_init_key(name, first_expert)}".encode()))
            p.copy_(torch.randn(p.shape, generator=g) * self.cfg.init_std)


_EXPERTS = ".moe.deepspeed_moe.experts.deepspeed_experts."
_GATE = ".moe.deepspeed_moe.gate.wg.weight"


def plain_init_key(name: str, first_expert: int) -> str:
    """The initialisation key ``DeepSeekV3Model.init_parameters`` uses for the parameter this model calls ``name``.

    * ``layers.<l>.mlp.moe.deepspeed_moe.gate.wg.weight`` -> ``layers.<l>.mlp.router.weight``;
    * ``layers.<l>.mlp.moe.deepspeed_moe.experts.deepspeed_experts.<i>.<gate_up|down>.weight`` ->
      ``layers.<l>.mlp.experts.<first_expert + i>.<gate_up|down>`` (the plain model stacks its experts; expert
      ``g``'s slice is drawn from that key);
    * every other name (attention, dense and shared SwiGLUs, embedding, head) is the same in both models.
    """
    if name.endswith(_GATE):
        return name[: -len(_GATE)] + ".router.weight"
    if _EXPERTS in name:
        head, tail = name.split(_EXPERTS)
        local, rest = tail.split(".", 1)
        return f"{head}.experts.{first_expert + int(local)}.{rest.removesuffix('.weight')}"
    return name
