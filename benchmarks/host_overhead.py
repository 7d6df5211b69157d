"""Host (Python) time of a fused block's forward against torchvision's, at a size where
the kernels cost next to nothing.

    python benchmarks/host_overhead.py            # CPU, 1x64x8x8 input, ResNet-50 layer1[0]

On a GPU at small batch the host, not the device, bounds a forward: what a block adds
per call in Python (its structural check, the fold cache, the functional layer) is then
what users wait for. Prints the median wall time per call (``time.perf_counter``, after
warm-up) of the whole block and of the parts that run on every call, eval and training.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchvision  # noqa: E402

import resnet_fused  # noqa: E402
from resnet_fused import modules  # noqa: E402


def median_us(fn: Callable[[], object], calls: int = 2000, repeats: int = 5) -> float:
    for _ in range(calls // 10):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main() -> int:
    torch.manual_seed(0)
    plain = torchvision.models.resnet50().layer1[0]
    fused = torchvision.models.resnet50().layer1[0]
    resnet_fused.fuse(fused)
    x = torch.randn(1, 64, 8, 8)
    rows = []
    for mode in ("eval", "train"):
        plain.train(mode == "train")
        fused.train(mode == "train")
        with torch.no_grad() if mode == "eval" else torch.enable_grad():
            rows.append((f"{mode}: torchvision Bottleneck forward", median_us(lambda: plain(x), 500)))
            rows.append((f"{mode}: FusedBottleneck forward", median_us(lambda: fused(x), 500)))
    rows.append(("unsupported_reason (every forward)", median_us(lambda: modules.unsupported_reason(fused))))
    fused.eval()
    with torch.no_grad():
        rows.append(("fold cache lookup (every folded conv)",
                     median_us(lambda: fused._folded("conv1", fused.conv1, fused.bn1, torch.float32))))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {tuple(x.shape)}")
    for name, us in rows:
        print(f"  {name:<42} {us:8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
