"""Eval-mode BatchNorm folding: ``bn(conv(x))`` as one convolution with a bias.

With running statistics a BatchNorm is a per-channel affine map, so it folds into the
convolution before it::

    scale = weight / sqrt(running_var + eps)
    conv_bn(x) = conv(x, conv.weight * scale) + (bias - running_mean * scale [+ conv.bias * scale])

A block's eval forward then needs only conv + bias + ReLU and conv + bias + add + ReLU.
On CUDA those run as cuDNN's fused kernels (``torch.cudnn_convolution_relu`` /
``torch.cudnn_convolution_add_relu``); elsewhere, and where cuDNN has no fused engine, as
``F.conv2d`` with the folded bias followed by an in-place ReLU or the fused add + ReLU op.

Folded weights are cached per block (:class:`FoldCache`) and rebuilt whenever a source
tensor may have changed. For each of conv.weight, conv.bias, bn.weight, bn.bias,
bn.running_mean, bn.running_var and bn.num_batches_tracked the cache records the tensor
object's ``id``, its version counter (``_version``: bumped by every in-place write through
autograd-visible tensors: foreach optimizer steps, ``load_state_dict``'s ``copy_``,
in-place ops under ``no_grad``; eager BatchNorm bumps ``num_batches_tracked``'s, not its
running statistics'), its storage, ``data_ptr()``, dtype, device, shape and strides
(``.to()``, ``param.data = ...``, ``load_state_dict(assign=True)``, new Parameters), plus
``bn.eps``, the compute dtype (autocast on or off) and the count of the steps of
optimizers that bump no version (fused ones; ZeroRedundancyOptimizer, whose shards
arrive by broadcast; ones over FSDP2's DTensor shards, gathered into parameters whose
versions FSDP2 preserves). The entry holds a weak reference to each source's storage,
which keeps no memory alive but keeps the storage's StorageImpl, whose address it
compares, from being reused meanwhile: a tensor that matches an entry views the very
memory it was folded from. It holds no reference to the tensors themselves, not even a
weak one, which would keep ``torch.utils.swap_tensors`` (``load_state_dict`` and ``.to()``
under ``torch.__future__.set_swap_module_params_on_conversion(True)``) from swapping them.
A BatchNorm with running statistics but no ``num_batches_tracked`` is folded afresh on
every call: nothing would show that an eager training forward updated its statistics.
One kind of write is invisible to all of these: an in-place write that bypasses the
Parameter's version counter (through ``param.data``, ``p.data.mul_(2)``, whose tensor has a
version counter of its own; a NumPy view; a ``vector_to_parameters`` alias; a
``torch.distributed`` collective; a CUDA graph's replay; another process writing a model
in shared memory); a
block drops its cache on every ``train()`` / ``eval()`` call, so calling ``model.eval()``
after such an edit refreshes it. It drops it on ``load_state_dict`` too, and on ``.to()``
and the like: the folded weights of replaced sources are not kept until the next call.
On CUDA a fold's kernels run on the caller's stream: a forward on another stream waits
for an event recorded after them before it reads the folded tensors. While a CUDA graph
is captured the blocks fold without the cache, so each replay folds the weights of then.
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _checks, backends

__all__ = ["FoldedConv", "FoldCache", "fold", "compute_dtype", "conv_bias", "conv_bias_relu", "conv_bias_add_relu"]


class FoldedConv(NamedTuple):
    """A convolution's weight and bias with the following BatchNorm folded in."""

    weight: Tensor  # conv.weight's shape and memory format, in the compute dtype
    bias: Tensor  # [out_channels], compute dtype


def _fold_accumulation_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """Folding arithmetic: float64 if any source is float64, float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> FoldedConv:
    """``conv`` followed by eval-mode ``bn`` as one convolution, in ``dtype``.

    Computed in float32 (float64 for float64 sources) and rounded once to ``dtype``;
    not differentiable.
    """
    eps = _checks.as_float("batch_norm", "eps", bn.eps)
    _checks.check_eps("batch_norm", "eps", eps, training=False)  # F.batch_norm's rule in eval
    _check_per_channel_sources(conv, bn)
    acc = _fold_accumulation_dtype(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.to(acc) + eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(acc)
        shift = -bn.running_mean.to(acc) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(acc)
        if conv.bias is not None:
            shift = shift + conv.bias.to(acc) * scale
        # empty_like keeps conv.weight's exact strides, so the convolution picks the
        # memory format (and output layout) it picks for the unfolded weight.
        weight = torch.empty_like(conv.weight, dtype=dtype)
        torch.mul(conv.weight, scale.reshape(-1, 1, 1, 1), out=weight)
        return FoldedConv(weight, shift.to(dtype))


def _check_per_channel_sources(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv.bias and the BatchNorm's tensors as the unfolded path needs them: one value per
    output channel, on the convolution's device. Folding would broadcast a 1-element one
    where eager raises, or fail inside its arithmetic."""
    channels, device = conv.weight.shape[0], conv.weight.device
    tensors = (("conv.bias", conv.bias), ("bn.weight", bn.weight), ("bn.bias", bn.bias),
               ("bn.running_mean", bn.running_mean), ("bn.running_var", bn.running_var))
    for name, t in tensors:
        if t is not None and (t.shape != (channels,) or t.device != device):
            raise ValueError(
                f"fold(): expected `{name}` to be a 1-D tensor of {channels} elements (one per output channel "
                f"of the convolution) on {device}, got shape {list(t.shape)} on {t.device}"
            )


_ABSENT = object()


def _member(module: nn.Module, store: dict, name: str) -> Optional[Tensor]:
    """``getattr(module, name)`` for a registered parameter or buffer, without the
    microsecond of ``Module.__getattr__`` (this runs for every folded conv call)."""
    value = store.get(name, _ABSENT)
    return getattr(module, name) if value is _ABSENT else value


def _sources(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Optional[Tensor], ...]:
    """What a folded pair is computed from, plus ``num_batches_tracked``: eager BatchNorm
    updates the running statistics without bumping their versions (a downsample's, run by
    torchvision's code) but bumps this counter's in the same forward."""
    params, bn_params, bn_buffers = conv._parameters, bn._parameters, bn._buffers
    return (
        _member(conv, params, "weight"), _member(conv, params, "bias"),
        _member(bn, bn_params, "weight"), _member(bn, bn_params, "bias"),
        _member(bn, bn_buffers, "running_mean"), _member(bn, bn_buffers, "running_var"),
        _member(bn, bn_buffers, "num_batches_tracked"),
    )  # fmt: skip


def _state(t: Tensor) -> tuple:
    # The storage by the address of its StorageImpl (held by an entry's weak reference,
    # so not reused meanwhile), and the data's address within it.
    return (t._version, t.untyped_storage()._cdata, t.data_ptr(), t.dtype, t.device, t.shape, t.stride())


# Some optimizers write the parameters without bumping their versions: every step of one
# moves this count, and an entry built before it is stale. Counted from the first
# FoldCache on (_watch_optimizer_steps).
# Under a lock: two threads' optimizers may step at once, and neither count may be lost.
_optimizer_steps = 0
_step_hook = None
_steps_lock = threading.Lock()


def _writes_unversioned(optimizer) -> bool:
    """Whether an optimizer's step changes parameters without bumping their versions:
    torch.optim's fused implementations (``fused=True``); ZeroRedundancyOptimizer, which
    broadcasts each rank's updated shard into the other ranks' parameters (a collective
    writes in place, unversioned); and one over DTensor parameters, FSDP2's shards, which
    ``fully_shard`` gathers into the same unsharded parameters before each forward with
    their version counters preserved."""
    if any(group.get("fused") for group in optimizer.param_groups):
        return True
    # A module not imported has no instances: nothing is imported here.
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer):
        return True
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and any(
        group["params"] and isinstance(group["params"][0], dtensor.DTensor) for group in optimizer.param_groups
    )


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    if _writes_unversioned(optimizer):
        with _steps_lock:
            _optimizer_steps += 1


def _watch_optimizer_steps() -> None:
    global _step_hook
    with _steps_lock:
        if _step_hook is None:
            _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)


class _Entry(NamedTuple):
    ids: tuple  # id() per source tensor, None for an absent one
    states: tuple  # _state per source tensor, None for an absent one
    # A weak reference to each source's storage: it keeps the storage's StorageImpl, not
    # its memory, so no other storage takes that address (compared by _state) while the
    # entry lives, and a replaced weight (`param.data = ...`, load_state_dict(assign=True))
    # is freed at once.
    storages: tuple
    eps: float
    optimizer_steps: int
    folded: FoldedConv
    # On CUDA, the stream the fold's kernels ran on and an event recorded there after them:
    # a forward on another stream waits for it before reading the folded tensors, once
    # (that stream's later work follows its wait); `readers` are the streams that have.
    stream: Optional[tuple]
    ready: Optional["torch.cuda.Event"]
    readers: set

    def matches(self, sources: tuple[Optional[Tensor], ...], eps: float) -> bool:
        for ident, state, t in zip(self.ids, self.states, sources):
            if t is None:
                if ident is not None:
                    return False
            elif ident != id(t) or state != _state(t):
                return False
        return eps == self.eps and self.optimizer_steps == _optimizer_steps


class FoldCache:
    """Folded convolutions of one block, each rebuilt when its sources change."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, torch.dtype], _Entry] = {}
        _watch_optimizer_steps()

    def __reduce__(self):
        # A copy (deepcopy, pickle) starts empty: a copied StorageWeakRef would release
        # the same reference twice, and a pickled one is a pointer into another process.
        return (FoldCache, ())

    def get(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> FoldedConv:
        """The folded ``conv``/``bn`` pair ``name`` in ``dtype``, from the cache when valid,
        ready to be read on the current stream."""
        sources = _sources(conv, bn)
        if sources[-1] is None or any(t is not None and t.is_inference() for t in sources):
            # Inference tensors have no version counter; without num_batches_tracked an
            # eager BatchNorm's training forward updates the statistics unseen.
            return fold(conv, bn, dtype)
        weight = conv.weight
        stream = torch._C._cuda_getCurrentStream(weight.get_device()) if weight.is_cuda else None
        key = (name, dtype)
        eps = _checks.as_float("batch_norm", "eps", bn.eps)  # a float: a tensor eps could change in place
        entry = self._entries.get(key)
        if entry is None or not entry.matches(sources, eps):
            # The sources' versions are read before the fold reads their values: a write
            # meanwhile (another thread) leaves an entry that no longer matches, never new
            # versions beside values folded from the old ones.
            ids = tuple(None if t is None else id(t) for t in sources)
            states = tuple(None if t is None else _state(t) for t in sources)
            storages = tuple(StorageWeakRef(t.untyped_storage()) for t in sources if t is not None)
            optimizer_steps = _optimizer_steps
            # Built outside inference mode so the entry is usable in any later mode.
            with torch.inference_mode(False):
                folded = fold(conv, bn, dtype)
                ready = None
                if stream is not None:
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(weight.device))
            entry = _Entry(ids, states, storages, eps, optimizer_steps, folded, stream, ready, set())
            # A new dictionary, published by one store: another thread may be iterating the
            # old one. This pair's stale entries in other dtypes are dropped, not kept alive.
            entries = {k: v for k, v in self._entries.items() if k[0] != name or v.matches(sources, eps)}
            entries[key] = entry
            self._entries = entries
        elif entry.stream != stream and stream not in entry.readers:
            _read_on_current_stream(entry, weight.device)
            entry.readers.add(stream)
        return entry.folded


def _read_on_current_stream(entry: _Entry, device: torch.device) -> None:
    """Orders the current stream after ``entry``'s fold, which ran on another stream (a
    server thread with a stream of its own, ``with torch.cuda.stream(s):``), and records
    the stream on the folded tensors: once the entry is dropped, the caching allocator
    reuses their memory only after this stream's reads."""
    current = torch.cuda.current_stream(device)
    current.wait_event(entry.ready)
    entry.folded.weight.record_stream(current)
    entry.folded.bias.record_stream(current)


_AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)


def compute_dtype(x: Tensor, conv: nn.Conv2d) -> Optional[torch.dtype]:
    """The dtype ``conv`` runs in on ``x``, as eager decides it; None when eager would raise.

    Under autocast the convolution runs in the autocast dtype when autocast casts both
    input and weight (float16, bfloat16, float32: it leaves float64, and an integer input
    to conv's own error); otherwise input and weight must agree.
    """
    device_type, weight_dtype = x.device.type, conv.weight.dtype
    if (
        x.dtype in _AUTOCAST_CASTS
        and weight_dtype in _AUTOCAST_CASTS
        and torch._C._is_autocast_available(device_type)  # torch.amp's test, without its wrapper; not on meta
        and torch.is_autocast_enabled(device_type)
    ):
        return torch.get_autocast_dtype(device_type)
    return x.dtype if x.dtype == weight_dtype else None


# ------------------------------------------------------------------ convolutions

_CUDNN_FUSED_REFUSED: set[tuple] = set()  # configurations cuDNN's fused ops raised on


def pair_of(size) -> tuple:
    """An nn.Conv2d size as F.conv2d reads it: a pair, one value for both sides, or an int
    (as a user may set it after construction)."""
    if isinstance(size, int):
        return (size, size)
    size = tuple(size)
    return size * 2 if len(size) == 1 else size


def _cudnn_fused_applies(x: Tensor, conv: nn.Conv2d) -> bool:
    return (
        x.is_cuda
        and torch.backends.cudnn.enabled
        and not torch.backends.cudnn.deterministic  # the fused ops choose algorithms freely
        and not torch.are_deterministic_algorithms_enabled()
        and not isinstance(conv.padding, str)
    )


def _cudnn_fused_or(fallback: Callable[[], Tensor], x: Tensor, conv: nn.Conv2d, folded: FoldedConv,
                    residual: Optional[Tensor]) -> Tensor:
    """cuDNN's fused conv + bias [+ residual] + ReLU where it applies, else ``fallback()``.

    On an H200 both fused ops cost about the plain convolution's time on ResNet-50 shapes
    (bf16, channels_last; the table in docs/modules.md, "Kernels after folding"), so no
    convolution followed by a separate epilogue pass can beat them; they are used wherever
    they run.
    cuDNN finds no fused engine for some configurations and raises: such a configuration
    is remembered and runs ``fallback`` from then on, once ``fallback`` has run it (bad
    input raises there too, and is no reason to give up on cuDNN for later calls).
    """
    if not _cudnn_fused_applies(x, conv):
        return fallback()
    name = "cudnn_convolution_relu" if residual is None else "cudnn_convolution_add_relu"
    # Pairs, as the fused ops' schema takes them (F.conv2d also takes the int, list or
    # one-value spellings a user may set after construction).
    geometry = (pair_of(conv.stride), pair_of(conv.padding), pair_of(conv.dilation), conv.groups)
    # What cuDNN's choice of engine depends on: TF32 admits more engines for float32.
    config = (name, x.device, x.dtype, x.is_contiguous(memory_format=torch.channels_last),
              tuple(folded.weight.shape), *geometry, x.dtype == torch.float32 and _conv_fp32_precision())
    if config in _CUDNN_FUSED_REFUSED:
        return fallback()
    try:
        if residual is None:
            return torch.cudnn_convolution_relu(x, folded.weight, folded.bias, *geometry)
        return torch.cudnn_convolution_add_relu(x, folded.weight, residual, 1.0, folded.bias, *geometry)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        out = fallback()  # raises for bad input: then nothing is remembered
        _CUDNN_FUSED_REFUSED.add(config)
        warnings.warn(
            f"resnet_fused: torch.{name} does not run {config} ({error}); using F.conv2d and a "
            f"separate epilogue for it",
            RuntimeWarning,
            stacklevel=3,
        )
        return out


def _conv_fp32_precision() -> object:
    """cuDNN's float32 convolution precision settings, as torch keeps them: the global and
    the convolutions' own ``fp32_precision`` ("tf32", "ieee", "none": follow the global)
    where torch has them; else ``allow_tf32``, which torch refuses to read once the
    per-operator settings differ."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        return torch.backends.fp32_precision, conv.fp32_precision
    return torch.backends.cudnn.allow_tf32


def conv_bias(x: Tensor, conv: nn.Conv2d, folded: FoldedConv) -> Tensor:
    """``bn(conv(x))`` in eval mode: a convolution with the folded weight and bias."""
    return F.conv2d(x, folded.weight, folded.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_bias_relu(x: Tensor, conv: nn.Conv2d, folded: FoldedConv) -> Tensor:
    """``relu(bn(conv(x)))`` in eval mode. Not differentiable (no autograd formula)."""
    # relu_: one pass, in place on a fresh tensor
    return _cudnn_fused_or(lambda: conv_bias(x, conv, folded).relu_(), x, conv, folded, None)


def conv_bias_add_relu(x: Tensor, conv: nn.Conv2d, folded: FoldedConv, residual: Tensor) -> Tensor:
    """``relu(bn(conv(x)) + residual)`` in eval mode. Not differentiable."""
    return _cudnn_fused_or(lambda: _add_relu(conv_bias(x, conv, folded), residual), x, conv, folded, residual)


def _add_relu(out: Tensor, residual: Tensor) -> Tensor:
    """The fused op with unit statistics, relu(out * 1 + 0 + residual): one pass where
    out.add_(residual).relu_() takes two."""
    channels = out.shape[1]
    zeros = torch.zeros(channels, dtype=torch.float32, device=out.device)
    ones = torch.ones(channels, dtype=torch.float32, device=out.device)
    _checks.OP_CHECKS["bn_add_relu"](out, residual, None, None, zeros, ones, False)  # eager ops do not check
    ops = backends.resolve(out.device, out.dtype).callable_ops()
    return ops.bn_add_relu(out, residual, None, None, zeros, ones, False)
