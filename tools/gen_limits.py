"""Write csrc/common/limits.h from deepep_plugin/limits.py (``--check``: fail if the committed header differs)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "common" / "limits.h"


def _limits():  # load the one module without importing the package (and torch)
    spec = importlib.util.spec_from_file_location("_deepep_limits", ROOT / "deepep_plugin" / "limits.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    text = _limits().cpp_header()
    if "--check" in argv:
        if not HEADER.exists() or HEADER.read_text() != text:
            print(f"{HEADER} is stale: run python tools/gen_limits.py", file=sys.stderr)
            return 1
        return 0
    HEADER.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
