"""resnet_fused: fused BatchNorm + ReLU + residual kernels for residual networks.

    import resnet_fused.functional as RF
    y = RF.bn_relu(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=True)

    model, report = resnet_fused.fuse(torchvision.models.resnet50())  # fused blocks, in place

Backends (CUDA C++, Triton, C++ CPU, plain-PyTorch reference) are chosen per device;
see :mod:`resnet_fused.backends`.
"""

import importlib

from . import _extension, ops, reference

ops.define("resnet_fused_reference", reference)
ops.register("resnet_fused_reference")
if _extension.LOADED:
    ops.register("resnet_fused")

from . import backends, functional  # noqa: E402
from . import triton  # noqa: E402  (registers the Triton backend, or says why it is unavailable)
from .backends import available_backends, get_backend, set_backend, use_backend  # noqa: E402

# The blocks build on torchvision's, an optional dependency: imported on first use.
_TORCHVISION_EXPORTS = {
    "FusedBasicBlock": "modules",
    "FusedBottleneck": "modules",
    "fuse": "fuse_model",
    "unfuse": "fuse_model",
}


def __getattr__(name):
    if name in _TORCHVISION_EXPORTS:
        try:
            module = importlib.import_module(f".{_TORCHVISION_EXPORTS[name]}", __name__)
        except ModuleNotFoundError as error:
            if error.name is None or error.name.split(".")[0] != "torchvision":
                raise
            raise ModuleNotFoundError(
                f"resnet_fused.{name} builds on torchvision's ResNet blocks: pip install torchvision "
                f"(or resnet_fused[vision]); the functional ops and backends need no torchvision",
                name="torchvision",
            ) from error
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_TORCHVISION_EXPORTS,
    "functional",
    "reference",
    "backends",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
]
__version__ = "0.1.0"
