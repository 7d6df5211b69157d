#!/usr/bin/env python3
"""Compiles every CUDA source with ``-Xptxas -v`` and reports each kernel's resources.

    python scripts/ptxas_report.py                 # sm_80 and sm_90
    python scripts/ptxas_report.py --arch 90a      # the GPU machine's TORCH_CUDA_ARCH_LIST=9.0a

Prints one row per kernel and architecture (registers, spill stores and loads, stack
frame = local memory, static shared memory) and exits with status 1 if any kernel spills
or uses local memory, 2 if a source does not compile. The sources are torch-free
(csrc/cuda/*.cu include only the CUDA runtime and csrc/*.h), so this needs nvcc only,
not a GPU or torch. Flags follow the build's (setup.py and torch.utils.cpp_extension).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
# What torch.utils.cpp_extension and setup.py pass to nvcc, minus the torch include paths.
NVCC_FLAGS = [
    "-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "-Xptxas=-v,-warn-spills,-warn-lmem-usage",
]

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclass
class Kernel:
    source: str
    arch: str
    mangled: str
    name: str = ""
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0

    @property
    def clean(self) -> bool:
        return self.stack == 0 and self.spill_stores == 0 and self.spill_loads == 0


def find_nvcc(explicit: str | None) -> str:
    candidates = [explicit, shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for c in candidates:
        if c and os.path.exists(c):
            return c
    sys.exit("ptxas_report: nvcc not found (pass --nvcc or set CUDA_HOME)")


def gencode(arch: str) -> str:
    return f"-gencode=arch=compute_{arch},code=sm_{arch}"


def compile_source(nvcc: str, source: Path, archs: list[str]) -> tuple[Path, int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *NVCC_FLAGS, *map(gencode, archs), "-c", str(source), "-o", os.path.join(tmp, "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=source.parent)
    return source, proc.returncode, proc.stdout + proc.stderr


def parse(source: str, log: str) -> list[Kernel]:
    kernels: list[Kernel] = []
    for line in log.splitlines():
        if m := ENTRY.search(line):
            kernels.append(Kernel(source, m.group(2), m.group(1)))
        elif kernels and (m := FRAME.search(line)):
            k = kernels[-1]
            k.stack, k.spill_stores, k.spill_loads = map(int, m.groups())
        elif kernels and (m := USAGE.search(line)):
            kernels[-1].registers = int(m.group(1))
            kernels[-1].smem = int(m.group(2) or 0)
    return kernels


def demangle(kernels: list[Kernel]) -> None:
    """Short readable names: the kernel and its template arguments, namespaces dropped."""
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    names = [k.mangled for k in kernels]
    if tool and names:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
        if len(out) == len(names):
            names = out
    for k, name in zip(kernels, names):
        name = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", name)  # the parameter list
        name = re.sub(r"\b[\w]+::", "", re.sub(r"\(anonymous namespace\)::", "", name))
        name = name.replace("(Layout)1", "NHWC").replace("(Layout)0", "NCHW")
        name = re.sub(r"\(Epilogue\)0", "Relu", name)
        name = re.sub(r"\(Epilogue\)1", "AddRelu", name)
        name = re.sub(r"\(Epilogue\)2", "DualAddRelu", name)
        name = name.replace("__nv_bfloat16", "bf16").replace("__half", "f16").replace("float", "f32")
        k.name = name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="comma-separated SM versions (default: 80,90)")
    parser.add_argument("--nvcc", help="nvcc to use (default: PATH, $CUDA_HOME, /usr/local/cuda)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    archs = [a.strip().replace(".", "") for a in args.arch.split(",") if a.strip()]
    nvcc = find_nvcc(args.nvcc)
    if not SOURCES:
        sys.exit("ptxas_report: no csrc/cuda/*.cu sources")

    kernels: list[Kernel] = []
    failed = False
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for source, rc, log in pool.map(lambda s: compile_source(nvcc, s, archs), SOURCES):
            rel = source.relative_to(ROOT)
            if rc != 0:
                failed = True
                print(f"ptxas_report: {rel} failed to compile:\n{log}", file=sys.stderr)
                continue
            for line in log.splitlines():
                if "warning" in line.lower():
                    print(f"{rel}: {line.strip()}")
            kernels += parse(str(rel), log)
    if failed:
        return 2
    demangle(kernels)

    kernels.sort(key=lambda k: (k.source, k.name, k.arch))
    width = max((len(k.name) for k in kernels), default=10)
    print(f"{'kernel':<{width}}  {'arch':>6}  {'regs':>4}  {'spill st':>8}  {'spill ld':>8}  {'stack':>5}  {'smem':>6}")
    for k in kernels:
        flag = "" if k.clean else "  <-- spills / local memory"
        print(
            f"{k.name:<{width}}  {k.arch:>6}  {k.registers:>4}  {k.spill_stores:>8}  {k.spill_loads:>8}  "
            f"{k.stack:>5}  {k.smem:>6}{flag}"
        )
    bad = [k for k in kernels if not k.clean]
    print(
        f"\nptxas: {len(kernels)} kernels x archs ({', '.join('sm_' + a for a in archs)}), "
        f"max {max((k.registers for k in kernels), default=0)} registers, "
        + (f"{len(bad)} with spills or local memory" if bad else "no spills, no local memory")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
