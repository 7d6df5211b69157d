"""Inputs and tolerances shared by the tests."""

from __future__ import annotations

import torch

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def activation(shape, dtype=torch.float32, layout="nhwc", device="cpu", *, scale=1.0, offset=0.0):
    """A fresh random (N, C, H, W) activation in the given layout, never all zeros."""
    x = torch.randn(shape, device=device, dtype=torch.float32) * scale + offset
    return x.to(dtype).contiguous(memory_format=LAYOUTS[layout])


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as `x` in a non-dense view (every other column) of `x`'s layout."""
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    wide = torch.empty(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device, memory_format=layout)
    with torch.no_grad():
        wide[..., ::2] = x
    return wide[..., ::2].requires_grad_(x.requires_grad) if x.is_leaf else wide[..., ::2]
