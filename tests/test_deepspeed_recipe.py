"""The DeepSpeed recipe (``examples/deepspeed``) runs end to end on CPU and its loss falls.

Runs ``python -m examples.deepspeed.train`` as a user would (it starts 2 gloo processes itself) with the
shipped ``ds_config.json``, for 8 steps, and reads the summary it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed", reason="deepspeed is installed by tools/ci_install_deepspeed.sh")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_recipe_trains_with_the_plugin_and_loss_falls(tmp_path) -> None:
    summary_path = tmp_path / "summary.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               # the child resolves deepep_plugin like this process does; the repository root provides `examples`
               PYTHONPATH=os.pathsep.join([p for p in sys.path if p] + [REPO]))
    cmd = [sys.executable, "-m", "examples.deepspeed.train", "--steps", "8", "--nprocs", "2",
           "--deepspeed_config", os.path.join(REPO, "examples", "deepspeed", "ds_config.json"),
           "--summary", str(summary_path)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    summary = json.loads(summary_path.read_text())
    assert summary["moe_layers"] == 2 and summary["plugin_layers"] == 2, summary
    assert summary["deepspeed_config"]["deepep_plugin"]["enabled"] is True
    losses = summary["losses"]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5, f"loss did not fall enough: {losses}"
    assert "step    8/8" in proc.stdout, proc.stdout
