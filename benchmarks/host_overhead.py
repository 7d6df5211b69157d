"""Host (Python) time of a fused block against torchvision's, at a size where the kernels
cost next to nothing.

    python benchmarks/host_overhead.py                      # CPU, 1x64x8x8, ResNet-50 layer1[0]
    python benchmarks/host_overhead.py --device cuda        # + bf16 autocast, channels_last
    python benchmarks/host_overhead.py --device cuda --profile 25

On a GPU the host, not the device, bounds a step whenever the host takes longer per
block than the kernels: what a block adds per call in Python (its structural check, the
fold cache, the functional layer, the op dispatch, the Triton launcher) is then what
users wait for. Prints the median wall time per call (``time.perf_counter``, after
warm-up, the device synchronized at the end of each timed loop) of the whole block, per
backend, in eval, training forward and training step (forward + backward), of the
parts that run on every call, and of one op family alone per backend (the statistics,
``bn_relu`` forward and backward at 2x64x8x8); for the C++ backends also with Python
autograd Functions in place of their C++ ones (``resnet_fused.ops.python_eager_autograd``:
what those save).
``--profile N`` adds cProfile's N most expensive functions (own time) of each fused
training step. The Triton backend is timed also with every launch through Triton's own
launch path (``resnet_fused.triton._runtime.replaying(False)``: what the replay of recorded
launch plans saves); ``--triton-stand-in`` times it without a GPU, on CPU tensors, its kernels
compiled for sm_90 and never run (``benchmarks/triton_stand_in.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
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
from benchmarks import common  # noqa: E402
from resnet_fused import modules  # noqa: E402


def median_us(fn: Callable[[], object], device: torch.device, calls: int = 2000, repeats: int = 5) -> float:
    for _ in range(max(calls // 10, 3)):
        fn()
    common.sync(device)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        common.sync(device)
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def _profile(fn: Callable[[], object], device: torch.device, calls: int, top: int) -> str:
    for _ in range(10):
        fn()
    common.sync(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    common.sync(device)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backends", default=None,
                        help="fused backends, comma-separated (default: every one available on the device)")
    parser.add_argument("--calls", type=int, default=500, help="calls per timed loop (default 500)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print cProfile's N most expensive functions of each fused training step")
    parser.add_argument("--triton-stand-in", action="store_true",
                        help="time the Triton backend on the CPU, its launches recorded, not run (no GPU needed)")
    args = parser.parse_args(argv)
    if args.triton_stand_in:
        from benchmarks.triton_stand_in import stand_in_driver

        if args.device != "cpu" or args.backends not in (None, "triton"):
            parser.error("--triton-stand-in times the triton backend on the cpu device")
        args.backends = "triton"
        with stand_in_driver():
            return _run(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    backends = args.backends.split(",") if args.backends else [
        b for b in resnet_fused.available_backends(device.type) if b not in ("auto", "reference")
    ]

    torch.manual_seed(0)
    plain = torchvision.models.resnet50().layer1[0].to(device)
    fused = resnet_fused.fuse(torchvision.models.resnet50().layer1[0].to(device))[0]
    x = torch.randn(1, 64, 8, 8, device=device)
    if device.type == "cuda":  # as the benchmark suite runs the blocks
        plain, fused, x = (t.to(memory_format=torch.channels_last) for t in (plain, fused, x))
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    x_grad = x.clone().requires_grad_()

    def forward(block: torch.nn.Module, input: torch.Tensor) -> Callable[[], object]:
        def run():
            with autocast():
                return block(input)
        return run

    def step(block: torch.nn.Module) -> Callable[[], None]:
        def run():
            with autocast():
                out = block(x_grad)
            out.sum().backward()
        return run

    providers = [("torchvision", plain, contextlib.nullcontext)]
    providers += [(f"fused {b}", fused, lambda b=b: resnet_fused.use_backend(b)) for b in backends]
    # The C++ backends' eager calls record C++ autograd Functions; what the Python ones cost:
    for b in (b for b in backends if b != "auto"):
        namespace = resnet_fused.backends.get(b).ops.name
        if namespace in resnet_fused.ops.NATIVE_EAGER_NAMESPACES:
            providers.append((f"fused {b}, Python autograd", fused, lambda b=b, ns=namespace: _both(
                resnet_fused.use_backend(b), resnet_fused.ops.python_eager_autograd(ns))))
    if "triton" in backends:
        from resnet_fused.triton import _runtime as triton_runtime

        providers.append(("fused triton, every launch through Triton", fused, lambda: _both(
            resnet_fused.use_backend("triton"), triton_runtime.replaying(False))))
    rows, profiles = [], []
    for label, block, backend in providers:
        with backend():
            block.eval()
            with torch.no_grad():
                rows.append((f"eval forward, {label}", median_us(forward(block, x), device, args.calls)))
            block.train()
            rows.append((f"train forward, {label}", median_us(forward(block, x_grad), device, args.calls)))
            rows.append((f"train step, {label}", median_us(step(block), device, args.calls // 2)))
            if args.profile and block is fused and "Python" not in label:
                profiles.append((label, _profile(step(block), device, args.calls // 2, args.profile)))
    for b in (b for b in backends if b != "auto"):
        rows += _op_rows(b, device, args.calls)
    rows.append(("unsupported_reason (every forward)", median_us(lambda: modules.unsupported_reason(fused), device)))
    fused.eval()
    with torch.no_grad():
        rows.append(("fold cache lookup (every folded conv)",
                     median_us(lambda: fused._folded("conv1", fused.conv1, fused.bn1, torch.float32), device)))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, input {tuple(x.shape)}"
          + (", bf16 autocast, channels_last" if device.type == "cuda" else "")
          + (", Triton's launches recorded, not run (stand-in driver)" if args.triton_stand_in else ""))
    for name, us in rows:
        print(f"  {name:<44} {us:8.1f} us")
    for label, text in profiles:
        print(f"\ncProfile of one training step, {label} (own time, {args.calls // 2} steps):\n{text}")
    return 0


def _op_rows(backend: str, device: torch.device, calls: int) -> list[tuple[str, float]]:
    """One op family alone, as a block calls it in training: the statistics (the eager
    op), and ``functional.bn_relu`` forward, then forward + backward (with the output's
    ``sum`` and the weight and bias gradients' accumulation), on a 2x64x8x8 channels_last
    input (bf16 on a GPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(2, 64, 8, 8, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    x_grad = x.clone().requires_grad_()
    weight, bias = (torch.randn(64, device=device, requires_grad=True) for _ in range(2))
    running_mean, running_var = torch.zeros(64, device=device), torch.ones(64, device=device)
    eager = resnet_fused.ops.eager_ops(resnet_fused.backends.get(backend).ops.name)

    def forward():
        return resnet_fused.functional.bn_relu(x_grad, running_mean, running_var, weight, bias, True, backend=backend)

    return [
        (f"batch_stats op, {backend}", median_us(lambda: eager.batch_stats(x, running_mean, running_var, 0.1, 1e-5),
                                                 device, calls)),
        (f"bn_relu train forward, {backend}", median_us(forward, device, calls)),
        (f"bn_relu train forward + backward, {backend}", median_us(lambda: forward().sum().backward(), device, calls)),
    ]


if __name__ == "__main__":
    sys.exit(main())
