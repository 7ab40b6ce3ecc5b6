"""Build deepep_plugin.

Everywhere: the pure-Python package (``deepep_plugin`` and ``deepep_plugin.integrations``).
Where a CUDA build of PyTorch and nvcc are present (build with ``--no-build-isolation`` so the build sees that
torch), also the kernels:

* ``deepep_plugin._intranode_C`` from ``csrc/intranode`` (normal kernels, CUDA IPC; no NVSHMEM);
* ``deepep_plugin._nvshmem_C`` from ``csrc/nvshmem`` (the NVSHMEM layer and the module), ``csrc/internode`` (normal
  kernels across nodes) and ``csrc/low_latency`` (low-latency kernels): NVSHMEM from the
  ``nvidia-nvshmem-cu13``/``-cu12`` wheel, relocatable device code.

Environment: ``DEEPEP_PLUGIN_NO_EXT=1`` skips the kernels; ``DEEPEP_PLUGIN_EXTENSIONS=intranode,nvshmem``
builds only the named ones (``low_latency`` and ``internode`` also name ``nvshmem``); ``TORCH_CUDA_ARCH_LIST``
(default ``9.0``); ``NVSHMEM_DIR`` overrides the wheel's location.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(folder: str) -> list[str]:
    return sorted(glob.glob(f"csrc/{folder}/*.cpp") + glob.glob(f"csrc/{folder}/*.cu"))


def _nvshmem_dir() -> str | None:
    if os.environ.get("NVSHMEM_DIR"):
        return os.environ["NVSHMEM_DIR"]
    try:
        import nvidia.nvshmem as nvshmem  # type: ignore[import-not-found]
    except ImportError:
        return None
    return list(nvshmem.__path__)[0]


def _gencode_flags() -> list[str]:
    """``-gencode`` flags for every arch of ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0`` -> compute_90/sm_90)."""
    flags = []
    for arch in os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace(";", " ").split():
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


_HOW = "build them on a machine with CUDA torch and nvcc: pip install --no-build-isolation ."


def _no_kernels_reason() -> str | None:
    """Why no kernel can be built here, or None when they can."""
    if os.environ.get("DEEPEP_PLUGIN_NO_EXT") == "1":
        return "DEEPEP_PLUGIN_NO_EXT=1 was set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return ("torch was not importable while building (pip's default build isolation builds in a fresh "
                "environment without your torch)")
    if torch.version.cuda is None:
        return f"the build saw torch {torch.__version__}, a CPU build"
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return f"nvcc was not found (CUDA_HOME={CUDA_HOME})"
    return None


def _extensions() -> tuple[list, dict]:
    if _no_kernels_reason() is not None:
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    cccl = os.path.join(CUDA_HOME, "include", "cccl")
    include_dirs = [os.path.join(HERE, "csrc"), cccl]
    cxx = ["-O3", "-std=c++17", "-Wno-deprecated-declarations"]
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v,-warn-spills"]
    wanted = set(os.environ.get("DEEPEP_PLUGIN_EXTENSIONS", "intranode,nvshmem").split(","))
    exts = []
    if "intranode" in wanted and _sources("intranode"):
        exts.append(CUDAExtension(
            "deepep_plugin._intranode_C",
            _sources("intranode"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            libraries=["cuda"],
        ))
    nv = _nvshmem_dir()
    if wanted & {"nvshmem", "low_latency", "internode"} and _sources("nvshmem") and nv is not None:
        lib = os.path.join(nv, "lib")
        exts.append(CUDAExtension(
            "deepep_plugin._nvshmem_C",
            _sources("nvshmem") + _sources("internode") + _sources("low_latency"),
            include_dirs=include_dirs + [os.path.join(nv, "include")],
            library_dirs=[lib],
            # torch's device-link step gets no arch flags of its own and would link for nvcc's default arch,
            # dropping NVSHMEM's sm_90 device code: pass the arch list there too.
            extra_compile_args={"cxx": cxx, "nvcc": nvcc + ["-rdc=true"], "nvcc_dlink": _gencode_flags()},
            dlink=True,
            dlink_libraries=["nvshmem_device"],
            extra_link_args=[f"-L{lib}", "-l:libnvshmem_host.so.3", "-lnvshmem_device", f"-Wl,-rpath,{lib}"],
            libraries=["cuda"],
        ))
    return exts, {"build_ext": BuildExtension}


def _record_build(ext_modules: list) -> None:
    """Write deepep_plugin/_build_info.py (what this install built, and why not the rest), which the runtime's
    "not built" errors and warnings quote, and say the same on stderr now."""
    built = sorted(e.name.rsplit(".", 1)[-1] for e in ext_modules)
    reason = _no_kernels_reason()
    if reason is None and "_nvshmem_C" not in built:
        reason = "the NVSHMEM wheel (nvidia-nvshmem-cu13) was not found or not asked for (DEEPEP_PLUGIN_EXTENSIONS)"
    with open(os.path.join(HERE, "deepep_plugin", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py: what this install built. Not in git.\n")
        f.write(f"BUILT = {built!r}\n")
        f.write(f"NOT_BUILT_REASON = {reason!r}\n")
    if reason is not None:
        what = "without" if not built else f"with only {', '.join(built)} of"
        sys.stderr.write(f"deepep_plugin: WARNING: installed {what} the CUDA kernels: {reason}; {_HOW}\n")


ext_modules, cmdclass = _extensions()
_record_build(ext_modules)

setup(
    packages=find_packages(include=["deepep_plugin", "deepep_plugin.*"]) + [
        "deepep_plugin.integrations",
        "deepep_plugin.integrations.megatron",
        "deepep_plugin.integrations.deepspeed",
    ],
    package_dir={"deepep_plugin.integrations": "integrations"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
