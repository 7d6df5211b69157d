"""The Triton backend's host path on a machine without a GPU: a stand-in CUDA driver.

Inside :func:`stand_in_driver`, Triton compiles the kernels for sm_90 (as
``resnet_fused.triton.compile_report`` does, no GPU needed) and every launch only records
the launcher's arguments (:data:`LAUNCHES`, the latest 64), so the Triton ops run on CPU tensors through
their whole host path: argument checks, partitions, allocations, autograd, Triton's
launch path or the replay of its launch plans (``resnet_fused.triton._runtime``), and nothing else. What it
leaves out: the driver's own launch (``cuLaunchKernelEx``, a few microseconds) and CUDA's
caching allocator (the CPU's serves instead). The autotuner times nothing: it takes the
configuration of ``prefer`` (an index into each kernel's list). Used by
``benchmarks/host_overhead.py --triton-stand-in`` and by the tests of the replay.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import types
from typing import Any, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.autotuner import Autotuner

import resnet_fused  # noqa: F401  (registers the backends)
from resnet_fused import backends
from resnet_fused.triton import _runtime, batch_stats, bn_act


@dataclasses.dataclass
class RecordedLaunch:
    """One launch as the compiled kernel's launcher received it."""

    kernel: str
    grid: tuple[int, int, int]
    stream: int
    function: Any
    args: tuple  # the launcher's kernel arguments, in order
    early: bool = False  # a programmatic dependent launch (the compiled kernel's launch_pdl)


# The latest launches: a record that grew with every launch would keep every tensor alive
# and load the garbage collector, which a timed loop would count.
LAUNCHES: collections.deque[RecordedLaunch] = collections.deque(maxlen=64)


STAND_IN_DRIVER_VERSION = 13000  # what the backend reads as the CUDA driver's version inside


class StandInDriver(DriverBase):
    """Triton's CUDA driver for an sm_90 device (on a CUDA 13.0 driver) that never runs anything."""

    target = GPUTarget("cuda", 90, 32)

    def __init__(self) -> None:
        self.device = 0  # what get_current_device and get_current_stream report: a test may change them
        self.stream = 0
        self.utils = types.SimpleNamespace(
            load_binary=lambda name, kernel, shared, device: (object(), object(), 64, 0, 1024),
            unload_module=lambda module: None,
            get_device_properties=lambda device: {"max_shared_mem": 232448, "multiprocessor_count": 132},
        )
        self.launcher_cls = _Launcher

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the stand-in driver builds no C launcher")

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("the stand-in driver times nothing")

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device: int = 0) -> int:
        return self.stream

    def get_device_interface(self):
        return torch.cuda


class _Launcher:
    """Stands in for a compiled kernel's C launcher: records each call."""

    def __init__(self, src, metadata) -> None:
        self.name = src.fn.__name__
        self.early = bool(metadata.launch_pdl)

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args) -> None:
        LAUNCHES.append(RecordedLaunch(self.name, (grid_x, grid_y, grid_z), stream, function, args, self.early))


def jit_functions() -> list[Any]:
    """Every Triton function of the backend: its kernels (autotuned or not) and helpers."""
    return [f for module in (batch_stats, bn_act) for f in vars(module).values()
            if isinstance(f, (triton.JITFunction, Autotuner))]


def _forget_compiled_kernels() -> None:
    """Drops what the stand-in left in Triton's and the backend's caches: kernels bound to
    its launcher, autotune choices it made without timing, recorded launch plans."""
    for f in jit_functions():
        (f.fn if isinstance(f, Autotuner) else f).device_caches.clear()
        if isinstance(f, Autotuner):
            f.cache.clear()
    _runtime.forget_plans()


@contextlib.contextmanager
def stand_in_driver(prefer: int = 0) -> Iterator[None]:
    """Inside, the Triton backend runs CPU tensors with :class:`StandInDriver`; autotuned
    kernels take configuration ``prefer`` of their list (the last one where it is longer)."""
    if torch.cuda.is_available():
        raise RuntimeError("stand_in_driver: a CUDA device is present; time the backend on it instead")

    def bench(self, *args, config, **meta):
        index = self.configs.index(config)
        return [0.0 if index == min(prefer, len(self.configs) - 1) else 1.0 + index]

    triton_backend = backends.get("triton")
    saved = Autotuner._bench, _runtime.DEVICE_TYPES, _runtime._cuda_driver_version
    # The private slot: reading `driver.active` would create the default driver, which
    # fails without a GPU (as would `reset_active`).
    saved_driver = triton.runtime.driver._active
    _forget_compiled_kernels()
    triton.runtime.driver.set_active(StandInDriver())
    Autotuner._bench = bench
    _runtime.DEVICE_TYPES = ("cpu",)
    _runtime._cuda_driver_version = lambda: STAND_IN_DRIVER_VERSION
    backends.register(dataclasses.replace(triton_backend, device_types=("cpu",), unavailable=None))
    try:
        yield
    finally:
        _forget_compiled_kernels()  # while the stand-in is active: Triton unloads them through it
        LAUNCHES.clear()
        backends.register(triton_backend)
        Autotuner._bench, _runtime.DEVICE_TYPES, _runtime._cuda_driver_version = saved
        triton.runtime.driver._active = saved_driver
