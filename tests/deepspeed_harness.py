"""Test harness for the DeepSpeed integration: environment, models and a dense plain-PyTorch reference MoE.

* ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported (CPU machines, gloo).
* :func:`init_deepspeed_comm` binds ``deepspeed.comm`` to the process group that ``dist_utils`` created.
* :func:`build_moe` makes a ``deepspeed.moe.layer.MoE`` whose experts all differ (each is seeded by its global
  id, so a rank can also rebuild every expert of the layer, see :func:`make_expert`) and whose gate is the same on
  every rank.
* :func:`dense_moe` is the reference: ``sum_j w[t, j] * expert[idx[t, j]](x[t])`` computed token by token
  on one rank with all ``E`` experts, no communication.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from typing import Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402


def init_deepspeed_comm() -> None:
    """Make ``deepspeed.comm`` use the already initialised ``torch.distributed`` default group (gloo)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


class ExpertMLP(nn.Module):
    """``[n, M] -> [n, M]``: ``fc2(gelu(fc1(x)))`` with biases (every parameter gets a gradient)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def make_expert(hidden: int, ffn: int, seed: int, global_id: int) -> ExpertMLP:
    """Expert ``global_id`` of a layer seeded with ``seed`` (identical on every rank that builds it)."""
    g = torch.Generator().manual_seed(seed * 1000 + global_id)
    expert = ExpertMLP(hidden, ffn)
    with torch.no_grad():
        for p in expert.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return expert


def gate_weight(hidden: int, num_experts: int, seed: int, skew_to: Optional[int] = None) -> torch.Tensor:
    """``[E, M]`` gate weight. With ``skew_to = L`` the first ``L`` experts get positive rows and the others
    negative ones, so for positive inputs every token picks only experts ``< L`` (EP rank 0's)."""
    g = torch.Generator().manual_seed(seed * 7919 + 1)
    w = torch.randn(num_experts, hidden, generator=g) * 0.5
    if skew_to is not None:
        w = w.abs()
        w[skew_to:] = -w[skew_to:]
    return w


def build_moe(hidden: int, ffn: int, num_experts: int, ep_size: int, k: int, seed: int, rank_in_ep: int,
              skew_to: Optional[int] = None, **moe_kwargs):
    """A ``deepspeed.moe.layer.MoE`` with distinct experts (global id ``rank_in_ep * L + i``) and a fixed gate.

    ``moe_kwargs`` go to ``MoE`` (capacity_factor, drop_tokens, noisy_gate_policy, ...). The caller binds the
    layer to its EP group (``set_deepspeed_parallelism()``) or lets ``deepspeed.initialize`` do it.
    """
    from deepspeed.moe.layer import MoE

    moe = MoE(hidden, ExpertMLP(hidden, ffn), num_experts=num_experts, ep_size=ep_size, k=k, **moe_kwargs)
    local = num_experts // ep_size
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(gate_weight(hidden, num_experts, seed, skew_to))
        for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.load_state_dict(make_expert(hidden, ffn, seed, rank_in_ep * local + i).state_dict())
    return moe


def dense_moe(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
              experts: List[nn.Module]) -> torch.Tensor:
    """Reference MoE output ``[S, M]`` for ``x [S, M]``, ``topk_idx [S, k]`` (``-1`` = unused) and
    ``topk_weights [S, k]``: every route computed separately with its expert, weighted in float32, summed."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.size(0)):
        for j in range(topk_idx.size(1)):
            e = int(topk_idx[t, j])
            if e >= 0:
                out[t] = out[t] + topk_weights[t, j].float() * experts[e](x[t:t + 1])[0].float()
    return out.to(x.dtype)


def grads_of(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: grad}`` of every parameter (zeros where the parameter got no gradient)."""
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """``torch.testing.assert_close`` with the quantity named in the message."""
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
