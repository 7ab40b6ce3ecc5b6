"""``python -m deepep_plugin.bench NAME [options]``: the benchmarks, the timeline reader and the fuzzer (programs, not
tests); NAME is one of intranode, internode, low-latency, compare, timeline, fuzz, graph-moe, sm-rates."""

from __future__ import annotations

import sys

USAGE = (
    "usage: python -m deepep_plugin.bench {intranode,internode,low-latency,compare,timeline,fuzz,graph-moe,sm-rates} "
    "[options]  (--help after the name for options)"
)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    name, rest = argv[0], argv[1:]
    if name == "intranode":
        from .intranode import main as run
    elif name == "internode":
        from .internode import main as run
    elif name == "compare":
        from .compare import main as run
    elif name == "timeline":
        from .timeline import main as run
    elif name == "fuzz":
        from .fuzz import main as run
    elif name in ("low-latency", "low_latency"):
        from .low_latency import main as run
    elif name in ("graph-moe", "graph_moe"):
        from .graph_moe import main as run
    elif name in ("sm-rates", "sm_rates"):
        from .sm_rates import main as run
    else:
        raise SystemExit(f"unknown benchmark {name!r}\n{USAGE}")
    run(rest)


if __name__ == "__main__":
    main()
