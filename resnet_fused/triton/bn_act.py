"""BatchNorm-apply + activation in Triton: the three fused forwards and their backward ops.

One kernel family, the tail chosen by the ``EPILOGUE`` constexpr:

=================  ============================  =======================================
``RELU``           relu(bn(x))                   ``bn_relu``
``ADD_RELU``       relu(bn(x) + y)               ``bn_add_relu``, y the residual
``DUAL_ADD_RELU``  relu(bn(x) + bn_d(y))         ``dual_bn_add_relu``, y the downsample
=================  ============================  =======================================

Forward: ``_bn_act_forward_kernel``, one pass. Backward, with g = 0 where the output (``pre`` as
stored in the input dtype) is <= 0, else grad_out:

1. ``_bn_act_backward_reduce_kernel``: per-channel partials of sum(g) and sum(g * (x - mean))
   (and sum(g * (y - mean_d))), over the deterministic partition of ``_reduce``; for
   ``ADD_RELU`` it also writes grad_residual = g.
2. ``_bn_act_backward_finalize_kernel``: merges them into grad_bias = sum(g), grad_weight =
   invstd * sum(g * (x - mean)) and, in training, the coefficients of
   grad_x = fma(g, scale, fma(x - mean, k2, k1)) with k1 = -scale * sum(g) / M and
   k2 = -scale * invstd^2 * sum(g * (x - mean)) / M (eval: grad_x = scale * g).
3. ``_bn_act_backward_elementwise_kernel``: grad_x (for ``ADD_RELU`` from grad_residual and x:
   7 activation passes in all instead of 8), and grad_x_d for ``DUAL_ADD_RELU``.

Every kernel forms the pre-activation with ``_coefficients`` and ``_preactivation`` —
pinned fma's, so no compiler contraction choice can differ between kernels — and the
backward's ReLU mask is recomputed bit for bit from the saved inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from . import _reduce, _runtime
from ._runtime import Launch

RELU = tl.constexpr(0)
ADD_RELU = tl.constexpr(1)
DUAL_ADD_RELU = tl.constexpr(2)

# ---------------------------------------------------------------- device helpers


@triton.jit
def _tile(C, rows, lanes, lane_blocks, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Offsets and mask of this program's [BLOCK_R, BLOCK_L] elementwise tile, and the
    channels of its lanes (channels_last, [BLOCK_L]) or of its rows (NCHW, [BLOCK_R])."""
    pid = tl.program_id(0)
    row = (pid // lane_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    lane = (pid % lane_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = (row < rows)[:, None] & (lane < lanes)[None, :]
    offsets = row.to(tl.int64)[:, None] * lanes + lane[None, :]
    if CHANNELS_LAST:
        channel = lane
    else:
        channel = row % C  # rows are (n, c) planes
    return offsets, mask, channel


@triton.jit
def _across_tile(v, CHANNELS_LAST: tl.constexpr):
    """Per-channel values of ``_tile``'s channels, broadcast along the tile. (Loading them
    as [BLOCK_R, 1] instead would repeat the load for every element a thread holds.)"""
    if CHANNELS_LAST:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _coefficients(weight_ptr, bias_ptr, mean_ptr, invstd_ptr, channel, C,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """scale = weight * invstd, shift = bias - mean * scale, and mean, per channel."""
    valid = channel < C
    mean = tl.load(mean_ptr + channel, mask=valid, other=0.0)
    scale = tl.load(invstd_ptr + channel, mask=valid, other=0.0)
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + channel, mask=valid, other=0.0) * scale
    if HAS_BIAS:
        shift = tl.fma(-mean, scale, tl.load(bias_ptr + channel, mask=valid, other=0.0))
    else:
        shift = -mean * scale
    return scale, shift, mean


@triton.jit
def _tile_coefficients(weight_ptr, bias_ptr, mean_ptr, invstd_ptr, channel, C,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    scale, shift, mean = _coefficients(weight_ptr, bias_ptr, mean_ptr, invstd_ptr, channel, C, HAS_WEIGHT, HAS_BIAS)
    return _across_tile(scale, CHANNELS_LAST), _across_tile(shift, CHANNELS_LAST), _across_tile(mean, CHANNELS_LAST)


@triton.jit
def _preactivation(x, y, scale, shift, scale_d, shift_d, EPILOGUE: tl.constexpr):
    pre = tl.fma(x, scale, shift)
    if EPILOGUE == ADD_RELU:
        pre = pre + y
    if EPILOGUE == DUAL_ADD_RELU:
        pre = pre + tl.fma(y, scale_d, shift_d)
    return pre


@triton.jit
def _masked_gradient(pre, dy, OUT: tl.constexpr):
    """dy, 0 where the ReLU's output (in dtype ``OUT``, as the forward stores it) is <= 0:
    as torch.relu's backward, so a NaN pre-activation passes dy, and one that rounds to 0
    does not. LLVM folds the conversion into one compare with half the dtype's smallest
    subnormal (sm_90 PTX: ``setp.le.f32`` with ``0f33000000``, 2^-25, for float16,
    ``0f00008000``, 2^-134, for bfloat16); spelled as that compare in Triton, the constant
    cost the bfloat16 backward kernels up to 28 registers."""
    return tl.where(pre.to(OUT) <= 0, 0.0, dy)


@triton.jit
def _grad_input(g, x, scale, mean, coef_ptr, channel, C, TRAINING: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """grad_x of one branch of a ``_tile``; k1, k2 are at coef_ptr[channel], coef_ptr[C + channel]."""
    if TRAINING:
        valid = channel < C
        k1 = _across_tile(tl.load(coef_ptr + channel, mask=valid, other=0.0), CHANNELS_LAST)
        k2 = _across_tile(tl.load(coef_ptr + C + channel, mask=valid, other=0.0), CHANNELS_LAST)
        grad = tl.fma(g, scale, tl.fma(x - mean, k2, k1))
    else:
        grad = g * scale
    return grad


# ---------------------------------------------------------------- forward


@_runtime.autotune(_runtime.TUNING.elementwise, ["lanes", "CHANNELS_LAST", "BLOCK_L", "EPILOGUE"])
@triton.jit
def _bn_act_forward_kernel(
    x_ptr, weight_ptr, bias_ptr, mean_ptr, invstd_ptr,
    y_ptr, weight_d_ptr, bias_d_ptr, mean_d_ptr, invstd_d_ptr,
    out_ptr,
    C, rows, lanes, lane_blocks,
    EPILOGUE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT_D: tl.constexpr, HAS_BIAS_D: tl.constexpr,
    BLOCK_L: tl.constexpr, TILE: tl.constexpr, PDL: tl.constexpr,
):
    _runtime.await_stream_predecessor(PDL)
    offsets, mask, channel = _tile(C, rows, lanes, lane_blocks, CHANNELS_LAST, TILE // BLOCK_L, BLOCK_L)
    scale, shift, mean = _tile_coefficients(
        weight_ptr, bias_ptr, mean_ptr, invstd_ptr, channel, C, HAS_WEIGHT, HAS_BIAS, CHANNELS_LAST
    )
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = x
    scale_d, shift_d = scale, shift
    if EPILOGUE != RELU:
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if EPILOGUE == DUAL_ADD_RELU:
        scale_d, shift_d, mean_d = _tile_coefficients(
            weight_d_ptr, bias_d_ptr, mean_d_ptr, invstd_d_ptr, channel, C, HAS_WEIGHT_D, HAS_BIAS_D, CHANNELS_LAST
        )
    pre = _preactivation(x, y, scale, shift, scale_d, shift_d, EPILOGUE)
    out = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.relu
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- backward


@triton.jit
def _backward_terms(grad_ptr, x_ptr, y_ptr, grad_y_ptr, offsets, mask, scale, shift, mean, scale_d, shift_d, mean_d,
                    EPILOGUE: tl.constexpr):
    """One tile's terms of the backward sums: g, g * (x - mean) and g * (y - mean_d) (the
    last for ``DUAL_ADD_RELU`` only); for ``ADD_RELU`` it writes grad_residual = g (the
    elementwise pass then reads it instead of the residual and the mask)."""
    dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # 0: masked lanes add 0
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = x
    if EPILOGUE != RELU:
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = _masked_gradient(_preactivation(x, y, scale, shift, scale_d, shift_d, EPILOGUE), dy, x_ptr.dtype.element_ty)
    if EPILOGUE == ADD_RELU:
        tl.store(grad_y_ptr + offsets, g.to(grad_y_ptr.dtype.element_ty), mask=mask)
    return g, g * (x - mean), g * (y - mean_d)


@_runtime.autotune(_runtime.TUNING.reduce, ["lanes", "CHANNELS_LAST", "BLOCK_L", "EPILOGUE"])
@triton.jit
def _bn_act_backward_reduce_kernel(
    grad_ptr, x_ptr, weight_ptr, bias_ptr, mean_ptr, invstd_ptr,
    y_ptr, weight_d_ptr, bias_d_ptr, mean_d_ptr, invstd_d_ptr,
    part_ptr, grad_y_ptr,
    C, rows, row_stride, lanes, groups, lane_chunks, rows_per_chunk, lanes_per_chunk, chunks,
    EPILOGUE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT_D: tl.constexpr, HAS_BIAS_D: tl.constexpr,
    BLOCK_L: tl.constexpr, TILE: tl.constexpr, STAGES: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr,
    PDL: tl.constexpr,
):
    _runtime.await_stream_predecessor(PDL)
    BLOCK_R: tl.constexpr = TILE // BLOCK_L
    group, chunk, covered, row_begin, row_end, lane_begin, lane_end, base = _reduce.chunk_bounds(
        rows, lanes, groups, lane_chunks, rows_per_chunk, lanes_per_chunk, chunks, CHANNELS_LAST, BLOCK_L,
        CHUNKS_PER_PROGRAM,
    )
    r = tl.arange(0, BLOCK_R)
    l = tl.arange(0, BLOCK_L)
    if CHANNELS_LAST:
        channel = (lane_begin + l)[None, :]
    else:
        channel = group
    scale, shift, mean = _coefficients(weight_ptr, bias_ptr, mean_ptr, invstd_ptr, channel, C, HAS_WEIGHT, HAS_BIAS)
    scale_d, shift_d, mean_d = scale, shift, mean
    if EPILOGUE == DUAL_ADD_RELU:
        scale_d, shift_d, mean_d = _coefficients(
            weight_d_ptr, bias_d_ptr, mean_d_ptr, invstd_d_ptr, channel, C, HAS_WEIGHT_D, HAS_BIAS_D
        )
    sum_g = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    sum_gc = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    sum_gc_d = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    # One loop over the chunk's (row tile a, lane block b) steps, the loop the pipeliner
    # overlaps, across rows too. channels_last chunks are one lane block wide.
    if CHANNELS_LAST:
        lane_blocks = 1
    else:
        lane_blocks = tl.cdiv(lane_end - lane_begin, BLOCK_L)
    a = 0
    b = 0
    for _ in tl.range(0, tl.cdiv(row_end - row_begin, BLOCK_R) * lane_blocks, num_stages=STAGES):
        row = row_begin + a * BLOCK_R + r
        lane = lane_begin + b * BLOCK_L + l
        mask = (row < row_end)[:, None] & (lane < lane_end)[None, :]
        offsets = base + row.to(tl.int64)[:, None] * row_stride + lane[None, :]
        g, gc, gc_d = _backward_terms(grad_ptr, x_ptr, y_ptr, grad_y_ptr, offsets, mask,
                                      scale, shift, mean, scale_d, shift_d, mean_d, EPILOGUE)
        sum_g += g
        sum_gc += gc
        if EPILOGUE == DUAL_ADD_RELU:
            sum_gc_d += gc_d
        a, b = _reduce.next_step(a, b, lane_blocks)
    sum_g = _reduce.sum_per_channel(sum_g, CHANNELS_LAST)
    _reduce.store_partial(part_ptr, 0, sum_g, C, chunks, chunk, covered, group, lane_begin, lane_end, CHANNELS_LAST,
                          BLOCK_L, CHUNKS_PER_PROGRAM)
    sum_gc = _reduce.sum_per_channel(sum_gc, CHANNELS_LAST)
    _reduce.store_partial(part_ptr, 1, sum_gc, C, chunks, chunk, covered, group, lane_begin, lane_end, CHANNELS_LAST,
                          BLOCK_L, CHUNKS_PER_PROGRAM)
    if EPILOGUE == DUAL_ADD_RELU:
        sum_gc_d = _reduce.sum_per_channel(sum_gc_d, CHANNELS_LAST)
        _reduce.store_partial(part_ptr, 2, sum_gc_d, C, chunks, chunk, covered, group, lane_begin, lane_end,
                              CHANNELS_LAST, BLOCK_L, CHUNKS_PER_PROGRAM)


@triton.jit
def _branch_gradients(sum_g, sum_gc, weight_ptr, invstd_ptr, grad_weight_ptr, grad_bias_ptr, coef_ptr,
                      channel, C, reduce_size, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    valid = channel < C
    invstd = tl.load(invstd_ptr + channel, mask=valid, other=0.0)
    tl.store(grad_bias_ptr + channel, sum_g, mask=valid)
    tl.store(grad_weight_ptr + channel, sum_gc * invstd, mask=valid)
    if TRAINING:
        scale = invstd
        if HAS_WEIGHT:
            scale = tl.load(weight_ptr + channel, mask=valid, other=0.0) * invstd
        tl.store(coef_ptr + channel, -scale * tl.math.div_rn(sum_g, reduce_size), mask=valid)
        tl.store(coef_ptr + C + channel, -scale * tl.math.div_rn(invstd * invstd * sum_gc, reduce_size), mask=valid)


@triton.jit
def _bn_act_backward_finalize_kernel(
    part_ptr, weight_ptr, invstd_ptr, weight_d_ptr, invstd_d_ptr,
    grad_weight_ptr, grad_bias_ptr, grad_weight_d_ptr, grad_bias_d_ptr, coef_ptr,
    C, chunks, reduce_size,
    TRAINING: tl.constexpr, DUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_WEIGHT_D: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    _runtime.await_stream_predecessor(PDL)
    channel = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    mask = (channel < C)[:, None] & (s < chunks)[None, :]
    offsets = channel.to(tl.int64)[:, None] * chunks + s[None, :]  # 64-bit: _reduce.store_partial
    plane = tl.cast(C, tl.int64) * chunks
    sum_g = tl.sum(tl.load(part_ptr + offsets, mask=mask, other=0.0), 1)
    sum_gc = tl.sum(tl.load(part_ptr + plane + offsets, mask=mask, other=0.0), 1)
    _branch_gradients(sum_g, sum_gc, weight_ptr, invstd_ptr, grad_weight_ptr, grad_bias_ptr, coef_ptr,
                      channel, C, reduce_size, TRAINING, HAS_WEIGHT)
    if DUAL:
        sum_gc_d = tl.sum(tl.load(part_ptr + 2 * plane + offsets, mask=mask, other=0.0), 1)
        # The downsample branch's coefficients, 2C on: two pointer steps of C, each widened on
        # its own (2 * C wraps in 32 bits from C = 2^30; a 64-bit product costs the dual
        # backward's elementwise kernel up to 20 registers).
        _branch_gradients(sum_g, sum_gc_d, weight_d_ptr, invstd_d_ptr, grad_weight_d_ptr, grad_bias_d_ptr,
                          coef_ptr + C + C, channel, C, reduce_size, TRAINING, HAS_WEIGHT_D)


@_runtime.autotune(_runtime.TUNING.elementwise, ["lanes", "CHANNELS_LAST", "BLOCK_L", "EPILOGUE"])
@triton.jit
def _bn_act_backward_elementwise_kernel(
    grad_ptr, x_ptr, weight_ptr, bias_ptr, mean_ptr, invstd_ptr,
    y_ptr, weight_d_ptr, bias_d_ptr, mean_d_ptr, invstd_d_ptr,
    coef_ptr, grad_x_ptr, grad_y_ptr,
    C, rows, lanes, lane_blocks,
    TRAINING: tl.constexpr, EPILOGUE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT_D: tl.constexpr, HAS_BIAS_D: tl.constexpr,
    BLOCK_L: tl.constexpr, TILE: tl.constexpr, PDL: tl.constexpr,
):
    _runtime.await_stream_predecessor(PDL)
    offsets, mask, channel = _tile(C, rows, lanes, lane_blocks, CHANNELS_LAST, TILE // BLOCK_L, BLOCK_L)
    scale, shift, mean = _tile_coefficients(
        weight_ptr, bias_ptr, mean_ptr, invstd_ptr, channel, C, HAS_WEIGHT, HAS_BIAS, CHANNELS_LAST
    )
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if EPILOGUE == ADD_RELU:
        # The reduce pass wrote g as grad_residual (exact: g is grad_out or 0): two
        # inputs instead of three, and no mask to recompute.
        g = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = x
        scale_d, shift_d, mean_d = scale, shift, mean
        if EPILOGUE == DUAL_ADD_RELU:
            y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            scale_d, shift_d, mean_d = _tile_coefficients(
                weight_d_ptr, bias_d_ptr, mean_d_ptr, invstd_d_ptr, channel, C, HAS_WEIGHT_D, HAS_BIAS_D,
                CHANNELS_LAST,
            )
        g = _masked_gradient(_preactivation(x, y, scale, shift, scale_d, shift_d, EPILOGUE), dy,
                             x_ptr.dtype.element_ty)
    grad_x = _grad_input(g, x, scale, mean, coef_ptr, channel, C, TRAINING, CHANNELS_LAST)
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if EPILOGUE == DUAL_ADD_RELU:
        grad_y = _grad_input(g, y, scale_d, mean_d, coef_ptr + C + C, channel, C, TRAINING, CHANNELS_LAST)  # 2C on
        tl.store(grad_y_ptr + offsets, grad_y.to(grad_y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- host side


class Branch(NamedTuple):
    """One BatchNorm of a fused op, ready for the kernels: its input dense in the op's
    layout, its per-channel arrays fp32 and contiguous. The ops pass it to the builders
    unpacked: its fields are in the order of the builders' parameters."""

    input: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    mean: Tensor
    invstd: Tensor

    @staticmethod
    def dense(input, weight, bias, mean, invstd, memory_format: torch.memory_format) -> "Branch":
        fp32 = _runtime.float32_contiguous
        return Branch(input.contiguous(memory_format=memory_format), fp32(weight), fp32(bias), fp32(mean), fp32(invstd))


def _input_args(x, weight, bias, mean, invstd, y, weight_d, bias_d, mean_d, invstd_d) -> dict:
    """The arguments every kernel of the family takes for its inputs: both branches."""
    return dict(
        x_ptr=x, **_per_channel_args("", weight, bias, mean, invstd, mean),
        y_ptr=x if y is None else y, **_per_channel_args("_d", weight_d, bias_d, mean_d, invstd_d, mean),
    )


def _per_channel_args(suffix: str, weight, bias, mean, invstd, placeholder) -> dict:
    """A branch's per-channel kernel arguments; an absent array (every one of an absent
    branch) passes ``placeholder``, which the kernel never reads."""
    flag = suffix.upper()
    return {
        f"weight{suffix}_ptr": placeholder if weight is None else weight,
        f"bias{suffix}_ptr": placeholder if bias is None else bias,
        f"mean{suffix}_ptr": placeholder if mean is None else mean,
        f"invstd{suffix}_ptr": placeholder if invstd is None else invstd,
        f"HAS_WEIGHT{flag}": weight is not None,
        f"HAS_BIAS{flag}": bias is not None,
    }


@dataclasses.dataclass(frozen=True)
class _Elementwise:
    """An activation as ``rows`` rows of ``lanes`` contiguous values, cut into tiles:
    channels_last rows are pixels (lanes: channels), NCHW rows are (n, c) planes."""

    channels: int
    rows: int
    lanes: int
    lane_block: int
    channels_last: bool

    @staticmethod
    def of(x: Tensor, channels_last: bool) -> "_Elementwise":
        return _Elementwise._of(tuple(x.shape), channels_last)

    @staticmethod
    @functools.lru_cache(maxsize=1024)  # computed once per shape: it runs on every op call
    def _of(shape: tuple[int, int, int, int], channels_last: bool) -> "_Elementwise":
        n, c, h, w = shape
        rows, lanes = (n * h * w, c) if channels_last else (n * c, h * w)
        block = _runtime.lane_block(lanes, _runtime.TUNING.max_lane_block, channels_last)
        return _Elementwise(c, rows, lanes, block, channels_last)

    @property
    def lane_blocks(self) -> int:
        return _runtime.cdiv(self.lanes, self.lane_block)

    def grid(self, meta: dict) -> tuple[int]:
        return (_runtime.cdiv(self.rows, meta["TILE"] // self.lane_block) * self.lane_blocks,)

    def kernel_args(self) -> dict:
        return dict(
            C=self.channels, rows=self.rows, lanes=self.lanes, lane_blocks=self.lane_blocks,
            CHANNELS_LAST=self.channels_last, BLOCK_L=self.lane_block,
        )


def empty_backward_scratch(part: _reduce.Partition, epilogue: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """What a backward's kernels hand each other: the reduction's partials, sum(g) and
    sum(g * (x - mean)) (and sum(g * (y - mean_d))) x C x chunks, and the finalize's
    coefficients, k1 and k2 of each branch x C."""
    sums, coefficients = (3, 4) if epilogue == DUAL_ADD_RELU.value else (2, 2)
    return (torch.empty((sums, part.channels, part.chunks), device=device, dtype=torch.float32),
            torch.empty((coefficients, part.channels), device=device, dtype=torch.float32))


# The builders of an op's launches. Every argument after the op variant and tiling is
# an operand of the op's launch plan (``_runtime.launch``): placed, never read. ``y`` is
# the residual (``ADD_RELU``) or the downsample input (``DUAL_ADD_RELU``), dense like ``x``.


def forward_launches(
    epilogue: int, view: _Elementwise,
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
    y: Optional[Tensor], weight_d: Optional[Tensor], bias_d: Optional[Tensor], mean_d: Optional[Tensor],
    invstd_d: Optional[Tensor],
    out: Tensor,
) -> list[Launch]:
    """The kernel writing ``out`` (numel > 0)."""
    args = dict(
        **_input_args(x, weight, bias, mean, invstd, y, weight_d, bias_d, mean_d, invstd_d),
        out_ptr=out, **view.kernel_args(), EPILOGUE=epilogue,
    )
    return [Launch(_bn_act_forward_kernel, view.grid, args)]


def backward_launches(
    epilogue: int, training: bool, part: _reduce.Partition, view: _Elementwise,
    grad: Tensor,
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
    y: Optional[Tensor], weight_d: Optional[Tensor], bias_d: Optional[Tensor], mean_d: Optional[Tensor],
    invstd_d: Optional[Tensor],
    partials: Tensor, coefficients: Tensor,
    grad_input: Tensor, grad_weight: Tensor, grad_bias: Tensor,
    grad_y: Optional[Tensor], grad_weight_d: Optional[Tensor], grad_bias_d: Optional[Tensor],
) -> list[Launch]:
    """The kernels of a fused backward (numel > 0), through ``partials`` and
    ``coefficients`` (``empty_backward_scratch``)."""
    block_c, block_s = part.finalize_blocks()
    inputs = _input_args(x, weight, bias, mean, invstd, y, weight_d, bias_d, mean_d, invstd_d)
    grad_y_ptr = grad_input if grad_y is None else grad_y
    finalize_args = dict(
        part_ptr=partials,
        weight_ptr=inputs["weight_ptr"], invstd_ptr=invstd,
        weight_d_ptr=inputs["weight_d_ptr"], invstd_d_ptr=inputs["invstd_d_ptr"],
        grad_weight_ptr=grad_weight, grad_bias_ptr=grad_bias,
        grad_weight_d_ptr=grad_weight if grad_weight_d is None else grad_weight_d,
        grad_bias_d_ptr=grad_bias if grad_bias_d is None else grad_bias_d,
        coef_ptr=coefficients, C=part.channels, chunks=part.chunks, reduce_size=float(part.reduce_size),
        TRAINING=training, DUAL=epilogue == DUAL_ADD_RELU.value,
        HAS_WEIGHT=inputs["HAS_WEIGHT"], HAS_WEIGHT_D=inputs["HAS_WEIGHT_D"],
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4,
    )
    return [
        Launch(
            _bn_act_backward_reduce_kernel,
            part.grid,
            dict(grad_ptr=grad, **inputs, part_ptr=partials, grad_y_ptr=grad_y_ptr, **part.kernel_args(),
                 EPILOGUE=epilogue),
        ),
        Launch(_bn_act_backward_finalize_kernel, part.finalize_grid, finalize_args),
        Launch(
            _bn_act_backward_elementwise_kernel,
            view.grid,
            dict(grad_ptr=grad, **inputs, coef_ptr=coefficients, grad_x_ptr=grad_input, grad_y_ptr=grad_y_ptr,
                 **view.kernel_args(), TRAINING=training, EPILOGUE=epilogue),
        ),
    ]


# ---------------------------------------------------------------- the ops


def _dense(input: Tensor, params: tuple, y: Optional[Tensor], params_d: Optional[tuple]):
    """The op's layout and its activations dense in it: (format, main, y, downsample)."""
    memory_format = _checks.activation_memory_format(input)
    main = Branch.dense(input, *params, memory_format)
    if params_d is not None:
        downsample = Branch.dense(y, *params_d, memory_format)
        return memory_format, main, downsample.input, downsample
    return memory_format, main, None if y is None else y.contiguous(memory_format=memory_format), None


def _input_operands(main: Branch, y: Optional[Tensor], downsample: Optional[Branch]) -> tuple:
    """The op's inputs as the builders take them (``_input_args``' parameters): an absent
    downsample branch's per-channel arrays as None."""
    return (*main, y, *(downsample[1:] if downsample else (None,) * 4))


def _forward(op: str, epilogue: int, input: Tensor, params: tuple, y: Optional[Tensor] = None,
             params_d: Optional[tuple] = None) -> Tensor:
    _runtime.check_runnable(op, input)
    memory_format, main, y, downsample = _dense(input, params, y, params_d)
    # In the op's layout, not with the input's strides (any, on a size-1 or empty dimension).
    out = torch.empty_like(main.input, memory_format=memory_format)
    if out.numel() > 0:
        view = _Elementwise.of(out, memory_format == torch.channels_last)
        operands = (*_input_operands(main, y, downsample), out)
        with _runtime.device_guard(out):
            _runtime.launch(forward_launches, (epilogue, view), operands)
    return out


def _backward(op: str, epilogue: int, training: bool, grad_out: Tensor, input: Tensor, params: tuple,
              y: Optional[Tensor] = None, params_d: Optional[tuple] = None) -> tuple:
    """(grad_input, grad_weight, grad_bias, grad_y, grad_weight_d, grad_bias_d); the last
    three are None when the epilogue has no such output."""
    _runtime.check_runnable(op, input)
    memory_format, main, y, downsample = _dense(input, params, y, params_d)
    grad = grad_out.contiguous(memory_format=memory_format)
    grad_input = torch.empty_like(main.input, memory_format=memory_format)
    grad_y = None if y is None else torch.empty_like(main.input, memory_format=memory_format)
    per_channel = [torch.empty_like(main.mean) for _ in range(4 if downsample else 2)]
    grad_weight, grad_bias, grad_weight_d, grad_bias_d = per_channel + [None] * (4 - len(per_channel))
    if grad_input.numel() == 0:
        for t in per_channel:
            t.zero_()  # the parameter gradients of an empty batch
    else:
        channels_last = memory_format == torch.channels_last
        part = _reduce.partition(grad_input, channels_last)
        partials, coefficients = empty_backward_scratch(part, epilogue, grad.device)
        operands = (
            grad, *_input_operands(main, y, downsample), partials, coefficients,
            grad_input, grad_weight, grad_bias, grad_y, grad_weight_d, grad_bias_d,
        )
        with _runtime.device_guard(grad_input):
            _runtime.launch(backward_launches, (epilogue, training, part, _Elementwise.of(grad_input, channels_last)),
                            operands)
    return grad_input, grad_weight, grad_bias, grad_y, grad_weight_d, grad_bias_d


def bn_relu(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor, training: bool
) -> Tensor:
    return _forward("bn_relu", RELU.value, input, (weight, bias, mean, invstd))


def bn_relu_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    grad_input, grad_weight, grad_bias, *_ = _backward(
        "bn_relu_backward", RELU.value, training, grad_out, input, (weight, bias, mean, invstd)
    )
    return grad_input, grad_weight, grad_bias


def bn_add_relu(
    input: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
) -> Tensor:
    return _forward("bn_add_relu", ADD_RELU.value, input, (weight, bias, mean, invstd), residual)


def bn_add_relu_backward(
    grad_out: Tensor,
    input: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_input, grad_weight, grad_bias, grad_residual, _, _ = _backward(
        "bn_add_relu_backward", ADD_RELU.value, training, grad_out, input, (weight, bias, mean, invstd), residual
    )
    return grad_input, grad_residual, grad_weight, grad_bias


def dual_bn_add_relu(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    input_d: Tensor,
    weight_d: Optional[Tensor],
    bias_d: Optional[Tensor],
    mean_d: Tensor,
    invstd_d: Tensor,
    training: bool,
) -> Tensor:
    return _forward(
        "dual_bn_add_relu", DUAL_ADD_RELU.value, input, (weight, bias, mean, invstd), input_d, (weight_d, bias_d, mean_d, invstd_d)
    )


def dual_bn_add_relu_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    input_d: Tensor,
    weight_d: Optional[Tensor],
    bias_d: Optional[Tensor],
    mean_d: Tensor,
    invstd_d: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(
        "dual_bn_add_relu_backward", DUAL_ADD_RELU.value, training, grad_out, input, (weight, bias, mean, invstd), input_d,
        (weight_d, bias_d, mean_d, invstd_d),
    )
