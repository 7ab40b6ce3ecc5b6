"""What an install says about its kernels: setup.py records what it built and why not the rest
(``deepep_plugin/_build_info.py``), warns on stderr, and the runtime's "not built" reasons quote it."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _setup_in(tmp: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp / name)
    for pkg in ("deepep_plugin", "integrations"):
        (tmp / pkg).mkdir()
        (tmp / pkg / "__init__.py").write_text("")
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_an_install_without_kernels_says_so_and_records_why(tmp_path: pathlib.Path) -> None:
    result = _setup_in(tmp_path, DEEPEP_PLUGIN_NO_EXT="1")
    assert result.returncode == 0, result.stderr
    assert "WARNING: installed without the CUDA kernels: DEEPEP_PLUGIN_NO_EXT=1 was set" in result.stderr
    assert "pip install --no-build-isolation ." in result.stderr
    info: dict = {}
    exec((tmp_path / "deepep_plugin" / "_build_info.py").read_text(), info)
    assert info["BUILT"] == [] and info["NOT_BUILT_REASON"] == "DEEPEP_PLUGIN_NO_EXT=1 was set"


def test_runtime_reasons_quote_the_install(monkeypatch) -> None:
    import types

    import deepep_plugin
    from deepep_plugin.backends import selection

    fake = types.ModuleType("deepep_plugin._build_info")
    fake.BUILT, fake.NOT_BUILT_REASON = [], "torch was not importable while building"
    monkeypatch.setitem(sys.modules, "deepep_plugin._build_info", fake)
    monkeypatch.setattr(deepep_plugin, "_build_info", fake, raising=False)
    assert selection.build_note() == " (at install time: torch was not importable while building)"
