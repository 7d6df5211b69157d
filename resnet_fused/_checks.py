"""Argument validation shared by every Python-side entry point.

The compiled ops validate the same rules in C++ (``csrc/bn_act.cpp``) with the same
exception types and messages (values as C++ prints them: ``Float``, ``[1, 3]``); this module serves the functional API, the fake (meta) kernels and the Triton
backend, so a bad argument is reported before any kernel runs, whatever the backend.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def activation_memory_format(t: Tensor) -> torch.memory_format:
    """The layout kernels process ``t`` in and return results in (as eager BatchNorm).

    ``at::Tensor::suggest_memory_format()``: channels_last when the strides are
    channels-last-like, contiguous NCHW otherwise. A tensor with no dimension of size 1 (whose
    strides would not count) dense in exactly one of the two layouts is in that one; other
    concrete shapes take the stride rule in plain Python; symbolic ones (tracing) torch's
    ``suggest_memory_format``, whose guards cost microseconds a call.
    """
    if t.layout != torch.strided:
        return torch.contiguous_format
    if t.dim() != 4:
        return suggest_memory_format(t)
    n, c, h, w = t.shape
    if n > 1 and c > 1 and h > 1 and w > 1:  # not min(), whose symbolic form guards the sizes' order
        nchw, nhwc = t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)
        if nchw != nhwc:
            return torch.contiguous_format if nchw else torch.channels_last
    shape, strides = t.shape, t.stride()
    if all(type(v) is int for v in (*shape, *strides)):
        return torch.channels_last if _strides_like_channels_last(shape, strides) else torch.contiguous_format
    return suggest_memory_format(t)


def _strides_like_channels_last(shape, strides) -> bool:
    """c10's ``is_channels_last_strides_2d_s4``: the strides grow in the order C, W, H, N,
    each at least the extent of the one before (stride times size); a zero C stride, an
    empty dimension, or an extent before N equal to C's stride (N111 patterns: ambiguous)
    mean NCHW."""
    if strides[1] == 0:
        return False
    extent = 0
    for d in (1, 3, 2, 0):
        if shape[d] == 0 or strides[d] < extent or (d == 0 and extent == strides[1]):
            return False
        extent = strides[d] * shape[d]
    return True


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _check_dense(op: str, name: str, t: Tensor) -> None:
    """Kernels read dense memory of one shape. (The C++ ops need no layout check: the
    dispatcher has no sparse or mkldnn kernel of theirs to call.)"""
    if t.layout != torch.strided:
        raise TypeError(f"{op}(): expected `{name}` to be a strided (dense) tensor, got layout {t.layout}")
    if t.is_nested:  # a strided nested tensor: no single shape
        raise TypeError(f"{op}(): expected `{name}` to be a dense tensor, got a nested tensor")


def check_activation(op: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}(): expected `{name}` to be a Tensor, got {type(t).__name__}")
    _check_dense(op, name, t)
    if t.dim() != 4:
        raise ValueError(
            f"{op}(): expected `{name}` to be a 4-D (N, C, H, W) tensor, "
            f"got a {t.dim()}-D tensor of shape {_shape(t)}"
        )
    if t.dtype not in ACTIVATION_DTYPES:
        raise TypeError(
            f"{op}(): expected `{name}` to have dtype float16, bfloat16, float32 or float64, "
            f"got {t.dtype}"
        )


def check_like(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` must match ``ref`` in shape, dtype and device (a residual, a gradient)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}(): expected `{name}` to be a Tensor, got {type(t).__name__}")
    _check_dense(op, name, t)
    if t.shape != ref.shape:
        raise ValueError(
            f"{op}(): expected `{name}` to have the shape of `{ref_name}` {_shape(ref)}, "
            f"got {_shape(t)}"
        )
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{op}(): expected `{name}` to have the dtype of `{ref_name}` ({ref.dtype}), "
            f"got {t.dtype}"
        )
    if t.device != ref.device:
        raise ValueError(
            f"{op}(): expected `{name}` on the device of `{ref_name}` ({ref.device}), "
            f"got {t.device}"
        )


def check_per_channel(op: str, name: str, t: Optional[Tensor], ref_name: str, ref: Tensor) -> None:
    """``t`` is None or a 1-D floating tensor with one value per channel of ``ref``."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}(): expected `{name}` to be a Tensor or None, got {type(t).__name__}")
    _check_dense(op, name, t)
    channels = ref.shape[1]
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(
            f"{op}(): expected `{name}` to be a 1-D tensor of {channels} elements "
            f"(one per channel of `{ref_name}`), got shape {_shape(t)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{op}(): expected `{name}` to be a floating-point tensor, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(
            f"{op}(): expected `{name}` on the device of `{ref_name}` ({ref.device}), "
            f"got {t.device}"
        )


def check_batch_norm(  # the arguments of torch.nn.functional.batch_norm, in its order
    op: str,
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    suffix: str = "",
) -> None:
    """One BatchNorm branch of a forward op: its input, running stats and parameters."""
    if not _batch_norm_arguments_pass(input, running_mean, running_var, weight, bias, training):
        _check_batch_norm_arguments(op, input, running_mean, running_var, weight, bias, training, suffix)


def _check_batch_norm_arguments(op, input, running_mean, running_var, weight, bias, training, suffix=""):
    """check_batch_norm's rules one by one, each raising with its message."""
    name = "input" + suffix
    check_activation(op, name, input)
    check_training(op, training)
    for arg, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_per_channel(op, arg + suffix, t, name, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{op}(): expected `running_mean{suffix}` and `running_var{suffix}` to be given "
            f"together or both be None"
        )
    if not training and running_mean is None:
        raise ValueError(
            f"{op}(): `running_mean{suffix}` and `running_var{suffix}` are required when "
            f"training=False (eval mode normalizes with them)"
        )
    if training:
        check_running_stats_writable(op, running_mean, running_var, suffix)
        check_running_stats_not_differentiated(op, running_mean, running_var, suffix)
        check_batch_size(input)


def _batch_norm_arguments_pass(input, running_mean, running_var, weight, bias, training) -> bool:
    """True only where every check of ``check_batch_norm`` passes, in one pass without its
    per-argument calls: the common case, whose checks take ~3.3 µs instead of ~5.7 (2-core
    Xeon, docs/performance.md), on every fused op of every training step. False decides nothing: the
    checks then run and name what is wrong."""
    if (
        type(training) is not bool
        or not isinstance(input, Tensor)
        or input.layout != torch.strided
        or input.is_nested  # strided nested tensors have no .shape
        or input.dim() != 4
        or input.dtype not in ACTIVATION_DTYPES
    ):
        return False
    shape, device = input.shape, input.device
    per_channel = (shape[1],)
    for t in (weight, bias, running_mean, running_var):
        if t is not None and not (
            isinstance(t, Tensor)
            and t.layout == torch.strided
            and t.shape == per_channel
            and t.is_floating_point()
            and t.device == device
        ):
            return False
    if (running_mean is None) != (running_var is None):
        return False
    if not training:
        return running_mean is not None
    if shape[0] * shape[2] * shape[3] == 1:
        return False
    if running_mean is not None:
        if running_mean is running_var:
            return False
        grad_mode = torch.is_grad_enabled()
        for t in (running_mean, running_var):
            if (shape[1] > 1 and t.stride(0) == 0) or (grad_mode and t.requires_grad):
                return False
    return True


def check_saved_for_backward(op: str, names: tuple[str, ...], *tensors: Optional[Tensor]) -> None:
    """Autograd's rule for what a recorded call saves, checked before anything runs: with
    grad mode on and an argument that requires grad, the op saves its tensor arguments
    (``names``) for its backward, and an inference tensor cannot be saved. Eager raises
    before its BatchNorm moves the running statistics; the save itself would raise only
    after the statistics pass has moved them. (Not while torch.compile traces: Dynamo
    cannot ask a tensor whether it is an inference tensor.)"""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None and t.is_inference():
            break
    else:
        return
    if any(t is not None and t.requires_grad for t in tensors):
        name = next(n for n, t in zip(names, tensors) if t is not None and t.is_inference())
        raise RuntimeError(
            f"{op}(): `{name}` is an inference tensor, which autograd cannot save for this call's "
            f"backward (grad mode is on and an argument requires grad); clone it outside "
            f"torch.inference_mode(), or call under torch.no_grad()"
        )


def check_training(op: str, training: object) -> None:
    """``training`` is a bool, as in eager's schema: a truthy tensor or string would pick a
    mode silently, and a running-statistics update could precede the error."""
    if not isinstance(training, bool):
        kind = type(training)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise TypeError(f"{op}(): expected `training` to be a bool, got {name}")


def check_running_stats_writable(
    op: str, running_mean: Optional[Tensor], running_var: Optional[Tensor], suffix: str = ""
) -> None:
    """Running statistics a training op updates in place need a memory location per
    channel: an expanded tensor (stride 0) has one for all (eager writes every channel's
    value there, the last one wins; the kernels would fail after writing the other). Nor
    may the two be one tensor: eager's CPU kernel updates the variance from the mean it has
    just written, the reference both from the old values. (Two views of one memory are not
    detected: their storage would cost every call a lookup.)"""
    if running_mean is not None and running_mean is running_var:
        raise ValueError(f"{op}(): expected `running_mean{suffix}` and `running_var{suffix}` to be two tensors "
                         f"(each is updated in place), got one tensor for both")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.shape[0] > 1 and t.stride(0) == 0:
            raise ValueError(
                f"{op}(): expected `{name}{suffix}` to hold one value per channel in memory (it is "
                f"updated in place), got an expanded tensor (stride 0)"
            )


def check_running_stats_not_differentiated(
    op: str, running_mean: Optional[Tensor], running_var: Optional[Tensor], suffix: str = ""
) -> None:
    """Eager's rule for the functional API: with grad mode on, running statistics that
    require grad are refused (their update is not differentiable); under no_grad they are
    updated. (Not a rule of the registered ops: a Python-defined one runs with grad mode
    off, whatever its caller's, and the ops agree across backends.)"""
    if not torch.is_grad_enabled():
        return
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{op}(): expected `{name}{suffix}` not to require grad in training with grad mode "
                f"on (it is updated in place, which autograd cannot differentiate)"
            )


def check_batch_size(input: Tensor) -> None:
    """Eager's own check (``torch.nn.functional._verify_batch_size``), same error and text."""
    values_per_channel = input.shape[0] * input.shape[2] * input.shape[3]
    if values_per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )


def as_float(op: str, name: str, value: object) -> float:
    """``value`` as a Python float, taking what a schema's ``float`` takes (``F.batch_norm``'s
    momentum and eps, the C++ ops'): a Python real number (bool included), a NumPy integer
    or floating scalar, or a 0-dim real tensor that does not require grad (not a NumPy bool,
    which eager takes too); else a TypeError naming the argument
    (Python-implemented ops are called without the schema in eager mode)."""
    if isinstance(value, (int, float)):  # bool is an int
        return float(value)
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.requires_grad and not value.is_complex():
            return float(value)
    elif type(value).__module__ == "numpy" and isinstance(value, numbers.Real):  # np.float32(0.1)
        return float(value)
    raise TypeError(f"{op}(): expected `{name}` to be a float, got {type(value).__name__}")


def _eager_allows_zero_eps_in_eval() -> bool:
    """Whether this torch's ``F.batch_norm`` takes eps = 0 in eval (2.12 on; before, it
    refuses every eps <= 0)."""
    try:
        torch.nn.functional.batch_norm(torch.ones(1, 1), torch.zeros(1), torch.ones(1), eps=0.0)
    except ValueError:
        return False
    return True


EAGER_ALLOWS_ZERO_EPS_IN_EVAL = _eager_allows_zero_eps_in_eval()


def check_eps(op: str, name: str, eps: float, training: bool) -> None:
    """Eager's rule (``torch.nn.functional.batch_norm``): ``eps`` > 0 in training, where a
    constant channel has variance 0, and in eval >= 0 (> 0 before torch 2.12: asked of the
    torch installed, ``EAGER_ALLOWS_ZERO_EPS_IN_EVAL``). (NaN passes, as there.)"""
    if training and eps <= 0.0:
        raise ValueError(f"{op}(): expected `{name}` to be positive in training, got {eps}")
    if eps < 0.0:
        raise ValueError(f"{op}(): expected `{name}` to be non-negative, got {eps}")
    if eps == 0.0 and not EAGER_ALLOWS_ZERO_EPS_IN_EVAL:
        raise ValueError(f"{op}(): expected `{name}` to be positive (this torch's batch_norm), got {eps}")


def check_batch_stats(
    op: str, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor]
) -> None:
    check_activation(op, "input", input)
    check_per_channel(op, "running_mean", running_mean, "input", input)
    check_per_channel(op, "running_var", running_var, "input", input)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{op}(): expected `running_mean` and `running_var` to be given together or both be None"
        )
    check_running_stats_writable(op, running_mean, running_var)
    check_batch_size(input)


def check_branch(
    op: str,
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    suffix: str = "",
) -> None:
    """One BatchNorm branch of a fused op: input, parameters, statistics to normalize with."""
    name = "input" + suffix
    check_activation(op, name, input)
    for arg, t in (("mean", mean), ("invstd", invstd)):
        if t is None:
            raise TypeError(f"{op}(): expected `{arg}{suffix}` to be a Tensor, got None")
    for arg, t in (("weight", weight), ("bias", bias), ("mean", mean), ("invstd", invstd)):
        check_per_channel(op, arg + suffix, t, name, input)


# ---------------------------------------------------------------- per op, with the op's own arguments


def _bn_relu(input, weight, bias, mean, invstd, training, *, op="bn_relu"):
    check_branch(op, input, weight, bias, mean, invstd)


def _bn_relu_backward(grad_out, input, weight, bias, mean, invstd, training):
    op = "bn_relu_backward"
    _bn_relu(input, weight, bias, mean, invstd, training, op=op)
    check_like(op, "grad_out", grad_out, "input", input)


def _bn_add_relu(input, residual, weight, bias, mean, invstd, training, *, op="bn_add_relu"):
    check_branch(op, input, weight, bias, mean, invstd)
    check_like(op, "residual", residual, "input", input)


def _bn_add_relu_backward(grad_out, input, residual, weight, bias, mean, invstd, training):
    op = "bn_add_relu_backward"
    _bn_add_relu(input, residual, weight, bias, mean, invstd, training, op=op)
    check_like(op, "grad_out", grad_out, "input", input)


def _dual_bn_add_relu(input, weight, bias, mean, invstd, input_d, weight_d, bias_d, mean_d, invstd_d, training,
                      *, op="dual_bn_add_relu"):
    check_branch(op, input, weight, bias, mean, invstd)
    check_branch(op, input_d, weight_d, bias_d, mean_d, invstd_d, "_d")
    check_like(op, "input_d", input_d, "input", input)


def _dual_bn_add_relu_backward(grad_out, *args):
    op = "dual_bn_add_relu_backward"
    _dual_bn_add_relu(*args, op=op)
    check_like(op, "grad_out", grad_out, "input", args[0])


def _batch_stats(input, running_mean, running_var, momentum, eps):
    check_batch_stats("batch_stats", input, running_mean, running_var)
    as_float("batch_stats", "momentum", momentum)
    check_eps("batch_stats", "eps", as_float("batch_stats", "eps", eps), training=True)


# Validation of every op of the set, called with the op's arguments: by the fake kernels,
# and by every Python-defined backend's registered op before it computes
# (resnet_fused.ops.define; eager calls are validated by their callers, functional's checks).
OP_CHECKS = {
    "batch_stats": _batch_stats,
    "bn_relu": _bn_relu,
    "bn_relu_backward": _bn_relu_backward,
    "bn_add_relu": _bn_add_relu,
    "bn_add_relu_backward": _bn_add_relu_backward,
    "dual_bn_add_relu": _dual_bn_add_relu,
    "dual_bn_add_relu_backward": _dual_bn_add_relu_backward,
}
