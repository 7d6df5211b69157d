"""What the suite measures: residual blocks and ResNet-50, their inputs, one step per mode.

Blocks are the identity blocks of each stage (the blocks a stage repeats): torchvision's
``Bottleneck`` at ResNet-50's four stage shapes and ``BasicBlock`` at ResNet-18's. The
model is torchvision's ``resnet50``. Modes:

``train``      forward + backward (a random upstream gradient; the input requires grad, as
               it does inside a network); ResNet-50: cross-entropy loss, backward, SGD step
``fwd_train``  forward in training mode (batch statistics) under ``no_grad``
``infer``      eval mode under ``inference_mode``
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("train", "fwd_train", "infer")
BLOCK_WORKLOADS = ("bottleneck", "basicblock")
MODEL_WORKLOADS = ("resnet50",)

# (stage, block in/out channels, block width, H = W) of the identity blocks.
STAGES = {
    "bottleneck": (  # ResNet-50: Bottleneck(inplanes, planes), inplanes = 4 * planes
        ("layer1", 256, 64, 56),
        ("layer2", 512, 128, 28),
        ("layer3", 1024, 256, 14),
        ("layer4", 2048, 512, 7),
    ),
    "basicblock": (  # ResNet-18: BasicBlock(planes, planes)
        ("layer1", 64, 64, 56),
        ("layer2", 128, 128, 28),
        ("layer3", 256, 256, 14),
        ("layer4", 512, 512, 7),
    ),
}


@dataclasses.dataclass(frozen=True)
class Size:
    """Batch sizes and scaling of one size preset."""

    name: str
    batch: int  # blocks
    model_batch: int  # ResNet-50
    image: int  # ResNet-50 input height = width
    channel_div: int = 1  # divides every block channel count (tests only)
    spatial_div: int = 1  # divides every block H = W (tests only)


SIZES = {
    "gpu": Size("gpu", batch=128, model_batch=128, image=224),
    # Full stage shapes, small batches: the whole CPU suite fits a few minutes on 2 cores.
    "cpu": Size("cpu", batch=8, model_batch=4, image=224),
    # Smoke tests: every code path in seconds; the numbers mean nothing.
    "tiny": Size("tiny", batch=2, model_batch=2, image=32, channel_div=16, spatial_div=8),
}


def default_size(device: torch.device) -> Size:
    return SIZES["gpu" if device.type == "cuda" else "cpu"]


def default_precision(device: torch.device) -> str:
    """bf16 autocast on a GPU (how ResNets train there); fp32 on the CPU."""
    return "bf16" if device.type == "cuda" else "fp32"


@dataclasses.dataclass(frozen=True)
class Case:
    """One workload at one shape and batch size."""

    workload: str  # "bottleneck", "basicblock" or "resnet50"
    shape: str  # stage name; "<H>px" for the model
    batch: int
    channels: int  # block input = output channels; 3 for the model
    width: int  # block width (planes); 0 for the model
    hw: int

    @property
    def is_model(self) -> bool:
        return self.workload in MODEL_WORKLOADS

    def build(self) -> nn.Module:
        """The torchvision module, seeded, with random BatchNorm affine parameters and
        running statistics (so eval mode and BN folding see realistic values)."""
        from torchvision.models.resnet import BasicBlock, Bottleneck, resnet50

        torch.manual_seed(0)
        if self.workload == "resnet50":
            model = resnet50()
        elif self.workload == "bottleneck":
            model = Bottleneck(self.channels, self.width)
        else:
            model = BasicBlock(self.channels, self.width)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        return model


def cases(workload: str, size: Size) -> list[Case]:
    if workload == "resnet50":
        return [Case("resnet50", f"{size.image}px", size.model_batch, 3, 0, size.image)]
    return [
        Case(workload, stage, size.batch, max(1, c // size.channel_div), max(1, w // size.channel_div),
             max(1, hw // size.spatial_div))
        for stage, c, w, hw in STAGES[workload]
    ]


@dataclasses.dataclass(frozen=True)
class Precision:
    """How activations are computed: bf16 autocast (fp32 parameters) or plain fp32."""

    name: str  # "bf16" or "fp32"

    @property
    def activation_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def autocast(self, device: torch.device):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)


PRECISIONS = ("bf16", "fp32")
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


@dataclasses.dataclass
class Inputs:
    x: Tensor  # block input (requires grad) or model images
    grad: Tensor | None = None  # block: upstream gradient of the output
    labels: Tensor | None = None  # model: class labels


def make_inputs(case: Case, precision: Precision, layout: str, device: torch.device) -> Inputs:
    gen = torch.Generator(device="cpu").manual_seed(1)
    fmt = LAYOUTS[layout]

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)

    shape = (case.batch, case.channels, case.hw, case.hw)
    if case.is_model:  # images arrive in fp32; autocast casts them
        labels = torch.randint(0, 1000, (case.batch,), generator=gen).to(device)
        return Inputs(randn(*shape, dtype=torch.float32), labels=labels)
    dtype = precision.activation_dtype  # a block's input is the previous block's output
    return Inputs(randn(*shape, dtype=dtype).requires_grad_(), grad=randn(*shape, dtype=dtype))


def _unnamed(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def make_step(
    case: Case, mode: str, model: nn.Module, run: Callable[[Tensor], Tensor], inputs: Inputs,
    precision: Precision, device: torch.device, *, named_phases: bool = False,
) -> Callable[[], Tensor]:
    """One step of ``mode``: returns the forward output. ``run`` is the provider's callable
    (``model`` itself, its compiled wrapper, ...); ``model`` owns the parameters.
    ``named_phases``: a training step's forward, backward and optimizer run inside
    ``record_function("step: <phase>")`` ranges, for the profiler (benchmarks/step_profile.py)."""
    model.train(mode != "infer")
    autocast = precision.autocast
    phase = torch.profiler.record_function if named_phases else _unnamed
    x = inputs.x if mode == "train" else inputs.x.detach()
    if mode == "infer":
        def step():
            with torch.inference_mode(), autocast(device):
                return run(x)
    elif mode == "fwd_train":
        def step():
            with torch.no_grad(), autocast(device):
                return run(x)
    elif case.is_model:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step():
            with phase("step: forward"), autocast(device):
                logits = run(x)
                loss = F.cross_entropy(logits, inputs.labels)
            with phase("step: backward"):
                loss.backward()
            with phase("step: optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return logits.detach()
    else:
        def step():
            model.zero_grad(set_to_none=True)
            x.grad = None
            with phase("step: forward"), autocast(device):
                y = run(x)
            with phase("step: backward"):
                y.backward(inputs.grad)
            return y.detach()
    return step


def make_forward(run: Callable[[Tensor], Tensor], inputs: Inputs, precision: Precision, device: torch.device):
    """The forward half of a training step: what it saves for backward is what it keeps."""

    def forward():
        with precision.autocast(device):
            return run(inputs.x)

    return forward
