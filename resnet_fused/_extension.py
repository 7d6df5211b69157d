"""Loads the compiled extension ``resnet_fused._C`` if it was built.

Importing it registers the op schemas and the CPU (and, when compiled, CUDA) kernels
under ``torch.ops.resnet_fused``. Without it the package still works: every op runs the
plain-PyTorch reference path: a warning at import says so, and one on the first
call per device type and dtype (``backends.resolve``).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

BUILD_HINT = "`pip install --no-build-isolation .` (in a checkout: `... -e .`)"

try:
    from . import _C  # noqa: F401  (registers torch.ops.resnet_fused)

    load_error: Exception | None = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    load_error = error

LOADED = load_error is None

# Why not, in words: a missing module imported from a package still initializing would
# read as "partially initialized module ... (most likely due to a circular import)".
NOT_LOADED: str | None = None
if not LOADED:
    try:
        built = importlib.util.find_spec(f"{__package__}._C") is not None
    except (ImportError, ValueError):  # a finder refused it: its own error says why
        built = True
    NOT_LOADED = f"could not be loaded ({load_error})" if built else "is not built"
    warnings.warn(
        f"resnet_fused: the compiled extension resnet_fused._C {NOT_LOADED}; "
        f"every op runs the plain-PyTorch reference path. Build it with {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernels(dispatch_key: str) -> bool:
    """Whether ``_C`` registered kernels for ``dispatch_key`` ("CPU" or "CUDA")."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::bn_relu", dispatch_key)
