"""The ``deepep-plugin`` command: usage and a non-zero exit without a command or with an unknown one; ``doctor
--ranks R --ranks-per-node G`` prints which runtime serves each call."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepep_plugin.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args", [(), ("frobnicate",)])
def test_no_or_unknown_command_prints_usage_and_fails(args: tuple) -> None:
    result = _cli(*args)
    assert result.returncode == 2
    assert "usage: deepep-plugin doctor" in result.stderr


def test_help_prints_usage() -> None:
    result = _cli("--help")
    assert result.returncode == 0 and "usage: deepep-plugin doctor" in result.stdout


def test_doctor_prints_which_runtime_serves_each_call() -> None:
    result = _cli("doctor", "--ranks", "16", "--ranks-per-node", "8")
    out = result.stdout
    assert "16 ranks, 2 node(s) of 8" in out, out
    for call in ("layout", "dispatch", "combine (bfloat16)", "combine (float32)", "low_latency_dispatch"):
        assert call in out, out
    rows = [line for line in out.splitlines() if line.startswith(("  normal", "  low-latency"))]
    assert len(rows) == 6, rows
    for row in rows:  # every call served by the reference path says why and how to fix it
        assert " reference " not in row or "fix:" in row, row


def test_doctor_rejects_a_bad_node_size() -> None:
    result = _cli("doctor", "--ranks", "12", "--ranks-per-node", "8")
    assert result.returncode != 0 and "ranks-per-node" in (result.stderr + result.stdout)
