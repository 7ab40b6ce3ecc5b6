"""The ``deepep-plugin`` command: ``doctor`` (what works on this machine and what to fix) and ``bench``."""

from __future__ import annotations

import importlib
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

    def extension(name: str) -> Callable[[], str]:
        def run() -> str:
            try:
                importlib.import_module(f"deepep_plugin.{name}")
            except ImportError as exc:
                raise RuntimeError(f"not built ({exc}); build with: pip install --no-build-isolation .") from None
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
    ok &= _check("intranode kernels", extension("_intranode_C"))
    ok &= _check("low-latency kernels", extension("_low_latency_C"))
    ok &= _check("NVSHMEM", nvshmem)
    _check("RDMA", rdma)
    ok &= _check("multicast", multicast)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: deepep-plugin doctor | deepep-plugin bench {intranode,internode,low-latency} [options]")
        return
    if argv[0] == "doctor":
        raise SystemExit(doctor())
    if argv[0] == "bench":
        from .bench.__main__ import main as bench

        bench(argv[1:])
        return
    raise SystemExit(f"unknown command {argv[0]!r}; try: deepep-plugin doctor")


if __name__ == "__main__":
    main()
