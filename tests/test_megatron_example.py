"""The Megatron-Core recipe (examples/megatron/run_cpu.sh) trains on 2 CPU processes with deepep_plugin dispatch.

It is launched exactly as a user would (``torchrun`` through the shell script, Megatron-LM flag names), on
generated data. The loss must fall, and the same run with Megatron's own ``alltoall`` dispatcher instead of the
plugin must log the same losses (same weights, same data; only the summation order of expert outputs differs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is installed by tools/ci_install_megatron.sh")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "megatron", "run_cpu.sh")
STEPS = 8


def _train(*extra: str) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["bash", SCRIPT, "--train-iters", str(STEPS), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    losses = [float(v) for v in re.findall(r"^step \d+ loss ([0-9.]+)", proc.stdout, flags=re.M)]
    assert len(losses) == STEPS, f"expected {STEPS} logged steps, got:\n{proc.stdout[-3000:]}"
    return losses


def test_recipe_trains_with_the_plugin_and_matches_megatron_alltoall() -> None:
    plugin = _train()  # --deepep-plugin --deepep-plugin-mode dispatcher, as in the script
    assert plugin[-1] < 0.8 * plugin[0], f"loss did not fall: {plugin}"
    stock = _train("--moe-token-dispatcher-type", "alltoall", "--no-deepep-plugin")
    assert max(abs(a - b) for a, b in zip(plugin, stock)) <= 2e-3, f"plugin {plugin} vs alltoall {stock}"
