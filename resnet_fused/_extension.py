"""Loads the compiled extension ``resnet_fused._C`` if it was built.

Importing it registers the op schemas and the CPU (and, when compiled, CUDA) kernels
under ``torch.ops.resnet_fused``. Without it the package still works: every op runs the
plain-PyTorch reference path: a warning at import says so, and one on the first
call per device type and dtype (``backends.resolve``).
"""

from __future__ import annotations

import warnings

import torch

BUILD_COMMAND = "pip install --no-build-isolation ."

try:
    from . import _C  # noqa: F401  (registers torch.ops.resnet_fused)

    load_error: Exception | None = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    load_error = error

LOADED = load_error is None

if not LOADED:
    warnings.warn(
        f"resnet_fused: the compiled extension resnet_fused._C could not be loaded ({load_error}); "
        f"every op runs the plain-PyTorch reference path. Build it with `{BUILD_COMMAND}`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernels(dispatch_key: str) -> bool:
    """Whether ``_C`` registered kernels for ``dispatch_key`` ("CPU" or "CUDA")."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::bn_relu", dispatch_key)
