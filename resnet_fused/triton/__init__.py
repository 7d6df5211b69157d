"""The Triton backend: every fused op as Triton kernels, ops ``torch.ops.resnet_fused_triton``.

Modules, one per op family, each with its kernels and host launchers:

- :mod:`.batch_stats` — batch statistics (``batch_stats``);
- :mod:`.bn_act` — the fused forwards ``bn_relu``, ``bn_add_relu``, ``dual_bn_add_relu``
  and their ``*_backward`` ops;
- :mod:`._reduce` — the deterministic two-level reduction both use;
- :mod:`._runtime` — where the kernels run, launch configurations;
- :mod:`.compile_report` — every kernel and configuration compiled for sm_90, with
  registers and spills (no GPU needed).

The backend is available when Triton is installed and a CUDA device is present, or,
for CI, on CPU tensors when ``TRITON_INTERPRET=1`` was set before import. Without
Triton, importing this package only registers the backend as unavailable, saying why.
"""

from __future__ import annotations

import functools
import types

import torch

from .. import backends, ops

NAMESPACE = "resnet_fused_triton"

try:
    import triton  # noqa: F401  (the compiler: imports are absolute, this package is resnet_fused.triton)
except ImportError as error:
    backends.register(
        backends.Backend(
            "triton", getattr(torch.ops, NAMESPACE), ("cuda",), backends.GPU_DTYPES,
            f"Triton cannot be imported ({error})",
        )
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
