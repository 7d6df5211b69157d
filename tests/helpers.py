"""Inputs and tolerances shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import resnet_fused

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

# scripts/gpu_check.sh sets RESNET_FUSED_MARGIN_LOG to a file: every comparison of the shared
# assertion helpers then appends the test, what it compared and its worst error as a
# fraction of what the tolerance allows (1 fails). The tolerances that only a GPU run
# checks are chosen from these (scripts/margins.py sums the file up).
MARGIN_LOG = os.environ.get("RESNET_FUSED_MARGIN_LOG", "")
MARGIN_LOG_MAX_NUMEL = 2**24  # larger comparisons are not logged: each takes ~4 float64 copies (0.5 GiB here)


def log_margin(what: str, fraction: float) -> None:
    """Appends ``fraction`` (an error over its bound) for ``what`` in the current test; a NaN
    (a NaN error: the comparison fails) as inf."""
    if MARGIN_LOG:
        fraction = float("inf") if fraction != fraction else fraction
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        with open(MARGIN_LOG, "a") as log:  # one short write: lines of parallel workers stay whole
            log.write(f"{fraction:.4g}\t{test}\t{what}\n")


def log_elementwise_margin(what: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """``log_margin`` of torch.testing.assert_close's rule, |actual - expected| <= atol +
    rtol |expected| per element (equal values, infinities and NaNs included, count as 0)."""
    if not MARGIN_LOG or not 0 < actual.numel() <= MARGIN_LOG_MAX_NUMEL:
        return
    a, e = actual.detach().double(), expected.detach().double()
    error = torch.where((a == e) | (a.isnan() & e.isnan()), 0.0, (a - e).abs())
    fraction = torch.where(error == 0, 0.0, error / (atol + rtol * e.abs()))  # not 0 / 0 where nothing is allowed
    log_margin(what, fraction.max().item())  # max propagates a NaN


def child_env(*paths: str, **variables: str) -> dict:
    """The environment of a child Python that imports this very resnet_fused (and modules
    on ``paths``) whatever the child's working directory: a relative PYTHONPATH would not."""
    package_root = str(Path(resnet_fused.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (package_root, *paths, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **variables}


def activation(shape, dtype=torch.float32, layout="nhwc", device="cpu", *, scale=1.0, offset=0.0):
    """A fresh random (N, C, H, W) activation in the given layout, never all zeros, strided
    as a convolution's output in that layout is (``torch.empty(..., memory_format=)``: for a
    size-1 dimension too, which ``contiguous(memory_format=)`` would leave as it was)."""
    x = torch.randn(shape, device=device, dtype=torch.float32) * scale + offset
    return torch.empty(shape, device=device, dtype=dtype, memory_format=LAYOUTS[layout]).copy_(x)


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as `x` in a non-dense view (every other column) of `x`'s layout."""
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    wide = torch.empty(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device, memory_format=layout)
    with torch.no_grad():
        wide[..., ::2] = x
    return wide[..., ::2].requires_grad_(x.requires_grad) if x.is_leaf else wide[..., ::2]


def opcheck_cases(ns, device="cpu", reduced_dtypes=(torch.float16, torch.bfloat16)):
    """(op, args) covering every op of namespace `ns`: activations in both layouts at once,
    training and eval, optional arguments absent, and the reduced dtypes the backend runs."""
    x = activation((3, 6, 4, 5), device=device)  # channels_last
    r = activation((3, 6, 4, 5), layout="nchw", device=device)  # a second activation in the other layout
    w, b = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    rm, rv = torch.randn(6, device=device), torch.rand(6, device=device) + 0.5
    m, i = rm, rv.rsqrt()
    cases = [
        (ns.batch_stats.default, (x, rm.clone(), rv.clone(), 0.1, 1e-5)),
        (ns.batch_stats.default, (x.contiguous(), None, None, 0.1, 1e-5)),
        (ns.bn_relu.default, (x, w, b, m, i, True)),
        (ns.bn_relu.default, (x.contiguous(), None, None, m, i, False)),
        (ns.bn_relu_backward.default, (r, x, w, b, m, i, True)),
        (ns.bn_add_relu.default, (x, r, w, b, m, i, True)),
        (ns.bn_add_relu_backward.default, (r, x, r, w, b, m, i, False)),
        (ns.dual_bn_add_relu.default, (x, w, b, m, i, r, None, b, m, i, True)),
        (ns.dual_bn_add_relu_backward.default, (r, x, w, b, m, i, r, w, None, m, i, True)),
    ]
    for dtype in reduced_dtypes:  # statistics and parameter gradients stay float32 (the fake kernels say so too)
        cases.append((ns.bn_add_relu.default, (x.to(dtype), r.to(dtype), w, b, m, i, True)))
        cases.append((ns.batch_stats.default, (x.to(dtype), rm.clone(), rv.clone(), 0.1, 1e-5)))
        cases.append((ns.bn_relu_backward.default, (r.to(dtype), x.to(dtype), w, b, m, i, True)))
    return cases


def assert_opcheck(ns, device="cpu", reduced_dtypes=(torch.float16, torch.bfloat16)):
    """torch.library.opcheck passes for every case of `opcheck_cases`."""
    for op, args in opcheck_cases(ns, device, reduced_dtypes):
        differentiable = not op.name().endswith(("backward", "batch_stats"))
        args = tuple(
            a.detach().clone().requires_grad_(differentiable and a.dim() == 4) if isinstance(a, torch.Tensor) else a
            for a in args
        )
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def assert_compiles_like_eager(backend, shape=(2, 8, 5, 5), dtype=torch.float32, device="cpu", compiler="inductor"):
    """A block tail (bn_relu, then bn_add_relu) under torch.compile(fullgraph=True): no graph
    break, and the output, the input gradient and the running statistics equal eager's."""
    import resnet_fused.functional as RF

    def tail(x, r, w, b, rm, rv):
        y = RF.bn_relu(x, rm, rv, w, b, True, backend=backend)
        return RF.bn_add_relu(y, r, rm, rv, w, b, True, backend=backend)

    channels = shape[1]
    x = activation(shape, dtype, device=device).requires_grad_()
    r = activation(shape, dtype, device=device)
    w, b = torch.rand(channels, device=device) + 0.5, torch.randn(channels, device=device)
    eager_stats, compiled_stats = (
        (torch.zeros(channels, device=device), torch.ones(channels, device=device)) for _ in range(2)
    )
    torch._dynamo.reset()
    want = tail(x, r, w, b, *eager_stats)
    got = torch.compile(tail, fullgraph=True, backend=compiler)(x, r, w, b, *compiled_stats)
    torch.testing.assert_close(got, want)
    (grad_got,), (grad_want,) = (torch.autograd.grad(out.float().sum(), x) for out in (got, want))
    torch.testing.assert_close(grad_got, grad_want)
    for a, e in zip(compiled_stats, eager_stats):
        torch.testing.assert_close(a, e)
