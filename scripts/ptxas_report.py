#!/usr/bin/env python3
"""Compiles every CUDA source with ``-Xptxas -v`` and reports each kernel's resources.

    python scripts/ptxas_report.py                 # sm_80 and sm_90
    python scripts/ptxas_report.py --arch 90a      # the GPU machine's TORCH_CUDA_ARCH_LIST=9.0a

Prints one row per kernel and architecture (registers, spill stores and loads, stack
frame = local memory, static shared memory) and exits with status 1 if any kernel spills
or uses local memory, 2 if a source does not compile. Where cuobjdump is found (the CUDA
toolkit's or the one Triton bundles), it also reads the machine code: every store of a
vectorized streaming kernel (forward, backward elementwise; V > 1) must be one 128-bit
STG.E.128, and status 1 says when nvcc split one (it did once, see store() in the .cu); and on
sm_90 and later every kernel must wait for its stream predecessor (ACQBULK) before its first
memory instruction (the kernels launch early, docs/cuda_kernels.md "Launches"). The sources are torch-free
(csrc/cuda/*.cu include only the CUDA runtime and csrc/*.h), so this needs nvcc only,
not a GPU or torch. Flags follow the build's (setup.py and torch.utils.cpp_extension).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


def find_cuobjdump(nvcc: str) -> str | None:
    candidates = [shutil.which("cuobjdump"), os.path.join(os.path.dirname(nvcc), "cuobjdump")]
    spec = importlib.util.find_spec("triton")  # Triton bundles one; found without importing it
    if spec and spec.submodule_search_locations:
        candidates.append(os.path.join(spec.submodule_search_locations[0], "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def compile_source(nvcc: str, source: Path, archs: list[str], cuobjdump: str | None) -> tuple[Path, int, str, str]:
    """(source, nvcc's status, its -Xptxas -v log, the object's SASS or "")."""
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "k.o")
        cmd = [nvcc, *NVCC_FLAGS, *map(gencode, archs), "-c", str(source), "-o", obj]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=source.parent)
        sass = ""
        if proc.returncode == 0 and cuobjdump:
            sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True).stdout
    return source, proc.returncode, proc.stdout + proc.stderr, sass


STREAMING = re.compile(r"(bn_act_forward_kernel|bn_act_backward_elementwise_kernel)I\w+?Li(\d+)E")


def sass_functions(sass: str) -> Iterator[tuple[str, str, str]]:
    """(arch such as "sm_90", mangled kernel name, its machine code) of each kernel in
    cuobjdump's -sass output."""
    arch = "?"
    for part in re.split(r"\n(?=\s*(?:Function : |arch = ))", sass):
        if m := re.match(r"\s*arch = (sm_\w+)", part):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", part):
            yield arch, m.group(1), part


def narrow_stores(sass: str) -> tuple[int, list[tuple[str, str, int]]]:
    """The vectorized streaming kernels (x archs) checked, and (arch, mangled kernel, count)
    for each one with a store that is not one 128-bit STG.E.128."""
    checked, found = 0, []
    for arch, mangled, code in sass_functions(sass):
        kernel = STREAMING.search(mangled)
        if kernel and int(kernel.group(2)) > 1:
            checked += 1
            narrow = [s for s in re.findall(r"\bSTG\.E(?:\.[A-Z0-9_]+)*", code) if ".128" not in s]
            if narrow:
                found.append((arch, mangled, len(narrow)))
    return checked, found


# Instructions that touch memory beyond registers and the constant bank.
MEMORY = re.compile(r"\b(?:LDG|STG|LDS|STS|LD|ST|ATOM|ATOMG|ATOMS|RED|CCTL|LDGSTS|UBLKCP|UTMALDG|SULD|SUST|TLD|TEX)\b")


def early_accesses(sass: str) -> tuple[int, list[tuple[str, str]]]:
    """The sm_90+ kernels checked, and (arch, mangled kernel) for each whose machine code
    touches memory before ACQBULK (griddepcontrol.wait) or has none: launched as a
    programmatic dependent, it would read what the kernel before it has not finished
    writing (docs/cuda_kernels.md, "Launches"). The compiler could hoist a load of
    const __restrict__ memory above the wait; this sees it if it does."""
    checked, found = 0, []
    for arch, mangled, code in sass_functions(sass):
        version = arch.removeprefix("sm_").rstrip("af")
        if not version.isdigit() or int(version) < 90:
            continue
        checked += 1
        lines = [line.split("*/", 1)[1] for line in code.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", line)]
        wait = next((i for i, ins in enumerate(lines) if "ACQBULK" in ins), None)
        first = next((i for i, ins in enumerate(lines) if MEMORY.search(ins)), None)
        if wait is None or (first is not None and first < wait):
            found.append((arch, mangled))
    return checked, found


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
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="ptxas processes at once (default: every core)")
    args = parser.parse_args()
    archs = [a.strip().replace(".", "") for a in args.arch.split(",") if a.strip()]
    nvcc = find_nvcc(args.nvcc)
    if not SOURCES:
        sys.exit("ptxas_report: no csrc/cuda/*.cu sources")

    cuobjdump = find_cuobjdump(nvcc)
    kernels: list[Kernel] = []
    narrow: list[tuple[str, str, int]] = []
    streaming = 0
    early: list[tuple[str, str]] = []
    waiting = 0
    failed = False
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for source, rc, log, sass in pool.map(lambda s: compile_source(nvcc, s, archs, cuobjdump), SOURCES):
            rel = source.relative_to(ROOT)
            if rc != 0:
                failed = True
                print(f"ptxas_report: {rel} failed to compile:\n{log}", file=sys.stderr)
                continue
            for line in log.splitlines():
                if "warning" in line.lower():
                    print(f"{rel}: {line.strip()}")
            kernels += parse(str(rel), log)
            checked, found = narrow_stores(sass)
            streaming += checked
            narrow += found
            checked, found = early_accesses(sass)
            waiting += checked
            early += found
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
    if cuobjdump is None:
        print("\nvector stores: not checked (no cuobjdump found)")
    else:
        named = [Kernel("", arch, mangled) for arch, mangled, _ in narrow]
        demangle(named)
        for k, (_, _, count) in zip(named, narrow):
            print(f"{k.name} {k.arch}: {count} stores narrower than 128 bits  <-- split vector stores")
        verdict = f"{len(narrow)} with narrower stores" if narrow else "every store one STG.E.128"
        print(f"\nvector stores: {streaming} vectorized streaming kernels x archs, {verdict} (SASS, cuobjdump)")
        for arch, mangled in early:
            print(f"{mangled} {arch}: memory accessed before ACQBULK (griddepcontrol.wait)  <-- reads too early")
        verdict = f"{len(early)} touch memory first" if early else "each waits (ACQBULK) before any memory access"
        print(f"early launch: {waiting} kernels x archs of sm_90 or later, {verdict} (SASS)")
    print(
        f"\nptxas: {len(kernels)} kernels x archs ({', '.join('sm_' + a for a in archs)}), "
        f"max {max((k.registers for k in kernels), default=0)} registers, "
        + (f"{len(bad)} with spills or local memory" if bad else "no spills, no local memory")
    )
    return 1 if bad or narrow or early else 0


if __name__ == "__main__":
    sys.exit(main())
