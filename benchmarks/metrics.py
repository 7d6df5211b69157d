"""Metrics beyond time: FLOPs, memory saved for backward, peak memory, where time goes.

The profiler breakdown sorts every GPU kernel (CPU: every operator's self time) into
conv / bn / eltwise / other by its name; :data:`KERNEL_CLASSES` are the rules, first
match wins, and docs/performance.md explains them.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from . import common

CATEGORIES = ("conv", "bn", "eltwise", "other")


def _words(*words: str) -> str:
    """Matches any of ``words`` not inside a longer identifier ("add" but not "padding")."""
    return r"(?<![a-z0-9])(?:" + "|".join(words) + r")(?![a-z0-9])"


# Matched against the lower-cased kernel or operator name, in order.
KERNEL_CLASSES = (
    # BatchNorm, and every fused kernel that contains it (resnet_fused's, inductor's).
    ("bn", re.compile(r"batch_?norm|welford|batch_stats|" + _words("bn"))),
    # Other inductor-generated kernels are its fused pointwise / reduction tails, even
    # when named after a convolution whose layout they prepare.
    ("eltwise", re.compile(r"^triton_(?:poi|per|red)_")),
    # Convolutions and matrix products (cuDNN, CUTLASS, cuBLAS, oneDNN, inductor
    # templates), with the layout transposes cuDNN runs inside a convolution call.
    ("conv", re.compile(r"conv|xmma|cutlass|gemm|wgrad|dgrad|fprop|cudnn|mkldnn|onednn|nchwtonhwc|nhwctonchw|"
                        + _words("mm", "addmm", "matmul"))),
    ("eltwise", re.compile(r"elementwise|" + _words("relu", "relu_", "threshold", "threshold_backward", "add",
                                                    "add_", "mul", "mul_", "clamp", "clamp_min", "copy", "copy_",
                                                    "to_copy", "fill", "fill_", "where"))),
)


def classify(name: str) -> str:
    """conv, bn, eltwise or other, for a kernel or operator name."""
    lowered = name.lower()
    for category, pattern in KERNEL_CLASSES:
        if pattern.search(lowered):
            return category
    return "other"


# Kernel names are kept this long in results (C++ template arguments make them longer).
KERNEL_NAME_CHARS = 160


DeviceEvent = tuple[object, str, float, float]  # stream, name, start and end (µs)


def device_events(prof) -> list[DeviceEvent]:
    """The kernels, copies and fills a torch profiler saw on the GPU (not the annotations of
    record_function ranges), with their streams."""
    from torch.autograd import DeviceType

    return [(getattr(e, "device_resource_id", None), e.name, e.time_range.start, e.time_range.end)
            for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]


def own_device_times(events: Iterable[DeviceEvent],
                     role_of: Callable[[str], Optional[str]]) -> dict[str, list[float]]:
    """Device time (µs) of each of ``events`` by ``role_of(name)`` (None: not counted), in
    the order they started, each from the end of the one before it on its stream where it
    started earlier: a programmatic dependent launch (sm_90) is resident before its
    predecessor ends and waits for it, and that wait is the predecessor's time, not its own."""
    times: dict[str, list[float]] = {}
    previous_end: dict[object, float] = {}
    for stream, name, start, end in sorted(events, key=lambda event: event[2]):
        role = role_of(name)
        if role:
            times.setdefault(role, []).append(max(0.0, end - max(start, previous_end.get(stream, start))))
        previous_end[stream] = max(previous_end.get(stream, end), end)
    return times


def own_device_us(events: Iterable[DeviceEvent], role_of: Callable[[str], Optional[str]]) -> dict[str, float]:
    """Device time (µs) of ``events``, summed by ``role_of(name)`` (:func:`own_device_times`)."""
    return {role: sum(times) for role, times in own_device_times(events, role_of).items()}


def breakdown(step: Callable[[], object], device: torch.device, iters: int) -> dict:
    """Per-step device time by category from the profiler: ``<category>_pct``,
    ``profiled_ms`` (their sum) and ``profiled_kernels``: every kernel or operator with its ms per
    step, largest first, from which a report applies the classification again.

    CUDA: kernel (and memcpy/memset) time, each kernel's own (:func:`own_device_us`). CPU:
    the self time of every operator.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    if not cuda:
        common.quiet_cpu_profiler()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
        common.sync(device)
    if cuda:
        us_by_name = own_device_us(device_events(prof), lambda name: name[:KERNEL_NAME_CHARS])
    else:
        us_by_name = Counter()
        for event in prof.key_averages():
            us_by_name[event.key[:KERNEL_NAME_CHARS]] += event.self_cpu_time_total
    per_name = Counter({name: us / iters / 1e3 for name, us in us_by_name.items() if us > 0})
    kernels = [[name, round(ms, 4)] for name, ms in per_name.most_common()]
    out = category_shares(kernels)
    if out:
        out["profiled_kernels"] = kernels
    return out


def category_shares(kernels: Iterable[tuple[str, float]]) -> dict:
    """``<category>_pct`` and ``profiled_ms`` from (name, ms) pairs, by :func:`classify`;
    empty when there is no time. A rendering of stored ``profiled_kernels`` applies today's rules."""
    per_category: Counter[str] = Counter()
    for name, ms in kernels:
        per_category[classify(name)] += ms
    total = sum(per_category.values())
    if total == 0:
        return {}
    out = {f"{c}_pct": 100 * per_category[c] / total for c in CATEGORIES}
    out["profiled_ms"] = total
    return out


def counted_flops(step: Callable[[], object]) -> tuple[int, object]:
    """FLOPs of one call of ``step`` (convolutions and matrix products, forward and
    backward), and what the call returned."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = step()
    return counter.get_total_flops(), result


def saved_for_backward_bytes(forward: Callable[[], Tensor], exclude: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages autograd saves during ``forward``.

    Counts through ``saved_tensors_hooks``: every tensor saved for backward, by
    whichever op or compiled graph saves it, once per storage (views share one).
    Storages of ``exclude`` (the parameters, which exist anyway) are not counted.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out  # frees the graph and what it saved
    return sum(saved.values())


def peak_memory_bytes(step: Callable[[], object], device: torch.device) -> Optional[int]:
    """CUDA: the most memory one step allocates above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
