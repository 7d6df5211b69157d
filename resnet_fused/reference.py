"""L0: the plain-PyTorch reference of every fused op.

These functions are the math every backend is tested against and the fallback for
configurations no compiled kernel handles. They take exactly the arguments of the
``torch.ops.resnet_fused`` ops and return the same results; the ``*_backward`` functions
spell out the fused backward formulas of ``csrc/bn_act_params.h``. Registered as the ops
of the ``reference`` backend (namespace ``resnet_fused_reference``), they get the same
fake kernels and autograd as every other backend (``resnet_fused.ops``).

Arithmetic follows the kernels: statistics and normalization in the accumulation type
(float64 for float64 inputs, float32 otherwise), one rounding to the input dtype at the
end, and the pre-activation formed as ``x * scale + shift (+ residual)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._checks import activation_memory_format

__all__ = [
    "accumulation_dtype",
    "batch_stats",
    "bn_relu",
    "bn_relu_backward",
    "bn_add_relu",
    "bn_add_relu_backward",
    "dual_bn_add_relu",
    "dual_bn_add_relu_backward",
]

_REDUCE_DIMS = (0, 2, 3)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and returned in for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(t: Tensor) -> Tensor:
    return t.reshape(1, -1, 1, 1)


def batch_stats(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    acc = accumulation_dtype(input.dtype)
    channels = input.shape[1]
    reduce_size = input.numel() // max(channels, 1)
    if reduce_size == 0:
        # An empty batch has mean 0 and variance 0, like an empty reduction in the
        # kernels; eager leaves the running statistics untouched.
        mean = torch.zeros(channels, dtype=acc, device=input.device)
        return mean, torch.full_like(mean, eps).rsqrt()
    with torch.no_grad():
        var, mean = torch.var_mean(input.to(acc), dim=_REDUCE_DIMS, correction=0)
        if running_mean is not None:
            unbiased_var = var * (reduce_size / (reduce_size - 1))
            new_mean = momentum * mean + (1.0 - momentum) * running_mean.to(acc)
            new_var = momentum * unbiased_var + (1.0 - momentum) * running_var.to(acc)
            write_running_statistic(running_mean, new_mean)
            write_running_statistic(running_var, new_var)
    return mean, torch.rsqrt(var + eps)


def write_running_statistic(running: Tensor, value: Tensor) -> None:
    """``running.copy_(value)`` as eager's BatchNorm writes a running statistic: without an
    autograd record (a leaf may require grad, under no_grad), and into an inference tensor
    outside inference mode too (copy_ may write one only inside)."""
    with torch.no_grad():
        if running.is_inference():
            with torch.inference_mode():
                running.copy_(value)
        else:
            running.copy_(value)


def _scale_shift(
    mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    acc = mean.dtype
    scale = invstd if weight is None else weight.to(acc) * invstd
    shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
    return scale, shift


def _normalized(
    input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
) -> Tensor:
    acc = accumulation_dtype(input.dtype)
    scale, shift = _scale_shift(mean.to(acc), invstd.to(acc), weight, bias)
    return input.to(scale.dtype) * _per_channel(scale) + _per_channel(shift)


def _finish(pre: Tensor, like: Tensor) -> Tensor:
    return torch.relu(pre).to(like.dtype).contiguous(memory_format=activation_memory_format(like))


def bn_relu(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
) -> Tensor:
    return _finish(_normalized(input, mean, invstd, weight, bias), input)


def bn_add_relu(
    input: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
) -> Tensor:
    pre = _normalized(input, mean, invstd, weight, bias) + residual.to(accumulation_dtype(input.dtype))
    return _finish(pre, input)


def dual_bn_add_relu(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    input_d: Tensor,
    weight_d: Optional[Tensor],
    bias_d: Optional[Tensor],
    mean_d: Tensor,
    invstd_d: Tensor,
    training: bool,
) -> Tensor:
    pre = _normalized(input, mean, invstd, weight, bias) + _normalized(input_d, mean_d, invstd_d, weight_d, bias_d)
    return _finish(pre, input)


# --- backward formulas -------------------------------------------------------------


def _branch_backward(
    g: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    memory_format: torch.memory_format,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one BN branch given the masked upstream gradient ``g`` (acc dtype).

    ``grad_input`` takes ``memory_format``, the layout of the op's main input.
    """
    acc = g.dtype
    mean, invstd = mean.to(acc), invstd.to(acc)
    reduce_size = input.numel() // max(input.shape[1], 1)
    centered = input.to(acc) - _per_channel(mean)
    sum_g = g.sum(_REDUCE_DIMS)
    sum_g_centered = (g * centered).sum(_REDUCE_DIMS)
    scale = invstd if weight is None else weight.to(acc) * invstd
    grad_input = g
    if training and reduce_size > 0:
        grad_input = (
            g
            - _per_channel(sum_g / reduce_size)
            - centered * _per_channel(invstd * invstd * sum_g_centered / reduce_size)
        )
    grad_input = (grad_input * _per_channel(scale)).to(input.dtype)
    return grad_input.contiguous(memory_format=memory_format), sum_g_centered * invstd, sum_g


def _masked_grad(grad_out: Tensor, pre: Tensor, output_dtype: torch.dtype) -> Tensor:
    # As torch.relu's backward (threshold_backward): 0 where the output is <= 0, so a NaN
    # passes. The output as stored: a pre-activation that rounds to 0 in it masks too.
    return torch.where(pre.to(output_dtype) <= 0, 0.0, grad_out.to(pre.dtype))


def bn_relu_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    g = _masked_grad(grad_out, _normalized(input, mean, invstd, weight, bias), input.dtype)
    return _branch_backward(g, input, weight, mean, invstd, training, activation_memory_format(input))


def bn_add_relu_backward(
    grad_out: Tensor,
    input: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    pre = _normalized(input, mean, invstd, weight, bias) + residual.to(accumulation_dtype(input.dtype))
    g = _masked_grad(grad_out, pre, input.dtype)
    memory_format = activation_memory_format(input)
    grad_input, grad_weight, grad_bias = _branch_backward(g, input, weight, mean, invstd, training, memory_format)
    grad_residual = g.to(residual.dtype).contiguous(memory_format=memory_format)
    return grad_input, grad_residual, grad_weight, grad_bias


def dual_bn_add_relu_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    input_d: Tensor,
    weight_d: Optional[Tensor],
    bias_d: Optional[Tensor],
    mean_d: Tensor,
    invstd_d: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    pre = _normalized(input, mean, invstd, weight, bias) + _normalized(
        input_d, mean_d, invstd_d, weight_d, bias_d
    )
    g = _masked_grad(grad_out, pre, input.dtype)
    memory_format = activation_memory_format(input)
    main = _branch_backward(g, input, weight, mean, invstd, training, memory_format)
    downsample = _branch_backward(g, input_d, weight_d, mean_d, invstd_d, training, memory_format)
    return (*main, *downsample)
