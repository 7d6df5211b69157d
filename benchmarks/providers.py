"""Who runs a workload: eager torchvision, torch.compile of it, resnet_fused per backend.

A provider turns a fresh copy of the torchvision module into the callable that is timed,
plus the context every call runs in. ``fused-<backend>`` converts the blocks with
``resnet_fused.fuse`` (imported lazily: the suite runs, and says why, without it) and
calls them under ``resnet_fused.use_backend(<backend>)``. ``compile-fused-cuda`` compiles
the fused model with torch.compile (the fused ops stay opaque nodes; convolutions, the rest
of the graph and the autograd plumbing run from Inductor's compiled code): on a machine whose
host bounds the eager step, what the fused kernels gain can show by the clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

FUSED_BACKENDS = ("cuda", "triton", "cpu", "reference")
NAMES = ("eager", "compile", "compile-max-autotune", *(f"fused-{b}" for b in FUSED_BACKENDS), "compile-fused-cuda")
DEFAULT = ("eager", "compile", *(f"fused-{b}" for b in FUSED_BACKENDS), "compile-fused-cuda")
BASELINES = ("eager", "compile")  # speedups are reported over these


@dataclasses.dataclass
class Prepared:
    module: nn.Module  # owns the parameters; train() / eval() go here
    run: Callable  # called with the input
    context: Callable[[], ContextManager] = contextlib.nullcontext


def family(name: str) -> str:
    """``eager``, ``compile`` or ``fused``: providers of one family cost alike."""
    return name.split("-", 1)[0]


def expand(names: list[str]) -> list[str]:
    """Provider names from a command line: ``fused`` means every backend."""
    out = []
    for name in names:
        if name == "fused":
            out += [f"fused-{b}" for b in FUSED_BACKENDS]
        elif name in NAMES:
            out.append(name)
        else:
            raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(NAMES)} or 'fused'")
    return list(dict.fromkeys(out))


def fused_backend(name: str) -> Optional[str]:
    """The resnet_fused backend a provider runs (``fused-cuda``, ``compile-fused-cuda``: cuda)."""
    _, fused, backend = name.rpartition("fused-")
    return backend if fused else None


def unavailable(name: str, device: torch.device, activation_dtype: torch.dtype) -> Optional[str]:
    """Why ``name`` cannot run here, or None."""
    backend = fused_backend(name)
    if backend is None:
        return None
    if _fuse() is None:
        return "resnet_fused.fuse not present"
    from resnet_fused import backends

    try:
        backends.get(backend).check(device, activation_dtype)
    except (RuntimeError, TypeError) as error:
        return str(error)
    return None


def prepare(name: str, model: nn.Module) -> Prepared:
    """The callable that runs ``model`` (a copy the provider may change) the provider's way."""
    if name == "eager":
        return Prepared(model, model)
    if fused_backend(name) is None:
        torch._dynamo.reset()  # every compiled copy starts cold: no cache limit, no stale graph
        mode = "max-autotune-no-cudagraphs" if name == "compile-max-autotune" else None
        return Prepared(model, torch.compile(model, mode=mode, fullgraph=True))
    import resnet_fused
    from torchvision.models.resnet import BasicBlock, Bottleneck

    model, report = _fuse()(model)
    fused = (resnet_fused.FusedBasicBlock, resnet_fused.FusedBottleneck)
    if any(isinstance(m, (BasicBlock, Bottleneck)) and not isinstance(m, fused) for m in model.modules()):
        raise RuntimeError(f"resnet_fused.fuse left blocks unfused, they would run eager: {report}")
    backend = fused_backend(name)
    run = model
    if family(name) == "compile":
        torch._dynamo.reset()
        run = torch.compile(model, fullgraph=True)
    return Prepared(model, run, lambda: resnet_fused.use_backend(backend))


def _fuse():
    import resnet_fused

    return getattr(resnet_fused, "fuse", None)
