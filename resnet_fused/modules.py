"""Drop-in fused versions of torchvision's residual blocks.

:class:`FusedBasicBlock` and :class:`FusedBottleneck` subclass torchvision's
``BasicBlock`` and ``Bottleneck`` and replace only ``forward``: the constructor, the
submodules (``conv1, bn1, ..., relu, downsample``), ``expansion`` and ``stride`` are
torchvision's own, so state_dicts, ``isinstance`` checks (torchvision's
``zero_init_residual``, user code) and ``ResNet(FusedBottleneck, ...)`` work unchanged,
and :func:`resnet_fused.fuse` can turn an existing block into a fused one by switching its
class in place (see :mod:`resnet_fused.fuse_model`).

Forward, per BatchNorm, in the mode eager's BatchNorm would run:

* batch statistics (training, or eval without running statistics): ``F.conv2d``, then
  :func:`resnet_fused.functional.bn_relu` for the inner stages and ``bn_add_relu`` /
  ``dual_bn_add_relu`` (one pass over both branches of a conv + BN downsample) for the
  last;
* running statistics with no autograd graph to record (``no_grad``, ``inference_mode``,
  or nothing requiring grad): BatchNorm folded into the convolution
  (:mod:`resnet_fused.folding`), conv + bias + ReLU and conv + bias + add + ReLU;
* running statistics with autograd (e.g. frozen BatchNorm while fine-tuning), and under
  ``torch.compile``: ``F.conv2d`` then the same fused ops in eval mode.

A block whose configuration the fused path does not cover (another norm layer or
activation, extra submodules, a downsample other than conv + BatchNorm, none where the
block changes its input's shape, hooks on a submodule) runs torchvision's forward
unchanged and warns once (:func:`unsupported_reason`), as it does under forward-mode AD,
``torch.func`` transforms and ``torch.fx.symbolic_trace``.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as _forward_ad
from torch.nn.modules import module as _module
from torchvision.models.resnet import BasicBlock, Bottleneck

from . import backends, folding, functional

__all__ = [
    "FusedBasicBlock",
    "FusedBottleneck",
    "BatchNormCall",
    "batch_norm_call",
    "uses_batch_statistics",
    "unsupported_reason",
]


# ------------------------------------------------------------------ BatchNorm semantics


class BatchNormCall(NamedTuple):
    """The arguments eager's BatchNorm passes to ``F.batch_norm``, in its order."""

    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    training: bool  # normalize with batch statistics
    momentum: float
    eps: float


def uses_batch_statistics(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` normalizes with batch statistics: in training, and in eval without running stats."""
    return _uses_batch_statistics(bn.training, bn.running_mean, bn.running_var)


def _uses_batch_statistics(training: bool, running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> bool:
    # bool(): eager takes any truthy `training` (a module's flag set to 1); the ops take a bool
    return bool(training) or (running_mean is None and running_var is None)


def _tensors(bn: nn.BatchNorm2d) -> tuple:
    """(weight, bias, running_mean, running_var, num_batches_tracked) of ``bn``, read from its
    dictionaries: ``Module.__getattr__`` costs ~0.4 us a read, and this runs for every
    BatchNorm of every forward. Where a wrapper keeps them elsewhere (a DataParallel
    replica's or FSDP's parameters are plain attributes), through ``getattr``."""
    try:
        parameters, buffers = bn._parameters, bn._buffers
        return (parameters["weight"], parameters["bias"], buffers["running_mean"], buffers["running_var"],
                buffers["num_batches_tracked"])
    except KeyError:
        return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked


def batch_norm_call(bn: nn.BatchNorm2d) -> BatchNormCall:
    """What ``bn.forward`` passes to ``F.batch_norm``, with its one side effect.

    Mirrors ``torch.nn.modules.batchnorm._BatchNorm.forward``: in training with tracked
    statistics it first bumps ``num_batches_tracked`` (``momentum=None`` then means a
    cumulative average, factor ``1 / num_batches_tracked``); running statistics are
    passed in eval, and in training only when tracked.
    """
    weight, bias, running_mean, running_var, tracked = _tensors(bn)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and tracked is not None:
        tracked.add_(1)
        factor = 1.0 / float(tracked) if bn.momentum is None else bn.momentum
    passes_running = not bn.training or bn.track_running_stats
    return BatchNormCall(
        running_mean if passes_running else None,
        running_var if passes_running else None,
        weight,
        bias,
        _uses_batch_statistics(bn.training, running_mean, running_var),
        factor,
        bn.eps,
    )


# ------------------------------------------------------------------ what the fused path covers


def _class_reason(name: str, module: nn.Module, expected: type) -> str:
    """'conv1 is Identity, not nn.Conv2d'; a class of the same name (e.g. QAT's Conv2d)
    named by its module, so the reason does not read 'Conv2d, not nn.Conv2d'."""
    cls = type(module)
    shown = f"{cls.__module__}.{cls.__qualname__}" if cls.__name__ == expected.__name__ else cls.__name__
    return f"{name} is {shown}, not nn.{expected.__name__}"


def _conv_reason(name: str, conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return _class_reason(name, conv, nn.Conv2d)
    if conv.padding_mode != "zeros":
        return f"{name} pads with padding_mode={conv.padding_mode!r}"
    return None


def _norm_reason(name: str, norm: nn.Module) -> Optional[str]:
    if type(norm) is not nn.BatchNorm2d:
        return _class_reason(name, norm, nn.BatchNorm2d)
    return None


def _keeps_size(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` gives every input an output of its own height and width (False
    for an attribute F.conv2d would refuse too: torchvision's forward then raises eager's
    error). Each side must pad what the dilated kernel takes away."""
    try:
        if conv.stride != (1, 1) and folding.pair_of(conv.stride) != (1, 1):
            return False
        if conv.padding == "same":
            return True
        try:  # the pairs nn.Conv2d makes, as they are: no conversions (runs every forward)
            (ph, pw), (dh, dw), (kh, kw) = conv.padding, conv.dilation, conv.kernel_size
        except (TypeError, ValueError):  # "valid", an int, one value for both sides
            (ph, pw) = (0, 0) if conv.padding == "valid" else folding.pair_of(conv.padding)
            (dh, dw), (kh, kw) = folding.pair_of(conv.dilation), folding.pair_of(conv.kernel_size)
        return 2 * ph == dh * (kh - 1) and 2 * pw == dw * (kw - 1)
    except (TypeError, ValueError):
        return False


def _identity_reason(modules: dict, pairs: tuple[tuple[str, str], ...]) -> Optional[str]:
    """Why a block without a downsample cannot add its input to its output in a fused op,
    which needs both of one shape; torchvision's ``out += identity`` broadcasts a
    one-channel input (a grayscale stem) or a 1x1 one, and raises for other shapes."""
    first, last = modules[pairs[0][0]], modules[pairs[-1][0]]
    if first.in_channels != last.out_channels:
        return f"no downsample, and the block maps {first.in_channels} channels to {last.out_channels}"
    for conv_name, _ in pairs:
        if not _keeps_size(modules[conv_name]):
            return f"no downsample, and {conv_name} changes the height or width"
    return None


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _has_global_hooks() -> bool:
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


_BASIC_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"))
_BOTTLENECK_PAIRS = _BASIC_PAIRS + (("conv3", "bn3"),)
# Tuples, not sets: torch 2.11's Dynamo cannot trace `dict.keys() - frozenset`.
_BASIC_MODULES = ("conv1", "bn1", "conv2", "bn2", "relu", "downsample")
_BOTTLENECK_MODULES = _BASIC_MODULES + ("conv3", "bn3")


def unsupported_reason(block: BasicBlock | Bottleneck) -> Optional[str]:
    """Why ``block`` cannot run the fused forward, or None when it can.

    The fused forward replaces the calls to the block's submodules, so it requires
    exactly the modules torchvision's forward calls (nn.Conv2d with zero padding,
    nn.BatchNorm2d, nn.ReLU, a downsample of nn.Conv2d + nn.BatchNorm2d, or none where the
    block keeps its input's shape) and no hooks that those calls would run. Runs on every
    forward: it reads the submodule dictionaries directly (``Module.__getattr__`` costs a
    microsecond a call).
    """
    if "forward" in block.__dict__:
        return "its forward is replaced on the instance"
    bottleneck = isinstance(block, Bottleneck)
    modules = block._modules
    allowed = _BOTTLENECK_MODULES if bottleneck else _BASIC_MODULES
    extra = [name for name in modules if name not in allowed]
    if extra:
        return f"extra submodules {', '.join(sorted(extra))}"
    pairs = _BOTTLENECK_PAIRS if bottleneck else _BASIC_PAIRS
    for conv_name, bn_name in pairs:
        reason = _conv_reason(conv_name, modules.get(conv_name)) or _norm_reason(bn_name, modules.get(bn_name))
        if reason:
            return reason
    relu = modules.get("relu")
    if type(relu) is not nn.ReLU:
        return f"relu is {type(relu).__name__}, not nn.ReLU"
    submodules = list(modules.values())
    downsample = modules.get("downsample")
    if downsample is None:
        reason = _identity_reason(modules, pairs)
        if reason:
            return reason
    else:
        if type(downsample) is not nn.Sequential or len(downsample._modules) != 2:
            return "downsample is not nn.Sequential(nn.Conv2d, nn.BatchNorm2d)"
        conv_d, bn_d = downsample._modules.values()
        reason = _conv_reason("downsample[0]", conv_d) or _norm_reason("downsample[1]", bn_d)
        if reason:
            return reason
        submodules += [conv_d, bn_d]
    replaced = [m for m in submodules if m is not None and "forward" in m.__dict__]
    if replaced:  # e.g. accelerate's hooks, which wrap forward on the instance
        return f"forward replaced on the instance of {', '.join(type(m).__name__ for m in replaced)}"
    hooked = [m for m in submodules if m is not None and _has_hooks(m)]
    if hooked:
        return f"hooks on {', '.join(type(m).__name__ for m in hooked)} (fusing would skip them)"
    if _has_global_hooks():
        return "global module hooks are registered (fusing would skip them)"
    return None


def _transform_reason(x) -> Optional[str]:
    """Why the fused forward cannot run under the active transforms, or None.

    The fused ops have no forward-mode derivative (jvp) and no batching rule (vmap), and
    the folded eval path writes through ``out=``, which vmap refuses; ``torch.fx``'s
    symbolic tracing (FX graph-mode quantization, torchvision's ``create_feature_extractor``)
    passes ``x`` as a Proxy, which the fused forward's Python decisions cannot branch on.
    torchvision's forward runs under all three (and traces to the conv / BatchNorm / ReLU
    graph those tools expect). (Under torch.compile, Dynamo traces the fused ops.)
    """
    if torch.compiler.is_compiling():
        return None
    if _forward_ad._current_level >= 0:
        return "forward-mode AD (a dual level) is active"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform (vmap, grad, jvp, ...) is active"
    if isinstance(x, torch.fx.Proxy):
        return "torch.fx symbolic tracing (the traced graph is torchvision's forward, unfused)"
    return None


_warned: set[tuple[str, str]] = set()


def _warn_reference_path(block: nn.Module, reason: str) -> None:
    key = (type(block).__name__, reason)
    if key not in _warned:
        _warned.add(key)
        plain = next(c for c in type(block).__mro__ if c in (BasicBlock, Bottleneck))
        warnings.warn(
            f"resnet_fused: a {key[0]} runs torchvision's {plain.__name__}.forward (not fused): {reason}",
            RuntimeWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------ the fused forward


def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _records_autograd(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad
        or any(t is not None and t.requires_grad for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var))
    )


def _folded_compute_dtype(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Optional[torch.dtype]:
    """The dtype to run ``bn(conv(x))`` folded in; None when it must run unfolded.

    Folding needs both running statistics (eval with one of them None runs unfolded, where
    the fused op refuses the pair by name) and pays off only through the cache, which holds
    non-differentiable tensors and relies on eager tensor versions: so no autograd graph,
    and no tracing (torch.compile, torch.jit.trace), which sees conv + fused op instead: a
    trace would otherwise keep the cached folded weights as constants, blind to weights
    loaded into it later. Nor under a dispatch mode (FakeTensorMode: the cache would keep
    fake weights, keyed by real parameters, for the next real call) or on the meta device,
    input or weights: ``F.conv2d`` of a CPU input and meta weights returns uninitialized
    memory, which the unfolded path's BatchNorm refuses where it is on meta too (with only
    the convolution on meta eager returns that memory as well). Other devices mixed: the
    convolution raises.
    """
    if (
        bn.training
        or bn.running_mean is None  # batch statistics, or half a pair: the ops name what is wrong
        or bn.running_var is None
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or _records_autograd(x, conv, bn)
        or torch._C._len_torch_dispatch_stack() > 0
        or x.is_meta
        or conv.weight.is_meta
    ):
        return None
    return folding.compute_dtype(x, conv)


_CACHE_ATTRIBUTE = "_fold_cache"


class _FusedBlock:
    """The fused forward shared by both blocks; mixed in before the torchvision class."""

    _inner_stages: tuple[tuple[str, str], ...]  # (conv, bn) pairs ending in BN + ReLU
    _last_stage: tuple[str, str]  # the pair ending in BN + residual add + ReLU

    def forward(self, x: Tensor) -> Tensor:
        reason = unsupported_reason(self) or _transform_reason(x)
        if reason is not None or x.dim() != 4:  # other ranks: eager raises its own error
            if reason is not None and not torch.compiler.is_compiling():  # Dynamo cannot trace warnings.warn
                _warn_reference_path(self, reason)
            return super().forward(x)
        out = x
        for conv_name, bn_name in self._inner_stages:
            out = self._conv_bn_relu(conv_name, bn_name, out)
        return self._conv_bn_add_relu(*self._last_stage, out, x)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script asks this first: TorchScript cannot compile the fused forward
        (its backends are Python), and a torchvision stand-in put in its place would
        silently unfuse the scripted model too (torch.jit.script writes what this returns
        into the parent's modules)."""
        raise RuntimeError(
            f"resnet_fused: torch.jit.script cannot compile {type(self).__name__}'s fused forward. "
            "torch.export.export and torch.compile trace the fused ops; to script, script an unfused copy: "
            "torch.jit.script(resnet_fused.unfuse(copy.deepcopy(model)))"
        )

    def _folded(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> folding.FoldedConv:
        if conv.weight.is_cuda and torch.cuda.is_current_stream_capturing():
            # Folded inside the graph: each replay folds the weights of then. Cached folded
            # weights would be replayed stale after an in-place load_state_dict, and read
            # freed once a later call folded them anew. (torch.cuda.graph makes the capture
            # stream's device current.)
            return folding.fold(conv, bn, dtype)
        cache = self.__dict__.get(_CACHE_ATTRIBUTE)
        if cache is None:  # created lazily: fuse() turns blocks into this class without __init__
            cache = self.__dict__[_CACHE_ATTRIBUTE] = folding.FoldCache()
        return cache.get(name, conv, bn, dtype)

    def _conv_bn_relu(self, conv_name: str, bn_name: str, x: Tensor) -> Tensor:
        conv, bn = getattr(self, conv_name), getattr(self, bn_name)
        dtype = _folded_compute_dtype(x, conv, bn)
        if dtype is not None:
            return folding.conv_bias_relu(x.to(dtype), conv, self._folded(conv_name, conv, bn, dtype))
        t = _conv(conv, x)
        backends.resolve(t.device, t.dtype)  # a backend that cannot run t raises before the batch is counted
        return functional.bn_relu(t, *batch_norm_call(bn))

    def _shortcut(self, x: Tensor) -> Tensor:
        """The identity branch as eager computes it, folded where it can be."""
        if self.downsample is None:
            return x
        conv, bn = self.downsample
        dtype = _folded_compute_dtype(x, conv, bn)
        if dtype is not None:
            return folding.conv_bias(x.to(dtype), conv, self._folded("downsample", conv, bn, dtype))
        return self.downsample(x)

    def _conv_bn_add_relu(self, conv_name: str, bn_name: str, out: Tensor, x: Tensor) -> Tensor:
        conv, bn = getattr(self, conv_name), getattr(self, bn_name)
        dtype = _folded_compute_dtype(out, conv, bn)
        if dtype is not None and self.downsample is not None and _records_autograd(x, *self.downsample):
            dtype = None  # a trainable shortcut: the folded add (cuDNN's) has no derivative
        if dtype is not None:
            folded = self._folded(conv_name, conv, bn, dtype)
            return folding.conv_bias_add_relu(out.to(dtype), conv, folded, self._shortcut(x).to(dtype))
        t = _conv(conv, out)
        main = batch_norm_call(bn)
        if self.downsample is None:
            return functional.bn_add_relu(t, x.to(t.dtype), *main)  # x: the block input, maybe outside autocast
        conv_d, bn_d = self.downsample
        dual = uses_batch_statistics(bn_d) == main.training  # the dual op normalizes both branches in one mode
        # Eager runs this BatchNorm before the downsample: bad arguments to it must raise
        # before the downsample's BatchNorm moves its running statistics or counter.
        functional._checked_scalars("dual_bn_add_relu" if dual else "bn_add_relu", t, *main)
        if not dual:
            return functional.bn_add_relu(t, self.downsample(x).to(t.dtype), *main)
        d = batch_norm_call(bn_d)
        return functional.dual_bn_add_relu(
            t, _conv(conv_d, x),
            main.running_mean, main.running_var, d.running_mean, d.running_var,
            main.weight, main.bias, d.weight, d.bias,
            main.training, main.momentum, main.eps, d.momentum, d.eps,
        )  # fmt: skip

    def train(self, mode: bool = True):
        # Also the refresh point for edits no version counter sees (folding.py).
        self.__dict__.pop(_CACHE_ATTRIBUTE, None)
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        # Loaded weights replace the sources (assign=True) or overwrite them: the folded
        # copies of the old ones are not kept until this block runs again.
        self.__dict__.pop(_CACHE_ATTRIBUTE, None)
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half(), ...: the cache would keep the old tensors (its sources'
        # storages and the folded weights) alive until this block runs again.
        self.__dict__.pop(_CACHE_ATTRIBUTE, None)
        return super()._apply(fn, *args, **kwargs)

    def _replicate_for_data_parallel(self):
        # nn.DataParallel copies __dict__ into each replica: its own cache, not the original's
        # (whose entries would hold the replica's tensors alive on the replica's device).
        replica = super()._replicate_for_data_parallel()
        replica.__dict__.pop(_CACHE_ATTRIBUTE, None)
        return replica

    def __getstate__(self):
        state = super().__getstate__()  # Module's: drops a compile()d call bound to this block
        state.pop(_CACHE_ATTRIBUTE, None)
        return state


class FusedBasicBlock(_FusedBlock, BasicBlock):
    """torchvision's ``BasicBlock`` with a fused forward; same constructor, submodules and state_dict."""

    _inner_stages, _last_stage = _BASIC_PAIRS[:-1], _BASIC_PAIRS[-1]


class FusedBottleneck(_FusedBlock, Bottleneck):
    """torchvision's ``Bottleneck`` with a fused forward; same constructor, submodules and state_dict.

    The stride sits on the 3x3 ``conv2``, as in torchvision (ResNet v1.5).
    """

    _inner_stages, _last_stage = _BOTTLENECK_PAIRS[:-1], _BOTTLENECK_PAIRS[-1]


FUSED_CLASS: dict[type, type] = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}
TORCHVISION_CLASS: dict[type, type] = {fused: plain for plain, fused in FUSED_CLASS.items()}


def set_block_class(block: nn.Module, cls: type) -> None:
    """Turns ``block`` into an instance of ``cls`` in place.

    The object, its submodules, parameters, buffers and hooks stay the same, the way
    ``torch.nn.utils.parametrize`` changes a module's class; only ``forward`` changes.
    """
    block.__dict__.pop(_CACHE_ATTRIBUTE, None)
    block.__class__ = cls
