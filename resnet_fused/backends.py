"""Which implementation runs a fused op.

Backends:

=============  ==========================================================  ============
name           implementation                                              devices
=============  ==========================================================  ============
``cuda``       CUDA C++ kernels of ``resnet_fused._C``                     cuda
``triton``     Triton kernels (``resnet_fused.triton``)                    cuda (cpu under
                                                                           TRITON_INTERPRET=1)
``cpu``        C++ CPU kernels of ``resnet_fused._C``                      cpu
``reference``  plain PyTorch (``resnet_fused.reference``)                  any
``auto``       the fastest available one for the tensor's device
=============  ==========================================================  ============

``auto``'s order on a GPU architecture is the one measured there (``auto_order.json``,
written by ``scripts/auto_order.py`` from benchmark runs: ``AUTO_ORDER``'s order, but where
a backend is faster than one before it by more than a margin both in its kernels, per
dtype, and in whole fused blocks by the clock); where nothing was measured,
``AUTO_ORDER``'s default.

Choose per call (``backend=`` on every functional op), globally with
``RESNET_FUSED_BACKEND`` (read at import) or :func:`set_backend`, or for a block of code
with :func:`use_backend`. A backend that is not available, or that cannot run the given
device or dtype, is an error when asked for by name. ``auto`` never fails: it falls back
to the reference path for a configuration no compiled kernel covers (float64 on a GPU,
say) and warns once per configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import warnings
from typing import Iterator, Optional, Union

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from . import _extension
from ._checks import ACTIVATION_DTYPES
from . import ops as _op_set

NAMES = ("auto", "cuda", "triton", "cpu", "reference")
ENV_VAR = "RESNET_FUSED_BACKEND"

# Preference of `auto` per device type where no measurement says otherwise, first
# available wins. On CUDA the C++ kernels come before Triton by assumption, until the
# kernel benchmark has run on a GPU of the architecture (auto_order.json).
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
AUTO_ORDER_FILE = os.path.join(os.path.dirname(__file__), "auto_order.json")


def _load_measured(path: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """{device key ("cuda:sm_90"): {dtype name: backends, fastest first}} from ``path``."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    return {key: {dtype: tuple(entry["order"]) for dtype, entry in by_dtype.items()}
            for key, by_dtype in data.get("measured", {}).items()}


MEASURED_ORDER = _load_measured(AUTO_ORDER_FILE)


_CUDA_DEVICE_KEYS: dict[int, str] = {}  # device index -> key; `auto` asks on every op call


def _cuda_device_key(device: Union[int, torch.device]) -> str:
    props = torch.cuda.get_device_properties(device)
    return f"cuda:sm_{props.major}{props.minor}"


def device_key(device: torch.device) -> str:
    """The key of a device's measurements: ``cuda:sm_<major><minor>``, or the device type.
    (Traced by torch.compile, which folds it to a constant: the cache stays out of the graph.)"""
    if device.type != "cuda":
        return device.type
    if torch.compiler.is_compiling():
        return _cuda_device_key(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    key = _CUDA_DEVICE_KEYS.get(index)
    if key is None:
        key = _CUDA_DEVICE_KEYS[index] = _cuda_device_key(index)
    return key


def auto_order(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The backends ``auto`` tries on ``device`` / ``dtype`` tensors, in order."""
    if MEASURED_ORDER:
        measured = MEASURED_ORDER.get(device_key(device), {}).get(str(dtype).removeprefix("torch."))
        if measured:
            return measured
    return AUTO_ORDER.get(device.type, ())


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    ops: object  # the op namespace, torch.ops.<namespace>
    device_types: tuple[str, ...]  # empty: any device
    dtypes: tuple[torch.dtype, ...]
    unavailable: Optional[str] = None  # why it cannot run here, if it cannot

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raises if this backend cannot run ``device`` / ``dtype`` tensors."""
        if self.unavailable:
            raise RuntimeError(f"resnet_fused backend {self.name!r} is not available: {self.unavailable}")
        if self.device_types and device.type not in self.device_types:
            raise RuntimeError(
                f"resnet_fused backend {self.name!r} runs on {'/'.join(self.device_types)} tensors, "
                f"got a tensor on {device}"
            )
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            hint = "; the reference backend runs it" if dtype in ACTIVATION_DTYPES and self.name != "reference" else ""
            raise TypeError(f"resnet_fused backend {self.name!r} supports dtypes {names}, got {dtype}{hint}")

    def callable_ops(self) -> object:
        """The ops to call now: in plain eager mode the implementations without torch.library's
        Python layers (:func:`resnet_fused.ops.eager_ops`); while a graph is traced
        (torch.compile, torch.export, a dispatch mode such as make_fx's or FakeTensorMode's)
        the registered ``torch.ops``, opaque nodes with fake kernels."""
        if torch.compiler.is_compiling() or _current_dispatch_mode() is not None:
            return self.ops
        return _op_set.eager_ops(self.ops.name)

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return (
            self.unavailable is None
            and (not self.device_types or device.type in self.device_types)
            and dtype in self.dtypes
        )


GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the GPU kernels' (no float64)


def _compiled(dispatch_key: str) -> Optional[str]:
    if not _extension.LOADED:
        return f"resnet_fused._C {_extension.NOT_LOADED}; build it with {_extension.BUILD_HINT}"
    if not _extension.has_kernels(dispatch_key):
        return f"resnet_fused._C was built without {dispatch_key} kernels"
    return None


_REGISTRY: dict[str, Backend] = {
    "cuda": Backend("cuda", torch.ops.resnet_fused, ("cuda",), GPU_DTYPES, _compiled("CUDA")),
    "cpu": Backend("cpu", torch.ops.resnet_fused, ("cpu",), ACTIVATION_DTYPES, _compiled("CPU")),
    "reference": Backend("reference", torch.ops.resnet_fused_reference, (), ACTIVATION_DTYPES),
}


def register(backend: Backend) -> None:
    """Adds or replaces a backend (the Triton module registers itself on import)."""
    _REGISTRY[backend.name] = backend
    _resolved.clear()


def _validate_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"expected a resnet_fused backend name (a str), got {type(name).__name__}")
    name = name.strip().lower()
    if name not in NAMES:
        raise ValueError(f"unknown resnet_fused backend {name!r}; expected one of {', '.join(NAMES)}")
    return name


def _from_environment() -> str:
    value = os.environ.get(ENV_VAR, "")
    try:
        return _validate_name(value or "auto")
    except ValueError as error:
        raise ValueError(f"{ENV_VAR}={value!r}: {error}") from None


_selected = _from_environment()


def get_backend() -> str:
    """The globally selected backend name."""
    return _selected


def set_backend(name: str) -> None:
    """Selects the backend used when an op is called without ``backend=``."""
    global _selected
    _selected = _validate_name(name)


# The use_backend blocks open in any thread, oldest first, as (token, name); the selection
# from before the first of them opened.
_open_blocks: list[tuple[object, str]] = []
_outside_blocks = _selected
_blocks_lock = threading.Lock()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager selecting ``name`` for the ops called inside it.

    The selection is process-wide, as :func:`set_backend`'s (and
    ``torch.backends.cudnn.flags``'): threads share it, so that the worker threads of
    ``nn.DataParallel`` run what their caller selected. Threads that need different
    backends at once pass ``backend=`` per call instead. On exit the selection is the
    newest block's still open, in any thread, or once none is, what it was before them
    (blocks of several threads may exit in any order)."""
    global _outside_blocks
    token = object()
    with _blocks_lock:
        if not _open_blocks:
            _outside_blocks = _selected
        set_backend(name)
        _open_blocks.append((token, _selected))
    try:
        yield
    finally:
        with _blocks_lock:
            _open_blocks[:] = [block for block in _open_blocks if block[0] is not token]
            set_backend(_open_blocks[-1][1] if _open_blocks else _outside_blocks)


def available_backends(device: Union[str, torch.device] = "cpu") -> list[str]:
    """Names of the backends built and registered for ``device``'s type that can run here:
    the C++ backends when compiled in (whether a GPU is present is not checked), ``triton``
    only with a CUDA device (or for ``cpu`` under ``TRITON_INTERPRET=1``)."""
    device = torch.device(device)
    return [b.name for b in _REGISTRY.values() if b.unavailable is None and (not b.device_types or device.type in b.device_types)]


def get(name: str) -> Backend:
    """The backend registered as ``name`` (not ``auto``)."""
    return _REGISTRY[_validate_name(name)]


_warned: set[tuple[str, torch.dtype]] = set()


def _why_not(name: str, dtype: torch.dtype) -> str:
    backend = _REGISTRY.get(name)
    if backend is None:
        return "not registered"
    return backend.unavailable or f"no {str(dtype).removeprefix('torch.')} kernels"


# resolve()'s answers in eager mode, per (device, dtype, name): every fused op asks, and the
# answer changes only when a backend is registered. Changing AUTO_ORDER or MEASURED_ORDER
# after the first op call therefore takes effect only with the cache emptied too (the tests
# do); register() runs at import, before any op. An error is not kept: it is raised again.
_resolved: dict[tuple[torch.device, torch.dtype, str], Backend] = {}


def resolve(device: torch.device, dtype: torch.dtype, requested: Optional[str] = None) -> Backend:
    """The backend that runs an op on ``device`` / ``dtype`` tensors."""
    name = _selected if requested is None else requested
    if torch.compiler.is_compiling():  # traced: no cache in the graph
        return _resolve(device, dtype, _validate_name(name))
    key = (device, dtype, name)
    backend = _resolved.get(key)
    if backend is None:
        backend = _resolved[key] = _resolve(device, dtype, _validate_name(name))
    return backend


def _resolve(device: torch.device, dtype: torch.dtype, name: str) -> Backend:
    if name != "auto":
        backend = _REGISTRY[name]
        backend.check(device, dtype)
        return backend
    order = auto_order(device, dtype)
    for candidate in order:
        if candidate in _REGISTRY and _REGISTRY[candidate].supports(device, dtype):
            return _REGISTRY[candidate]
    key = (device.type, dtype)
    if order and key not in _warned:
        _warned.add(key)
        reasons = "; ".join(f"{c}: {_why_not(c, dtype)}" for c in order)
        warnings.warn(
            f"resnet_fused: no compiled kernel runs {dtype} on {device.type} ({reasons}); "
            f"using the plain-PyTorch reference path",
            RuntimeWarning,
            stacklevel=4,  # the caller of the functional op (via resolve)
        )
    return _REGISTRY["reference"]

