"""Batch statistics in Triton: per-channel mean and invstd, running statistics updated.

Two kernels, one read of the input (``_reduce`` describes the partition):

1. ``_batch_stats_partials_kernel``: each program streams one chunk of one channel group
   (or ``CHUNKS_PER_PROGRAM`` adjacent chunks, ``_reduce``) in ``[TILE // BLOCK_L, BLOCK_L]``
   tiles. Every lane of the tile keeps its own Welford (mean, M2) in fp32 over the values
   it visits; lanes visit values in lockstep, so a lane's count follows from the loop
   indices and is never stored (channels_last loads two row tiles per step: the kernel
   only reads, so it needs twice the loads in flight of a kernel that also writes;
   ``STAGES`` > 1 pipelines the loop, see ``_runtime``).
   At the end the lanes are merged per channel (Chan et al.: the count-weighted mean of
   the lane means, and the lane M2s plus the spread of the lane means) into one
   (count, mean, M2) partial.
2. ``_batch_stats_finalize_kernel``: one program per few channels loads all of their partials at
   once, merges them the same way, and writes mean and invstd = 1/sqrt(var + eps)
   (biased variance), and the running statistics with the unbiased variance, exactly
   as eager BatchNorm updates them.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ..reference import write_running_statistic
from . import _reduce, _runtime
from ._runtime import Launch

NAME = "batch_stats"


@triton.jit
def _welford_step(mean, m2, x, weight):
    """One more value per lane: ``weight`` is 1 / (the lane's new count). (Triton's fp32
    division is approximate, within 2 ulp: harmless in a Welford weight.)"""
    delta = x - mean
    updated = mean + delta * weight
    return updated, m2 + delta * (x - updated)


@triton.jit
def _welford_update(mean, m2, x, mask, weight):
    """``_welford_step`` where ``mask``; elsewhere the lane keeps its state."""
    updated, updated_m2 = _welford_step(mean, m2, x, weight)
    return tl.where(mask, updated, mean), tl.where(mask, updated_m2, m2)


@triton.jit
def _about_rounded_mean(rounded_mean, total, sum_spread, sum_m2):
    """(mean, M2) of ``total`` values from their moments about ``rounded_mean``, the
    count-weighted mean of their parts' means as float32 rounds it: ``sum_spread`` and
    ``sum_m2`` sum count * (part mean - rounded_mean) and part M2 + count * (part mean -
    rounded_mean)^2. The rounding's own n * (mean - rounded_mean)^2 leaves M2 (it was the
    whole M2 of a constant channel of 1000.1: invstd 2e-4 off at eps 1e-5, 10% at 1e-12)."""
    correction = tl.math.div_rn(sum_spread, tl.maximum(total, 1.0))
    # An M2 past float32's range stays inf (the correction is at most M2, so it overflows
    # only with it: inf - inf would be NaN); below 0 only by rounding; NaN kept.
    m2 = tl.where(sum_m2 == float("inf"), sum_m2, sum_m2 - sum_spread * correction)
    return rounded_mean + correction, tl.where(m2 < 0.0, 0.0, m2)


@_runtime.autotune(_runtime.TUNING.reduce, ["lanes", "CHANNELS_LAST", "BLOCK_L"])
@triton.jit
def _batch_stats_partials_kernel(
    x_ptr, part_ptr,
    C, rows, row_stride, lanes, groups, lane_chunks, rows_per_chunk, lanes_per_chunk, chunks,
    CHANNELS_LAST: tl.constexpr, BLOCK_L: tl.constexpr, TILE: tl.constexpr, STAGES: tl.constexpr,
    CHUNKS_PER_PROGRAM: tl.constexpr, PDL: tl.constexpr,
):
    _runtime.await_stream_predecessor(PDL)
    BLOCK_R: tl.constexpr = TILE // BLOCK_L
    group, chunk, covered, row_begin, row_end, lane_begin, lane_end, base = _reduce.chunk_bounds(
        rows, lanes, groups, lane_chunks, rows_per_chunk, lanes_per_chunk, chunks, CHANNELS_LAST, BLOCK_L,
        CHUNKS_PER_PROGRAM,
    )
    r = tl.arange(0, BLOCK_R)
    l = tl.arange(0, BLOCK_L)
    lane_visits = _reduce.visits(lane_end - lane_begin, l, BLOCK_L)
    mean = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    m2 = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    if CHANNELS_LAST:
        # One lane block, the same count for every lane: row tile t is its (t + 1)-th
        # value. Two tiles per step: every byte this kernel moves is a load, and two
        # loads in flight per step double the bytes in flight without growing the state.
        # The steps whose two tiles lie inside the chunk take no row mask and no select
        # (a quarter fewer instructions in bf16, where the loop is issue-bound): a lane past
        # the last channel loads 0, stays at mean 0 and M2 0, and its count is 0 at the end.
        # The chunk's last, partial step is masked.
        lane = lane_begin + l
        lane_mask = (lane < lane_end)[None, :]
        # 64-bit: BLOCK_R rows of C channels pass 2^31 from C = 2^25 (tl.cast: a row_stride of 1 is a constexpr).
        next_tile = tl.cast(row_stride, tl.int64) * BLOCK_R
        full_steps = (row_end - row_begin) // (2 * BLOCK_R)
        for a in tl.range(0, full_steps, num_stages=STAGES):
            offsets = (row_begin + 2 * a * BLOCK_R + r).to(tl.int64)[:, None] * row_stride + lane[None, :]
            x = tl.load(x_ptr + offsets, mask=lane_mask, other=0.0).to(tl.float32)
            next_x = tl.load(x_ptr + offsets + next_tile, mask=lane_mask, other=0.0).to(tl.float32)
            mean, m2 = _welford_step(mean, m2, x, 1.0 / (2 * a + 1))
            mean, m2 = _welford_step(mean, m2, next_x, 1.0 / (2 * a + 2))
        if full_steps * 2 * BLOCK_R < row_end - row_begin:
            a = full_steps
            row = row_begin + 2 * a * BLOCK_R + r
            mask = (row < row_end)[:, None] & lane_mask
            next_mask = (row + BLOCK_R < row_end)[:, None] & lane_mask
            offsets = row.to(tl.int64)[:, None] * row_stride + lane[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            next_x = tl.load(x_ptr + offsets + next_tile, mask=next_mask, other=0.0).to(tl.float32)
            mean, m2 = _welford_update(mean, m2, x, mask, 1.0 / (2 * a + 1))
            mean, m2 = _welford_update(mean, m2, next_x, next_mask, 1.0 / (2 * a + 2))
    else:
        # One loop over (row tile a, lane block b) steps, so the pipeliner overlaps rows too.
        lane_blocks = tl.cdiv(lane_end - lane_begin, BLOCK_L)
        a = 0
        b = 0
        for _ in tl.range(0, tl.cdiv(row_end - row_begin, BLOCK_R) * lane_blocks, num_stages=STAGES):
            row = row_begin + a * BLOCK_R + r
            lane = lane_begin + b * BLOCK_L + l
            mask = (row < row_end)[:, None] & (lane < lane_end)[None, :]
            offsets = base + row.to(tl.int64)[:, None] * row_stride + lane[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            # A valid lane has been updated a * (its lane visits) + b times before; lanes
            # visit every lane block or all but the last: two scalar weights, not one a lane.
            weight = tl.where(lane_visits == lane_blocks, 1.0 / (a * lane_blocks + b + 1).to(tl.float32),
                              1.0 / (a * (lane_blocks - 1) + b + 1).to(tl.float32))[None, :]
            mean, m2 = _welford_update(mean, m2, x, mask, weight)
            a, b = _reduce.next_step(a, b, lane_blocks)

    count = (_reduce.visits(row_end - row_begin, r, BLOCK_R)[:, None] * lane_visits[None, :]).to(tl.float32)
    total = _reduce.sum_per_channel(count, CHANNELS_LAST)
    # Lanes past the last channel have a count of 0 (and are not stored).
    rounded_mean = tl.math.div_rn(_reduce.sum_per_channel(count * mean, CHANNELS_LAST), tl.maximum(total, 1.0))
    if CHANNELS_LAST:
        spread = mean - rounded_mean[None, :]
    else:
        spread = mean - rounded_mean
    chunk_mean, chunk_m2 = _about_rounded_mean(
        rounded_mean, total, _reduce.sum_per_channel(count * spread, CHANNELS_LAST),
        _reduce.sum_per_channel(m2 + count * spread * spread, CHANNELS_LAST),
    )
    _reduce.store_partial(part_ptr, 0, total, C, chunks, chunk, covered, group, lane_begin, lane_end, CHANNELS_LAST,
                          BLOCK_L, CHUNKS_PER_PROGRAM)
    _reduce.store_partial(part_ptr, 1, chunk_mean, C, chunks, chunk, covered, group, lane_begin, lane_end,
                          CHANNELS_LAST, BLOCK_L, CHUNKS_PER_PROGRAM)
    _reduce.store_partial(part_ptr, 2, chunk_m2, C, chunks, chunk, covered, group, lane_begin, lane_end,
                          CHANNELS_LAST, BLOCK_L, CHUNKS_PER_PROGRAM)


@triton.jit
def _batch_stats_finalize_kernel(
    part_ptr, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr,
    C, chunks, momentum, one_minus_momentum, eps, unbias,
    HAS_RUNNING: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    _runtime.await_stream_predecessor(PDL)
    channel = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    mask = (channel < C)[:, None] & (s < chunks)[None, :]
    offsets = channel.to(tl.int64)[:, None] * chunks + s[None, :]  # 64-bit: _reduce.store_partial
    plane = tl.cast(C, tl.int64) * chunks
    count = tl.load(part_ptr + offsets, mask=mask, other=0.0)  # 0 past the last chunk
    chunk_mean = tl.load(part_ptr + plane + offsets, mask=mask, other=0.0)
    chunk_m2 = tl.load(part_ptr + 2 * plane + offsets, mask=mask, other=0.0)
    total = tl.maximum(tl.sum(count, 1), 1.0)  # 0 only for channels past the last
    rounded_mean = tl.math.div_rn(tl.sum(count * chunk_mean, 1), total)
    spread = chunk_mean - rounded_mean[:, None]
    mean, m2 = _about_rounded_mean(rounded_mean, total, tl.sum(count * spread, 1),
                                   tl.sum(chunk_m2 + count * spread * spread, 1))
    var = tl.math.div_rn(m2, total)
    valid = channel < C
    tl.store(mean_ptr + channel, mean, mask=valid)
    tl.store(invstd_ptr + channel, tl.math.div_rn(1.0, tl.sqrt_rn(var + eps)), mask=valid)
    if HAS_RUNNING:
        running_mean = tl.load(running_mean_ptr + channel, mask=valid)
        running_var = tl.load(running_var_ptr + channel, mask=valid)
        tl.store(running_mean_ptr + channel, momentum * mean + one_minus_momentum * running_mean, mask=valid)
        tl.store(running_var_ptr + channel, momentum * (var * unbias) + one_minus_momentum * running_var, mask=valid)


def empty_partials(part: _reduce.Partition, device: torch.device) -> Tensor:
    """What the partials kernel hands the finalize: (count, mean, M2) x C x chunks."""
    return torch.empty((3, part.channels, part.chunks), device=device, dtype=torch.float32)


def launches(
    part: _reduce.Partition,
    x: Tensor,
    partials: Tensor,
    mean: Tensor,
    invstd: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    one_minus_momentum: float,
    eps: float,
) -> list[Launch]:
    """The kernels computing the statistics of ``x`` (dense in its layout, numel > 0,
    reduced by ``part``) into ``partials`` (3 x C x ``part.chunks``), then ``mean``,
    ``invstd`` and the running statistics. Every argument after ``part`` is an operand of
    the op's launch plan (``_runtime.launch``): placed, never read."""
    block_c, block_s = part.finalize_blocks()
    has_running = running_mean is not None
    return [
        Launch(
            _batch_stats_partials_kernel, part.grid,
            dict(x_ptr=x, part_ptr=partials, **part.kernel_args()),
        ),
        Launch(
            _batch_stats_finalize_kernel,
            part.finalize_grid,
            dict(
                part_ptr=partials, mean_ptr=mean, invstd_ptr=invstd,
                running_mean_ptr=running_mean if has_running else mean,
                running_var_ptr=running_var if has_running else invstd,
                C=part.channels, chunks=part.chunks,
                momentum=momentum, one_minus_momentum=one_minus_momentum, eps=eps,
                unbias=part.reduce_size / (part.reduce_size - 1),  # M >= 2: check_batch_size
                HAS_RUNNING=has_running, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4,
            ),
        ),
    ]


def batch_stats(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    _runtime.check_runnable(NAME, input)
    memory_format = _checks.activation_memory_format(input)
    x = input.contiguous(memory_format=memory_format)
    mean = x.new_empty(x.shape[1], dtype=torch.float32)
    invstd = torch.empty_like(mean)
    if x.numel() == 0:
        # An empty batch: mean 0, variance 0; eager leaves the running statistics untouched.
        mean.zero_()
        invstd.fill_(eps).rsqrt_()  # as the reference
        return mean, invstd
    # What the kernel updates: the running statistics themselves, or copies written back.
    buffers = [_runtime.float32_contiguous(t) for t in (running_mean, running_var)]
    part = _reduce.partition(x, memory_format == torch.channels_last)
    partials = empty_partials(part, x.device)
    with _runtime.device_guard(x):
        _runtime.launch(launches, (part,), (x, partials, mean, invstd, *buffers, momentum, 1.0 - momentum, eps))
    for user, buffer in zip((running_mean, running_var), buffers):
        if buffer is not user:
            write_running_statistic(user, buffer)
    return mean, invstd
