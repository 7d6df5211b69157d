#!/usr/bin/env python3
"""Compiles every Triton kernel with every autotune configuration for sm_90 and reports
each one's resources.

    python scripts/triton_report.py                    # bfloat16 and float32
    python scripts/triton_report.py --dtype bfloat16

Prints one row per distinct compiled kernel (registers per thread, local memory per
thread = spills or stack, shared memory) and exits with status 1 if any kernel uses
local memory, or if an elementwise kernel stores narrower than 128-bit vectors. Needs
Triton and torch, not a GPU: the argument sets are the ones the ops launch, built on CPU
tensors (resnet_fused.triton.compile_report).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's resnet_fused

import torch  # noqa: E402

from resnet_fused.triton import compile_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dtype", action="append", choices=["bfloat16", "float16", "float32"],
        help="activation dtype (repeatable; default: bfloat16 and float32)",
    )
    dtypes = tuple(getattr(torch, d) for d in parser.parse_args().dtype or ()) or compile_report.DTYPES
    rows = compile_report.compile_all(dtypes)
    print(f"Triton kernels compiled for {compile_report.TARGET}, shape {compile_report.SHAPE}:")
    print(compile_report.format_table(rows))
    spilling = [r for r in rows if r.local_bytes]
    narrow = [r for r in rows if r.narrow_stores]
    print(f"{len(rows)} kernels, {len(spilling)} using local memory, most registers {max(r.registers for r in rows)}, "
          f"{len(narrow)} elementwise kernels with stores narrower than 128 bits")
    return 1 if spilling or narrow else 0


if __name__ == "__main__":
    sys.exit(main())
