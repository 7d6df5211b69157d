"""Functional interface of the fused ops.

Argument order and defaults follow :func:`torch.nn.functional.batch_norm`. Every op
validates its arguments before any kernel runs and takes ``backend=`` to force an
implementation (see :mod:`resnet_fused.backends`). All ops support autograd,
``torch.compile`` and both ``torch.channels_last`` and contiguous NCHW inputs; outputs
keep the input's memory format. Statistics are accumulated in float32 (float64 for
float64 inputs), and running statistics are updated exactly as
:class:`torch.nn.BatchNorm2d` updates them: the biased batch variance normalizes, the
unbiased one is folded into ``running_var`` with weight ``momentum``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks, backends
from .reference import accumulation_dtype

__all__ = ["batch_stats", "bn_relu", "bn_add_relu", "dual_bn_add_relu"]


def batch_stats(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-channel batch mean and inverse standard deviation of an (N, C, H, W) tensor.

    Returns ``(mean, invstd)`` with ``invstd = 1 / sqrt(var + eps)`` (biased variance),
    in float32 (float64 for float64 input), reading ``input`` once. Running statistics,
    when given, are updated in place as training-mode BatchNorm updates them. The
    results are not differentiable (like :func:`torch.batch_norm_stats`); the fused ops
    differentiate through the statistics themselves when ``training=True``.
    """
    _checks.check_batch_stats("batch_stats", input, running_mean, running_var)
    _checks.check_running_stats_not_differentiated("batch_stats", running_mean, running_var)
    momentum, eps = _scalars("batch_stats", momentum, eps, training=True)
    ops = backends.resolve(input.device, input.dtype, backend).callable_ops()
    return ops.batch_stats(input.detach(), running_mean, running_var, momentum, eps)


def _scalars(op: str, momentum, eps, training: bool, suffix: str = "") -> tuple[float, float]:
    momentum, eps = _checks.as_float(op, "momentum" + suffix, momentum), _checks.as_float(op, "eps" + suffix, eps)
    _checks.check_eps(op, "eps" + suffix, eps, training)
    return momentum, eps


def _checked_scalars(op: str, input: Tensor, running_mean, running_var, weight, bias, training, momentum, eps,
                     suffix: str = "") -> tuple[float, float]:
    """Checks one BatchNorm's arguments (``F.batch_norm``'s order); returns momentum and eps as floats."""
    _checks.check_batch_norm(op, input, running_mean, running_var, weight, bias, training, suffix)
    return _scalars(op, momentum, eps, training, suffix)


def _statistics(ops, input, running_mean, running_var, training, momentum, eps):
    """The mean and invstd a fused op normalizes with: batch or running statistics."""
    if training:
        return ops.batch_stats(input.detach(), running_mean, running_var, momentum, eps)
    acc = accumulation_dtype(input.dtype)
    return running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)


def bn_relu(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    r"""``relu(batch_norm(input, ...))``, normalization and ReLU in one pass.

    Same arguments as :func:`torch.nn.functional.batch_norm`. In training the batch
    statistics take one read of ``input`` (:func:`batch_stats`), normalization and ReLU
    one read and one write. The backward recomputes the ReLU mask from ``input`` and fuses
    it into the BatchNorm reduction: two reads of ``input`` and the gradient, one write.
    """
    momentum, eps = _checked_scalars("bn_relu", input, running_mean, running_var, weight, bias, training, momentum, eps)
    _checks.check_saved_for_backward("bn_relu", ("input", "weight", "bias"), input, weight, bias)
    ops = backends.resolve(input.device, input.dtype, backend).callable_ops()
    mean, invstd = _statistics(ops, input, running_mean, running_var, training, momentum, eps)
    return ops.bn_relu(input, weight, bias, mean, invstd, training)


def bn_add_relu(
    input: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    r"""``relu(batch_norm(input, ...) + residual)`` in one pass: a block's identity tail.

    ``residual`` must have the shape, dtype and device of ``input``. The backward's
    reduction pass writes the gradient of ``residual`` (the masked ``grad_out``) as it
    reads ``grad_out``; its elementwise pass writes the gradient of ``input``.
    """
    op = "bn_add_relu"
    momentum, eps = _checked_scalars(op, input, running_mean, running_var, weight, bias, training, momentum, eps)
    _checks.check_like(op, "residual", residual, "input", input)
    _checks.check_saved_for_backward(op, ("input", "residual", "weight", "bias"), input, residual, weight, bias)
    ops = backends.resolve(input.device, input.dtype, backend).callable_ops()
    mean, invstd = _statistics(ops, input, running_mean, running_var, training, momentum, eps)
    return ops.bn_add_relu(input, residual, weight, bias, mean, invstd, training)


def dual_bn_add_relu(
    input: Tensor,
    input_d: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    running_mean_d: Optional[Tensor],
    running_var_d: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    weight_d: Optional[Tensor] = None,
    bias_d: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    momentum_d: float = 0.1,
    eps_d: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    r"""``relu(batch_norm(input, ...) + batch_norm(input_d, ..._d))`` in one pass.

    The tail of a block whose shortcut is a conv + BatchNorm downsample: ``input`` is the
    main branch's last conv output, ``input_d`` the downsample conv's output (same shape),
    and every ``*_d`` argument belongs to the downsample BatchNorm.
    """
    op = "dual_bn_add_relu"
    momentum, eps = _checked_scalars(op, input, running_mean, running_var, weight, bias, training, momentum, eps)
    momentum_d, eps_d = _checked_scalars(
        op, input_d, running_mean_d, running_var_d, weight_d, bias_d, training, momentum_d, eps_d, "_d"
    )
    _checks.check_like(op, "input_d", input_d, "input", input)
    _checks.check_saved_for_backward(op, ("input", "weight", "bias", "input_d", "weight_d", "bias_d"),
                                     input, weight, bias, input_d, weight_d, bias_d)
    ops = backends.resolve(input.device, input.dtype, backend).callable_ops()
    mean, invstd = _statistics(ops, input, running_mean, running_var, training, momentum, eps)
    mean_d, invstd_d = _statistics(ops, input_d, running_mean_d, running_var_d, training, momentum_d, eps_d)
    return ops.dual_bn_add_relu(
        input, weight, bias, mean, invstd, input_d, weight_d, bias_d, mean_d, invstd_d, training
    )
