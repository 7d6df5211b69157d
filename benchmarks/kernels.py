"""L1 kernel benchmark: each fused op against the eager composite it replaces.

    python benchmarks/kernels.py                        # GPU: ResNet-50 stage shapes, N=128, bf16 and fp32
    python benchmarks/kernels.py --device cpu           # the same shapes at N=8 on the CPU
    python benchmarks/kernels.py --ops batch_stats,bn_add_relu --shapes layer1 --dtype bf16 --layout nchw

Ops: ``batch_stats``; the fused forwards ``bn_relu``, ``bn_add_relu``, ``dual_bn_add_relu``
(normalizing with given statistics); their ``*_backward`` ops (training mode); and the
training forwards ``train_*`` = batch_stats + the fused op, against eager
``F.batch_norm(training=True)`` + ``relu`` (+ add). Every op runs on the backends (below)
and as the eager PyTorch composite it replaces:

=========================  =====================================================
op                         eager composite
=========================  =====================================================
batch_stats                ``torch.batch_norm_stats`` (CUDA); ``torch.var_mean`` (CPU)
bn_relu / bn_add_relu /    ``relu(F.batch_norm(x, eval) [+ r | + F.batch_norm(x_d, eval)])``
dual_bn_add_relu
``*_backward``             autograd backward of the training-mode composite
train_*                    ``relu(F.batch_norm(x, training=True) [+ ...])``
=========================  =====================================================

Bytes: ``bytes`` counts each input read once and each output written once (the issue's
rule; per-channel vectors ignored); ``kernel_bytes`` is the traffic the fused kernels make
by design: the backward reads its inputs twice (reduction pass, then elementwise pass;
``bn_add_relu_backward``'s reduction writes ``grad_residual = g`` and its elementwise pass
reads that and ``x`` alone: 7 passes, not 8), a training forward reads its input once for
statistics and once to normalize. ``% copy`` divides achieved bandwidth by the
device-to-device copy bandwidth measured in the same run (benchmarks/common.py): a 1 GiB
copy, where fixed costs vanish. Each (shape, dtype) also
times a copy of its activation in the same harness (op ``copy``, backend ``torch``), and
each row's ``pct_size_copy`` divides the op's bandwidth by its own traffic by that copy's:
how close the op comes to what a plain copy reaches at that size, where the launch, the
first loads' latency and the last partial wave weigh (the issue's target stays against the
1 GiB figure). Timing: on CUDA each callable is captured in a CUDA graph and
its replays are timed with ``triton.testing.do_bench`` (L2 flushed between replays), so
host launch overhead counts for neither side; on the CPU, medians of wall-clock runs.
Each fused row also carries ``rel_err``, ||fused - eager|| / ||eager|| of its worst
output, against the eager composite on float32 copies of the inputs (so the baseline's own
reduced-precision rounding does not count); above ``ACCURACY_BOUND`` the row fails, untimed,
and the run exits non-zero: a fast wrong result cannot pass unnoticed.
On CUDA, rows of the ``cuda`` and ``triton`` backends also break the op into its kernels
(``kernels``: device time per call from the torch profiler, each kernel's from the end of
the one before it where an early launch started it sooner, L2 flushed before each call,
and each streaming kernel's own % of copy bandwidth), which separates the streaming passes
from the fixed cost of the small reduction-finalize kernels. ``--l2-flush`` says how:
``zero`` writes a 256 MiB buffer, as do_bench does, and leaves L2 full of dirty lines that
the next kernel writes back as it evicts them; a kernel that writes leaves about as much
of its own output dirty at its end, so the two cancel, but a read-only kernel (the
statistics, the relu and dual backward reductions) leaves nothing and is charged up to an
L2's worth of write-back it never made. ``read`` reads the buffer instead and leaves L2
clean, which credits a writer with the output it leaves unwritten in L2. ``own`` (the
default) gives each kernel its own traffic: read-only kernels timed after a read, the
others after a write (the third GPU run: a read took 7-8 µs off CUDA's bf16 statistics
kernel at layer1.256 and layer2.512, and 3-4 µs off the forward, a writer). At the target
stages each streaming kernel is also set against a *yardstick* of its own traffic's size
(``yardstick_us``), after the same flush: a PyTorch sum into float32 of as many bytes for a
read-only kernel, a PyTorch copy moving as many for the others (``pct_yardstick``: "97% of
a same-size read"). Below L2's size a plain copy falls well short of the 1 GiB figure (the
third run: 67% at 26 MB): the yardstick says how much of a kernel's shortfall any kernel of
that size pays. Each role's time is its median over the profiled calls; a streaming kernel
after the op's first re-reads what that one read, so where the activation is smaller than
L2 it is marked ``warm``, and the summary's per-kernel verdict does not judge it.

Backends: every one available on the device but ``reference`` (the tests' oracle, not a
contender; name it in ``--backends`` to time it). ``--budget-s`` bounds the whole run.
Prints every row, then a summary per op (last), and writes JSON plus the tables to the
results directory (``--out``, else ``$RESNET_FUSED_RESULTS``, else results/local), again
after every shape, so a run cut short still leaves what it measured. The JSON's
environment records the configuration Triton's autotuner chose per kernel and key
(``triton_configs``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `resnet_fused` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import resnet_fused  # noqa: E402
from benchmarks import common, metrics  # noqa: E402
from resnet_fused import backends  # noqa: E402

EPS = 1e-5
MOMENTUM = 0.1

# ResNet-50 stages: spatial size and the two channel counts of their activations (the
# block's output width and its bottleneck width).
STAGES = {"layer1": (56, (256, 64)), "layer2": (28, (512, 128)), "layer3": (14, (1024, 256)), "layer4": (7, (2048, 512))}
# Where the L1 target (every kernel >= 85% of copy bandwidth) applies: its stages, their
# shapes as rows name them (layer1.256, ...), and the summary's name for them (L1-2).
TARGET_STAGES = ("layer1", "layer2")
TARGET_SHAPES = tuple(f"{stage}.{channels}" for stage in TARGET_STAGES for channels in STAGES[stage][1])
TARGET_COLUMN = "L" + "-".join(stage.removeprefix("layer") for stage in TARGET_STAGES)
TARGET_PCT_COPY = 85.0
TARGET_BATCH, TARGET_LAYOUT = 128, "channels_last"  # the rows a verdict is judged on
DEFAULT_BATCH = {"cuda": 128, "cpu": 8}
DEFAULT_BUDGET_MS = {"cuda": 40.0, "cpu": 100.0}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
LAYOUTS = {"channels_last": torch.channels_last, "nhwc": torch.channels_last, "nchw": torch.contiguous_format,
           "contiguous": torch.contiguous_format}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    channels: int
    size: int  # H = W


def parse_shapes(spec: Optional[str]) -> list[Shape]:
    """`layer1` (both of its shapes), `layer1.64`, or `CxS` (C channels, S x S)."""
    if not spec:
        spec = ",".join(STAGES)
    shapes = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        stage, _, channels = item.partition(".")
        if stage in STAGES:
            size, widths = STAGES[stage]
            chosen = widths if not channels else (int(channels),)
            shapes += [Shape(f"{stage}.{c}", c, size) for c in chosen]
        elif "x" in item:
            c, s = item.split("x")
            shapes.append(Shape(f"{c}x{s}", int(c), int(s)))
        else:
            raise SystemExit(f"unknown shape {item!r}: expected layer1..layer4, layerN.C or CxS")
    return shapes


# ---------------------------------------------------------------- the ops


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    passes: int  # activation-sized reads + writes, each input once and each output once
    kernel_passes: int  # what the fused kernels move by design


OPS = {
    op.name: op
    for op in (
        Op("batch_stats", 1, 1),
        Op("bn_relu", 2, 2),
        Op("bn_add_relu", 3, 3),
        Op("dual_bn_add_relu", 3, 3),
        Op("bn_relu_backward", 3, 5),  # reads grad_out, x twice; writes grad_x
        Op("bn_add_relu_backward", 5, 7),  # + residual; grad_residual written by the reduction, read back
        Op("dual_bn_add_relu_backward", 5, 8),  # + x_d read twice, grad_x_d written
        Op("train_bn_relu", 2, 3),  # x read for statistics, then to normalize
        Op("train_bn_add_relu", 3, 4),
        Op("train_dual_bn_add_relu", 3, 5),  # both inputs read for statistics
    )
}


class Tensors:
    """Inputs of every op at one shape: activations, parameters, statistics."""

    def __init__(self, n: int, shape: Shape, dtype: torch.dtype, layout: torch.memory_format, device: torch.device):
        def activation():
            return torch.randn(n, shape.channels, shape.size, shape.size, device=device, dtype=dtype).contiguous(
                memory_format=layout
            )

        def per_channel(offset=0.0, spread=1.0):
            return torch.rand(shape.channels, device=device) * spread + offset

        c = shape.channels
        self.x, self.other, self.grad = activation(), activation(), activation()
        self.w, self.b, self.w_d, self.b_d = per_channel(0.5), per_channel(-0.5), per_channel(0.5), per_channel(-0.5)
        self.rm, self.rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        self.rm_d, self.rv_d = torch.zeros(c, device=device), torch.ones(c, device=device)
        ref = torch.ops.resnet_fused_reference
        self.mean, self.invstd = ref.batch_stats(self.x, None, None, MOMENTUM, EPS)
        self.mean_d, self.invstd_d = ref.batch_stats(self.other, None, None, MOMENTUM, EPS)
        # eval-mode F.batch_norm normalizes with (var + eps)^-1/2: the var that gives invstd
        self.var, self.var_d = self.invstd.pow(-2) - EPS, self.invstd_d.pow(-2) - EPS

    @property
    def numel(self) -> int:
        return self.x.numel()

    def as_float32(self) -> "Tensors":
        """The same values with float32 activations (per-channel tensors shared)."""
        upcast = copy.copy(self)
        upcast.x, upcast.other, upcast.grad = self.x.float(), self.other.float(), self.grad.float()
        return upcast


def fused_callable(op: str, ns, t: Tensors) -> Callable[[], object]:
    """The op on one backend's namespace of ops (torch.ops.<namespace>)."""
    main = (t.w, t.b, t.mean, t.invstd)
    down = (t.w_d, t.b_d, t.mean_d, t.invstd_d)
    calls = {
        "batch_stats": lambda: ns.batch_stats(t.x, t.rm, t.rv, MOMENTUM, EPS),
        "bn_relu": lambda: ns.bn_relu(t.x, *main, True),
        "bn_add_relu": lambda: ns.bn_add_relu(t.x, t.other, *main, True),
        "dual_bn_add_relu": lambda: ns.dual_bn_add_relu(t.x, *main, t.other, *down, True),
        "bn_relu_backward": lambda: ns.bn_relu_backward(t.grad, t.x, *main, True),
        "bn_add_relu_backward": lambda: ns.bn_add_relu_backward(t.grad, t.x, t.other, *main, True),
        "dual_bn_add_relu_backward": lambda: ns.dual_bn_add_relu_backward(t.grad, t.x, *main, t.other, *down, True),
    }
    if op in calls:
        return calls[op]

    def train():
        mean, invstd = ns.batch_stats(t.x, t.rm, t.rv, MOMENTUM, EPS)
        if op == "train_bn_relu":
            return ns.bn_relu(t.x, t.w, t.b, mean, invstd, True)
        if op == "train_bn_add_relu":
            return ns.bn_add_relu(t.x, t.other, t.w, t.b, mean, invstd, True)
        mean_d, invstd_d = ns.batch_stats(t.other, t.rm_d, t.rv_d, MOMENTUM, EPS)
        return ns.dual_bn_add_relu(t.x, t.w, t.b, mean, invstd, t.other, t.w_d, t.b_d, mean_d, invstd_d, True)

    return train


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _add_bandwidths(row: dict, copy_gbs: float, size_copy_gbs: Optional[float]) -> None:
    """A timed row's GB/s, by the issue's bytes and by the kernels' own traffic, and their
    shares of the 1 GiB copy and (when it was measured) of the same-size copy."""
    ms = row["median_ms"]
    row["gbs"] = row["bytes"] / ms / 1e6
    row["pct_copy"] = 100 * row["gbs"] / copy_gbs
    if row["kernel_bytes"] is None:  # eager: not the fused kernels' traffic
        row["kernel_gbs"] = row["kernel_pct_copy"] = row["pct_size_copy"] = None
        return
    row["kernel_gbs"] = row["kernel_bytes"] / ms / 1e6
    row["kernel_pct_copy"] = 100 * row["kernel_gbs"] / copy_gbs
    row["pct_size_copy"] = None if size_copy_gbs is None else 100 * row["kernel_gbs"] / size_copy_gbs


def _copy_callable(x: torch.Tensor) -> Callable[[], object]:
    """A device copy of ``x`` into a tensor of its own: the op-sized yardstick."""
    out = torch.empty_like(x)
    return lambda: out.copy_(x)


def eager_callable(op: str, t: Tensors) -> Callable[[], object]:
    """The eager PyTorch composite the op replaces."""

    def eval_bn(x, mean, var, w, b):
        return F.batch_norm(x, mean, var, w, b, False, 0.0, EPS)

    def train_bn(x, rm, rv, w, b):
        return F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)

    if op == "batch_stats":
        if t.x.is_cuda:
            return lambda: torch.batch_norm_stats(t.x, EPS)

        def var_mean():
            var, mean = torch.var_mean(t.x, dim=(0, 2, 3), correction=0)
            return mean, torch.rsqrt(var + EPS)

        return var_mean
    if op == "bn_relu":
        return lambda: F.relu(eval_bn(t.x, t.mean, t.var, t.w, t.b))
    if op == "bn_add_relu":
        return lambda: F.relu(eval_bn(t.x, t.mean, t.var, t.w, t.b) + t.other)
    if op == "dual_bn_add_relu":
        return lambda: F.relu(eval_bn(t.x, t.mean, t.var, t.w, t.b) + eval_bn(t.other, t.mean_d, t.var_d, t.w_d, t.b_d))
    if op == "train_bn_relu":
        return lambda: F.relu(train_bn(t.x, t.rm, t.rv, t.w, t.b))
    if op == "train_bn_add_relu":
        return lambda: F.relu(train_bn(t.x, t.rm, t.rv, t.w, t.b) + t.other)
    if op == "train_dual_bn_add_relu":
        return lambda: F.relu(train_bn(t.x, t.rm, t.rv, t.w, t.b) + train_bn(t.other, t.rm_d, t.rv_d, t.w_d, t.b_d))

    # backward ops: autograd through the training composite. The forward graph is built
    # once, on the first call, and retained: built on the stream that calls first (the
    # CUDA-graph capture stream, see _graph), so its backward can be captured there.
    forward_graph = {}  # "out", "wrt": built by the first call

    def forward():
        x, w, b = (v.detach().requires_grad_() for v in (t.x, t.w, t.b))
        y = F.batch_norm(x, None, None, w, b, True, MOMENTUM, EPS)
        wrt = [x, w, b]
        if op == "bn_add_relu_backward":
            other = t.other.detach().requires_grad_()
            y, wrt = y + other, wrt + [other]
        elif op == "dual_bn_add_relu_backward":
            other, w_d, b_d = (v.detach().requires_grad_() for v in (t.other, t.w_d, t.b_d))
            y = y + F.batch_norm(other, None, None, w_d, b_d, True, MOMENTUM, EPS)
            wrt += [other, w_d, b_d]
        return F.relu(y), wrt

    def backward():
        if not forward_graph:
            forward_graph["out"], forward_graph["wrt"] = forward()
        return torch.autograd.grad(forward_graph["out"], forward_graph["wrt"], t.grad, retain_graph=True)

    return backward


# Each backend's kernels, as the profiler names them, by their role in an op.
KERNEL_ROLES = {
    "cuda": {  # csrc/cuda/bn_act_kernels.cu; the names carry the resnet_fused namespace
        "batch_stats_finalize_kernel": "statistics finalize",
        "bn_act_backward_finalize_kernel": "backward finalize",
        "batch_stats_kernel": "statistics",
        "bn_act_backward_reduce_kernel": "backward reduce",
        "bn_act_backward_elementwise_kernel": "backward elementwise",
        "bn_act_forward_kernel": "forward",
    },
    "triton": {  # resnet_fused/triton; the names are the @triton.jit functions'
        "_batch_stats_finalize_kernel": "statistics finalize",
        "_bn_act_backward_finalize_kernel": "backward finalize",
        "_batch_stats_partials_kernel": "statistics",
        "_bn_act_backward_reduce_kernel": "backward reduce",
        "_bn_act_backward_elementwise_kernel": "backward elementwise",
        "_bn_act_forward_kernel": "forward",
    },
}
# The activation-sized passes each streaming role makes per call (the finalize kernels
# move only per-channel vectors): the same design in both backends.
ROLE_PASSES = {
    "batch_stats": {"statistics": 1},
    "bn_relu": {"forward": 2},
    "bn_add_relu": {"forward": 3},
    "dual_bn_add_relu": {"forward": 3},
    "bn_relu_backward": {"backward reduce": 2, "backward elementwise": 3},
    "bn_add_relu_backward": {"backward reduce": 4, "backward elementwise": 3},
    "dual_bn_add_relu_backward": {"backward reduce": 3, "backward elementwise": 5},
    "train_bn_relu": {"statistics": 1, "forward": 2},
    "train_bn_add_relu": {"statistics": 1, "forward": 3},
    "train_dual_bn_add_relu": {"statistics": 2, "forward": 3},  # statistics of both inputs
}


def kernel_role(backend: str, name: str) -> Optional[str]:
    """The role of the profiler's kernel ``name`` if it is one of ``backend``'s kernels."""
    roles = KERNEL_ROLES.get(backend, {})
    if backend == "triton":
        return roles.get(name)
    if "resnet_fused" not in name:
        return None
    return next((role for kernel, role in roles.items() if kernel in name), None)


# How kernel_breakdown empties L2 before each call (module docstring: --l2-flush).
L2_FLUSHES: dict[str, Callable[[torch.Tensor], object]] = {
    "zero": lambda buffer: buffer.zero_(),  # L2 left dirty
    # L2 left clean; the int8 buffer summed as int64: int8's sum would first write an int64 copy
    "read": lambda buffer: buffer.view(torch.int64).sum(),
}
L2_FLUSH_MODES = ("own", *L2_FLUSHES)
# The streaming roles that write no activation, only per-channel partials (bn_add_relu's
# backward reduction also writes grad_residual).
READ_ONLY_ROLES = {
    "batch_stats": {"statistics"},
    "train_bn_relu": {"statistics"},
    "train_bn_add_relu": {"statistics"},
    "train_dual_bn_add_relu": {"statistics"},
    "bn_relu_backward": {"backward reduce"},
    "dual_bn_add_relu_backward": {"backward reduce"},
}


def l2_flush_for(op: str, role: str, mode: str) -> str:
    """The flush a kernel of ``role`` in ``op`` is timed after under ``mode``: under "own", a
    read before a read-only kernel, and before a finalize kernel of an op that only reads."""
    if mode != "own":
        return mode
    read_only = READ_ONLY_ROLES.get(op, set())
    if role in read_only or (role not in ROLE_PASSES[op] and read_only >= ROLE_PASSES[op].keys()):
        return "read"
    return "zero"


def per_call_median(times: list[float], calls: int) -> float:
    """The median over ``calls`` of a role's time per call, from its kernels' ``times`` in
    launch order (as many per call); their mean per call where they do not divide evenly."""
    if not times or len(times) % calls:
        return sum(times) / calls
    per_call = len(times) // calls
    return statistics.median(sum(times[i:i + per_call]) for i in range(0, len(times), per_call))


def _device_us(role_of: Callable[[str], Optional[str]], fn: Callable[[], object], flush: str,
               iterations: int) -> dict[str, float]:
    """Device time per call (the median of ``iterations``) of the CUDA kernels fn launches,
    summed by ``role_of(name)`` (None: not counted), by the torch profiler, L2 emptied the
    ``flush`` way before every call."""
    from torch.profiler import ProfilerActivity, profile

    buffer = torch.zeros(256 << 20, dtype=torch.int8, device="cuda")
    empty_l2 = L2_FLUSHES[flush]
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            empty_l2(buffer)
            fn()
        torch.cuda.synchronize()
    times = metrics.own_device_times(metrics.device_events(prof), role_of)
    return {role: per_call_median(role_times, iterations) for role, role_times in times.items()}


def _profiled_us(backend: str, fn: Callable[[], object], flush: str, iterations: int) -> dict[str, float]:
    """Device time per call of each of ``backend``'s kernels that fn launches, by role."""
    return _device_us(lambda name: kernel_role(backend, name), fn, flush, iterations)


@functools.lru_cache(maxsize=None)
def _flush_kernel_names(flush: str) -> frozenset[str]:
    """The kernels an L2 flush launches, as the profiler names them."""
    names: set[str] = set()
    _device_us(lambda name: names.add(name), lambda: None, flush, 1)
    return frozenset(names)


def yardstick_us(x: torch.Tensor, kind: str, passes: int, flush: str, iterations: int = 20) -> float:
    """Device time per call of a plain PyTorch kernel that moves ``passes`` activation-sized
    passes of ``x``'s size and dtype the way a fused kernel of ``kind`` does, after the same
    L2 flush: ``read``, a sum into float32 (it only reads); ``copy``, a copy of passes / 2
    activations (half read, half written). What any kernel pays at that size."""
    flush_names = _flush_kernel_names(flush)
    if kind == "read":
        source = torch.randn(passes * x.numel(), device=x.device, dtype=x.dtype)

        def fn():
            return torch.sum(source, dtype=torch.float32)
    elif kind == "copy":
        fn = _copy_callable(torch.randn(passes * x.numel() // 2, device=x.device, dtype=x.dtype))
    else:
        raise ValueError(f"yardstick kind {kind!r}: expected 'read' or 'copy'")

    def role_of(name: str) -> Optional[str]:  # a sum's zeroed semaphore is not part of the stream
        return None if name in flush_names or name.startswith("Memset") else "yardstick"

    times = _device_us(role_of, fn, flush, iterations)
    if "yardstick" not in times:  # none in the profile, or named as the flush's: not told apart
        raise RuntimeError(f"the {kind} yardstick launches only kernels the {flush} flush launches too")
    return times["yardstick"]


class Yardsticks:
    """The yardsticks of one activation, each measured once: (kind, passes, flush) -> µs."""

    def __init__(self, x: torch.Tensor):
        self.x, self.us = x, {}

    def __call__(self, kind: str, passes: int, flush: str) -> float:
        if (kind, passes, flush) not in self.us:
            self.us[kind, passes, flush] = yardstick_us(self.x, kind, passes, flush)
        return self.us[kind, passes, flush]


def warm_in_l2(op: str, role: str, activation_bytes: int, l2_bytes: Optional[int]) -> bool:
    """Whether a kernel of ``role`` re-reads, from an L2 of ``l2_bytes``, activations the op's
    streaming kernel before it has just read: any streaming kernel but an op's first, at an
    activation smaller than L2 (the L2 flush precedes the op's first kernel only)."""
    return l2_bytes is not None and activation_bytes < l2_bytes and role in list(ROLE_PASSES[op])[1:]


def kernel_breakdown(op: str, backend: str, fn: Callable[[], object], activation_bytes: int, copy_gbs: float,
                     iterations: int = 20, l2_flush: str = "own",
                     yardstick: Optional[Callable[[str, int, str], float]] = None,
                     l2_bytes: Optional[int] = None) -> dict:
    """Device time per call of each of ``backend``'s kernels that fn launches, by role, each
    timed after the L2 flush ``l2_flush_for`` gives it, and each streaming kernel's share of
    copy bandwidth, marked ``warm`` where ``warm_in_l2`` (an L2 of ``l2_bytes``); with
    ``yardstick`` (kind, passes, flush -> µs, as ``yardstick_us``), also its bandwidth
    against the same-size read (read-only kernels) or copy (the others)."""
    flushes = {l2_flush_for(op, role, l2_flush) for role in ROLE_PASSES[op]}
    by_flush = {flush: _profiled_us(backend, fn, flush, iterations) for flush in sorted(flushes)}
    kernels = {}
    for role in dict.fromkeys(role for times in by_flush.values() for role in times):  # in launch order
        flush = l2_flush_for(op, role, l2_flush)
        if role not in by_flush[flush]:
            continue
        entry = {"us": by_flush[flush][role], "l2_flush": flush}
        passes = ROLE_PASSES[op].get(role)
        if passes:
            entry["pct_copy"] = 100 * passes * activation_bytes / (entry["us"] * 1e3) / copy_gbs
            if warm_in_l2(op, role, activation_bytes, l2_bytes):
                entry["warm"] = True
            if yardstick is not None:
                kind = "read" if role in READ_ONLY_ROLES.get(op, ()) else "copy"
                try:
                    entry["yardstick_us"] = yardstick(kind, passes, flush)
                except Exception as error:  # a diagnostic: the kernel's own time stands
                    entry["yardstick_error"] = _error_text(error)
                else:
                    entry["yardstick"] = kind
                    entry["pct_yardstick"] = 100 * entry["yardstick_us"] / entry["us"]
        kernels[role] = entry
    return kernels


# Where a fused op's outputs sit among its eager composite's (autograd returns gradients
# in the order of its inputs: x, weight, bias, then the residual).
EAGER_OUTPUT_ORDER = {"bn_add_relu_backward": (0, 3, 1, 2)}
# A row fails when a fused result is further than this from eager on float32 inputs
# (||fused - eager|| / ||eager||, the worst output), where a wrong kernel lands near 1. A
# correct one differs by its rounding to the dtype and, in the input gradients, by the
# elements whose pre-activation is within rounding of 0, where eager's ReLU mask and the
# kernels' may differ (a norm-wise error of about the square root of their share). The
# second GPU run's worst: 1.7e-3 in bfloat16, 3.6e-4 in float32 (input gradients): the
# bounds leave ten times that.
ACCURACY_BOUND = {torch.float32: 4e-3, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _outputs(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def relative_error(op: str, actual, expected) -> float:
    """The largest relative error over the op's outputs."""
    actual, expected = _outputs(actual), _outputs(expected)
    order = EAGER_OUTPUT_ORDER.get(op, range(len(actual)))
    if len(actual) != len(expected) or len(order) != len(actual):
        raise ValueError(f"{op}: {len(actual)} outputs against eager's {len(expected)}")
    errors = []
    for a, i in zip(actual, order):
        a, e = a.float(), expected[i].float()
        errors.append(float(torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e).clamp_min(1e-30)))
    return max(errors)


# ---------------------------------------------------------------- timing


def timed(fn: Callable[[], object], device: torch.device, budget_ms: float) -> tuple[dict, str]:
    """Median time of fn; on CUDA of its CUDA-graph replays (plain launches if capture fails)."""
    if device.type != "cuda":
        return common.measure(fn, device, budget_ms=budget_ms), "wall clock"
    try:
        graph = common.cuda_graph(fn)
    except RuntimeError as error:
        torch.cuda.synchronize(device)
        print(f"  (CUDA graph capture failed, timing plain launches: {str(error).splitlines()[0]})")
        return common.measure(fn, device, budget_ms=budget_ms), "launches"
    try:
        return common.measure(graph.replay, device, budget_ms=budget_ms), "cuda graph"
    finally:
        del graph


# ---------------------------------------------------------------- the benchmark


def default_backends(device: torch.device) -> list[str]:
    return [name for name in resnet_fused.available_backends(device) if name != "reference"]


def _copy_row(t: Tensors, case: dict, dev: torch.device, budget_ms: float,
              copy_gbs: float) -> tuple[dict, Optional[float]]:
    """The row of a copy of ``t``'s activation, and the bandwidth it reached (None where it
    failed): what a plain copy reaches at that size (the fused rows' ``pct_size_copy``)."""
    copy_bytes = 2 * t.numel * t.x.element_size()
    row = dict(op="copy", **case, bytes=copy_bytes, kernel_bytes=copy_bytes, copy_gbs=copy_gbs, backend="torch")
    try:
        times, timing = timed(_copy_callable(t.x), dev, budget_ms)
    except Exception as error:
        row["error"] = _error_text(error)
        return row, None
    row.update(times, timing=timing)
    size_copy_gbs = copy_bytes / times["median_ms"] / 1e6
    _add_bandwidths(row, copy_gbs, size_copy_gbs)
    return row, size_copy_gbs


def _op_rows(op_name: str, t: Tensors, t32: Tensors, case: dict, names: list[str], dev: torch.device,
             budget_ms: float, copy_gbs: float, size_copy_gbs: Optional[float],
             kernels_of: Callable[[str, str, Callable[[], object]], Optional[dict]]) -> list[dict]:
    """The rows of one op at one (shape, dtype): eager's, then each backend's that runs the
    dtype there. A fused row further than ACCURACY_BOUND from eager (on float32 copies of
    the inputs) fails, untimed; ``kernels_of`` gives a fused row's kernel breakdown."""
    op, dtype, element = OPS[op_name], t.x.dtype, t.x.element_size()
    base = dict(op=op_name, **case, bytes=op.passes * t.numel * element,
                kernel_bytes=op.kernel_passes * t.numel * element, copy_gbs=copy_gbs)
    expected = eager_callable(op_name, t32)()
    variants = [("eager", eager_callable(op_name, t))]
    variants += [(name, fused_callable(op_name, backends.get(name).ops, t))
                 for name in names if backends.get(name).supports(dev, dtype)]
    rows, eager_ms = [], None
    for name, fn in variants:
        row = dict(base, backend=name)
        if name == "eager":
            row["kernel_bytes"] = None  # kernel_bytes is the fused kernels' traffic
        try:
            if name != "eager":
                row["rel_err"] = relative_error(op_name, fn(), expected)
                if not row["rel_err"] <= ACCURACY_BOUND[dtype]:
                    raise ArithmeticError(f"relative error {row['rel_err']:.1e} against eager, above "
                                          f"{ACCURACY_BOUND[dtype]:.0e} for {row['dtype']}")
            times, timing = timed(fn, dev, budget_ms)
        except Exception as error:  # one failing op must not stop the others
            row["error"] = _error_text(error)
            rows.append(row)
            print(f"  {op_name} {row['shape']} {row['dtype']} {name}: FAILED {row['error']}")
            continue
        ms = times["median_ms"]
        eager_ms = ms if name == "eager" else eager_ms
        row.update(times, timing=timing)
        _add_bandwidths(row, copy_gbs, size_copy_gbs)
        row["speedup_vs_eager"] = None if name == "eager" or eager_ms is None else eager_ms / ms
        kernels = kernels_of(op_name, name, fn)
        if kernels is not None:
            row["kernels"] = kernels
        rows.append(row)
    return rows


def run(
    device: str = "cuda",
    dtypes: Iterable[str] = ("bf16", "fp32"),
    shapes: Optional[str] = None,
    ops: Optional[Iterable[str]] = None,
    backend_names: Optional[Iterable[str]] = None,
    batch: Optional[int] = None,
    layout: str = "channels_last",
    budget_ms: Optional[float] = None,
    copy_gbs: Optional[float] = None,
    budget_s: Optional[float] = None,
    on_progress: Optional[Callable[[list[dict]], None]] = None,
    l2_flush: str = "own",
) -> list[dict]:
    """Benchmarks every (op, shape, dtype) on each backend and eagerly; one dict per row.

    ``budget_ms`` is the timing budget of one measurement; ``budget_s``, if given, bounds
    the whole run instead: half of it is spread over the measurements (the other half
    covers setup, warm-up, autotuning and the error checks), 5 to 40 ms each, and it is a
    deadline: (shape, dtype, op) cases it leaves no time for are skipped (shapes run in
    order, layer1 first), and the profiler breakdowns are dropped while the run is behind
    schedule. ``on_progress`` gets the rows so far after each (shape, dtype).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available (use --device cpu)")
    op_names = list(ops or OPS)
    unknown = [o for o in op_names if o not in OPS]
    if unknown:
        raise SystemExit(f"unknown ops {unknown}; expected some of {', '.join(OPS)}")
    names = list(backend_names or default_backends(dev))
    for name in names:
        backends.get(name)  # validates the name
    batch = batch or DEFAULT_BATCH[dev.type]
    dtypes = list(dtypes)
    shape_list = parse_shapes(shapes)
    cases = len(shape_list) * len(dtypes) * len(op_names)
    if budget_s is not None:
        measurements = cases * (1 + len(names)) + len(shape_list) * len(dtypes)  # + the same-size copies
        budget_ms = min(max(5.0, 0.5 * budget_s * 1e3 / measurements), DEFAULT_BUDGET_MS[dev.type])
    budget_ms = budget_ms or DEFAULT_BUDGET_MS[dev.type]
    memory_format = LAYOUTS[layout]
    l2_bytes = torch.cuda.get_device_properties(dev).L2_cache_size if dev.type == "cuda" else None
    if copy_gbs is None:
        copy_gbs = common.copy_bandwidth_gbs(dev)
        print(f"copy bandwidth on {dev}: {copy_gbs:.0f} GB/s (bytes read + written)")

    rows = []
    started = time.perf_counter()
    done = skipped = 0

    def out_of_time() -> bool:
        return budget_s is not None and time.perf_counter() - started > budget_s

    def behind_schedule() -> bool:
        return budget_s is not None and (time.perf_counter() - started) / budget_s > done / cases

    def kernels_of(op_name: str, backend: str, fn: Callable[[], object], *, shape: Shape, activation_bytes: int,
                   yardstick: Yardsticks) -> Optional[dict]:
        """A fused row's kernel breakdown: at the target stages, what the target is judged
        on, always (with the yardsticks, a few profiled calls each); elsewhere only while the
        run is on schedule."""
        target_stage = shape.name.split(".")[0] in TARGET_STAGES
        if backend not in KERNEL_ROLES or dev.type != "cuda" or not (target_stage or not behind_schedule()):
            return None
        try:
            return kernel_breakdown(op_name, backend, fn, activation_bytes, copy_gbs, l2_flush=l2_flush,
                                    yardstick=yardstick if target_stage else None, l2_bytes=l2_bytes)
        except Exception as error:  # the profiler is a diagnostic: never fail the row
            return {"error": f"{type(error).__name__}: {error}"}

    for shape in shape_list:
        for dtype_name in dtypes:
            if out_of_time():
                skipped += len(op_names)
                continue
            dtype = DTYPES[dtype_name]
            t = Tensors(batch, shape, dtype, memory_format, dev)
            t32 = t.as_float32()
            element = t.x.element_size()
            case = dict(shape=shape.name, n=batch, c=shape.channels, h=shape.size, w=shape.size,
                        dtype=str(dtype).removeprefix("torch."), layout=layout)
            copy_row, size_copy_gbs = _copy_row(t, case, dev, budget_ms, copy_gbs)
            rows.append(copy_row)
            breakdown = functools.partial(kernels_of, shape=shape, activation_bytes=t.numel * element,
                                          yardstick=Yardsticks(t.x))
            for op_name in op_names:
                if out_of_time():
                    skipped += 1
                    continue
                rows += _op_rows(op_name, t, t32, case, names, dev, budget_ms, copy_gbs, size_copy_gbs, breakdown)
                done += 1
            del t, t32, breakdown  # before empty_cache: the yardsticks hold the activation too
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if on_progress is not None:
                on_progress(rows)
    if skipped:
        print(f"budget of {budget_s:.0f} s reached: {skipped} of {cases} (shape, dtype, op) cases not measured")
    return rows


# ---------------------------------------------------------------- tables


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def _kernel_text(k: dict) -> str:
    """One kernel of a breakdown: '9.5 us (63% copy, 97% of a same-size read) after a read'."""
    shares = [f"{k['pct_copy']:.0f}% copy"] if "pct_copy" in k else []
    if "pct_yardstick" in k:
        shares.append(f"{k['pct_yardstick']:.0f}% of a same-size {k['yardstick']}")
    return (f"{k['us']:.1f} us" + (f" ({', '.join(shares)})" if shares else "")
            + (" after a read" if k.get("l2_flush") == "read" else "") + (", warm in L2" if k.get("warm") else ""))


def rows_table(rows: list[dict]) -> str:
    header = (f"{'op':<26} {'shape':<12} {'dtype':<9} {'backend':<9} {'ms':>9} {'GB/s':>7} {'%copy':>6} "
              f"{'%copy kernel':>12} {'%size copy':>10} {'x eager':>8} {'rel err':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:<26} {r['shape']:<12} {r['dtype']:<9} {r['backend']:<9} FAILED: {r['error']}")
            continue
        lines.append(
            f"{r['op']:<26} {r['shape']:<12} {r['dtype']:<9} {r['backend']:<9} {r['median_ms']:>9.4f} "
            f"{r['gbs']:>7.0f} {r['pct_copy']:>6.1f} {_fmt(r.get('kernel_pct_copy'), '>12.1f'):>12} "
            f"{_fmt(r.get('pct_size_copy'), '>10.1f'):>10} "
            f"{_fmt(r.get('speedup_vs_eager'), '>8.2f'):>8} {_fmt(r.get('rel_err'), '>8.1e'):>8}"
        )
        if r.get("kernels"):
            parts = [f"{role} {_kernel_text(k)}" for role, k in r["kernels"].items() if role != "error"]
            lines.append(f"{'':<4}kernels: {'; '.join(parts) or r['kernels'].get('error')}")
    return "\n".join(lines)


def streaming_kernel_pcts(rows: list[dict], key: str = "pct_copy") -> list[float]:
    """% of copy bandwidth (or ``key``: another share) of every streaming kernel in rows (from
    their kernel breakdowns)."""
    return [k[key] for r in rows for kind, k in (r.get("kernels") or {}).items() if kind != "error" and key in k]


def judged_rows(rows: list[dict]) -> list[dict]:
    """The rows a target verdict is judged on: measured, at a target shape, at N =
    TARGET_BATCH in TARGET_LAYOUT."""
    return [r for r in rows if "error" not in r and r["shape"] in TARGET_SHAPES
            and r["n"] == TARGET_BATCH and LAYOUTS.get(r["layout"]) == LAYOUTS[TARGET_LAYOUT]]


def target_verdict(pcts: list[float], covered: int) -> str:
    """A target for one (op, dtype, backend): every share in ``pcts`` at TARGET_PCT_COPY or
    more, and every target shape judged (``covered`` of them; else "incomplete")."""
    if not pcts:
        return "-"
    if min(pcts) < TARGET_PCT_COPY:
        return "MISS"
    return "met" if covered == len(TARGET_SHAPES) else "incomplete"


def op_target(rows: list[dict]) -> str:
    """DESIGN.md's rule for one (op, dtype, backend): the op's median at every target shape
    moves its inputs once and outputs once at TARGET_PCT_COPY or more of copy bandwidth."""
    judged = judged_rows(rows)
    return target_verdict([r["pct_copy"] for r in judged], len({r["shape"] for r in judged}))


def kernel_target(rows: list[dict]) -> str:
    """The issues' rule for one (op, dtype, backend): every streaming kernel at
    TARGET_PCT_COPY or more of copy bandwidth by its own traffic (its profiled time after an
    L2 flush), at every target shape. A kernel warm in L2 is not judged, and its shape
    stays uncovered, as does one whose profile lacks a kernel."""
    judged = judged_rows(rows)
    pcts, covered = [], set()
    for r in judged:
        kernels = r.get("kernels") or {}
        streaming = [kernels.get(role, {}) for role in ROLE_PASSES.get(r["op"], ())]
        cold = [k["pct_copy"] for k in streaming if "pct_copy" in k and not k.get("warm")]
        pcts += cold
        if streaming and len(cold) == len(streaming):
            covered.add(r["shape"])
    if not pcts:
        return "incomplete" if any(r.get("kernels") for r in judged) else "-"
    return target_verdict(pcts, len(covered))


def summary_legend(card: str, copy_gbs: float) -> str:
    stages = "/".join(TARGET_STAGES)
    return (f"summary ({card}, copy {copy_gbs:.0f} GB/s; '%copy' by inputs read once and outputs "
            f"written once; 'kernel' by the fused kernels' own traffic; 'per kernel': the slowest streaming "
            f"kernel alone (profiler); 'size copy': by own traffic against a copy of the same activation "
            f"(op copy: what a copy reaches at that size); 'vs size': the slowest streaming kernel against "
            f"a PyTorch read or copy of its own traffic's size; minima over the {stages} shapes measured, "
            f"'{TARGET_COLUMN}': how many of their {len(TARGET_SHAPES)}; the targets, judged at every {stages} "
            f"shape at N={TARGET_BATCH} in {TARGET_LAYOUT} (met, MISS or incomplete): 'op target': '%copy' >= "
            f"{TARGET_PCT_COPY:.0f}; 'kernel target': every streaming kernel ('per kernel') >= "
            f"{TARGET_PCT_COPY:.0f}% of copy, a kernel warm in L2 (re-reading what the kernel before it read) "
            f"not judged):")


_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def summary_table(rows: list[dict]) -> str:
    """Per (op, dtype, backend): the largest shape's time and bandwidth, the lowest
    % of copy bandwidth over the target stages (and how many of their shapes were
    measured), the L1 target's verdicts, the geometric-mean speedup over eager. The
    reference backend (the tests' oracle, not a contender) is left to the full table.

    Headers take two lines and columns their contents' width, so that the table (~70
    rows) fits the short output tail a remote GPU run returns."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r and r["backend"] != "reference":
            groups.setdefault((r["op"], r["dtype"], r["backend"]), []).append(r)
    # (header's first line, its second, alignment); the legend names each by both lines
    columns = [("op", "", "<"), ("dtype", "", "<"), ("backend", "", "<"), ("largest", "", "<"), ("ms", "", ">"),
               ("GB/s", "", ">"), ("%copy", "", ">"), ("min %copy", TARGET_COLUMN, ">"), (TARGET_COLUMN, "", ">"),
               ("op", "target", ">"), ("kernel", "", ">"), ("per", "kernel", ">"), ("kernel", "target", ">"),
               ("size", "copy", ">"), ("vs", "size", ">"), ("x eager", "geo", ">"), ("max", "err", ">")]
    body = []
    for (op, dtype, backend), group in groups.items():
        largest = max(group, key=lambda r: r["bytes"])
        target = [r for r in group if r["shape"] in TARGET_SHAPES]
        covered = len({r["shape"] for r in target})
        target = target or group  # no target shape measured: minima over what was
        speedups = [r["speedup_vs_eager"] for r in group if r.get("speedup_vs_eager")]
        errors = [r["rel_err"] for r in group if r.get("rel_err") is not None]
        size_copy = [r["pct_size_copy"] for r in target if r.get("pct_size_copy") is not None]
        kernel_pct = [r["kernel_pct_copy"] for r in target if r.get("kernel_pct_copy") is not None]
        body.append([
            op, _SHORT_DTYPES.get(dtype, dtype), backend, largest["shape"], f"{largest['median_ms']:.4f}",
            f"{largest['gbs']:.0f}", f"{largest['pct_copy']:.1f}", f"{min(r['pct_copy'] for r in target):.1f}",
            f"{covered}/{len(TARGET_SHAPES)}", op_target(group) if op in OPS and backend != "eager" else "-",
            _fmt(min(kernel_pct, default=None), ".1f"), _fmt(min(streaming_kernel_pcts(target), default=None), ".1f"),
            kernel_target(group), _fmt(min(size_copy, default=None), ".1f"),
            _fmt(min(streaming_kernel_pcts(target, "pct_yardstick"), default=None), ".1f"),
            _fmt(math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else None, ".2f"),
            _fmt(max(errors) if errors else None, ".1e"),
        ])
    widths = [max(len(top), len(bottom), *(len(cells[i]) for cells in body))
              for i, (top, bottom, _) in enumerate(columns)]

    def line(cells):
        return " ".join(format(cell, f"{align}{width}")
                        for cell, width, (_, _, align) in zip(cells, widths, columns)).rstrip()

    lines = [line([top for top, _, _ in columns]), line([bottom for _, bottom, _ in columns]),
             "-" * (sum(widths) + len(widths) - 1)]
    lines += [line(cells) for cells in body]
    failed = sum("error" in r for r in rows)
    if failed:
        lines.append(f"{failed} measurements FAILED (see the rows above)")
    return "\n".join(lines)


def triton_configs() -> dict:
    """The configurations Triton's autotuner chose in this process, per kernel and key
    (empty when the Triton backend did not run)."""
    runtime = sys.modules.get("resnet_fused.triton._runtime")
    return runtime.tuned_configs() if runtime is not None else {}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--shapes", help="comma-separated: layer1..layer4, layerN.C or CxS (default: all stages)")
    parser.add_argument("--ops", help=f"comma-separated subset of: {', '.join(OPS)}")
    parser.add_argument("--backends", help="comma-separated backends (default: all available on the device)")
    parser.add_argument("--batch", type=int, help="N (default: 128 on CUDA, 8 on the CPU)")
    parser.add_argument("--layout", default="channels_last", choices=sorted(LAYOUTS))
    parser.add_argument("--budget-ms", type=float, help="timing budget per measurement (default: 40 CUDA, 100 CPU)")
    parser.add_argument("--budget-s", type=float, help="bound on the whole run, in seconds (sets --budget-ms)")
    parser.add_argument("--out", help=f"results directory (default: ${common.RESULTS_ENV} or results/local)")
    parser.add_argument("--l2-flush", default="own", choices=L2_FLUSH_MODES,
                        help="how the kernel breakdown empties L2 before each call (default: own, a read before "
                             "read-only kernels and a write before the others)")
    args = parser.parse_args(argv)

    def split(value):
        return [v.strip() for v in value.split(",") if v.strip()] if value else None

    dtypes = split(args.dtype)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        parser.error(f"unknown dtype {bad}; expected some of bf16, fp16, fp32")
    device = torch.device(args.device)
    env = common.environment(device)
    print(f"{env['card']} | torch {env['torch']} | triton {env['triton']} | {env['git_commit']} | {env['timestamp']}")
    out = common.results_dir(args.out)
    stem = f"kernels_{device.type}_{LAYOUTS[args.layout] == torch.channels_last and 'nhwc' or 'nchw'}"

    env["copy_gbs"] = common.copy_bandwidth_gbs(device)
    env["l2_flush"] = args.l2_flush  # of the kernel breakdowns
    print(f"copy bandwidth on {device}: {env['copy_gbs']:.0f} GB/s (bytes read + written)", flush=True)

    def write(rows):
        env["triton_configs"] = triton_configs()
        common.write_json(out / f"{stem}.json", env, rows)
        header = {k: v for k, v in env.items() if k != "triton_configs"}  # the JSON has them
        (out / f"{stem}.txt").write_text(f"{header}\n\n{rows_table(rows)}\n\n"
                                         f"{summary_legend(env['card'], env['copy_gbs'])}\n{summary_table(rows)}\n")

    rows = run(args.device, dtypes, args.shapes, split(args.ops), split(args.backends), args.batch, args.layout,
               args.budget_ms, env["copy_gbs"], budget_s=args.budget_s, on_progress=write, l2_flush=args.l2_flush)
    write(rows)
    table, summary = rows_table(rows), summary_table(rows)
    print(f"\n{table}\n\nwritten: {out / (stem + '.json')}, {out / (stem + '.txt')}\n")
    print(summary_legend(env["card"], env["copy_gbs"]))
    print(summary)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
