"""The ``deepep-plugin`` command: ``doctor`` (what works on this machine and what to fix) and ``bench``."""

from __future__ import annotations

import os
import sys
from typing import Callable


def _check(name: str, fn: Callable[[], str]) -> bool:
    try:
        detail = fn()
    except Exception as exc:  # noqa: BLE001 - a doctor reports, it does not crash
        print(f"  [FIX ] {name}: {exc}")
        return False
    print(f"  [ OK ] {name}: {detail}")
    return True


def doctor() -> int:
    """Check torch, GPUs, NVLink peers, the compiled kernels, NVSHMEM and RDMA devices; say what to fix."""
    import torch

    print("deepep_plugin doctor")
    ok = True
    ok &= _check("torch", lambda: f"{torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})")
    if not torch.cuda.is_available():
        print("  [INFO] no CUDA device: the reference backend (gloo/NCCL over torch.distributed) is used")
        return 0 if ok else 1

    def gpus() -> str:
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        cap = torch.cuda.get_device_capability(0)
        if cap < (9, 0):
            raise RuntimeError(f"compute capability {cap}: the kernels are built for sm_90 (Hopper)")
        return f"{torch.cuda.device_count()} x {', '.join(sorted(names))} (sm_{cap[0]}{cap[1]})"

    def peers() -> str:
        n = torch.cuda.device_count()
        missing = [(i, j) for i in range(n) for j in range(n) if i != j and not torch.cuda.can_device_access_peer(i, j)]
        if missing:
            raise RuntimeError(f"no peer access between GPUs {missing}: intranode kernels need NVLink P2P")
        return f"peer access between all {n} GPUs" if n > 1 else "one GPU (peers: processes sharing it)"

    def extension(what: str, name: str) -> Callable[[], str]:
        def run() -> str:
            from .backends.selection import extension_unavailable

            why = extension_unavailable(what, name)
            if why:
                raise RuntimeError(why)
            return "built"
        return run

    def nvshmem() -> str:
        import nvidia.nvshmem as nv  # type: ignore[import-not-found]

        path = list(nv.__path__)[0]
        libs = sorted(f for f in os.listdir(os.path.join(path, "lib")) if f.startswith("libnvshmem_host"))
        return f"wheel at {path} ({', '.join(libs)})"

    def rdma() -> str:
        root = "/sys/class/infiniband"
        devices = sorted(os.listdir(root)) if os.path.isdir(root) else []
        if not devices:
            return "no RDMA devices: low-latency kernels use NVLink P2P inside a node only"
        return ", ".join(devices)

    def multicast() -> str:
        if os.environ.get("NVSHMEM_DISABLE_NVLS") not in (None, "1"):
            raise RuntimeError("NVSHMEM_DISABLE_NVLS is not 1: deepep_plugin never uses NVLink multicast")
        return "NVLink multicast stays off (NVSHMEM_DISABLE_NVLS=1 is set by Buffer)"

    ok &= _check("GPUs", gpus)
    ok &= _check("NVLink peers", peers)
    ok &= _check("intranode kernels", extension("intranode kernels", "_intranode_C"))
    ok &= _check("internode and low-latency kernels (NVSHMEM)", extension("NVSHMEM kernels", "_nvshmem_C"))
    ok &= _check("NVSHMEM", nvshmem)
    _check("RDMA", rdma)
    ok &= _check("multicast", multicast)
    return 0 if ok else 1


def serving_table(num_ranks: int, num_ranks_per_node: int, unavailable: Callable[[str], str] | None = None
                  ) -> list[tuple[str, str, str, str]]:
    """``(mode, call, runtime, why)`` for every call of a group of ``num_ranks`` in nodes of
    ``num_ranks_per_node``, with Buffers built by ``Buffer.sized_for``, on this machine's build (or the one
    ``unavailable(runtime) -> reason`` describes)."""
    import torch

    from .backends.selection import LOW_LATENCY_OPS, NORMAL_OPS, Topology, choose, unavailable_reason

    unavailable = unavailable or unavailable_reason
    per_node = min(num_ranks_per_node, num_ranks)
    spans = num_ranks > per_node
    rows = []
    for mode, ops in (("normal", NORMAL_OPS), ("low-latency", LOW_LATENCY_OPS)):
        ll = mode == "low-latency"
        topo = Topology(num_ranks, per_node, ll, 1 << 20, 1 << 20 if ll or spans else 0)
        for op in ops:
            dtypes = (torch.bfloat16, torch.float32) if op == "combine" else (None,)
            for dtype in dtypes:
                choice = choose(op, topo, cuda=True, dtype=dtype, unavailable=unavailable)
                call = op if dtype is None else f"{op} ({str(dtype).replace('torch.', '')})"
                why = f"{choice.reason}; fix: {choice.fix}" if choice.falls_back else ""
                rows.append((mode, call, choice.runtime, why))
    return rows


def _parse_int(argv: list[str], flag: str) -> int | None:
    if flag not in argv:
        return None
    i = argv.index(flag)
    try:
        value = int(argv[i + 1])
    except (IndexError, ValueError):
        raise SystemExit(f"{flag} needs a positive integer") from None
    if value < 1:
        raise SystemExit(f"{flag} needs a positive integer, got {value}")
    return value


def print_serving_table(num_ranks: int, num_ranks_per_node: int) -> None:
    from .limits import MAX_NVL_PEERS

    if num_ranks_per_node > MAX_NVL_PEERS or num_ranks % min(num_ranks_per_node, num_ranks):
        raise SystemExit(f"--ranks-per-node must be in [1, {MAX_NVL_PEERS}] and divide --ranks")
    nodes = num_ranks // min(num_ranks_per_node, num_ranks)
    print(f"which runtime serves each call on CUDA tensors: {num_ranks} ranks, {nodes} node(s) of "
          f"{min(num_ranks_per_node, num_ranks)}, Buffers from Buffer.sized_for (CPU tensors: reference)")
    for mode, call, runtime, why in serving_table(num_ranks, num_ranks_per_node):
        print(f"  {mode:<12} {call:<26} {runtime:<12} {why}")


USAGE = ("usage: deepep-plugin doctor [--ranks R [--ranks-per-node G]]\n"
         "       deepep-plugin bench {intranode,internode,low-latency,compare,fuzz} [options]")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if not argv:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    if argv[0] == "doctor":
        ranks = _parse_int(argv, "--ranks")
        per_node = _parse_int(argv, "--ranks-per-node")
        code = doctor()
        if ranks is not None:
            print_serving_table(ranks, per_node if per_node is not None else min(ranks, 8))
        elif per_node is not None:
            raise SystemExit("--ranks-per-node needs --ranks")
        raise SystemExit(code)
    if argv[0] == "bench":
        from .bench.__main__ import main as bench

        bench(argv[1:])
        return
    print(f"deepep-plugin: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
