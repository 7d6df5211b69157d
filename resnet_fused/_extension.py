"""Loads the compiled extension ``resnet_fused._C`` if it was built.

Importing it registers the op schemas and the CPU (and, when compiled, CUDA) kernels
under ``torch.ops.resnet_fused``. Without it the package still works: every op runs the
plain-PyTorch reference path: a warning at import says so, and one on the first
call per device type and dtype (``backends.resolve``).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

import torch

BUILD_HINT = "`pip install --no-build-isolation .`, or `pip install --no-build-isolation -e .` in a checkout"

try:
    from . import _C  # noqa: F401  (registers torch.ops.resnet_fused)

    load_error: Exception | None = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    load_error = error

LOADED = load_error is None


def _why_not_loaded(error: Exception) -> str:
    """Why ``_C`` did not load, in words: the failed import of a missing module from a
    package still initializing reads "partially initialized module ... circular import"."""
    name = f"{__package__}._C"
    try:  # sys.modules[name] = None, or a finder refusing it: blocked, not missing
        built = name in sys.modules or importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        built = True
    return f"could not be loaded ({error})" if built else "is not built"


NOT_LOADED = None if load_error is None else _why_not_loaded(load_error)
if NOT_LOADED:
    warnings.warn(
        f"resnet_fused: the compiled extension resnet_fused._C {NOT_LOADED}; "
        f"every op runs the plain-PyTorch reference path. Build it with {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernels(dispatch_key: str) -> bool:
    """Whether ``_C`` registered kernels for ``dispatch_key`` ("CPU" or "CUDA")."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::bn_relu", dispatch_key)
