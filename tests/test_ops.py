"""The fused ops on the CPU backends (C++ kernels and reference) against eager PyTorch.

Every op is checked, in training and in eval, for outputs, running statistics and all
gradients against two oracles: eager ``F.batch_norm`` + ``relu`` (+ add) composites in
float64 on the very same (rounded) inputs, and the same composites in the input dtype.

Tolerances, per dtype (``ROUNDING``): the fused ops compute in float32 (float64 for
float64) and round once, so against the float64 oracle they may differ by one rounding
of the output dtype plus float32 arithmetic error: 2^-7 relative for bfloat16 (8 bits
of mantissa), 2^-10 for float16, ~100 float32 ulps for float32, and near float64
round-off for float64. Eager in a reduced dtype rounds twice (the BatchNorm output, then
the sum), so the comparison with same-dtype eager allows two roundings. Weight and bias
gradients are float32 sums whose terms may cancel: bounded by the terms' magnitudes
(``CHANNEL_SUM_ERROR``); running statistics within a few float32 roundings
(``RUNNING_STATS_TOL``), whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import fractions
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import _checks, backends, functional as RF
from helpers import (LAYOUTS, activation, assert_compiles_like_eager, assert_opcheck, child_env, log_elementwise_margin,
                     log_margin, non_contiguous)

CPU_BACKENDS = [b for b in ("cpu", "reference") if b in resnet_fused.available_backends("cpu")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (relative = absolute) tolerance of one rounding to the dtype after float32 math
ROUNDING = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}
# Against float64 eager, an activation (output, input gradient) is float32 math rounded once
# to its dtype: within the unit roundoff relative to itself (2^-11, 2^-8 for the 16-bit
# types), plus float32 error absolute, ~1e-6 of the terms it sums (|x * scale|, |shift|,
# the residual: up to ~10 here), before that rounding.
EXACT_ROUNDING = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5),
                  torch.float16: (2**-11, 2e-5), torch.bfloat16: (2**-8, 2e-5)}  # (rtol, atol)
# Eager in float16/bfloat16 rounds each BatchNorm output (|y| up to ~4 here, where one
# ulp is 4x the ulp at 1) and then the sum: up to three half-ulps at 4, i.e. 6 units of
# ROUNDING in absolute terms, whatever the (possibly small) size of the result.
EAGER_ROUNDINGS = 8
# In training an input gradient is a difference of terms with per-channel coefficients from
# float32 sums: float32 error relative to the gradient's largest element, beyond the rounding
# (eval: g * scale rounded once, nothing to add): seen up to 1.7e-7 of the largest element
# (two seeds of every training case, 2026-11-29); float64's sums err ~4e-15.
GRADIENT_SUM_ERROR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}
# A weight or bias gradient is a sum over N*H*W terms that may cancel: its float32 error
# is bounded by the terms' magnitudes (`channel_sum_magnitudes`), not by the sum. Largest
# seen over six seeds of every run_case shape (2026-11-29): 8.5e-7 of the magnitude against
# float64 (~14 units of float32's rounding: blocked sums), 1.8e-6 against eager in float32
# and float16, and 3.7e-3 against eager in bfloat16 (its own error: the float64 oracle is
# the tight check).
CHANNEL_SUM_ERROR = {
    "eager64": {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 4e-6, torch.bfloat16: 4e-6},
    "eager": {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 2e-2},
}
# Running statistics: float32, (1 - momentum) * old + momentum * the batch's (unbiased
# variance), values of order 1 (the inputs' per-channel offsets keep the mean from 0):
# seen up to 2.7e-7 against float64, 1.2e-6 against eager (its own float32 error).
# 2e-6 sees a biased variance at 17040 values per channel (a 6e-6 change at momentum 0.1).
RUNNING_STATS_TOL = {
    "eager64": {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6},
    "eager": {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5},
}

SHAPES = [
    (4, 19, 5, 7),  # C not a multiple of any vector width
    (3, 8, 1, 1),  # H = W = 1
    (1, 13, 3, 3),  # batch of one
    (2, 67, 9, 11),  # C spans several vectors plus a tail; N*H*W odd
    # The CPU kernels reduce blocks of 16384 values (channels_last: of max(16, 16384 / C)
    # rows) and merge the blocks' partials: several blocks per channel in each layout.
    (8, 33, 30, 30),  # channels_last: 15 blocks of 496 rows
    (3, 5, 80, 71),  # NCHW: 17040 values per channel, two blocks
]
OPS = ["bn_relu", "bn_add_relu", "dual_bn_add_relu"]


def requires_cpu_kernels():
    return pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="resnet_fused._C not built")


class BatchNormState:
    """A BatchNorm's parameters and running statistics (float32, like nn.BatchNorm2d).
    ``affine``: both parameters or neither, or a pair (has weight, has bias), as the
    functional ops take each on its own."""

    def __init__(self, channels, affine=True, track=True, device="cpu"):
        f32 = dict(device=device, dtype=torch.float32)
        has_weight, has_bias = affine if isinstance(affine, tuple) else (affine, affine)
        self.weight = (torch.rand(channels, **f32) + 0.5).requires_grad_() if has_weight else None
        self.bias = torch.randn(channels, **f32).requires_grad_() if has_bias else None
        self.running_mean = torch.randn(channels, **f32) * 0.1 if track else None
        self.running_var = torch.rand(channels, **f32) + 0.5 if track else None

    def clone(self, dtype=None):
        other = BatchNormState.__new__(BatchNormState)
        for name in ("weight", "bias"):
            t = getattr(self, name)
            setattr(other, name, None if t is None else t.detach().to(dtype or t.dtype).requires_grad_())
        for name in ("running_mean", "running_var"):
            t = getattr(self, name)
            setattr(other, name, None if t is None else t.to(dtype or t.dtype).clone())
        return other


# The downsample BatchNorm's momentum and eps differ from the main one's, so a mix-up shows.
MOMENTUM, EPS, MOMENTUM_D, EPS_D = 0.1, 1e-5, 0.3, 1e-4


def eager(op, x, other, bn, bn_d, training, momentum=MOMENTUM, eps=EPS, momentum_d=MOMENTUM_D, eps_d=EPS_D,
          relu=True):
    """The eager composite each fused op replaces (`relu=False`: its pre-activation)."""
    y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, momentum, eps)
    if op == "bn_add_relu":
        y = y + other
    elif op == "dual_bn_add_relu":
        y = y + F.batch_norm(
            other, bn_d.running_mean, bn_d.running_var, bn_d.weight, bn_d.bias, training, momentum_d, eps_d
        )
    return torch.relu(y) if relu else y


def fused(op, x, other, bn, bn_d, training, backend, momentum=MOMENTUM, eps=EPS, momentum_d=MOMENTUM_D,
          eps_d=EPS_D):
    if op == "bn_relu":
        return RF.bn_relu(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, momentum, eps, backend=backend)
    if op == "bn_add_relu":
        return RF.bn_add_relu(
            x, other, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, momentum, eps, backend=backend
        )
    return RF.dual_bn_add_relu(
        x, other, bn.running_mean, bn.running_var, bn_d.running_mean, bn_d.running_var,
        bn.weight, bn.bias, bn_d.weight, bn_d.bias, training, momentum, eps, momentum_d, eps_d, backend=backend,
    )


def grads(out, upstream, tensors):
    tensors = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(out, tensors, upstream)


def leaves(x, other, bn, bn_d, op):
    ts = [x, bn.weight, bn.bias]  # x, other: views of leaves are fine for autograd.grad
    if op != "bn_relu":
        ts.append(other)
    if op == "dual_bn_add_relu":
        ts += [bn_d.weight, bn_d.bias]
    return ts


def assert_close(actual, expected, tol, what, atol=None):
    """Compared in float64 against a float64 oracle (rounding the oracle first would add a
    rounding of its own), else in ``actual``'s dtype."""
    if expected.dtype == torch.float64:
        actual = actual.double()
    expected, atol = expected.to(actual.dtype), tol if atol is None else atol
    log_elementwise_margin(what, actual, expected, tol, atol)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same_layout(actual, expected, what):
    """The same strides; where a dimension has size 1 or 0 its stride is arbitrary (eager's
    own forward and backward pick different ones), so there the same dense layouts."""
    if min(expected.shape, default=2) > 1:
        assert actual.stride() == expected.stride(), f"{what}: strides {actual.stride()}, expected {expected.stride()}"
    else:
        for layout in (torch.contiguous_format, torch.channels_last):
            assert actual.is_contiguous(memory_format=layout) == expected.is_contiguous(memory_format=layout), what


def input_gradient_atol(expected, atol, training, oracle, dtype):
    """atol of an input gradient: ``atol``; in training, a difference of terms as large as
    its largest element, at least their error relative to that element: against float64
    the float32 error of its per-channel sums (``GRADIENT_SUM_ERROR``), against eager in
    the same dtype eager's own roundings of such terms (``atol`` of them: with a few values
    per channel, eager in bfloat16 was seen 2% of the largest element off)."""
    if not training:
        return atol
    largest = expected.abs().max().item()
    if oracle == "eager64":
        return max(atol, GRADIENT_SUM_ERROR[dtype] * largest)
    if oracle == "eager":
        return atol * max(1.0, largest)
    return atol


def channel_sum_magnitudes(input64, g64, mean, invstd):
    """Per channel in float64, the magnitudes that bound a branch's bias and weight
    gradients' float32 error (``g``: the masked upstream gradient; mean, invstd: the
    statistics the branch normalizes with): Σ|g| for the bias; for the weight Σ|g x̂| plus
    Σ|g| invstd mean|x|, the term of which the float32 error of the mean (that each x - mean
    carries) is a fraction (in eval the running mean is exact: a bound ~2x loose)."""
    dims = (0, 2, 3)
    xhat = (input64 - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    sum_abs_g = g64.abs().sum(dims)
    return sum_abs_g, (g64 * xhat).abs().sum(dims) + sum_abs_g * invstd * input64.abs().mean(dims)


def unmasked_channel_sum_magnitude(g, input, mean, invstd):
    """A bound of both parameter gradients' magnitudes (``channel_sum_magnitudes``) for an
    upstream gradient ``g`` before its mask, with the statistics as the ops take them."""
    return sum(channel_sum_magnitudes(input.double(), g.double(), mean.double(), invstd.double()))


def assert_channel_sums_close(actual, expected, magnitude, tol, what):
    """|actual - expected| <= tol * magnitude per channel (plus float32's smallest normal:
    an all-masked channel's sums are 0 in both)."""
    error = (actual.double() - expected.double()).abs()
    bound = tol * magnitude + torch.finfo(torch.float32).tiny
    log_margin(what, (error / bound).max().item())
    assert (error <= bound).all(), f"{what}: error / (tol * magnitude) up to {(error / bound).max().item():.3g}"


def run_case(op, backend, shape, dtype, layout, training, *, affine=True, affine_d=None, track=True,
             make_input=None, device="cpu", same_dtype_oracle="eager"):
    """Runs `op` fused and its oracles on the same inputs; compares all: the output, every
    gradient, the running statistics. The oracles: eager in float64, and in the op's dtype
    either eager (its own doubly rounded result) or the reference backend (float32 math
    rounded once, as the kernels; the GPU tests, tests/test_cuda_ops.py). ``affine_d``: the
    downsample BatchNorm's (BatchNormState), ``affine`` unless told.

    The upstream gradient is zeroed where the float64 pre-activation is within the eager
    tolerance of 0: there eager's doubly rounded sum may land on the other side of the ReLU
    than the exact value, and no tolerance could absorb a flipped mask.
    """
    make_input = make_input or (lambda t: t)
    C = shape[1]

    def channel_offsets():  # batch means away from 0, so an error in the mean shows
        return torch.randn(C, device=device).view(1, C, 1, 1)

    x = activation(shape, dtype, layout, device, offset=channel_offsets())
    other = activation(shape, dtype, layout, device, offset=channel_offsets()) if op != "bn_relu" else None
    bn = BatchNormState(C, affine, track, device)
    bn_d = BatchNormState(C, affine if affine_d is None else affine_d, track, device)
    # Mean 1: the per-channel sums of the gradient do not cancel to noise, an error in them shows.
    upstream = activation(shape, dtype, layout, device, offset=1.0)
    with torch.no_grad():
        pre64 = eager(op, x.double(), None if other is None else other.double(), bn.clone(torch.float64),
                      bn_d.clone(torch.float64), training, relu=False)
        upstream[pre64.abs() < ROUNDING[dtype] * EAGER_ROUNDINGS] = 0
        g64 = torch.where(pre64 > 0, upstream.double(), 0.0)
        magnitudes = {}  # per parameter: the magnitude of its gradient's terms
        for input, state, eps in [(x, bn, EPS)] + ([(other, bn_d, EPS_D)] if op == "dual_bn_add_relu" else []):
            x64 = input.double()
            if training:
                var, mean = torch.var_mean(x64, (0, 2, 3), correction=0)
            else:
                mean, var = state.running_mean.double(), state.running_var.double()
            magnitudes[state.bias], magnitudes[state.weight] = channel_sum_magnitudes(x64, g64, mean,
                                                                                      (var + eps).rsqrt())

    runs = {}
    for name in ("fused", "eager64", same_dtype_oracle):
        dt = torch.float64 if name == "eager64" else dtype
        xi = make_input(x.detach().to(dt).requires_grad_())
        oi = None if other is None else make_input(other.detach().to(dt).requires_grad_())
        # eager on the CPU mixes dtypes only for float16/bfloat16 inputs with float32 parameters
        state, state_d = bn.clone(dt if dt == torch.float64 else None), bn_d.clone(dt if dt == torch.float64 else None)
        if name in ("eager", "eager64"):
            out = eager(op, xi, oi, state, state_d, training)
        else:
            out = fused(op, xi, oi, state, state_d, training, backend=backend if name == "fused" else name)
        g = grads(out, upstream.to(out.dtype), leaves(xi, oi, state, state_d, op))
        runs[name] = (out, g, state, state_d)

    out, g, state, state_d = runs["fused"]
    present = [t for t in leaves(x, other, bn, bn_d, op) if t is not None]  # as grads() has them
    assert out.dtype == dtype and out.shape == x.shape
    for i, (a, e) in enumerate(zip((out, *g), (runs[same_dtype_oracle][0], *runs[same_dtype_oracle][1]))):
        assert_same_layout(a, e, f"{'output' if i == 0 else f'gradient {i - 1}'} vs {same_dtype_oracle}")
    for oracle in ("eager64", same_dtype_oracle):
        ref_out, ref_g, ref_state, ref_state_d = runs[oracle]
        if oracle == "eager64":
            rtol, atol = EXACT_ROUNDING[dtype]
        elif oracle == "eager":  # eager's own doubly rounded result
            rtol = atol = ROUNDING[dtype] * EAGER_ROUNDINGS
        else:  # the reference backend: float32 math rounded once, differently ordered
            rtol = atol = ROUNDING[dtype]
        # The reference backend sums in float32 too: each side errs about as much as against
        # float64 (up to 8.5e-7 of the magnitudes, 2.7e-7 in the running statistics), so the
        # two differ by at most twice that, within float64's tolerances (4e-6, 2e-6).
        kind = "eager" if oracle == "eager" else "eager64"
        channel_tol = CHANNEL_SUM_ERROR[kind][dtype]
        assert_close(out, ref_out, rtol, f"output vs {oracle}", atol)
        for i, (a, b, leaf) in enumerate(zip(g, ref_g, present, strict=True)):
            if a.dim() == 4:
                grad_atol = input_gradient_atol(b, atol, training, oracle, dtype)
                assert_close(a, b, rtol, f"gradient {i} vs {oracle}", grad_atol)
            else:
                assert_channel_sums_close(a, b, magnitudes[leaf], channel_tol, f"gradient {i} vs {oracle}")
        if track and training:
            states = [(state, ref_state)] + ([(state_d, ref_state_d)] if op == "dual_bn_add_relu" else [])
            for s, r in states:
                tol = RUNNING_STATS_TOL[kind][dtype]
                assert_close(s.running_mean, r.running_mean, tol, f"running_mean vs {oracle}")
                assert_close(s.running_var, r.running_var, tol, f"running_var vs {oracle}")
    if track and not training:  # eval reads the running statistics and never writes them
        for s, initial in [(state, bn)] + ([(state_d, bn_d)] if op == "dual_bn_add_relu" else []):
            assert torch.equal(s.running_mean, initial.running_mean), "eval changed running_mean"
            assert torch.equal(s.running_var, initial.running_var), "eval changed running_var"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_matches_eager(backend, op, layout, dtype, shape):
    run_case(op, backend, shape, dtype, layout, training=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_eval_matches_eager(backend, op, layout, dtype):
    run_case(op, backend, (3, 21, 6, 5), dtype, layout, training=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_without_affine_or_running_stats(backend, op):
    run_case(op, backend, (4, 11, 3, 5), torch.float32, "nhwc", training=True, affine=False, track=False)


# The dual op's branches take their optional parameters each on its own: one branch with
# (weight, bias), the other with part of them (a kernel reading one branch's flags for both
# would read a missing parameter's placeholder).
PARTIAL_AFFINE = [(False, True), (True, False), (False, False)]  # (has weight, has bias)
AFFINE_PAIRS = [((True, True), p) for p in PARTIAL_AFFINE] + [(p, (True, True)) for p in PARTIAL_AFFINE]


def affine_pair_id(pair):
    return "-".join("".join(name for name, has in zip("wb", p) if has) or "none" for p in pair)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine, affine_d", AFFINE_PAIRS, ids=map(affine_pair_id, AFFINE_PAIRS))
def test_dual_branches_with_their_own_affine_parameters(backend, layout, training, affine, affine_d):
    run_case("dual_bn_add_relu", backend, (2, 11, 3, 5), torch.float32, layout, training,
             affine=affine, affine_d=affine_d)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_non_contiguous_inputs(backend, op, layout):
    run_case(op, backend, (2, 10, 4, 6), torch.float32, layout, training=True, make_input=non_contiguous)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cumulative_moving_average_matches_momentum_none(backend):
    """BatchNorm2d(momentum=None) averages batches; the functional op gets 1/num_batches."""
    bn = torch.nn.BatchNorm2d(7, momentum=None)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(1, 4):
        x = activation((3, 7, 4, 4), offset=step)
        bn(x)
        RF.bn_relu(x, running_mean, running_var, bn.weight, bn.bias, True, 1.0 / step, bn.eps, backend=backend)
    torch.testing.assert_close(running_mean, bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(running_var, bn.running_var, rtol=1e-6, atol=1e-6)


EMPTY_SHAPES = [(0, 5, 4, 4), (2, 5, 0, 3)]  # no batch; a batch of empty planes


def check_empty_input(backend, shape, layout, device="cpu"):
    """An input with no values: every op returns empty results, parameter gradients of 0,
    and leaves the running statistics untouched, as eager does; batch_stats returns mean 0
    and invstd 1 / sqrt(eps), as an empty reduction in the kernels (eps of its own, so a
    default one shows; rtol: float32 rounding of that quotient, computed in float or double)."""
    x, other = (activation(shape, layout=layout, device=device).requires_grad_() for _ in range(2))
    state, state_d = BatchNormState(5, device=device), BatchNormState(5, device=device)
    initial = state.clone(), state_d.clone()
    mean, invstd = RF.batch_stats(x, state.running_mean, state.running_var, 0.1, 1e-3, backend=backend)
    assert torch.equal(mean, torch.zeros(5, device=device)), mean
    torch.testing.assert_close(invstd, torch.full((5,), 1e-3 ** -0.5, device=device), rtol=1e-6, atol=0)
    for op in OPS:
        out = fused(op, x, other, state, state_d, True, backend=backend)
        assert out.shape == x.shape, op
        for g in torch.autograd.grad(out.sum(), leaves(x, other, state, state_d, op)):
            assert g.shape == x.shape if g.dim() == 4 else torch.equal(g, torch.zeros_like(g)), op
    for s, s0 in zip((state, state_d), initial):
        assert torch.equal(s.running_mean, s0.running_mean) and torch.equal(s.running_var, s0.running_var)


STRIDE_SHAPES = [(3, 8, 1, 1), (4, 1, 4, 4), (1, 6, 3, 3), *EMPTY_SHAPES]  # a size-1 or empty dimension


def check_results_strided_in_the_op_layout(backend, shape, device="cpu"):
    """Every activation an op returns (output, input gradients) is dense in the layout the
    op runs in, with that layout's own strides (``torch.empty(..., memory_format=)``, as the
    C++ host layer allocates), also where a dimension of size 1 or 0 leaves the input's
    strides arbitrary: they are not copied from the input. (The reference backend returns
    what eager's ops return, whose strides there vary between forward and backward.)"""
    for fmt in (torch.channels_last, torch.contiguous_format):
        fresh = torch.randn(shape, device=device)
        # each layout's canonical strides, and NCHW strides that also count as channels_last
        for x in (torch.empty_like(fresh, memory_format=fmt).copy_(fresh), fresh.contiguous(memory_format=fmt)):
            x = x.requires_grad_()
            other = x.detach().flip(0).contiguous(memory_format=fmt).requires_grad_()
            want = torch.empty(shape, memory_format=_checks.activation_memory_format(x)).stride()
            state, state_d = BatchNormState(shape[1], device=device), BatchNormState(shape[1], device=device)
            for op in OPS:
                out = fused(op, x, other, state, state_d, True, backend=backend)
                results = [out, *torch.autograd.grad(out.sum(), [x] + ([other] if op != "bn_relu" else []))]
                for i, t in enumerate(results):
                    assert t.stride() == want, f"{op} from strides {x.stride()}: result {i} {t.stride()}, not {want}"


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("shape", STRIDE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_results_strided_in_the_op_layout(backend, shape):
    check_results_strided_in_the_op_layout(backend, shape)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_empty_input(backend, shape, layout):
    check_empty_input(backend, shape, layout)


def check_statistics_far_from_zero(backend, shape, layout, dtype=torch.float32, device="cpu", *, offset=1000.0,
                                   scale=3.0):
    """Channels of std ``scale`` about ``offset`` (a naive float32 sum of squares loses the
    variance entirely), but for every third one, a constant 1.7, and the one after it, a
    constant ``offset + 0.1``: a kernel rounds the means of blocks, lanes or chunks to
    float32, and squared deviations summed about a rounded mean must not count its rounding
    as variance (all of a constant channel's: the CPU kernels' invstd was 4% low at a
    constant 1e4, Triton's 2e-4 at 1000.1). Within 1e-5 of float64."""
    x = activation(shape, dtype, layout, device, scale=scale, offset=offset)
    with torch.no_grad():
        x[:, 1::3] = 1.7
        x[:, 2::3] = offset + 0.1
    mean, invstd = RF.batch_stats(x, backend=backend)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, mean64.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(invstd, (var64 + 1e-5).rsqrt().float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape, offset, scale",
    [((32, 9, 24, 24), 1000.0, 3.0),
     # several blocks of the CPU kernels' reductions; std 1 about 1e4 (was 2e-4 off in channels_last)
     ((8, 4, 56, 56), 1e4, 1.0), ((2, 3, 100, 100), 1e4, 1.0)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None,
)
def test_statistics_are_stable_far_from_zero(backend, layout, dtype, shape, offset, scale):
    check_statistics_far_from_zero(backend, shape, layout, dtype, offset=offset, scale=scale)


def check_variance_past_float32_range(backend, layout, device="cpu"):
    """Float32 channels of std 1e30, whose variance float32 cannot hold, beside ordinary
    ones: as eager on the CPU, invstd 0 there (the output is relu(bias)) and running_var
    inf, never NaN (Triton's merges once took inf - inf)."""
    x = activation((3, 4, 5, 7), torch.float32, layout, device)
    with torch.no_grad():
        x[:, 1::2] *= 1e30
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    fused_stats = [torch.zeros(4, device=device), torch.ones(4, device=device)]
    eager_stats = [torch.zeros(4), torch.ones(4)]
    y = RF.bn_relu(x, *fused_stats, w, b, training=True, backend=backend).cpu()
    expected = F.relu(F.batch_norm(x.cpu(), *eager_stats, w.cpu(), b.cpu(), training=True))
    assert torch.equal(y[:, 1::2], expected[:, 1::2]) and not expected.isnan().any()
    torch.testing.assert_close(y, expected, rtol=ROUNDING[torch.float32], atol=ROUNDING[torch.float32])
    assert torch.equal(fused_stats[1][1::2].cpu(), torch.full((2,), float("inf")))
    for fused, eager in zip(fused_stats, eager_stats):
        torch.testing.assert_close(fused[0::2].cpu(), eager[0::2], rtol=1e-5, atol=1e-5)
    # The 1e30 channels' means cancel towards 0: their float32 error is relative to the
    # values, at most (n - 1) u mean|x| for n = 105 summed in float32 (6.2e-6 of it), for
    # each side; the running mean takes it times the momentum.
    bound = 0.1 * 2 * 104 * 2**-24 * x[:, 1::2].abs().mean().item()
    torch.testing.assert_close(fused_stats[0][1::2].cpu(), eager_stats[0][1::2], rtol=0, atol=bound)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_variance_past_float32_range(backend, layout):
    check_variance_past_float32_range(backend, layout)


def check_nan_residual_gradients(backend, layout, device="cpu"):
    """A NaN in the residual: the output is NaN there, and torch.relu's backward passes the
    gradient there (it zeroes only where the output is <= 0), so every gradient is eager's."""
    shape = (2, 6, 3, 5)
    x = activation(shape, layout=layout, device=device).requires_grad_()
    residual = activation(shape, layout=layout, device=device)
    residual[0, 1, 2, 3] = residual[1, 4, 0, 0] = float("nan")
    residual.requires_grad_()
    w = (torch.rand(6, device=device) + 0.5).requires_grad_()
    b = torch.randn(6, device=device).requires_grad_()
    upstream = activation(shape, layout=layout, device=device)
    want = torch.relu(F.batch_norm(x, None, None, w, b, True) + residual)
    got = RF.bn_add_relu(x, residual, None, None, w, b, True, backend=backend)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5)
    for a, e, name in zip(torch.autograd.grad(got, [x, residual, w, b], upstream),
                          torch.autograd.grad(want, [x, residual, w, b], upstream), ("x", "residual", "w", "b")):
        assert not a.isnan().any(), name
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_nan_residual_passes_the_gradient_as_eager(backend, layout):
    check_nan_residual_gradients(backend, layout)


def check_non_finite_inputs_in_eval(backend, layout, device="cpu"):
    """Eval normalizes with running statistics, so an Inf or NaN in the input stays in its
    element: -Inf gives an output of 0 and no gradient, +Inf and NaN pass the gradient
    (scale * g, as eager's relu and batch_norm backward give it), and every other element
    is eager's. A backward that adds (x - mean) * 0 for eval's missing batch terms gets NaN
    at all three. Every op, both inputs of the dual one; upstream gradient without zeros."""
    shape = (2, 6, 3, 5)

    def poisoned(at):  # -Inf, +Inf and NaN at the three indices `at`
        t = activation(shape, layout=layout, device=device)
        for index, value in zip(at, (float("-inf"), float("inf"), float("nan"))):
            t[index] = value
        return t.requires_grad_()

    # Elsewhere in `other` than in `x`: where one is not finite, the other is.
    x, other = poisoned([(0, 1, 2, 3), (1, 4, 0, 0), (1, 2, 1, 1)]), poisoned([(1, 0, 2, 4), (0, 3, 1, 0), (0, 5, 0, 2)])
    w, b = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    rm, rv = torch.randn(6, device=device), torch.rand(6, device=device) + 0.5
    upstream = activation(shape, layout=layout, device=device, offset=2.0)
    eager_bn = lambda t: F.batch_norm(t, rm, rv, w, b, False)  # noqa: E731
    cases = {
        "bn_relu": ((x,), lambda: torch.relu(eager_bn(x)),
                    lambda: RF.bn_relu(x, rm, rv, w, b, False, backend=backend)),
        "bn_add_relu": ((x, other), lambda: torch.relu(eager_bn(x) + other),
                        lambda: RF.bn_add_relu(x, other, rm, rv, w, b, False, backend=backend)),
        "dual_bn_add_relu": ((x, other), lambda: torch.relu(eager_bn(x) + eager_bn(other)),
                             lambda: RF.dual_bn_add_relu(x, other, rm, rv, rm, rv, w, b, w, b, False, backend=backend)),
    }
    for op, (inputs, eager, fused) in cases.items():
        want, got = eager(), fused()
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5, msg=lambda m: f"{op}: {m}")
        for i, (a, e) in enumerate(zip(torch.autograd.grad(got, inputs, upstream),
                                       torch.autograd.grad(want, inputs, upstream))):
            assert not a.isnan().any(), f"{op}: a NaN in the gradient of input {i}"
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{op}, input {i}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_non_finite_inputs_in_eval_keep_to_their_element(backend, layout):
    check_non_finite_inputs_in_eval(backend, layout)


def check_non_finite_statistics(backend, layout, device="cpu"):
    """A channel holding an Inf or a NaN gets a non-finite mean and a NaN invstd, so its
    whole output is NaN, as eager's (whose mean there is Inf or NaN by its summation
    order); the other channels are exact."""
    x = activation((4, 5, 3, 3), layout=layout, device=device)
    x[1, 0, 2, 1], x[3, 2, 0, 0], x[0, 3, 1, 1] = float("inf"), float("nan"), float("-inf")
    mean, invstd = RF.batch_stats(x, backend=backend)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    finite, poisoned = [1, 4], [0, 2, 3]
    torch.testing.assert_close(mean[finite], mean64[finite].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(invstd[finite], (var64[finite] + 1e-5).rsqrt().float(), rtol=1e-5, atol=0)
    assert not mean[poisoned].isfinite().any() and invstd[poisoned].isnan().all()
    assert (var64[poisoned] + 1e-5).rsqrt().isnan().all()  # eager's too


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_non_finite_values_poison_only_their_channel(backend, layout):
    check_non_finite_statistics(backend, layout)


def check_statistics_with_an_outlier_first(backend, shape, layout, device="cpu"):
    """Values of std 1e-3 and a first value of 1 in every channel (1000 std away), so
    that a kernel's lanes, threads or steps that start there see an outlier: close to
    float64 for Welford or short shifted steps. (Sums shifted by a lane's first value
    over hundreds of values, tried once in Triton, were off by 2e-4: the shift's distance
    from the mean multiplies their rounding.) The mean within 2e-6 of mean|x| (~34 float32
    roundings: its sum's error scales with the values' magnitudes, which the outlier makes
    ~2x the mean's; seen up to 8e-7 over 300 seeds)."""
    x = activation(shape, layout=layout, device=device, scale=1e-3)
    x[0, :, 0, 0] = 1.0
    mean, invstd = RF.batch_stats(x, backend=backend)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    mean_abs = x.double().abs().mean(dim=(0, 2, 3))
    assert ((mean.double() - mean64).abs() <= 2e-6 * mean_abs).all(), (mean, mean64)
    torch.testing.assert_close(invstd, (var64 + 1e-5).rsqrt().float(), rtol=1e-5, atol=0)


def _inference(make):
    with torch.inference_mode():
        return make()


def check_running_statistics_of_any_kind(backend, layout, device="cpu"):
    """Running statistics a kernel cannot update in place (float16 after a model.half(), a
    strided view, also an inference tensor) and leaves that require grad, under no_grad
    (eager updates those there and refuses them with grad mode on; so does the functional
    API, test_bad_input_names_the_argument): updated as the reference updates them,
    without an autograd record. Tolerance: one
    float16 ulp (the update rounds to float16 from float32 values that may differ in their
    last bits), a few float32 ulps."""
    x = activation((3, 5, 4, 4), layout=layout, device=device)
    kinds = {
        "float16 leaves that require grad": lambda: (
            torch.zeros(5, dtype=torch.float16, device=device).requires_grad_(),
            torch.ones(5, dtype=torch.float16, device=device).requires_grad_()),
        "float32 leaves that require grad": lambda: (
            torch.zeros(5, device=device).requires_grad_(), torch.ones(5, device=device).requires_grad_()),
        "strided views": lambda: (torch.zeros(10, device=device)[::2], torch.ones(10, device=device)[1::2]),
        "strided inference tensors": lambda: _inference(
            lambda: (torch.zeros(10, device=device)[::2], torch.ones(10, device=device)[1::2])),
    }
    for kind, make in kinds.items():
        (got_mean, got_var), (want_mean, want_var) = make(), make()
        with torch.no_grad():
            RF.batch_stats(x, got_mean, got_var, 0.3, backend=backend)
            RF.batch_stats(x, want_mean, want_var, 0.3, backend="reference")
        for got, want in ((got_mean, want_mean), (got_var, want_var)):
            assert got.grad_fn is None and got.requires_grad == want.requires_grad, kind
            tol = dict(rtol=1e-3, atol=1e-3) if got.dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{kind}: {m}")
            assert not torch.equal(got, make()[0 if got is got_mean else 1]), f"{kind}: not updated"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_running_statistics_of_any_kind(backend, layout):
    check_running_statistics_of_any_kind(backend, layout)


def check_tensors_over_2_to_the_31_elements(backend, shape, layout, device="cpu", chunk_values=2**26):
    """batch_stats, bn_add_relu, dual_bn_add_relu and their backward ops over bfloat16
    tensors of ``shape`` (more than 2^31 values on a GPU; the CPU runs the check's own logic
    at a small shape): offsets past 2^31 must be 64-bit in every kernel. Per-channel results
    against float64 sums over chunks of whole rows along H, at most ``chunk_values`` values
    each; elementwise ones at the first and the last two rows of every plane (the last hold
    the values past 2^31 in either layout). The upstream gradient has mean 1, so the input
    gradients' per-channel terms are of order 1 and a wrong one shows. The backward's mask
    is the kernel's own output's (a float32 recomputation could flip a few of 2^31 values);
    the residual's gradient is the masked upstream one exactly.
    Tolerances: per-channel 1e-5, of the statistics and of the gradients' terms' magnitudes
    (float32 accumulation over 2^25-2^29 values per channel, merged in order); elementwise one bfloat16 rounding, four for an input
    gradient (its three terms rounded once each in float32, then to bfloat16)."""
    N, C, H, W = shape
    numel, m = N * C * H * W, N * H * W
    if torch.device(device).type == "cuda":
        needed = 6 * 2 * numel + (3 << 30)  # six tensors at a time (below); the chunked checks
        free, _ = torch.cuda.mem_get_info()
        if free < needed:
            pytest.skip(f"needs {needed / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    ops, ref = resnet_fused.backends.get(backend).ops, torch.ops.resnet_fused_reference
    bf16 = dict(device=device, dtype=torch.bfloat16, memory_format=LAYOUTS[layout])
    # y is bn_add_relu's residual and the dual op's downsample input.
    x, y = torch.empty(shape, **bf16).normal_(0.5, 1), torch.empty(shape, **bf16).normal_()
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    w_d, b_d = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    rows = max(1, H * chunk_values // numel)
    ends = [(slice(None), slice(None), part) for part in (slice(0, 2), slice(H - 2, H))]

    def channel(t):
        return t.view(1, -1, 1, 1)

    def chunks(*tensors):
        return zip(*(t.split(rows, dim=2) for t in tensors))

    def dense(t):
        return t.contiguous(memory_format=LAYOUTS[layout])

    def check_branch_gradients(op, out, g, input, weight, mean, invstd, grad_input, grad_weight, grad_bias):
        """One BN branch's gradients, masked where ``out`` is not positive."""
        sums = torch.zeros(4, C, device=device, dtype=torch.float64)  # sum(g), sum(g (x - mean)), magnitudes
        for xc, gc, oc in chunks(input, g, out):
            masked = torch.where(oc > 0, gc.double(), 0.0)
            centered = masked * (xc.double() - channel(mean.double()))
            sums += torch.stack([masked.sum((0, 2, 3)), centered.sum((0, 2, 3)),
                                 masked.abs().sum((0, 2, 3)), centered.abs().sum((0, 2, 3))])
        sum_g, sum_gc, mag_g, mag_gc = sums
        assert_channel_sums_close(grad_bias, sum_g, mag_g, 1e-5, f"{op} grad_bias")
        assert_channel_sums_close(grad_weight, sum_gc * invstd, mag_gc * invstd, 1e-5, f"{op} grad_weight")
        scale = weight * invstd
        for end in ends:
            masked = torch.where(out[end] > 0, g[end], 0.0).float()
            want = (masked * channel(scale) - channel(scale * sum_g.float() / m)
                    - (input[end].float() - channel(mean)) * channel(scale * invstd**2 * sum_gc.float() / m))
            assert_close(grad_input[end].float(), want, 4 * ROUNDING[torch.bfloat16], f"{op} grad_input")

    mean, invstd = ops.batch_stats(x, None, None, 0.1, 1e-5)
    mean64 = sum(xc.double().sum((0, 2, 3)) for (xc,) in chunks(x)) / m
    var64 = sum(((xc.double() - channel(mean64)) ** 2).sum((0, 2, 3)) for (xc,) in chunks(x)) / m
    assert_close(mean, mean64, 1e-5, "mean", atol=1e-6)
    assert_close(invstd, (var64 + 1e-5).rsqrt(), 1e-5, "invstd", atol=0)
    del mean64, var64
    g = torch.empty_like(x).normal_(1, 1)

    out = ops.bn_add_relu(x, y, w, b, mean, invstd, True)
    for end in ends:
        want = ref.bn_add_relu(dense(x[end]), dense(y[end]), w, b, mean, invstd, True)
        assert_close(out[end], want, ROUNDING[torch.bfloat16], "bn_add_relu output")
    grad_x, grad_y, grad_w, grad_b = ops.bn_add_relu_backward(g, x, y, w, b, mean, invstd, True)
    for end in ends:
        assert torch.equal(grad_y[end], torch.where(out[end] > 0, g[end], 0.0)), "grad_residual"
    check_branch_gradients("bn_add_relu", out, g, x, w, mean, invstd, grad_x, grad_w, grad_b)
    del out, grad_x, grad_y  # the dual op's six tensors in the same memory

    mean_d, invstd_d = ops.batch_stats(y, None, None, 0.1, 1e-5)
    main, downsample = (w, b, mean, invstd), (w_d, b_d, mean_d, invstd_d)
    out = ops.dual_bn_add_relu(x, *main, y, *downsample, True)
    for end in ends:
        want = ref.dual_bn_add_relu(dense(x[end]), *main, dense(y[end]), *downsample, True)
        assert_close(out[end], want, ROUNDING[torch.bfloat16], "dual_bn_add_relu output")
    grad_x, grad_w, grad_b, grad_y, grad_w_d, grad_b_d = ops.dual_bn_add_relu_backward(
        g, x, *main, y, *downsample, True)
    check_branch_gradients("dual_bn_add_relu", out, g, x, w, mean, invstd, grad_x, grad_w, grad_b)
    check_branch_gradients("dual_bn_add_relu downsample", out, g, y, w_d, mean_d, invstd_d,
                           grad_y, grad_w_d, grad_b_d)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_the_64_bit_indexing_check_at_a_small_shape(backend, layout):
    """The GPU tests' check past 2^31 values (test_cuda_ops.py, test_triton_ops.py) runs its
    logic here, in chunks of 2, 2, 2 and 1 rows: it passes on correct kernels."""
    check_tensors_over_2_to_the_31_elements(backend, (3, 5, 7, 6), layout, chunk_values=200)


def check_mask_of_the_rounded_output(backend, device="cpu", dtypes=(torch.float16, torch.bfloat16)):
    """The backward masks where the output, as stored in the input's dtype, is <= 0, as
    eager's relu backward does: a pre-activation of half the dtype's smallest subnormal
    (2^-25 in float16, 2^-134 in bfloat16) rounds to 0 (a tie, to even) and gets no
    gradient, the next float rounds to the smallest subnormal and gets it; 1e-9 rounds to
    0 in float16, not in bfloat16. Eval mode with x = 0 makes the pre-activation the bias
    exactly; every op, both backward passes (the bias gradient, a count of the unmasked
    values, comes from the reduction). Tolerance: the input gradient is 1 * invstd rounded
    to the dtype."""
    stats = torch.zeros(4, device=device), torch.ones(4, device=device)
    zero_bias = torch.zeros(4, device=device)
    for dtype, layout in itertools.product(dtypes, ("nchw", "nhwc")):
        tie = 2.0 ** (-25 if dtype == torch.float16 else -134)
        values = torch.tensor([tie, 0.0, 1e-9, -1e-9])
        values[1] = torch.nextafter(values[0], torch.tensor(1.0))
        bias = values.to(device).requires_grad_()
        x = torch.zeros(2, 4, 1, 2, device=device, dtype=dtype)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        zeros = torch.zeros_like(x)

        def bn(t):
            return F.batch_norm(t, *stats, None, bias, False)

        eager = {
            "bn_relu": lambda: torch.relu(bn(x)),
            "bn_add_relu": lambda: torch.relu(bn(x) + zeros),
            "dual_bn_add_relu": lambda: torch.relu(bn(x) + F.batch_norm(zeros, *stats, None, zero_bias, False)),
        }
        fused = {
            "bn_relu": lambda: RF.bn_relu(x, *stats, None, bias, False, backend=backend),
            "bn_add_relu": lambda: RF.bn_add_relu(x, zeros, *stats, None, bias, False, backend=backend),
            "dual_bn_add_relu": lambda: RF.dual_bn_add_relu(x, zeros, *stats, *stats, None, bias, None, zero_bias,
                                                            False, backend=backend),
        }
        for op, fused_call in fused.items():
            got, want = fused_call(), eager[op]()
            assert torch.equal(got, want), (op, dtype, layout, got, want)
            upstream = torch.ones_like(x)
            for a, e, name in zip(torch.autograd.grad(got, [x, bias], upstream),
                                  torch.autograd.grad(want, [x, bias], upstream), ("x", "bias")):
                torch.testing.assert_close(a, e, rtol=1e-3, atol=0,
                                           msg=lambda m: f"{op} {dtype} {layout} grad {name}: {m}")
        assert (want[:, 0] == 0).all() and (want[:, 1] > 0).all(), want  # the boundary this checks


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mask_of_the_rounded_output(backend):
    check_mask_of_the_rounded_output(backend)


OUTLIER_CASES = [((1, 4, 40, 40), "nhwc"), ((2, 3, 30, 30), "nchw")]
OUTLIER_SHAPES_ON_GPU = [(8, 24, 64, 64), (3, 5, 30, 30)]  # each in both layouts


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape, layout", OUTLIER_CASES)
def test_statistics_with_an_outlier_first(backend, shape, layout):
    check_statistics_with_an_outlier_first(backend, shape, layout)


@requires_cpu_kernels()
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_cpu_kernels_are_deterministic(layout):
    x = activation((8, 33, 30, 30), layout=layout, offset=0.5)
    r = activation((8, 33, 30, 30), layout=layout)
    w, b = torch.rand(33) + 0.5, torch.randn(33)
    first = torch.ops.resnet_fused.batch_stats(x, None, None, 0.1, 1e-5)
    grads1 = torch.ops.resnet_fused.bn_add_relu_backward(r, x, r, w, b, *first, True)
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        again = torch.ops.resnet_fused.batch_stats(x, None, None, 0.1, 1e-5)
        grads2 = torch.ops.resnet_fused.bn_add_relu_backward(r, x, r, w, b, *again, True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


def test_activation_memory_format_is_torchs_suggestion():
    """The layout every backend processes an input in: its shortcut for tensors dense in one
    layout must agree with ``suggest_memory_format`` on every stride pattern, size-1 and
    empty dimensions included."""
    from torch._prims_common import suggest_memory_format

    from resnet_fused._checks import activation_memory_format

    for shape in itertools.product((0, 1, 2, 3), repeat=4):
        base, padded = torch.empty(shape), torch.empty([2 * s + 1 for s in shape])
        views = [base, base.to(memory_format=torch.channels_last), base.permute(0, 1, 3, 2),
                 base.transpose(0, 1), base.permute(0, 2, 3, 1), base.permute(3, 2, 1, 0),
                 padded[::2, ::2, ::2, ::2][tuple(slice(s) for s in shape)],
                 padded.to(memory_format=torch.channels_last)[tuple(slice(s) for s in shape)]]
        for t in views:
            assert activation_memory_format(t) == suggest_memory_format(t), (tuple(t.shape), t.stride())
    # Arbitrary strides, overlapping and zero ones included (N = 1 takes the stride rule).
    storage = torch.empty(4096)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3000):
        shape = torch.randint(0, 4, (4,), generator=generator).tolist()
        strides = torch.randint(0, 40, (4,), generator=generator).tolist()
        t = storage.as_strided(shape, strides)
        assert activation_memory_format(t) == suggest_memory_format(t), (shape, strides)


# ---------------------------------------------------------------- gradcheck, backward ops


@requires_cpu_kernels()
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(layout, training):
    shape = (3, 5, 4, 3)
    x = activation(shape, torch.float64, layout).requires_grad_()
    x_d = activation(shape, torch.float64, layout).requires_grad_()
    w = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(5, dtype=torch.float64).requires_grad_()
    rm = torch.randn(5, dtype=torch.float64)
    rv = torch.rand(5, dtype=torch.float64) + 0.5
    ops = torch.ops.resnet_fused
    assert torch.autograd.gradcheck(
        lambda x, w, b: RF.bn_relu(x, rm, rv, w, b, training, backend="cpu"), (x, w, b)
    )
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: RF.bn_add_relu(x, r, rm, rv, w, b, training, backend="cpu"), (x, x_d, w, b)
    )
    assert torch.autograd.gradcheck(
        lambda x, xd, w, b: RF.dual_bn_add_relu(x, xd, rm, rv, rm, rv, w, b, w * 0.5, -b, training, eps_d=1e-3, backend="cpu"),
        (x, x_d, w, b),
    )
    if not training:  # eval: the statistics are inputs of their own, with gradients
        mean = rm.clone().requires_grad_()
        invstd = rv.rsqrt().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, m, i: ops.bn_relu(x, w, b, m, i, False), (x, mean, invstd))
        assert torch.autograd.gradcheck(
            lambda x, r, m, i: ops.bn_add_relu(x, r, w, b, m, i, False), (x, x_d, mean, invstd)
        )
        assert torch.autograd.gradcheck(
            lambda m, i, md, id_: ops.dual_bn_add_relu(x, w, b, m, i, x_d, w, None, md, id_, False),
            (mean, invstd, mean.detach().flip(0).requires_grad_(), invstd.detach().flip(0).requires_grad_()),
        )


@requires_cpu_kernels()
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_each_statistic_alone_gets_its_gradient_in_eval(layout):
    """Eval: a mean or an invstd that alone requires a gradient gets it, in either branch of
    the dual op. Training: none (the batch statistics' own gradients are in grad_input)."""
    shape = (3, 5, 4, 3)
    x, x_d = (activation(shape, torch.float64, layout) for _ in range(2))
    w, b = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    main = [torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5]  # mean, invstd
    down = [torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5]
    ops = torch.ops.resnet_fused

    def with_leaf(stats, k, leaf):
        return [leaf if i == k else t for i, t in enumerate(stats)]

    for k in range(2):
        leaf = main[k].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t: ops.bn_relu(x, w, b, *with_leaf(main, k, t), False), (leaf,))
        assert torch.autograd.gradcheck(lambda t: ops.bn_add_relu(x, x_d, w, b, *with_leaf(main, k, t), False), (leaf,))
        leaf = down[k].clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda t: ops.dual_bn_add_relu(x, w, b, *main, x_d, w.flip(0), None, *with_leaf(down, k, t), False), (leaf,)
        )
    mean, x_leaf = main[0].clone().requires_grad_(), x.clone().requires_grad_()
    ops.bn_relu(x_leaf, w, b, mean, main[1], True).sum().backward()
    assert mean.grad is None and x_leaf.grad is not None


@requires_cpu_kernels()
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_backward_ops_match_reference_formulas(layout, dtype, training):
    shape = (3, 23, 5, 4)
    x, r, g = (activation(shape, dtype, layout) for _ in range(3))
    w, b = torch.rand(23) + 0.5, torch.randn(23)
    mean, invstd = torch.ops.resnet_fused.batch_stats(x, None, None, 0.1, 1e-5)
    cases = {
        "bn_relu_backward": (g, x, w, b, mean, invstd, training),
        "bn_add_relu_backward": (g, x, r, w, b, mean, invstd, training),
        "dual_bn_add_relu_backward": (g, x, w, b, mean, invstd, r, w.flip(0), None, mean, invstd, training),
    }
    # Activations: two roundings of values as large as the largest output (|grad| reaches
    # ~10 here). Weight and bias gradients: float32 sums of the same terms, within
    # CHANNEL_SUM_ERROR of their magnitudes (the unmasked gradient's: a bound of both).
    tol = 2 * ROUNDING[dtype]
    for name, args in cases.items():
        got = getattr(torch.ops.resnet_fused, name)(*args)
        want = getattr(torch.ops.resnet_fused_reference, name)(*args)
        for i, (a, e) in enumerate(zip(got, want)):
            assert a.dtype == e.dtype and a.stride() == e.stride(), f"{name} output {i}"
            if a.dim() == 1:
                branch_input = r if name == "dual_bn_add_relu_backward" and i > 2 else x
                magnitude = unmasked_channel_sum_magnitude(g, branch_input, mean, invstd)
                assert_channel_sums_close(a, e, magnitude, CHANNEL_SUM_ERROR["eager64"][dtype], f"{name} output {i}")
                continue
            atol = tol * e.abs().max().item()
            torch.testing.assert_close(a, e, rtol=tol, atol=atol, msg=lambda m: f"{name} output {i}: {m}")


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize("namespace", ["resnet_fused", "resnet_fused_reference"])
def test_opcheck(namespace):
    if namespace == "resnet_fused" and "cpu" not in CPU_BACKENDS:
        pytest.skip("resnet_fused._C not built")
    assert_opcheck(getattr(torch.ops, namespace))


@requires_cpu_kernels()
@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_cpu_kernels_of_every_instruction_set(capability):
    """The CPU kernels are built once per instruction set and picked at run time as ATen
    picks its own (ATEN_CPU_CAPABILITY): the suite runs this machine's widest; this runs the
    cpu backend's tests of this file under a narrower one, in a process of its own."""
    if capability == "AVX2" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no AVX2")
    env = child_env(ATEN_CPU_CAPABILITY=capability.lower())
    picked = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                            env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert picked == capability
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "cpu and not reference and not instruction_set"],
        env=env, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


@requires_cpu_kernels()
def test_python_schemas_equal_cpp_schemas():
    for name in resnet_fused.ops.OP_NAMES:
        cpp = getattr(torch.ops.resnet_fused, name).default._schema
        ref = getattr(torch.ops.resnet_fused_reference, name).default._schema
        assert [(a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in cpp.arguments] == [
            (a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in ref.arguments
        ], name
        assert [str(r.type) for r in cpp.returns] == [str(r.type) for r in ref.returns], name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph(backend):
    assert_compiles_like_eager(backend, compiler="aot_eager")


# ---------------------------------------------------------------- bad input


BAD_INPUTS = [
    ("rank", lambda x, c: (x[0], c), ValueError, "`input` to be a 4-D"),
    ("dtype", lambda x, c: (x.to(torch.int32), c), TypeError, "`input` to have dtype"),
    ("channels", lambda x, c: (x, {**c, "weight": torch.ones(5)}), ValueError, "`weight` to be a 1-D tensor of 6"),
    ("param 2-D", lambda x, c: (x, {**c, "weight": torch.ones(6, 1)}), ValueError, "`weight` to be a 1-D tensor of 6"),
    ("device", lambda x, c: (x, {**c, "bias": torch.zeros(6, device="meta")}), ValueError, "`bias` on the device"),
    ("param dtype", lambda x, c: (x, {**c, "weight": torch.ones(6, dtype=torch.int64)}), TypeError, "`weight` to be a floating"),
    ("stats pair", lambda x, c: (x, {**c, "running_var": None}), ValueError, "`running_mean` and `running_var`"),
    ("one value", lambda x, c: (x[:1, :, :1, :1], c), ValueError, "Expected more than 1 value per channel"),
    ("expanded stats", lambda x, c: (x, {**c, "running_var": torch.ones(1).expand(6)}), ValueError,
     r"`running_var` to hold one value per channel in memory .* expanded tensor"),
    ("stats require grad", lambda x, c: (x, {**c, "running_mean": torch.zeros(6, requires_grad=True)}), ValueError,
     r"`running_mean` not to require grad in training"),
    ("nested", lambda x, c: (torch.nested.nested_tensor(list(x)), c), TypeError,
     r"`input` to be a dense tensor, got a nested tensor"),
    ("sparse param", lambda x, c: (x, {**c, "weight": torch.ones(6).to_sparse()}), TypeError,
     r"`weight` to be a strided \(dense\) tensor, got layout torch.sparse_coo"),
    ("eps zero", lambda x, c: (x, {**c, "eps": 0.0}), ValueError, r"`eps` to be positive in training, got 0.0"),
    ("one tensor for both stats", lambda x, c: (x, {**c, "running_var": c["running_mean"]}), ValueError,
     r"`running_mean` and `running_var` to be two tensors \(each is updated in place\)"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c[0])
def test_bad_input_names_the_argument(backend, case):
    _, mutate, error, message = case
    x = activation((2, 6, 3, 3))
    kwargs = dict(running_mean=torch.zeros(6), running_var=torch.ones(6), weight=torch.ones(6), bias=torch.zeros(6))
    x, kwargs = mutate(x, kwargs)
    with pytest.raises(error, match=message):
        RF.bn_relu(x, training=True, backend=backend, **kwargs)


def _required_tensor_cases():
    """(namespace, op, arguments with one required tensor None, its name) for every op's
    required tensors, in the namespaces a user can call directly."""
    x, s = activation((2, 4, 3, 3)), torch.ones(4)
    calls = {
        "bn_relu": (("input", x), ("weight", None), ("bias", None), ("mean", s), ("invstd", s), ("training", True)),
        "bn_add_relu": (("input", x), ("residual", x), ("weight", None), ("bias", None), ("mean", s), ("invstd", s),
                        ("training", True)),
        "dual_bn_add_relu": (("input", x), ("weight", None), ("bias", None), ("mean", s), ("invstd", s),
                             ("input_d", x), ("weight_d", None), ("bias_d", None), ("mean_d", s), ("invstd_d", s),
                             ("training", True)),
        "bn_relu_backward": (("grad_out", x), ("input", x), ("weight", None), ("bias", None), ("mean", s),
                             ("invstd", s), ("training", True)),
    }
    namespaces = ["resnet_fused_reference"]
    if "cpu" in CPU_BACKENDS:
        namespaces += ["resnet_fused", "resnet_fused_eager"]
    for namespace in namespaces:
        for op, arguments in calls.items():
            if namespace == "resnet_fused_eager" and op.endswith("_backward"):
                continue
            for i, (name, value) in enumerate(arguments):
                if isinstance(value, torch.Tensor):
                    args = [None if j == i else v for j, (_, v) in enumerate(arguments)]
                    yield pytest.param(namespace, op, args, name, id=f"{namespace}-{op}-{name}")


@pytest.mark.parametrize("namespace, op, args, name", list(_required_tensor_cases()))
def test_a_required_tensor_given_as_none_is_refused_by_name(namespace, op, args, name):
    """Called directly, every op refuses None for a required tensor by name (the C++ ops
    read an undefined tensor's device: "tensor does not have a device")."""
    with pytest.raises(TypeError, match=rf"{op}\(\): expected `{name}` to be a Tensor, got None"):
        getattr(getattr(torch.ops, namespace), op)(*args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_nested_residual_is_refused_by_name(backend):
    """A nested tensor where the op expects one like ``input`` (its shape cannot be asked)."""
    x = activation((2, 6, 3, 3))
    with pytest.raises(TypeError, match=r"bn_add_relu\(\): expected `residual` to be a dense tensor, got a nested"):
        RF.bn_add_relu(x, torch.nested.nested_tensor(list(x)), None, None, training=True, backend=backend)


def _batch_norm_argument_variants():
    """check_batch_norm's arguments, each variant changing one of a valid call's: valid
    ones (layouts, dtypes, absent tensors, eval, no_grad, one channel) and refused ones."""
    x = activation((2, 6, 3, 3))
    ok = dict(input=x, weight=torch.ones(6), bias=torch.zeros(6), running_mean=torch.zeros(6),
              running_var=torch.ones(6), training=True)
    nested = torch.nested.nested_tensor([x[0], x[1]])  # strided, no single shape
    one_channel = dict(ok, input=x[:, :1], weight=None, bias=None,
                       running_mean=torch.zeros(()).expand(1), running_var=torch.ones(1, 1)[0])
    variants = [
        ok, dict(ok, training=False), dict(ok, input=x.to(memory_format=torch.channels_last)),
        dict(ok, input=x.double()), dict(ok, input=x.half(), weight=torch.ones(6, dtype=torch.bfloat16)),
        dict(ok, input=non_contiguous(x)), dict(ok, weight=None, bias=None),
        dict(ok, running_mean=None, running_var=None), one_channel, dict(one_channel, training=False),
        dict(ok, running_mean=torch.zeros(12)[::2]), dict(ok, weight=torch.nn.Parameter(torch.ones(6))),
        dict(ok, training=False, running_mean=torch.zeros(6, requires_grad=True)),
        dict(ok, training=False, running_var=ok["running_mean"]),  # only read in eval
        # refused
        dict(ok, input=x[0]), dict(ok, input=x.unsqueeze(-1)), dict(ok, input=x.int()), dict(ok, input=x.to_sparse()), dict(ok, input=x.tolist()),
        dict(ok, weight=torch.ones(5)), dict(ok, weight=torch.ones(1, 6)), dict(ok, weight=torch.ones(6).to_sparse()),
        dict(ok, bias=torch.zeros(6, dtype=torch.int64)), dict(ok, bias=torch.zeros(6, device="meta")),
        dict(ok, bias=[0.0] * 6), dict(ok, running_var=None), dict(ok, running_mean=None, running_var=None, training=False),
        dict(ok, training=1), dict(ok, training="False"), dict(ok, input=x[:1, :, :1, :1]),
        dict(ok, running_var=torch.ones(1).expand(6)), dict(ok, running_mean=torch.zeros(6, requires_grad=True)),
        dict(ok, input=torch.randn(2, 6, 3, 3, device="meta")),
        dict(ok, input=nested), dict(ok, input=nested, training=False), dict(ok, running_var=ok["running_mean"]),
    ]
    return [dict(v) for v in variants]


def test_batch_norm_checks_fast_path_passes_only_what_the_checks_pass():
    """check_batch_norm returns early where one combined test passes; that test must
    never pass an argument the separate checks refuse (nor may it refuse what they
    pass: that is only slower, but would leave the fast path untested)."""
    passed = refused = 0
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            for args in _batch_norm_argument_variants():
                fast = _checks._batch_norm_arguments_pass(**args)
                try:
                    _checks._check_batch_norm_arguments("bn_relu", **args)
                    checks_pass = True
                except (TypeError, ValueError):
                    checks_pass = False
                assert fast == checks_pass, (grad_mode, {k: getattr(v, "shape", v) for k, v in args.items()})
                passed, refused = passed + checks_pass, refused + (not checks_pass)
    assert (passed, refused) == (29, 43)  # every variant ran both ways (no_grad passes one more)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_expanded_running_statistics_are_refused_before_any_update(backend):
    """Updated in place, a running statistic needs a value per channel in memory: an expanded
    one is refused before anything is written (the other stays as it was), by the eager
    path and by the registered op; in eval it is only read, and fine."""
    x = activation((2, 6, 3, 3))
    running_mean, running_var = torch.zeros(6), torch.ones(1).expand(6)
    ops = resnet_fused.backends.get(backend).ops
    for call in (lambda: RF.batch_stats(x, running_mean, running_var, backend=backend),
                 lambda: RF.dual_bn_add_relu(x, x, torch.zeros(6), torch.ones(6), running_mean, running_var,
                                             training=True, backend=backend),
                 lambda: ops.batch_stats(x, running_mean, running_var, 0.1, 1e-5)):
        with pytest.raises(ValueError, match=r"`running_var(_d)?` to hold one value per channel in memory"):
            call()
        assert torch.equal(running_mean, torch.zeros(6))
    y = RF.bn_relu(x, running_mean, running_var, training=False, backend=backend)
    torch.testing.assert_close(y, RF.bn_relu(x, running_mean, running_var.contiguous(), training=False,
                                             backend="reference"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_tensor_as_both_running_statistics_is_refused_by_the_registered_op(backend):
    """As by the functional API (BAD_INPUTS), with its message also for an expanded tensor:
    each statistic is updated in place."""
    x = activation((2, 6, 3, 3))
    for running in (torch.rand(6) + 0.5, torch.ones(1).expand(6)):
        before = running.clone()
        with pytest.raises(ValueError, match=r"batch_stats\(\): expected `running_mean` and `running_var` to be two tensors"):
            resnet_fused.backends.get(backend).ops.batch_stats(x, running, running, 0.1, 1e-5)
        assert torch.equal(running, before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_refused_calls_leave_the_running_statistics_alone(backend):
    """Arguments eager refuses are refused before the statistics are taken, so no running
    statistic moves: a non-bool `training` (a truthy string or tensor would pick a mode),
    running statistics that require grad, a sparse parameter, eps <= 0 in training."""
    x = activation((2, 6, 3, 3))
    running_mean, running_var = torch.randn(6), torch.rand(6) + 0.5
    before = running_mean.clone(), running_var.clone()
    calls = [
        (TypeError, r"bn_relu\(\): expected `training` to be a bool, got str",
         lambda: RF.bn_relu(x, running_mean, running_var, training="False", backend=backend)),
        (TypeError, r"expected `training` to be a bool, got int",
         lambda: RF.bn_add_relu(x, x, running_mean, running_var, training=1, backend=backend)),
        (ValueError, r"dual_bn_add_relu\(\): expected `running_var_d` not to require grad",
         lambda: RF.dual_bn_add_relu(x, x, running_mean, running_var, torch.zeros(6), torch.ones(6, requires_grad=True),
                                     training=True, backend=backend)),
        (TypeError, r"`bias` to be a strided",
         lambda: RF.bn_relu(x, running_mean, running_var, None, torch.zeros(6).to_sparse(), True, backend=backend)),
        (ValueError, r"dual_bn_add_relu\(\): expected `eps_d` to be positive in training, got -1.0",
         lambda: RF.dual_bn_add_relu(x, x, torch.zeros(6), torch.ones(6), running_mean, running_var,
                                     training=True, eps_d=-1.0, backend=backend)),
        (ValueError, r"batch_stats\(\): expected `eps` to be positive in training, got 0.0",
         lambda: RF.batch_stats(x, running_mean, running_var, eps=0.0, backend=backend)),
        (ValueError, r"batch_stats\(\): expected `running_var` to be a 1-D tensor of 6",
         lambda: RF.batch_stats(x, running_mean, torch.ones(5), backend=backend)),
        (ValueError, r"batch_stats\(\): expected `running_mean` not to require grad",
         lambda: RF.batch_stats(x, torch.zeros(6, requires_grad=True), running_var, backend=backend)),
    ]
    for error, message, call in calls:
        with pytest.raises(error, match=message):
            call()
        assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1]), message


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inference_tensors_autograd_would_save_are_refused_before_any_update(backend):
    """With grad mode on and an argument that requires grad, a call records its backward,
    which saves the activations and parameters, and an inference tensor cannot be saved.
    Eager raises before its BatchNorm moves the running statistics; so does every fused op
    now, naming the argument (the save itself raised after the statistics pass). Eager
    saves no bias or residual, so it takes inference ones: the fused ops, which save both
    to recompute the ReLU mask, are stricter there. Under no_grad each call runs and
    updates the statistics, as eager's does."""
    def inference(t):
        with torch.inference_mode():
            return t.clone()

    x = activation((2, 6, 3, 3)).requires_grad_()
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    running_mean, running_var = torch.randn(6), torch.rand(6) + 0.5
    before = running_mean.clone(), running_var.clone()
    calls = {
        "input": lambda: RF.bn_relu(inference(x), running_mean, running_var, w.requires_grad_(), b, True,
                                    backend=backend),
        "weight": lambda: RF.bn_relu(x, running_mean, running_var, inference(w), b, True, backend=backend),
        "residual": lambda: RF.bn_add_relu(x, inference(x), running_mean, running_var, w, b, True, backend=backend),
        "bias_d": lambda: RF.dual_bn_add_relu(x, x, running_mean, running_var, torch.zeros(6), torch.ones(6),
                                              w, b, w, inference(b), True, backend=backend),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"\(\): `{name}` is an inference tensor, which autograd cannot save"):
            call()
        assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1]), name
        with torch.no_grad():
            call()
        assert not torch.equal(running_mean, before[0]), f"{name}: not updated under no_grad"
        running_mean.copy_(before[0]), running_var.copy_(before[1])
    w.requires_grad_(False)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):  # eager's rule
        F.batch_norm(x, running_mean, running_var, inference(w), b, True)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])
    F.batch_norm(x, running_mean, running_var, w, inference(b), True)  # eager saves no bias
    assert not torch.equal(running_mean, before[0])
    # With grad mode on but nothing requiring grad, nothing is recorded: an inference input
    # runs and updates the statistics, as eager's does.
    running_mean.copy_(before[0]), running_var.copy_(before[1])
    want_mean, want_var = running_mean.clone(), running_var.clone()
    want = F.relu(F.batch_norm(inference(x), want_mean, want_var, w, b, True))
    got = RF.bn_relu(inference(x), running_mean, running_var, w, b, True, backend=backend)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(running_mean, want_mean), torch.testing.assert_close(running_var, want_var)
    assert not torch.equal(running_var, before[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eps_follows_eager_in_eval(backend):
    """Eval only adds eps to the running variance: 0 is allowed where this torch's eager
    allows it (2.12 on) and refused where it refuses it; a negative one refused."""
    x = activation((2, 6, 3, 3))
    running_mean, running_var = torch.randn(6), torch.rand(6) + 0.5
    try:
        expected = F.relu(F.batch_norm(x, running_mean, running_var, training=False, eps=0.0))
    except ValueError as error:  # torch 2.11 and older
        assert "eps must be positive" in str(error)
        with pytest.raises(ValueError, match=r"bn_relu\(\): expected `eps` to be positive \(this torch's"):
            RF.bn_relu(x, running_mean, running_var, training=False, eps=0.0, backend=backend)
    else:
        torch.testing.assert_close(
            RF.bn_relu(x, running_mean, running_var, training=False, eps=0.0, backend=backend), expected,
            rtol=ROUNDING[torch.float32], atol=ROUNDING[torch.float32])
    with pytest.raises(ValueError, match=r"bn_relu\(\): expected `eps` to be non-negative, got -1e-05"):
        RF.bn_relu(x, running_mean, running_var, training=False, eps=-1e-5, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eps_zero_in_eval_is_refused_where_eager_refuses_it(backend, monkeypatch):
    """Under a torch whose eager refuses eps = 0 in eval (2.11 and older), so do the ops."""
    monkeypatch.setattr(resnet_fused._checks, "EAGER_ALLOWS_ZERO_EPS_IN_EVAL", False)
    x = activation((2, 6, 3, 3))
    with pytest.raises(ValueError, match=r"bn_relu\(\): expected `eps` to be positive \(this torch's"):
        RF.bn_relu(x, torch.randn(6), torch.rand(6) + 0.5, training=False, eps=0.0, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inference_tensor_running_statistics_update_as_in_eager(backend):
    """Running statistics created under torch.inference_mode and passed to a training op
    outside it are updated as F.batch_norm updates them, and nothing asks for their
    versions (the C++ op bumped them and raised after writing; the reference wrote one)."""
    x = activation((3, 5, 4, 4))
    with torch.inference_mode():
        running_mean, running_var = torch.randn(5), torch.rand(5) + 0.5
        eager_mean, eager_var = running_mean.clone(), running_var.clone()
    F.batch_norm(x, eager_mean, eager_var, training=True, momentum=0.3)
    with torch.no_grad():
        RF.bn_relu(x, running_mean, running_var, training=True, momentum=0.3, backend=backend)
    torch.testing.assert_close(running_mean, eager_mean, rtol=ROUNDING[torch.float32], atol=ROUNDING[torch.float32])
    torch.testing.assert_close(running_var, eager_var, rtol=ROUNDING[torch.float32], atol=ROUNDING[torch.float32])
    assert not torch.equal(running_var, torch.ones(5))
    ops = backends.get(backend).ops
    ops.batch_stats(x, running_mean, running_var, 0.3, 1e-5)  # the registered op too
    F.batch_norm(x, eager_mean, eager_var, training=True, momentum=0.3)
    torch.testing.assert_close(running_mean, eager_mean, rtol=ROUNDING[torch.float32], atol=ROUNDING[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mismatched_residual_is_rejected(backend):
    x = activation((2, 6, 3, 3))
    with pytest.raises(ValueError, match="`residual` to have the shape of `input`"):
        RF.bn_add_relu(x, x[:, :5], None, None, training=True, backend=backend)
    with pytest.raises(TypeError, match="`residual` to have the dtype of `input`"):
        RF.bn_add_relu(x, x.double(), None, None, training=True, backend=backend)
    with pytest.raises(ValueError, match="`input_d` to have the shape of `input`"):
        RF.dual_bn_add_relu(x, x[:1], None, None, None, None, training=True, backend=backend)
    with pytest.raises(ValueError, match="`running_mean_d` and `running_var_d` are required"):
        RF.dual_bn_add_relu(x, x, torch.zeros(6), torch.ones(6), None, None, training=False, backend=backend)


@pytest.mark.parametrize("namespace", ["resnet_fused", "resnet_fused_reference"])
def test_raw_ops_validate(namespace):
    """The ops called directly (C++ checks, or the Python ones) reject bad input, same wording."""
    if namespace == "resnet_fused" and "cpu" not in CPU_BACKENDS:
        pytest.skip("resnet_fused._C not built")
    x = activation((2, 6, 3, 3))
    ops = getattr(torch.ops, namespace)
    with pytest.raises(ValueError, match=r"bn_relu\(\): expected `mean` to be a 1-D tensor of 6"):
        ops.bn_relu(x, None, None, torch.zeros(4), torch.ones(6), True)
    with pytest.raises(ValueError, match="`input` to be a 4-D"):
        ops.batch_stats(x[0], None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ops.batch_stats(x[:1, :, :1, :1], None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"bn_add_relu_backward\(\): expected `grad_out` to have the shape"):
        ops.bn_add_relu_backward(x[:1], x, x, None, None, torch.zeros(6), torch.ones(6), True)
    with pytest.raises(ValueError, match="`weight_d` on the device of `input_d`"):
        ops.dual_bn_add_relu(x, None, None, torch.zeros(6), torch.ones(6), x, torch.ones(6, device="meta"),
                             None, torch.zeros(6), torch.ones(6), True)
    with pytest.raises(ValueError, match="`residual` to have the shape of `input`"):
        ops.bn_add_relu(x, x[:, :, :1], None, None, torch.zeros(6), torch.ones(6), True)
    with pytest.raises(ValueError, match="`residual` on the device of `input`"):
        ops.bn_add_relu(x, x.to("meta"), None, None, torch.zeros(6), torch.ones(6), True)
    with pytest.raises(ValueError, match="`input_d` to have the shape of `input`"):
        ops.dual_bn_add_relu(x, None, None, torch.zeros(6), torch.ones(6), x[:, :, :1], None, None, torch.zeros(6),
                             torch.ones(6), True)
    with pytest.raises(ValueError, match=r"bn_relu_backward\(\): expected `grad_out` to have the shape"):
        ops.bn_relu_backward(x[:1], x, None, None, torch.zeros(6), torch.ones(6), True)
    with pytest.raises(ValueError, match=r"dual_bn_add_relu_backward\(\): expected `grad_out` to have the shape"):
        ops.dual_bn_add_relu_backward(x[:1], x, None, None, torch.zeros(6), torch.ones(6), x, None, None,
                                      torch.zeros(6), torch.ones(6), True)
    with pytest.raises(ValueError, match=r"batch_stats\(\): expected `eps` to be positive in training, got -1"):
        ops.batch_stats(x, None, None, 0.1, -1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_is_an_error(backend):
    """A gradient penalty through a fused op fails loudly instead of differentiating to zero."""
    x = activation((2, 4, 3, 3)).requires_grad_()
    w = (torch.rand(4) + 0.5).requires_grad_()
    y = RF.bn_relu(x, None, None, w, None, True, backend=backend)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(gx.square().sum(), w)


def _fused_call(op: str, backend: str, training: bool):
    """(function of the differentiable tensors through the functional API, the same through the
    registered ops called directly, the tensors): eval mode gives mean and invstd gradients."""
    x, y = activation((3, 4, 2, 3)), activation((3, 4, 2, 3), layout="nchw")
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    ops = backends.get(backend).ops
    tensors = [t.clone().requires_grad_() for t in (x, y, w, b, mean, var)]

    def functional(x, y, w, b, mean, var):
        stats = (None, None) if training else (mean, var)
        if op == "bn_relu":
            return RF.bn_relu(x, *stats, w, b, training, backend=backend)
        if op == "bn_add_relu":
            return RF.bn_add_relu(x, y, *stats, w, b, training, backend=backend)
        return RF.dual_bn_add_relu(x, y, *stats, *stats, w, b, b, w, training, backend=backend)

    def registered(x, y, w, b, mean, var):
        if training:
            mean, invstd = ops.batch_stats(x.detach(), None, None, 0.1, 1e-5)
        else:
            invstd = torch.rsqrt(var + 1e-5)
        if op == "bn_relu":
            return ops.bn_relu(x, w, b, mean, invstd, training)
        if op == "bn_add_relu":
            return ops.bn_add_relu(x, y, w, b, mean, invstd, training)
        if training:
            mean_d, invstd_d = ops.batch_stats(y.detach(), None, None, 0.1, 1e-5)
        else:  # each branch its own rsqrt, as functional computes them: one shared node would
            # sum the branches' invstd gradients before its backward, which rounds differently
            mean_d, invstd_d = mean, torch.rsqrt(var + 1e-5)
        return ops.dual_bn_add_relu(x, w, b, mean, invstd, y, b, w, mean_d, invstd_d, training)

    return functional, registered, tensors


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("op", ["bn_relu", "bn_add_relu", "dual_bn_add_relu"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eager_path_equals_the_registered_ops(backend, op, training):
    """The eager path (one autograd.Function over the implementation) and torch.library's
    registered autograd run the same kernels and formulas: every gradient bitwise equal."""
    functional, registered, tensors = _fused_call(op, backend, training)
    grad = activation((3, 4, 2, 3))
    results = []
    for fn in (functional, registered):
        inputs = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*inputs)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in inputs])
    for name, eager, library in zip(("out", "x", "y", "w", "b", "mean", "var"), *results):
        if eager is None or library is None:
            assert eager is None and library is None, name
        else:
            assert torch.equal(eager, library), name


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs resnet_fused._C")
@pytest.mark.parametrize("op, function", [("bn_relu", "BnRelu"), ("bn_add_relu", "BnAddRelu"),
                                          ("dual_bn_add_relu", "DualBnAddRelu")])
def test_cpp_backends_run_forward_and_backward_without_python(op, function):
    """A plain eager call of a C++ backend records one C++ autograd node (csrc/autograd.cpp):
    no resnet_fused Python code runs in its backward; without grad mode it records none."""
    functional, _, tensors = _fused_call(op, "cpu", training=True)
    inputs = [t.detach().clone().requires_grad_() for t in tensors]
    out = functional(*inputs)
    assert out.grad_fn.name() == f"torch::autograd::CppNode<resnet_fused::eager::{function}>"
    python_calls = []
    package = os.path.dirname(resnet_fused.__file__) + os.sep  # not an editable install's import finder

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            python_calls.append(frame.f_code.co_name)

    sys.setprofile(profile)  # CPU backward runs on this thread
    try:
        out.backward(activation(out.shape))
    finally:
        sys.setprofile(None)
    assert python_calls == [] and inputs[0].grad is not None and inputs[2].grad is not None  # x, w
    with torch.no_grad():
        assert functional(*inputs).grad_fn is None
    with torch.inference_mode():
        assert torch.equal(functional(*inputs), out.detach())
    with resnet_fused.ops.python_eager_autograd("resnet_fused"):  # what host_overhead.py compares
        assert "CppNode" not in functional(*inputs).grad_fn.name()
    assert "CppNode" in functional(*inputs).grad_fn.name()


@pytest.mark.parametrize("op", ["bn_relu", "bn_add_relu", "dual_bn_add_relu"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_autograd_traces_the_eager_backward_whole(backend, op):
    """Compiled autograd (fullgraph) traces the backward of an eager forward: the C++
    Functions as one node each (is_traceable), the Python ones through the registered
    backward ops; the gradients are autograd's."""
    from torch._dynamo import compiled_autograd

    functional, _, tensors = _fused_call(op, backend, training=True)
    inputs = [t.detach().clone().requires_grad_() for t in tensors]
    out = functional(*inputs)
    grad = activation(out.shape)
    expected = torch.autograd.grad(out, inputs, grad, retain_graph=True, allow_unused=True)
    torch._dynamo.reset()
    graphs = []

    def backend_fn(gm, example_inputs):
        graphs.append(gm)
        return gm

    with compiled_autograd._enable(lambda gm: torch.compile(gm, backend=backend_fn, fullgraph=True)):
        out.backward(grad)
    assert len(graphs) == 1
    for want, t in zip(expected, inputs):
        assert (want is None and t.grad is None) or torch.equal(want, t.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scalar_arguments_are_checked_before_any_kernel(backend):
    x, running_mean, running_var = activation((2, 4, 3, 3)), torch.zeros(4), torch.ones(4)
    with pytest.raises(TypeError, match=r"bn_relu\(\): expected `momentum` to be a float, got NoneType"):
        RF.bn_relu(x, running_mean, running_var, training=True, momentum=None, backend=backend)
    with pytest.raises(TypeError, match=r"dual_bn_add_relu\(\): expected `eps_d` to be a float, got str"):
        RF.dual_bn_add_relu(x, x, running_mean, running_var, None, None, training=True, eps_d="1e-5", backend=backend)
    assert torch.equal(running_mean, torch.zeros(4))  # no statistics were taken
    for value in (torch.tensor([0.1]), torch.tensor(0.1, requires_grad=True), 0.1j, fractions.Fraction(1, 10)):
        with pytest.raises(TypeError, match=r"bn_relu\(\): expected `momentum` to be a float, got"):
            RF.bn_relu(x, running_mean, running_var, training=True, momentum=value, backend=backend)
        assert torch.equal(running_mean, torch.zeros(4)), value


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scalar_arguments_take_what_a_schema_float_takes(backend):
    """momentum and eps as F.batch_norm takes them: NumPy scalars, 0-dim tensors and bools
    too, each acting as its float value."""
    x = activation((2, 4, 3, 3))
    expected_mean = torch.zeros(4)
    expected = RF.bn_relu(x, expected_mean, torch.ones(4), training=True, momentum=1.0, eps=0.5, backend=backend)
    for momentum, eps in ((np.float32(1), np.float16(0.5)), (torch.tensor(1), torch.tensor(0.5)), (True, np.float64(0.5))):
        running_mean = torch.zeros(4)
        y = RF.bn_relu(x, running_mean, torch.ones(4), training=True, momentum=momentum, eps=eps, backend=backend)
        assert torch.equal(y, expected) and torch.equal(running_mean, expected_mean), (momentum, eps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functionalize_runs_the_registered_ops(backend):
    """torch.func transforms other than grad (functionalize, vmap) get the registered ops."""
    _, _, (x, y, w, b, mean, var) = _fused_call("bn_relu", backend, training=False)
    f = lambda x: RF.bn_relu(x, mean.detach(), var.detach(), w.detach(), b.detach(), False, backend=backend)  # noqa: E731
    x = x.detach()
    assert torch.equal(torch.func.functionalize(f)(x), f(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_graph_tracing_sees_the_registered_ops(backend):
    """Under a tracing dispatch mode (make_fx with fake tensors) the ops are opaque graph
    nodes with fake kernels, not the eager path's implementation."""
    from torch.fx.experimental.proxy_tensor import make_fx

    namespace = resnet_fused.backends.get(backend).ops.name

    def f(x, w):
        return RF.bn_relu(x, None, None, w, None, True, backend=backend)

    graph = make_fx(f, tracing_mode="fake")(activation((2, 4, 3, 3)), torch.rand(4) + 0.5).graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert {f"{namespace}.batch_stats.default", f"{namespace}.bn_relu.default"} <= targets


def check_torch_func_grad_matches_autograd(backend, device="cpu"):
    """torch.func.grad differentiates the fused ops as autograd does (the Triton kernels,
    which cannot read torch.func's wrapped tensors, once failed); nested transforms (a
    second order, a vmap of the gradient) fail loudly."""
    x, residual = activation((2, 4, 3, 3), device=device), activation((2, 4, 3, 3), device=device)
    w = torch.rand(4, device=device) + 0.5
    stats = {name: (torch.zeros(4, device=device), torch.ones(4, device=device)) for name in ("func", "autograd")}

    def loss(x, w, stats=stats["func"]):
        return RF.bn_add_relu(x, residual, *stats, w, None, True, backend=backend).square().sum()

    x_autograd, w_autograd = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss(x_autograd, w_autograd, stats["autograd"]).backward()
    version = stats["func"][1]._version
    grads = torch.func.grad(loss, argnums=(0, 1))(x, w)
    assert torch.equal(grads[0], x_autograd.grad) and torch.equal(grads[1], w_autograd.grad)  # the same kernels
    assert stats["func"][1]._version > version  # the running statistics' update is seen
    for func, eager in zip(stats["func"], stats["autograd"]):
        assert torch.equal(func, eager)
    with pytest.raises(NotImplementedError, match="nested torch.func transforms .*double backward"):
        torch.func.grad(lambda w: torch.func.grad(loss, argnums=1)(x, w).square().sum())(w)
    with pytest.raises(NotImplementedError, match="nested torch.func transforms"):
        torch.func.vmap(torch.func.grad(loss, argnums=1), in_dims=(None, 0))(x, torch.stack([w, w + 1]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_func_grad_matches_autograd(backend):
    check_torch_func_grad_matches_autograd(backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_of_vmap_of_an_eval_op_runs(backend):
    """Transforms that differentiate nothing compose (vmap of vmap, of functionalize): only
    a grad or jvp inside another transform is refused."""
    _, _, (x, _, w, b, mean, var) = _fused_call("bn_relu", backend, training=False)
    x, w, b, mean, var = (t.detach() for t in (x, w, b, mean, var))
    f = lambda x: RF.bn_relu(x, mean, var, w, b, False, backend=backend)  # noqa: E731
    xs = torch.stack([torch.stack([x, x + 1]), torch.stack([x - 1, 2 * x])])
    expected = torch.stack([torch.stack([f(v) for v in row]) for row in xs])
    torch.testing.assert_close(torch.func.vmap(torch.func.vmap(f))(xs), expected)
    torch.testing.assert_close(torch.func.vmap(torch.func.functionalize(f))(xs[0]), expected[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_running_statistics_updates_bump_versions(backend):
    """As any in-place op does: caches keyed on versions (the folded weights) see the update,
    in eager mode and through the registered op (what dispatch modes and compile call)."""
    x = activation((4, 3, 2, 2))
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    registered = backends.get(backend).ops
    for update in (
        lambda: RF.batch_stats(x, running_mean, running_var, backend=backend),
        lambda: RF.bn_relu(x, running_mean, running_var, training=True, backend=backend),
        lambda: registered.batch_stats(x, running_mean, running_var, 0.1, 1e-5),
    ):
        before = running_mean._version, running_var._version
        update()
        assert running_mean._version > before[0] and running_var._version > before[1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eager_calls_skip_torch_library_python_layers(backend, monkeypatch):
    """In eager mode a fused op is one autograd.Function over its implementation: torch.library's
    autograd kernel (which rebuilds every argument list with fill_defaults, tens of microseconds
    an op on a GPU host) stays out of forward and backward. torch.compile still sees the ops."""
    def fail(*args):
        raise AssertionError("torch.library's autograd layer ran in eager mode")

    monkeypatch.setattr(torch._library.utils, "fill_defaults", fail)
    x = activation((2, 4, 3, 3)).requires_grad_()
    w = (torch.rand(4) + 0.5).requires_grad_()
    y = RF.bn_add_relu(x, activation((2, 4, 3, 3)), None, None, w, None, True, backend=backend)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
    with pytest.raises(AssertionError, match="autograd layer ran"):  # the check above can fail
        getattr(torch.ops, resnet_fused.backends.get(backend).ops.name).bn_relu(x, w, None, torch.zeros(4), torch.ones(4), True)


# ---------------------------------------------------------------- backend selection


def test_use_backend_blocks_of_threads_may_exit_in_any_order():
    """A enters use_backend("cpu"), B enters use_backend("reference"), A exits, B exits: the
    selection is then B's while B's block is open and, after both, what it was before."""
    before = resnet_fused.get_backend()
    a_entered, b_entered, a_exited = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with resnet_fused.use_backend("cpu"):
            a_entered.set()
            b_entered.wait(5)
        a_exited.set()

    def b():
        a_entered.wait(5)
        with resnet_fused.use_backend("reference"):
            b_entered.set()
            a_exited.wait(5)
            seen["inside b"] = resnet_fused.get_backend()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"inside b": "reference"} and resnet_fused.get_backend() == before


def test_backend_selection_api():
    selected = resnet_fused.get_backend()
    with resnet_fused.use_backend("Reference"):  # names are case-insensitive, like the variable
        assert resnet_fused.get_backend() == "reference"
    assert resnet_fused.get_backend() == selected
    with pytest.raises(ValueError, match="unknown resnet_fused backend 'fast'"):
        resnet_fused.set_backend("fast")
    with pytest.raises(TypeError, match="expected a resnet_fused backend name \\(a str\\), got NoneType"):
        resnet_fused.set_backend(None)
    x = activation((2, 6, 3, 3))
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        RF.bn_relu(x, None, None, training=True, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'triton'"):
        RF.bn_relu(x, None, None, training=True, backend="triton")
    with pytest.raises(TypeError, match="backend name \\(a str\\), got int"):
        RF.bn_relu(x, None, None, training=True, backend=1)
    assert backends.resolve(x.device, x.dtype, "auto").name == ("cpu" if "cpu" in CPU_BACKENDS else "reference")


def test_backend_env_var_and_missing_extension():
    """RESNET_FUSED_BACKEND is honoured; without _C, import warns once and falls back."""
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'resnet_fused._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, resnet_fused, resnet_fused.functional as RF\n"
        "    x = torch.randn(2, 3, 4, 4)\n"
        "    y = RF.bn_relu(x, None, None, training=True)\n"
        "    y = RF.bn_relu(x, None, None, training=True)\n"
        "print(resnet_fused.get_backend(), [str(w.message).split(':')[0] for w in caught])\n"
    )
    env = {**os.environ, "RESNET_FUSED_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "reference ['resnet_fused']", out
    env["RESNET_FUSED_BACKEND"] = "fastest"
    failed = subprocess.run([sys.executable, "-c", "import resnet_fused"], capture_output=True, text=True, env=env)
    assert failed.returncode != 0
    assert "RESNET_FUSED_BACKEND='fastest': unknown resnet_fused backend 'fastest'" in failed.stderr, failed.stderr


def test_auto_follows_the_measured_order(monkeypatch):
    """auto_order.json's order for the device and dtype wins; elsewhere AUTO_ORDER's default."""
    assert all(set(order) <= set(backends.NAMES) - {"auto"}
               for by_dtype in backends._load_measured(backends.AUTO_ORDER_FILE).values() for order in by_dtype.values())
    monkeypatch.setattr(backends, "MEASURED_ORDER", {"cpu": {"float32": ("reference", "cpu")}})
    monkeypatch.setattr(backends, "_resolved", {})  # answers given under the real order
    assert backends.resolve(torch.device("cpu"), torch.float32, "auto").name == "reference"
    default = "cpu" if "cpu" in CPU_BACKENDS else "reference"
    assert backends.resolve(torch.device("cpu"), torch.float64, "auto").name == default
    # the lookup traces under torch.compile without a graph break
    x = activation((2, 3, 4, 4))
    compiled = torch.compile(lambda x: RF.bn_relu(x, None, None, training=True), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), RF.bn_relu(x, None, None, training=True, backend="reference"))


def test_cuda_device_key_is_cached_per_device(monkeypatch):
    """`auto` looks the key up on every op call: the device properties are read once per device."""
    calls = []

    class Props:
        major, minor = 9, 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: calls.append(index) or Props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(backends, "_CUDA_DEVICE_KEYS", {})
    for device in ("cuda:0", "cuda", "cuda:0", "cuda:1"):
        assert backends.device_key(torch.device(device)) == "cuda:sm_90"
    assert calls == [0, 1]


def _script(name):
    """scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_auto_order_script_ranks_backends_by_geometric_mean(tmp_path, capsys):
    script = _script("auto_order")

    def row(backend, op, shape, ms, dtype="bfloat16", **extra):
        return dict(backend=backend, op=op, shape=shape, dtype=dtype, layout="channels_last", median_ms=ms, **extra)

    rows = [row("eager", "bn_relu", "layer1.64", 0.1), row("cuda", "bn_relu", "layer1.64", 2.0),
            row("triton", "bn_relu", "layer1.64", 1.0), row("cuda", "bn_relu", "layer2.128", 1.0),
            row("triton", "bn_relu", "layer2.128", 4.0),  # geometric means: cuda sqrt(2), triton 2
            row("triton", "batch_stats", "layer1.64", 0.1),  # no cuda row: not a common case
            row("torch", "copy", "layer1.64", 0.05),  # the kernel benchmark's same-size copy: no contender
            row("cuda", "bn_relu", "layer1.64", None, dtype="float32", error="RuntimeError: x"),
            row("triton", "bn_relu", "layer1.64", 1.0, dtype="float32")]
    run = tmp_path / "kernels_cuda_nhwc.json"
    env = dict(device="cuda", arch="sm_90", card="NVIDIA H200", timestamp="2026-11-27T00:00:00+00:00", git_commit="abc")
    run.write_text(json.dumps({"environment": env, "rows": rows}))
    out = tmp_path / "auto_order.json"
    out.write_text(json.dumps({"about": "kept", "measured": {"cuda:sm_80": {"bfloat16": {"order": ["triton"]}}}}))
    assert script.main([str(run), "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["about"] == script.ABOUT and table["measured"]["cuda:sm_80"] == {"bfloat16": {"order": ["triton"]}}
    entry = table["measured"]["cuda:sm_90"]["bfloat16"]
    assert entry["order"] == ["cuda", "triton"] and entry["cases"] == 2 and entry["card"] == "NVIDIA H200"
    assert entry["geomean_ms"]["cuda"] == pytest.approx(2**0.5, rel=1e-5)
    assert "float32" not in table["measured"]["cuda:sm_90"]  # one backend measured: nothing to rank
    assert backends._load_measured(str(out))["cuda:sm_90"] == {"bfloat16": ("cuda", "triton")}
    cpu_run = tmp_path / "kernels_cpu_nhwc.json"
    cpu_run.write_text(json.dumps({"environment": dict(env, device="cpu", arch=None), "rows": rows}))
    with pytest.raises(SystemExit):
        script.main([str(cpu_run), "--out", str(out)])
    assert "expected runs of one CUDA architecture (environment 'arch'), got ['None']" in capsys.readouterr().err


@pytest.mark.parametrize(
    "triton_kernels, triton_blocks, expected",
    [(0.99, None, ["cuda", "triton"]),  # 1% faster kernels: within the margin
     (0.95, None, ["triton", "cuda"]),  # 5% faster: ahead
     (0.95, 0.97, ["triton", "cuda"]),  # and 3% faster blocks
     (0.95, 0.99, ["cuda", "triton"]),  # blocks 1% faster: within the margin
     (0.95, 1.5, ["cuda", "triton"]),  # faster kernels, slower blocks (the host): not ahead
     (1.10, 0.5, ["cuda", "triton"])],  # slower kernels, faster blocks: not ahead either
)
def test_auto_order_moves_a_backend_ahead_only_when_clearly_faster_everywhere(tmp_path, triton_kernels,
                                                                             triton_blocks, expected):
    """Kernels (device time) and, when a suite run is given, blocks (by the clock, host
    included): Triton goes ahead of AUTO_ORDER's CUDA C++ only if faster by more than the
    margin in both."""
    script = _script("auto_order")
    env = dict(device="cuda", arch="sm_90", card="NVIDIA H200", timestamp="2026-11-27T00:00:00+00:00", git_commit="abc")
    kernel_rows = [dict(backend=backend, op="bn_relu", shape=shape, dtype="float32", layout="channels_last",
                        median_ms=ms * (triton_kernels if backend == "triton" else 1.0))
                   for shape, ms in (("layer1.64", 0.03), ("layer2.128", 0.02)) for backend in ("cuda", "triton")]
    kernels = tmp_path / "kernels_cuda_nhwc.json"
    kernels.write_text(json.dumps({"environment": env, "rows": kernel_rows}))
    argv = [str(kernels), "--out", str(tmp_path / "auto_order.json")]
    if triton_blocks is not None:
        block_rows = [dict(workload="bottleneck", mode=mode, shape="layer1", dtype="bf16", layout="channels_last",
                           provider=provider, median_ms=ms * (triton_blocks if provider == "fused-triton" else 1.0))
                      for mode, ms in (("train", 1.7), ("infer", 0.3))
                      for provider in ("eager", "fused-cuda", "fused-triton", "compile-fused-cuda")]
        block_rows.append(dict(block_rows[0], provider="fused-reference", median_ms=1e-3))  # the oracle: no contender
        block_rows.append(dict(block_rows[0], provider="fused-cpu", mode="eval"))  # no kernels measured: no contender
        block_rows.append(dict(block_rows[0], mode="fwd_train", provider="fused-cuda"))  # triton skipped: not common
        suite = tmp_path / "results.json"
        suite.write_text(json.dumps({"environment": env, "rows": block_rows}))
        argv += ["--blocks", str(suite)]
    assert script.main(argv) == 0
    entry = json.loads((tmp_path / "auto_order.json").read_text())["measured"]["cuda:sm_90"]["float32"]
    assert entry["order"] == expected and entry["margin"] == script.DEFAULT_MARGIN
    if triton_blocks is not None:
        assert entry["blocks_cases"] == 2 and entry["blocks_dtypes"] == ["bf16"]
        assert entry["blocks_geomean_ms"]["triton"] == pytest.approx(triton_blocks * (1.7 * 0.3) ** 0.5, rel=1e-3)


@pytest.mark.parametrize("suite", ["another card", "no triton block", "not JSON"])
def test_auto_order_refuses_blocks_it_cannot_weigh(tmp_path, suite, capsys):
    """A suite run of another card, one where a backend timed no block (all failed, say:
    the kernels alone would then decide, unnoticed), or a file that is not a run: an error
    naming the problem, and no order written."""
    script = _script("auto_order")
    env = dict(device="cuda", arch="sm_90", card="NVIDIA H200", timestamp="2026-11-27T00:00:00+00:00")
    rows = [dict(backend=b, op="bn_relu", shape="layer1.64", dtype="float32", median_ms=ms)
            for b, ms in (("cuda", 1.0), ("triton", 0.5))]
    block = dict(workload="bottleneck", mode="train", shape="layer1", dtype="bf16", layout="channels_last")
    blocks = [dict(block, provider="fused-cuda", median_ms=1.7), dict(block, provider="fused-triton", median_ms=None,
                                                                      status="error: RuntimeError")]
    kernels, results = tmp_path / "kernels.json", tmp_path / "results.json"
    kernels.write_text(json.dumps({"environment": env, "rows": rows}))
    results.write_text({
        "another card": json.dumps({"environment": dict(env, card="NVIDIA H100 80GB HBM3"), "rows": blocks}),
        "no triton block": json.dumps({"environment": env, "rows": blocks}),
        "not JSON": "{",
    }[suite])
    with pytest.raises(SystemExit) as raised:
        script.main([str(kernels), "--blocks", str(results), "--out", str(tmp_path / "out.json")])
    message = str(raised.value) + capsys.readouterr().err
    assert {"another card": "NVIDIA H100", "no triton block": "timed no case", "not JSON": "cannot read"}[suite] in message
    assert not (tmp_path / "out.json").exists()


def test_auto_warns_once_when_falling_back(monkeypatch):
    """`auto` on a configuration no compiled kernel covers: reference path, one warning."""
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton",))  # a backend that cannot run here
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_resolved", {})
    x = activation((2, 3, 4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RF.bn_relu(x, None, None, training=True)
        backends._resolved.clear()  # the second call asks again, not the cache
        RF.bn_relu(x, None, None, training=True)
    assert [str(w.message) for w in caught if "reference path" in str(w.message)].__len__() == 1
    assert all(w.filename == __file__ for w in caught if "reference path" in str(w.message))  # the caller's line


def test_registering_a_backend_renews_what_resolve_answers(monkeypatch):
    """resolve() keeps its answers per (device, dtype, name) until a backend registers."""
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_resolved", {})
    cpu = torch.device("cpu")
    assert backends.resolve(cpu, torch.float32, "reference") is backends.get("reference")
    backends.register(dataclasses.replace(backends.get("reference"), dtypes=(torch.float64,)))
    with pytest.raises(TypeError, match="supports dtypes float64, got torch.float32"):
        backends.resolve(cpu, torch.float32, "reference")


def test_auto_passes_over_a_backend_that_cannot_run_the_dtype_or_is_unavailable(monkeypatch):
    """auto takes the first backend of the order that supports the device, the dtype and is
    available (float64 on a GPU must not go to the CUDA kernels); a backend asked for by
    name that is unavailable says why."""
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_resolved", {})
    cpu = torch.device("cpu")
    reference = backends.get("reference")
    backends.register(dataclasses.replace(reference, name="float32_only", dtypes=(torch.float32,)))
    backends.register(dataclasses.replace(reference, name="broken", unavailable="it is broken"))
    monkeypatch.setattr(backends, "NAMES", (*backends.NAMES, "float32_only", "broken"))
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("broken", "float32_only", "reference"))
    monkeypatch.setattr(backends, "MEASURED_ORDER", {})
    assert backends.resolve(cpu, torch.float32, "auto").name == "float32_only"
    assert backends.resolve(cpu, torch.float64, "auto") is reference
    with pytest.raises(RuntimeError, match="backend 'broken' is not available: it is broken"):
        backends.resolve(cpu, torch.float32, "broken")


def test_auto_order_needs_more_than_the_margin():
    """Exactly the margin faster is not "faster by more than the margin"."""
    order = _script("auto_order").order
    assert order([{"cuda": 1.0, "triton": 0.98}], 0.02) == ["cuda", "triton"]
    assert order([{"cuda": 1.0, "triton": 0.979}], 0.02) == ["triton", "cuda"]
    assert order([{"cuda": 1.0, "triton": 0.9}, {"cuda": 1.0, "triton": 0.99}], 0.02) == ["cuda", "triton"]


def test_margin_log_records_each_comparison_and_the_summary_ranks_them(tmp_path, monkeypatch):
    """With RESNET_FUSED_MARGIN_LOG (scripts/gpu_check.sh) each comparison of the shared
    helpers logs its worst error over its bound; scripts/margins.py groups them by test
    function and quantity, worst first."""
    import helpers

    log = tmp_path / "margins.tsv"
    monkeypatch.setattr(helpers, "MARGIN_LOG", str(log))
    inf = float("inf")
    expected = torch.tensor([1.0, 2.0015, inf, -3.0], dtype=torch.float64)
    # |2 - 2.0015| / (1e-3 + 1e-3 * 2.0015): the worst element; equal infinities count 0
    assert_close(torch.tensor([1.0, 2.0, inf, -3.0], dtype=torch.float64), expected, 1e-3, "output 0")
    assert_close(expected.clone(), expected, 0.0, "output 1")  # equal: 0, also where nothing is allowed
    assert_channel_sums_close(torch.tensor([1.0, 5.0]), torch.tensor([1.6, 5.0]), torch.tensor([1.0, 1.0]), 1.0,
                              "grad_weight")
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0]), torch.tensor([1.5]), 1e-3, "output 2")
    fractions = [(float(f), what) for f, _, what in (line.split("\t") for line in log.read_text().splitlines())]
    assert [what for _, what in fractions] == ["output 0", "output 1", "grad_weight", "output 2"]
    assert fractions[0][0] == pytest.approx(0.0015 / (1e-3 + 1e-3 * 2.0015), rel=1e-3)
    assert fractions[1][0] == 0.0 and fractions[2][0] == pytest.approx(0.6, rel=1e-6)
    assert fractions[3][0] == pytest.approx(0.5 / (1e-3 + 1.5e-3), rel=1e-3)  # a failing one is logged too
    summarize = _script("margins").summarize
    summary = summarize(log.read_text().splitlines(), top=40).splitlines()
    assert summary[0].startswith("4 comparisons in 4 groups, 2 of them with a worst case above half")
    this = "tests/test_ops.py::test_margin_log_records_each_comparison_and_the_summary_ranks_them"
    assert summary[2].split() == [f"{fractions[3][0]:.3g}", "1", this, "::", "-", "::", "output", "2", "-"]
    assert summary[3].split() == ["0.6", "1", this, "::", "-", "::", "grad_weight", "-"]
    # Grouped by dtype (each has its own tolerance), not by shape or layout; NaN ranks as inf.
    lines = ["0.9\tt.py::f[8x4-bfloat16-nhwc]\toutput 1", "0.001\tt.py::f[8x4-float32-nhwc]\toutput 1",
             "0.3\tt.py::f[2x3-bfloat16-nchw]\toutput 1", "nan\tt.py::f[2x3-float32-nchw]\toutput 0"]
    rows = [line.split() for line in summarize(lines, top=2).splitlines()[2:]]
    assert rows == [["inf", "1", "t.py::f", "::", "float32", "::", "output", "0", "[2x3-float32-nchw]"],
                    ["0.9", "2", "t.py::f", "::", "bfloat16", "::", "output", "1", "[8x4-bfloat16-nhwc]"],
                    ["(+1", "groups,", "all", "below", "0.9)"]]
