"""Builds resnet_fused._C against the torch already installed in this environment.

    pip install --no-build-isolation .        # or -e . for development

The CPU kernels are always built. The CUDA kernels are built when torch has CUDA and
nvcc is found; no GPU is needed to build. Environment switches:

    RESNET_FUSED_CUDA=auto|1|0   auto (default): build CUDA kernels when possible;
                                 1: require them (fail if impossible); 0: skip them
    TORCH_CUDA_ARCH_LIST         target architectures, default "8.0;9.0+PTX"
    RESNET_FUSED_PTXAS_VERBOSE=1 print ptxas's register/spill report per kernel
    MAX_JOBS                     parallel compile jobs (ninja), read by torch
"""

import glob
import os
import shutil
import sys

from setuptools import setup

_NO_TORCH_MESSAGE = """
resnet_fused compiles its kernels against the torch installed in your environment,
but this build cannot import torch. Most likely pip built it in an isolated
environment (plain `pip install .`), which never sees your torch.

Install torch and the build tools first, then build without isolation:

    pip install torch setuptools wheel ninja
    pip install --no-build-isolation .
"""


def _locate_cuda_toolkit():
    """Points CUDA_HOME at the toolkit when `nvcc` on PATH is a wrapper script.

    torch takes the toolkit to be two levels above `which nvcc`; a wrapper such as
    /usr/local/bin/nvcc would make that /usr/local, with no CUDA headers or libraries.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guessed = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    for home in (guessed, "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_toolkit()
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(_NO_TORCH_MESSAGE)

# pyproject's `torch>=2.11`: pip would upgrade an older torch after this build, leaving a
# module built for the old one that cannot load. The oldest tested (README, "Requirements").
MIN_TORCH = (2, 11)
if tuple(int(part) for part in torch.__version__.split(".")[:2]) < MIN_TORCH:
    sys.exit(f"resnet_fused needs torch >= {'.'.join(map(str, MIN_TORCH))}, found {torch.__version__}: "
             f"upgrade torch first (pip install 'torch>={'.'.join(map(str, MIN_TORCH))}'), then build.")

CSRC = "csrc"


def _sources(*patterns):
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(CSRC, pattern)))


def _want_cuda():
    mode = os.environ.get("RESNET_FUSED_CUDA", "auto").lower()
    if mode not in ("auto", "1", "0"):
        sys.exit(f"RESNET_FUSED_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return False
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        missing.append("nvcc was not found (set CUDA_HOME)")
    if missing and mode == "1":
        sys.exit("RESNET_FUSED_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    if missing:
        print("resnet_fused: building CPU kernels only: " + "; ".join(missing))
    return not missing


def _extension():
    # at::vec headers carry `#pragma unroll` for other compilers, and GCC notes the vector
    # ABI of the per-ISA kernel builds (csrc/cpu): neither is actionable. -g0 after Python's
    # -g: the debug information was 24 of the module's 26 MB (nvcc keeps -lineinfo).
    cxx_flags = ["-O3", "-g0", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-Wno-psabi",
                 "-DPy_LIMITED_API=0x030A0000"]
    link_flags = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread. The
        # extension then shares torch's libgomp (same soname, already loaded).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    sources = _sources("*.cpp", "cpu/*.cpp")
    common = dict(extra_link_args=link_flags, py_limited_api=True)
    if not _want_cuda():
        return CppExtension("resnet_fused._C", sources, extra_compile_args={"cxx": cxx_flags}, **common)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    nvcc_flags = ["-O3", "-lineinfo", "--threads=0"]
    if os.environ.get("RESNET_FUSED_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v,-warn-spills,-warn-lmem-usage")
    print(f"resnet_fused: building CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return CUDAExtension(
        "resnet_fused._C",
        sources + _sources("cuda/*.cpp", "cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        **common,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
