"""resnet_fused: fused BatchNorm + ReLU + residual kernels for residual networks.

    import resnet_fused.functional as RF
    y = RF.bn_relu(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=True)

Backends (CUDA C++, Triton, C++ CPU, plain-PyTorch reference) are chosen per device;
see :mod:`resnet_fused.backends`.
"""

from . import _extension, ops, reference

ops.define("resnet_fused_reference", reference)
ops.register("resnet_fused_reference")
if _extension.LOADED:
    ops.register("resnet_fused")

from . import backends, functional  # noqa: E402
from . import triton  # noqa: E402  (registers the Triton backend, or says why it is unavailable)
from .backends import available_backends, get_backend, set_backend, use_backend  # noqa: E402

__all__ = [
    "functional",
    "reference",
    "backends",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
]
__version__ = "0.1.0"
