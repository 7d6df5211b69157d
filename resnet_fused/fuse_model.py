"""``fuse(model)`` and ``unfuse(model)``: torchvision residual blocks to fused ones and back.

Both work in place on any ``nn.Module`` (blocks nested anywhere, in ``nn.Sequential`` or
as attributes, or the model itself a block) by changing each block's class
(:func:`resnet_fused.modules.set_block_class`): every module, Parameter, buffer and hook
object stays the one it was, so an optimizer, a ``state_dict`` reference or a hook handle
taken before keeps working, and ``unfuse`` undoes ``fuse`` exactly.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .modules import FUSED_CLASS, TORCHVISION_CLASS, set_block_class, unsupported_reason

__all__ = ["fuse", "unfuse", "FuseReport", "BlockReport"]

FUSED = "fused"
ALREADY_FUSED = "already fused"
NOT_FUSED = "not fused"

FUSED_CLASS_NAME = {plain.__name__: fused.__name__ for plain, fused in FUSED_CLASS.items()}


@dataclasses.dataclass(frozen=True)
class BlockReport:
    name: str  # qualified name in the model, "" for the model itself
    block_class: str  # the class it had when fuse() found it
    status: str  # FUSED, ALREADY_FUSED or NOT_FUSED
    reason: str = ""  # why not fused / why an already fused block runs torchvision's forward


@dataclasses.dataclass
class FuseReport:
    """What :func:`fuse` did to each residual block of a model; ``print`` it for a summary."""

    blocks: list[BlockReport] = dataclasses.field(default_factory=list)

    def _with(self, status: str) -> list[BlockReport]:
        return [b for b in self.blocks if b.status == status]

    @property
    def fused(self) -> list[BlockReport]:
        return self._with(FUSED)

    @property
    def already_fused(self) -> list[BlockReport]:
        return self._with(ALREADY_FUSED)

    @property
    def not_fused(self) -> list[BlockReport]:
        return self._with(NOT_FUSED)

    def __str__(self) -> str:
        if not self.blocks:
            return "resnet_fused.fuse: no torchvision BasicBlock or Bottleneck found"
        fused = Counter(FUSED_CLASS_NAME[b.block_class] for b in self.fused)
        counts = ", ".join(f"{cls} x{n}" for cls, n in sorted(fused.items()))
        summary = f"resnet_fused.fuse: {len(self.fused)} of {len(self.blocks)} residual blocks fused"
        lines = [summary + (f" ({counts})" if counts else "")]
        if self.already_fused:
            unfused_forward = [b for b in self.already_fused if b.reason]
            line = f"  {len(self.already_fused)} already fused"
            if unfused_forward:
                verb = "runs" if len(unfused_forward) == 1 else "run"
                line += f"; {len(unfused_forward)} of them {verb} torchvision's forward:"
            lines.append(line)
            lines.extend(_grouped_by_reason(unfused_forward))
        if self.not_fused:
            lines.append(f"  {len(self.not_fused)} left as they were (torchvision's forward):")
            lines.extend(_grouped_by_reason(self.not_fused))
        return "\n".join(lines)


def _grouped_by_reason(blocks: list[BlockReport]) -> list[str]:
    """One line per block class and reason, naming its blocks: a model whose blocks all share
    a reason (a quantizable ResNet's subclassed blocks) gets one line, not one per block."""
    names: dict[tuple[str, str], list[str]] = {}
    for b in blocks:
        names.setdefault((b.block_class, b.reason), []).append(b.name or "<model>")
    return [f"    {', '.join(group)} ({block_class}): {reason}" for (block_class, reason), group in names.items()]


def _check_model(caller: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}(): expected `model` to be an nn.Module (an instance), got {type(model).__name__}")


def fuse(model: nn.Module) -> tuple[nn.Module, FuseReport]:
    """Turns every torchvision ``BasicBlock`` / ``Bottleneck`` in ``model`` into its fused class.

    In place; returns ``(model, report)``. Blocks the fused forward does not cover
    (:func:`resnet_fused.modules.unsupported_reason`) and subclasses of torchvision's
    blocks (whose forward may differ) are left as they are, listed in the report with
    the reason, and warned about. Idempotent: fused blocks are reported as such.
    """
    _check_model("fuse", model)
    report = FuseReport()
    for name, block in model.named_modules():
        cls = type(block)
        if cls in FUSED_CLASS:
            reason = unsupported_reason(block)
            if reason is None:
                set_block_class(block, FUSED_CLASS[cls])
                report.blocks.append(BlockReport(name, cls.__name__, FUSED))
            else:
                report.blocks.append(BlockReport(name, cls.__name__, NOT_FUSED, reason))
        elif cls in TORCHVISION_CLASS:
            report.blocks.append(BlockReport(name, cls.__name__, ALREADY_FUSED, unsupported_reason(block) or ""))
        elif isinstance(block, (BasicBlock, Bottleneck)):
            base = BasicBlock if isinstance(block, BasicBlock) else Bottleneck
            reason = f"a subclass of torchvision's {base.__name__}; only the exact class is fused (its forward may differ)"
            report.blocks.append(BlockReport(name, cls.__name__, NOT_FUSED, reason))
    if report.not_fused:
        warnings.warn(str(report), RuntimeWarning, stacklevel=2)
    return model, report


def unfuse(model: nn.Module) -> nn.Module:
    """Turns every fused block in ``model`` back into torchvision's class, in place; returns ``model``."""
    _check_model("unfuse", model)
    for block in model.modules():
        plain = TORCHVISION_CLASS.get(type(block))
        if plain is not None:
            set_block_class(block, plain)
    return model
