"""Training through ``deepspeed.initialize`` with the plugin enabled from the JSON config (2 gloo processes).

A small model (linear, DeepSpeed MoE with EP = 2 and 4 experts, linear) trains 3 steps on a fixed batch with
ZeRO stage 0 and 2, once with DeepSpeed's own MoE layer and once through
``deepep_plugin.integrations.deepspeed.initialize`` with ``"deepep_plugin": {"enabled": true}`` in the config
(given as a dict or as a JSON file). Expected: the engine found the plugin's layer, the loss falls, and the
plugin run follows DeepSpeed's own run step for step (dropless gating without sampling noise, so both
compute the same function: the losses agree to 1e-5).
"""

from __future__ import annotations

import json

import deepspeed_harness as h  # noqa: I001  (sets DS_ACCELERATOR before deepspeed is imported)
import pytest
import torch

pytest.importorskip("deepspeed", reason="deepspeed is installed by tools/ci_install_deepspeed.sh")

import deepspeed  # noqa: E402
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

from deepep_plugin.integrations import deepspeed as ep_ds  # noqa: E402

WORLD = 2
HIDDEN = 16
STEPS = 3


class TinyMoEModel(torch.nn.Module):
    """``x [B, S, M]`` -> linear -> MoE -> linear; returns ``MSE(prediction, target) + 0.01 * l_aux``."""

    def __init__(self, rank: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(HIDDEN, HIDDEN)
        self.moe = h.build_moe(HIDDEN, 32, 4, WORLD, 2, seed, rank, drop_tokens=False,
                               top2_2nd_expert_sampling=False)
        self.out = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y, l_aux, _ = self.moe(torch.relu(self.inp(x)))
        return torch.nn.functional.mse_loss(self.out(y), target) + 0.01 * l_aux


def _train(rank: int, zero_stage: int, plugin: bool, config_path: str | None) -> list[float]:
    model = TinyMoEModel(rank, seed=5)
    params = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "params"})
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    config = {"train_batch_size": 2 * WORLD, "train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": zero_stage}, "steps_per_print": 1000, "wall_clock_breakdown": True,
              "deepep_plugin": {"enabled": plugin, "backend": "reference"}}
    if config_path is not None:
        with open(config_path, "w") as f:
            json.dump(config, f)
    init = ep_ds.initialize if plugin else deepspeed.initialize
    engine, _, _, _ = init(model=model, optimizer=optimizer, config=config_path or config)
    want_type = ep_ds.DeepEPMOELayer if plugin else deepspeed.moe.sharded_moe.MOELayer
    assert [type(m) for m in engine.moe_layers] == [want_type]

    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 6, HIDDEN, generator=g)
    target = torch.sin(3 * x.flip(-1))
    losses = []
    for _ in range(STEPS):
        loss = engine(x, target)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    layer = engine.moe_layers[0]
    # DeepSpeed's per-layer timers (milliseconds), which the engine reads with wall_clock_breakdown
    timings = [layer.gate.gate_time, layer.time_falltoall, layer.time_salltoall, layer.time_moe]
    assert all(t > 0 for t in timings) and layer.time_moe >= layer.time_falltoall, timings
    return losses


def _worker(rank: int, world: int, zero_stage: int, tmp: str, as_file: bool) -> None:
    h.init_deepspeed_comm()
    reference = _train(rank, zero_stage, plugin=False, config_path=None)
    mine = _train(rank, zero_stage, plugin=True, config_path=f"{tmp}/ds_config_{rank}.json" if as_file else None)
    assert all(b < a for a, b in zip(mine, mine[1:])), f"rank {rank}: loss did not fall: {mine}"
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(reference), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"rank {rank}: plugin losses {mine} vs DeepSpeed's {reference}: {m}")


@pytest.mark.parametrize("zero_stage, as_file", [(0, False), (2, True)])
def test_training_with_the_plugin_follows_deepspeed_and_loss_falls(zero_stage: int, as_file: bool,
                                                                   tmp_path) -> None:
    run_distributed(_worker, WORLD, zero_stage, str(tmp_path), as_file)
