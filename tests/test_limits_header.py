"""``csrc/common/limits.h`` is what ``tools/gen_limits.py`` writes from ``deepep_plugin/limits.py``; the kernels
and the Python side therefore share one set of limits, statuses and wait codes."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

from deepep_plugin import limits

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_header_is_generated_from_limits_py() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_limits.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_no_header_redefines_a_generated_constant() -> None:
    names = {cpp for _, cpp, _ in limits.LIMITS} | {c.cpp for c in limits.WAITS + limits.MAILBOX_STATUSES}
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix not in (".h", ".cuh", ".cu", ".cpp") or path.name == "limits.h":
            continue
        for match in re.finditer(r"(?:constexpr\s+int\s+|^\s*)(k[A-Z]\w*)\s*=", path.read_text(), re.M):
            assert match.group(1) not in names, f"{path.relative_to(ROOT)} redefines {match.group(1)} (limits.h)"


def test_codes_are_unique() -> None:
    for table in (limits.WAITS, limits.MAILBOX_STATUSES):
        assert len({c.value for c in table}) == len(table)
        assert len({c.cpp for c in table}) == len(table)
    assert limits.wait_message(81).startswith("dispatch notify")
    assert limits.wait_message(999) == "wait code 999"
