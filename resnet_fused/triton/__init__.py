"""The Triton backend: every fused op as Triton kernels, ops ``torch.ops.resnet_fused_triton``.

Modules, one per op family, each with its kernels and host launchers:

- :mod:`.batch_stats` — batch statistics (``batch_stats``);
- :mod:`.bn_act` — the fused forwards ``bn_relu``, ``bn_add_relu``, ``dual_bn_add_relu``
  and their ``*_backward`` ops;
- :mod:`._reduce` — the deterministic two-level reduction both use;
- :mod:`._runtime` — where the kernels run, launch configurations;
- :mod:`.compile_report` — every kernel and configuration compiled for sm_90, with
  registers and spills (no GPU needed).

The backend is available when Triton (3.6 or later) is installed and a CUDA device is
present, or, for CI, on CPU tensors when ``TRITON_INTERPRET=1`` was set before import.
Without such a Triton, importing this package only registers the backend as unavailable,
saying why.
"""

from __future__ import annotations

import functools
import re
import types
from typing import Optional

import torch

from .. import backends, ops

NAMESPACE = "resnet_fused_triton"
# The oldest Triton the kernels have run with (3.6: on a GPU, and in CI; torch 2.11 ships
# it). Older ones lack what they use: programmatic dependent launch (3.3), constants keyed
# by argument index, an autotuner that takes its timing function.
MIN_TRITON = (3, 6)


def _version(text: str) -> tuple[int, ...]:
    """(3, 6) of "3.6.0", "3.6.0+git1234", "3.6rc1"; () where it has no major.minor."""
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else ()


def _why_unusable() -> Optional[str]:
    """Why the installed Triton cannot build the kernels, or None."""
    try:
        import triton  # (the compiler: imports are absolute, this package is resnet_fused.triton)
    except ImportError as error:
        return f"Triton cannot be imported ({error})"
    if _version(triton.__version__) < MIN_TRITON:
        minimum = ".".join(map(str, MIN_TRITON))
        return (f"Triton {triton.__version__} is older than {minimum}, the oldest the kernels run with "
                f"(torch pins its Triton: torch 2.11 and later ship {minimum} or newer)")
    return None


_UNUSABLE = _why_unusable()
if _UNUSABLE is not None:
    backends.register(
        backends.Backend("triton", getattr(torch.ops, NAMESPACE), ("cuda",), backends.GPU_DTYPES, _UNUSABLE)
    )
else:
    from .. import reference
    from . import _runtime, batch_stats, bn_act

    def _within_row_limit(name: str, implementation):
        """``implementation``, or the reference op for inputs of more rows than the kernels
        index (every op's first argument is an activation of the op's shape)."""
        fallback = getattr(reference, name)

        @functools.wraps(implementation)  # keeps the signature the schema is inferred from
        def op(*args):
            return (fallback if _runtime.beyond_row_limit(name, args[0]) else implementation)(*args)

        return op

    ops.define(
        NAMESPACE,
        types.SimpleNamespace(**{
            name: _within_row_limit(name, getattr(batch_stats if name == "batch_stats" else bn_act, name))
            for name in ops.OP_NAMES
        }),
    )
    ops.register(NAMESPACE)
    backends.register(
        backends.Backend(
            "triton", getattr(torch.ops, NAMESPACE), _runtime.DEVICE_TYPES, _runtime.DTYPES,
            _runtime.unavailable_reason(),
        )
    )
