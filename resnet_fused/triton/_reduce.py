"""Per-channel reductions as a deterministic two-level tree: the partition and its walk.

Level one: each program reduces one *chunk* of one *channel group* (or several adjacent
chunks: below) into fp32 partials, written to
``partials[k, channel, chunk]``. Level two: a finalize kernel merges each
channel's partials in a fixed order. No atomics, so results do not depend on scheduling;
the partition depends only on the shape and the device's SM count.

An activation is walked as rows of contiguous lanes:

==============  ===========================  ==========================  ===============
layout          rows (stride)                lanes                       channel group
==============  ===========================  ==========================  ===============
channels_last   N*H*W pixels (C)             the group's ``BLOCK_L``     ``BLOCK_L``
                                             channels                    channels
NCHW            N images (C*H*W)             H*W positions of channel c  one channel c
==============  ===========================  ==========================  ===============

A chunk is a range of rows (and, in NCHW, a range of lanes). The partition aims at
``reduce_chunks_per_sm`` chunks per SM in all, at most ``MAX_CHUNKS`` partials per
channel (the finalize holds all of a channel's partials at once).

A program takes ``CHUNKS_PER_PROGRAM`` adjacent chunks (a constant of the autotune
configuration) as one range of rows, where chunks span whole rows of lanes (channels_last
always; NCHW when a chunk is whole planes, ``lane_chunks == 1``; otherwise one chunk): it
stores its partial in the first one's slot and an empty partial (all zeros: a count of 0,
sums of 0) in each of the others, so the finalize merges the same slots whatever the
configuration. On the GPU a program takes half as many chunks as it has warps, so every
configuration runs 16 warps per SM: one wave of programs, whatever the tile, as the
configurations hold ptxas to 128 registers a thread (``_runtime.TUNING``). NCHW cuts
each channel into a multiple of the most chunks a program takes, so its
C x chunks / CHUNKS_PER_PROGRAM programs fill whole waves
where C is a power of two (C = 512 on 132 SMs: 4 chunks per channel, 2 waves of 4 or of
2 programs per SM).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from . import _runtime

MAX_CHUNKS = 1024


@dataclasses.dataclass(frozen=True)
class Partition:
    channels_last: bool
    channels: int
    rows: int
    row_stride: int
    lanes: int
    lane_block: int  # BLOCK_L
    groups: int
    rows_per_chunk: int
    row_chunks: int
    lanes_per_chunk: int  # NCHW; channels_last: the group's BLOCK_L channels
    lane_chunks: int

    @property
    def chunks(self) -> int:
        return self.row_chunks * self.lane_chunks

    def programs(self, chunks_per_program: int) -> int:
        """The grid of a partials kernel whose programs take ``chunks_per_program`` chunks
        each where chunks span whole rows of lanes (one lane chunk: always in
        channels_last), else one."""
        per_program = chunks_per_program if self.lane_chunks == 1 else 1
        return self.groups * _runtime.cdiv(self.chunks, per_program)

    def grid(self, meta: dict) -> tuple[int]:
        """A partials launch's grid, from its configuration's ``CHUNKS_PER_PROGRAM``."""
        return (self.programs(meta["CHUNKS_PER_PROGRAM"]),)

    @property
    def reduce_size(self) -> int:
        """M = N*H*W, the values behind each channel's statistics."""
        return self.rows if self.channels_last else self.rows * self.lanes

    def kernel_args(self) -> dict:
        """The arguments every partials kernel takes, by name."""
        return dict(
            C=self.channels,
            rows=self.rows,
            row_stride=self.row_stride,
            lanes=self.lanes,
            groups=self.groups,
            lane_chunks=self.lane_chunks,
            rows_per_chunk=self.rows_per_chunk,
            lanes_per_chunk=self.lanes_per_chunk,
            chunks=self.chunks,
            CHANNELS_LAST=self.channels_last,
            BLOCK_L=self.lane_block,
        )

    def finalize_blocks(self) -> tuple[int, int]:
        """(BLOCK_C, BLOCK_S) of a finalize program: channels x all of their partials."""
        block_s = _runtime.next_power_of_2(self.chunks)
        return max(1, _runtime.TUNING.finalize_tile // block_s), block_s

    def finalize_grid(self, meta: dict) -> tuple[int]:
        """A finalize launch's grid: programs of BLOCK_C channels."""
        return (_runtime.cdiv(self.channels, self.finalize_blocks()[0]),)


def partition(x: torch.Tensor, channels_last: bool) -> Partition:
    """How to reduce the dense activation ``x`` (N, C, H, W) per channel."""
    return _partition(tuple(x.shape), channels_last, _runtime.sm_count(x.device))


@functools.lru_cache(maxsize=1024)  # computed once per shape: it runs on every op call
def _partition(shape: tuple[int, int, int, int], channels_last: bool, sms: int) -> Partition:
    tuning = _runtime.TUNING
    n, c, h, w = shape
    hw = h * w
    target = tuning.reduce_chunks_per_sm * sms
    if channels_last:
        block = _runtime.lane_block(c, tuning.reduce_channel_block, channels_last=True)
        groups = _runtime.cdiv(c, block)
        rows = n * hw
        wanted = min(_runtime.cdiv(target, groups), MAX_CHUNKS, _runtime.cdiv(rows, tuning.min_rows_per_chunk))
        rows_per_chunk = _runtime.cdiv(rows, max(wanted, 1))
        return Partition(
            channels_last=True, channels=c, rows=rows, row_stride=c, lanes=c, lane_block=block, groups=groups,
            rows_per_chunk=rows_per_chunk, row_chunks=_runtime.cdiv(rows, rows_per_chunk), lanes_per_chunk=block,
            lane_chunks=1,
        )
    wanted = max(1, min(_runtime.cdiv(target, c), MAX_CHUNKS))
    step = tuning.most_chunks_per_program  # row chunks in multiples of it: module docstring
    rows_per_chunk = _runtime.cdiv(n, min(n, max(step, wanted - wanted % step)))
    row_chunks = _runtime.cdiv(n, rows_per_chunk)
    lane_chunks = max(1, min(wanted // row_chunks, _runtime.cdiv(hw, tuning.min_lanes_per_chunk)))
    granule = tuning.lane_granule
    lanes_per_chunk = _runtime.cdiv(_runtime.cdiv(hw, lane_chunks), granule) * granule
    block = _runtime.lane_block(min(hw, lanes_per_chunk), tuning.reduce_lane_block, channels_last=False)
    return Partition(
        channels_last=False, channels=c, rows=n, row_stride=c * hw, lanes=hw, lane_block=block, groups=c,
        rows_per_chunk=rows_per_chunk, row_chunks=row_chunks, lanes_per_chunk=lanes_per_chunk,
        lane_chunks=_runtime.cdiv(hw, lanes_per_chunk),
    )


# ---------------------------------------------------------------- device side


@triton.jit
def chunk_bounds(
    rows, lanes, groups, lane_chunks, rows_per_chunk, lanes_per_chunk, chunks,
    CHANNELS_LAST: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr,
):
    """This program's channel group, first chunk, number of chunks, row range, lane range
    and base offset."""
    pid = tl.program_id(0)
    group = pid % groups  # neighbouring programs share rows: DRAM pages, L2 sectors
    # Chunks that span whole rows of lanes (one lane chunk: always in channels_last) are
    # taken CHUNKS_PER_PROGRAM at a time, adjacent row chunks; others one at a time.
    per_program = tl.where(lane_chunks == 1, CHUNKS_PER_PROGRAM, 1)
    chunk = pid // groups * per_program
    covered = tl.minimum(chunks - chunk, per_program)
    row_chunk = chunk // lane_chunks
    row_begin = row_chunk * rows_per_chunk
    row_end = tl.minimum(row_begin + covered * rows_per_chunk, rows)  # < rows + rows_per_chunk
    if CHANNELS_LAST:
        lane_begin = group * BLOCK_L
        lane_end = tl.minimum(lane_begin + BLOCK_L, lanes)
        base = tl.zeros([], tl.int64)
    else:
        lane_begin = (chunk - row_chunk * lane_chunks) * lanes_per_chunk
        lane_end = tl.minimum(lane_begin + lanes_per_chunk, lanes)
        base = group.to(tl.int64) * lanes  # channel `group`'s plane in image 0
    return group, chunk, covered, row_begin, row_end, lane_begin, lane_end, base


@triton.jit
def next_step(a, b, lane_blocks):
    """The step after (row tile a, lane block b) of a chunk walked row tile by row tile,
    ``lane_blocks`` lane blocks each: kept as counters, so a flattened loop divides nothing."""
    wrap = b == lane_blocks - 1
    return tl.where(wrap, a + 1, a), tl.where(wrap, 0, b + 1)


@triton.jit
def visits(extent, first, BLOCK: tl.constexpr):
    """How many times lane ``first`` of blocks of ``BLOCK`` steps through ``extent`` values."""
    return tl.cdiv(tl.maximum(extent - first, 0), BLOCK)


@triton.jit
def sum_per_channel(v, CHANNELS_LAST: tl.constexpr):
    """A tile's sum per channel: over rows in channels_last (one value per lane), over
    everything in NCHW (the tile holds one channel)."""
    if CHANNELS_LAST:
        return tl.sum(v, 0)
    else:
        return tl.sum(tl.sum(v, 1), 0)


@triton.jit
def store_partial(part_ptr, k, value, C, chunks, chunk, covered, group, lane_begin, lane_end,
                  CHANNELS_LAST: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr):
    """partials[k, channel, chunk] = value for the channels of this program, and 0 in the
    slots of the other ``covered - 1`` chunks it took."""
    # 64-bit: a wide input's partials (up to 3 * C * MAX_CHUNKS values) can pass 2^31.
    # tl.cast, not .to(): Triton specializes an integer argument of 1 to a constexpr.
    plane = part_ptr + k * tl.cast(C, tl.int64) * chunks
    if CHANNELS_LAST:
        channel = lane_begin + tl.arange(0, BLOCK_L)
        valid = channel < lane_end
        tl.store(plane + channel.to(tl.int64) * chunks + chunk, value, mask=valid)
        for other in tl.static_range(1, CHUNKS_PER_PROGRAM):
            tl.store(plane + channel.to(tl.int64) * chunks + chunk + other, tl.zeros_like(value),
                     mask=valid & (other < covered))
    else:
        tl.store(plane + group.to(tl.int64) * chunks + chunk, value)
        for other in tl.static_range(1, CHUNKS_PER_PROGRAM):
            tl.store(plane + group.to(tl.int64) * chunks + chunk + other, tl.zeros_like(value),
                     mask=other < covered)
