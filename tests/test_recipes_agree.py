"""The training recipes compute the same first-step loss where they train the same model (issue 7, item 4).

Which recipes train the same model:

* ``examples/deepseek_v3`` (plain PyTorch) and ``examples/deepspeed`` (DeepSpeed's ``MoE`` layers, swapped to
  ``deepep_plugin`` by the ``"deepep_plugin"`` section of ``ds_config.json``): the same DeepSeek-V3-style
  architecture from the same ``ModelConfig`` preset (MLA, dense first layer, shared + routed SwiGLU experts,
  group-limited sigmoid gating with the routed scaling factor), initialised parameter for parameter from the same
  streams, fed the same ``MarkovCorpus`` batches (rank ``r`` of ``R`` reads batch ``step * R + r``). Their first
  step's loss -- before any update, so optimiser, ZeRO, weight decay and DeepSpeed's ``l_aux`` play no part --
  must be that of one process holding every expert on the union of the ranks' batches.
* ``examples/megatron`` is *not* the same model: megatron-core's ``GPTModel`` with standard multi-head attention
  (no MLA), LayerNorm, GELU MLPs (no SwiGLU), no dense first layer and no shared expert, 8 routed experts in 8
  groups, Megatron's own initialisation, and its own data (an affine recurrence over 64 tokens). Its comparable pair
  is internal: the same run with deepep_plugin dispatch and with Megatron's ``alltoall`` dispatcher logs the same
  losses (``tests/test_megatron_example.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: examples/

from examples.deepseek_v3 import train as plain_train  # noqa: E402
from examples.deepseek_v3.configs import load_preset  # noqa: E402
from examples.deepseek_v3.data import MarkovCorpus  # noqa: E402
from examples.deepseek_v3.model import DeepSeekV3Model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_CONFIG = os.path.join(REPO, "examples", "deepspeed", "ds_config.json")
SEED = 2718  # not the recipes' default, so the agreement does not hinge on one seed
SEQ_LEN = 32
RANKS = 2


def _oracle_first_loss(micro_batch: int) -> float:
    """Mean token loss of the initial single-process model (all experts local) over the ranks' first batches."""
    cfg, train_cfg = load_preset("tiny")
    corpus = MarkovCorpus(cfg.vocab_size, SEQ_LEN, SEED, train_cfg.markov_branching)
    model = DeepSeekV3Model(cfg, seed=SEED)
    with torch.no_grad():
        return float(sum(model.loss(corpus.batch(r, micro_batch)) for r in range(RANKS)) / RANKS)


def _plain_first_loss(micro_batch: int, out_dir: str) -> float:
    summary = plain_train.main(["--preset", "tiny", "--steps", "1", "--batch-size", str(micro_batch),
                                "--seq-len", str(SEQ_LEN), "--seed", str(SEED), "--nprocs", str(RANKS),
                                "--device", "cpu", "--no-progress", "--out-dir", out_dir])
    assert summary is not None and summary["world_size"] == RANKS
    return summary["first_loss"]


def _deepspeed_first_loss(tmp_path: "os.PathLike[str]") -> float:
    summary_path = os.path.join(tmp_path, "ds_summary.json")
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([p for p in sys.path if p] + [REPO]))
    cmd = [sys.executable, "-m", "examples.deepspeed.train", "--preset", "tiny", "--steps", "1",
           "--seq-len", str(SEQ_LEN), "--seed", str(SEED), "--nprocs", str(RANKS),
           "--deepspeed_config", DS_CONFIG, "--summary", summary_path]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(summary_path) as f:
        summary = json.load(f)
    assert summary["plugin_layers"] == summary["moe_layers"] == 2, summary  # the plugin's gating, not DeepSpeed's
    return summary["losses"][0]


def test_deepspeed_config_gates_as_the_tiny_preset_routes() -> None:
    """Precondition of the comparison: ds_config.json's group-limited gating is the preset's router."""
    cfg, _ = load_preset("tiny")
    with open(DS_CONFIG) as f:
        gating = json.load(f)["deepep_plugin"]["group_limited_gating"]
    assert gating == {"num_groups": cfg.n_group, "topk_group": cfg.topk_group, "score_function": "sigmoid",
                      "routed_scaling_factor": cfg.routed_scaling_factor, "normalize": cfg.norm_topk_prob}


def test_plain_and_deepspeed_recipes_give_the_single_process_first_step_loss(tmp_path) -> None:
    pytest.importorskip("deepspeed", reason="deepspeed is installed by tools/ci_install_deepspeed.sh")
    with open(DS_CONFIG) as f:
        micro_batch = json.load(f)["train_micro_batch_size_per_gpu"]
    expected = _oracle_first_loss(micro_batch)
    plain = _plain_first_loss(micro_batch, os.path.join(tmp_path, "plain"))
    deepspeed_loss = _deepspeed_first_loss(tmp_path)
    # float32 on the CPU; the three differ only in the order of a few sums
    assert plain == pytest.approx(expected, rel=1e-5), f"plain recipe {plain} vs single process {expected}"
    assert deepspeed_loss == pytest.approx(expected, rel=1e-5), \
        f"DeepSpeed recipe {deepspeed_loss} vs single process {expected}"
    assert deepspeed_loss == pytest.approx(plain, rel=1e-5)
