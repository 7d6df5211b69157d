#!/usr/bin/env python3
"""Compiles the Triton kernels for this machine's GPU ahead of their first launch.

    python scripts/triton_precompile.py                        # the kernel benchmark's shapes
    python scripts/triton_precompile.py --dtype bfloat16 --jobs 8 --shape 128x256x56x56

Every kernel and autotune configuration the ops launch at the given shapes lands in
Triton's on-disk cache, compiled in parallel processes (resnet_fused.triton.compile_report
.precompile); the autotuner then times the candidates without compiling them. Default
shapes: the ResNet-50 stage activations at batch 128 (benchmarks/kernels.py), channels_last.
Needs a GPU and Triton, not resnet_fused._C.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's resnet_fused
# It runs alongside the extension's build (scripts/gpu_check.sh): resnet_fused._C may be
# half-written and is not needed. Its warning is silenced here and, as spawned workers run
# this module first, in the workers.
warnings.filterwarnings("ignore", message="resnet_fused: the compiled extension", category=RuntimeWarning)

from resnet_fused.triton import compile_report  # noqa: E402

# ResNet-50's stage activations (benchmarks/kernels.py STAGES): spatial size, channels.
STAGE_SHAPES = [(56, 256), (56, 64), (28, 512), (28, 128), (14, 1024), (14, 256), (7, 2048), (7, 512)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "float32"],
                        help="activation dtype (repeatable; default: bfloat16 and float32)")
    parser.add_argument("--shape", action="append", help="NxCxHxW (repeatable; default: the stage shapes, N=128)")
    parser.add_argument("--layout", action="append", choices=sorted(compile_report.LAYOUTS),
                        help="repeatable; default: nhwc")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compilations at once (default: every core)")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shape or ()] or [
        (128, c, s, s) for s, c in STAGE_SHAPES
    ]
    if any(len(s) != 4 for s in shapes):
        parser.error(f"--shape: expected NxCxHxW, got {args.shape}")
    specs = [(d, s, layout) for d in args.dtype or ("bfloat16", "float32") for s in shapes
             for layout in args.layout or ("nhwc",)]
    start = time.perf_counter()
    count = compile_report.precompile(specs, args.jobs)
    print(f"precompiled {count} Triton kernels for {len(specs)} (dtype, shape, layout) in "
          f"{time.perf_counter() - start:.1f} s with {args.jobs} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
