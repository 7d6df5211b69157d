"""Models, training runs and comparisons shared by the block and fuse tests."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Optional

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import resnet_fused
from helpers import log_margin

# Each torchvision block configuration the fused blocks must reproduce:
# name -> (block class, inplanes, planes, stride, downsample?, groups, base_width, dilation).
BLOCK_CONFIGS = {
    "basic": (BasicBlock, 16, 16, 1, False, 1, 64, 1),
    "basic_stride2_downsample": (BasicBlock, 16, 24, 2, True, 1, 64, 1),
    "bottleneck": (Bottleneck, 64, 16, 1, False, 1, 64, 1),
    "bottleneck_stride2_downsample": (Bottleneck, 32, 16, 2, True, 1, 64, 1),
    "bottleneck_groups32_width4": (Bottleneck, 64, 16, 1, False, 32, 4, 1),
    "bottleneck_width128": (Bottleneck, 64, 16, 1, False, 1, 128, 1),
    "bottleneck_dilation2": (Bottleneck, 64, 16, 1, False, 1, 64, 2),
}


@pytest.fixture
def no_tf32():
    """float32 convolutions in float32, not TF32 (cuDNN's default), so float32 tolerances apply."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


@contextlib.contextmanager
def running_on(backend: str):
    """``use_backend(backend)``, with Triton's first configuration pinned: autotuning every
    new shape of a whole block or model would take minutes."""
    with resnet_fused.use_backend(backend):
        if backend != "triton":
            yield
            return
        from resnet_fused.triton import _runtime

        with _runtime.pinned_config(_runtime.pinned_index() or 0):  # RESNET_FUSED_TRITON_CONFIG, or the first
            yield


def make_block(config: str, cls: Optional[type] = None, norm_layer=None) -> nn.Module:
    """A block of ``config``, as torchvision's class or ``cls`` (a fused class)."""
    base, inplanes, planes, stride, has_downsample, groups, base_width, dilation = BLOCK_CONFIGS[config]
    downsample = None
    if has_downsample:
        out = planes * base.expansion
        downsample = nn.Sequential(conv1x1(inplanes, out, stride), (norm_layer or nn.BatchNorm2d)(out))
    cls = cls or base
    return cls(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)


def block_input_shape(config: str, batch: int = 2, size: int = 6) -> tuple[int, int, int, int]:
    return (batch, BLOCK_CONFIGS[config][1], size, size)


def randomize_batch_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm parameters and running statistics (defaults make folding trivial)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
    return model


def calibrate_running_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics of ``x``'s activations (random ones blow up a deep network in eval)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    training = model.training
    for m in norms:
        m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.train(training)


def fused_copy(model: nn.Module) -> nn.Module:
    fused, _ = resnet_fused.fuse(copy.deepcopy(model))
    return fused


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


@dataclasses.dataclass
class Run:
    """What a few training steps produced, step by step, and the final state."""

    outputs: list[torch.Tensor]
    input_grads: list[torch.Tensor]
    param_grads: list[dict[str, torch.Tensor]]
    state: dict[str, torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every recorded tensor under a readable name."""
        named = {}
        for i, (y, gx, gp) in enumerate(zip(self.outputs, self.input_grads, self.param_grads)):
            named[f"step{i}.output"] = y
            named[f"step{i}.input_grad"] = gx
            named.update({f"step{i}.grad.{k}": v for k, v in gp.items()})
        named.update({f"final.{k}": v for k, v in self.state.items()})
        return named


def train(
    model: nn.Module,
    inputs: list[torch.Tensor],
    grads_out: list[torch.Tensor],
    *,
    autocast: Optional[torch.dtype] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Run:
    """Optimizer steps (default: SGD with momentum and weight decay) on given inputs and upstream gradients."""
    opt = optimizer or sgd(model)
    run = Run([], [], [], {})
    for x, g in zip(inputs, grads_out):
        x = x.clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            y = model(x)
        y.backward(g.to(y.dtype))
        run.outputs.append(y.detach().clone())
        run.input_grads.append(x.grad.clone())
        run.param_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    run.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return run


def assert_close_scaled(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float) -> None:
    """``max|actual - expected| <= tol * max|expected|`` per tensor; integer tensors exactly.

    Scaled by each tensor's largest magnitude rather than elementwise: gradients and
    reductions round differently in any two correct implementations, and elements that
    cancel to near zero carry absolute, not relative, rounding error.
    """
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        a = actual[name]
        assert a.shape == e.shape and a.dtype == e.dtype, f"{name}: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        if not e.is_floating_point():
            assert torch.equal(a, e), f"{name}: {a} != {e}"
            continue
        error = (a.double() - e.double()).abs().max().item() if e.numel() else 0.0
        scale = e.double().abs().max().item() if e.numel() else 0.0
        assert error <= tol * scale or error == 0.0, f"{name}: max error {error:.3g} > {tol:g} * {scale:.3g}"


def assert_within_eager_error(
    fused: dict[str, torch.Tensor],
    eager: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    factor: float = 4.0,
    floor: float = 1e-3,
) -> None:
    """Reduced precision: the fused result is about as close to the float32 reference as eager's.

    Per tensor, in the L2 norm: ``|fused - ref| <= factor * |eager - ref| + floor * |ref|``.
    Both round the same convolutions, so their errors are of one order; they are not
    equal because a pre-activation within rounding of zero flips its ReLU mask in one
    and not the other, moving a gradient element by O(1). With enough elements (inputs
    of 16x16 and more) both suffer such flips: over 35 random runs of every block
    configuration the ratio stayed below 2.4; ``factor`` 4 leaves room for other
    hardware. ``floor`` covers tensors eager happens to get almost exactly right.
    """
    for name, ref in reference.items():
        if not ref.is_floating_point():
            assert torch.equal(fused[name], ref) and torch.equal(eager[name], ref), name
            continue
        ref = ref.double()
        fused_error = (fused[name].double() - ref).norm().item()
        eager_error = (eager[name].double() - ref).norm().item()
        bound = factor * eager_error + floor * ref.norm().item()
        log_margin(f"{name} (L2 error, by eager's)",
                   0.0 if fused_error == 0 else fused_error / bound if bound > 0 else float("inf"))
        assert fused_error <= bound, f"{name}: fused error {fused_error:.3g} > {bound:.3g} (eager {eager_error:.3g})"


def random_like_outputs(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Random upstream gradients shaped like the model's outputs (so ReLU masks matter)."""
    with torch.no_grad():
        probe = copy.deepcopy(model).eval()
        return [torch.randn_like(probe(x).float()) for x in inputs]

