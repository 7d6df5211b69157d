"""FusedBasicBlock / FusedBottleneck against torchvision's blocks, configuration by configuration.

Precision policy:
- float64: several SGD steps, every output, gradient, parameter and running statistic
  within 1e-10 of eager (scaled, see block_helpers.assert_close_scaled): the fused path
  computes the same math, so only rounding at float64 precision may differ.
- float32: one step, scaled tolerance 2e-5, ten times the largest difference seen over 56
  random runs (1.6e-6) and of the order of eager's own float32-vs-float64 error. Longer
  float32 trajectories are not compared elementwise: a pre-activation within rounding of
  zero flips its ReLU mask in one implementation and not the other, after which the runs
  diverge chaotically (eager diverges from its own float64 run the same way).
- bfloat16 (CPU autocast; float16 convolutions barely exist on the CPU): judged against
  eager's own error versus the float32 model (block_helpers.assert_within_eager_error).
"""

from __future__ import annotations

import copy
import datetime
import functools
import gc
import pickle
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from block_helpers import (
    BLOCK_CONFIGS,
    assert_close_scaled,
    assert_within_eager_error,
    block_input_shape,
    fused_copy,
    make_block,
    no_tf32,  # noqa: F401  (fixture)
    random_like_outputs,
    randomize_batch_norms,
    running_on,
    train,
)
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from helpers import LAYOUTS, child_env
import resnet_fused
from resnet_fused import folding, use_backend
from resnet_fused.modules import FusedBasicBlock, FusedBottleneck

CONFIGS = list(BLOCK_CONFIGS)
FUSED = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings(monkeypatch):
    """A block warns once per (class, reason) in a process: each test starts with none
    given, so a test expecting one does not depend on which tests ran before it."""
    monkeypatch.setattr(resnet_fused.modules, "_warned", set())


def pair(config, dtype=torch.float32, layout="nchw", device="cpu"):
    """(torchvision block, fused block) with identical random state."""
    plain = randomize_batch_norms(make_block(config)).to(device, dtype, memory_format=LAYOUTS[layout])
    return plain, fused_copy(plain)


def inputs_for(config, steps, dtype=torch.float32, layout="nchw", device="cpu", **shape):
    return [
        torch.randn(block_input_shape(config, **shape), device=device, dtype=dtype).contiguous(
            memory_format=LAYOUTS[layout]
        )
        for _ in range(steps)
    ]


def eval_output(model, x, **autocast):
    with torch.no_grad(), torch.autocast(x.device.type, enabled=bool(autocast), **autocast):
        return model(x)


# ------------------------------------------------------------------ drop-in compatibility


@pytest.mark.parametrize("config", CONFIGS)
def test_same_constructor_submodules_and_state_dict(config):
    torch.manual_seed(0)
    plain = make_block(config)
    torch.manual_seed(0)
    fused = make_block(config, cls=FUSED[type(plain)])
    assert isinstance(fused, type(plain)) and fused.expansion == plain.expansion and fused.stride == plain.stride
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in plain.named_modules()]
    assert [type(m) for m in fused.modules()][1:] == [type(m) for m in plain.modules()][1:]
    for a, b in zip(fused.state_dict().items(), plain.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    # Interchangeable both ways, strictly.
    randomize_batch_norms(plain)
    fused.load_state_dict(plain.state_dict())
    plain.load_state_dict(fused.state_dict())
    x = inputs_for(config, 1)[0]
    torch.testing.assert_close(eval_output(fused, x), eval_output(plain, x), rtol=1e-5, atol=1e-5)


def test_torchvision_resnet_built_from_fused_blocks():
    """``ResNet(FusedBottleneck, ...)`` works, zero_init_residual (an isinstance check) included."""
    torch.manual_seed(0)
    plain = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, zero_init_residual=True).double()
    torch.manual_seed(0)
    fused = ResNet(FusedBottleneck, [1, 1, 1, 1], num_classes=10, zero_init_residual=True).double()
    assert all(torch.equal(fused.get_parameter(n), p) for n, p in plain.named_parameters())
    assert torch.all(fused.layer1[0].bn3.weight == 0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_close_scaled({"out": fused(x)}, {"out": plain(x)}, 1e-10)


def test_stride_on_the_3x3_conv():
    block = FusedBottleneck(32, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64)))
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.conv3.stride == (1, 1)


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("config", CONFIGS)
def test_train_float64_several_steps(config, backend):
    plain, fused = pair(config, torch.float64)
    inputs = inputs_for(config, 3, torch.float64)
    grads = random_like_outputs(plain, inputs)
    with use_backend(backend):  # "reference": what runs where the extension is not built
        fused_run = train(fused, inputs, grads)
    assert_close_scaled(fused_run.tensors(), train(plain, inputs, grads).tensors(), 1e-10)


class Checkpointed(nn.Module):
    """A block under activation checkpointing, as memory-bound training wraps them."""

    def __init__(self, block: nn.Module, reentrant: bool):
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("config", ["bottleneck", "basic_stride2_downsample"])
def test_train_under_activation_checkpointing(config, reentrant):
    """The recomputed forward (which, as eager's, updates the running statistics a second
    time) and its backward match torchvision's block under the same checkpointing."""
    plain, fused = pair(config, torch.float64)
    inputs = inputs_for(config, 2, torch.float64)
    grads = random_like_outputs(plain, inputs)
    fused_run = train(Checkpointed(fused, reentrant), inputs, grads)
    assert_close_scaled(fused_run.tensors(), train(Checkpointed(plain, reentrant), inputs, grads).tensors(), 1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_train_float32(config, layout):
    plain, fused = pair(config, layout=layout)
    inputs = inputs_for(config, 1, layout=layout)
    grads = random_like_outputs(plain, inputs)
    fused_run, eager_run = train(fused, inputs, grads), train(plain, inputs, grads)
    assert_close_scaled(fused_run.tensors(), eager_run.tensors(), 2e-5)
    # Same memory format as eager (strides of the output and of the input gradient).
    assert fused_run.outputs[0].stride() == eager_run.outputs[0].stride()
    assert fused_run.input_grads[0].stride() == eager_run.input_grads[0].stride()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("model_layout,input_layout", [("nhwc", "nchw"), ("nchw", "nhwc")])
def test_mixed_layouts_return_eager_memory_format(model_layout, input_layout, training):
    config = "bottleneck_stride2_downsample"
    plain, fused = pair(config, layout=model_layout)
    plain.train(training), fused.train(training)
    x = inputs_for(config, 1, layout=input_layout)[0]
    with torch.no_grad():
        y, expected = fused(x), plain(x)
    assert y.stride() == expected.stride()
    assert_close_scaled({"out": y}, {"out": expected}, 2e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_train_bfloat16_autocast(config):
    plain, fused = pair(config, layout="nhwc")
    reference = copy.deepcopy(plain)
    inputs = inputs_for(config, 1, layout="nhwc", size=16)
    grads = random_like_outputs(plain, inputs)
    fused_run = train(fused, inputs, grads, autocast=torch.bfloat16)
    eager_run = train(plain, inputs, grads, autocast=torch.bfloat16)
    assert fused_run.outputs[0].dtype == eager_run.outputs[0].dtype == torch.bfloat16
    assert fused_run.outputs[0].stride() == eager_run.outputs[0].stride()
    assert_within_eager_error(fused_run.tensors(), eager_run.tensors(), train(reference, inputs, grads).tensors())
    # bn1 and the downsample's BatchNorm normalize the same bfloat16 convolution outputs in
    # both blocks: their running statistics are float32 sums of the same values (eager's
    # float32 variance is ~3e-6 off float64's), where an error of one count in 256 shows.
    first = [n for n in fused_run.state if n.startswith(("bn1.running", "downsample.1.running"))]
    assert first, "no running statistics of a block's first BatchNorms"
    for name in first:
        torch.testing.assert_close(fused_run.state[name], eager_run.state[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_batch_of_one_value_per_channel_raises_like_eager():
    plain, fused = pair("basic")
    x = torch.randn(1, 16, 1, 1)
    with pytest.raises(ValueError) as eager_error:
        plain(x)
    with pytest.raises(ValueError) as fused_error:
        fused(x)
    assert str(fused_error.value) == str(eager_error.value)


@pytest.mark.parametrize("training", [True, False])
def test_eps_eager_refuses_is_refused(training):
    """A BatchNorm eps eager refuses (<= 0 in training, < 0 in eval) raises a ValueError
    in the fused forward too, the folded eval path included, rather than normalizing with
    NaN; eps = 0 in eval runs as in eager."""
    plain, fused = pair("bottleneck_stride2_downsample")
    plain.train(training), fused.train(training)
    x = torch.randn(block_input_shape("bottleneck_stride2_downsample"))
    for block in (plain, fused):
        block.bn2.eps = 0.0 if training else -1e-3
    with pytest.raises(ValueError, match="eps must be"):
        plain(x)
    with pytest.raises(ValueError, match=r"expected `eps` to be (positive in training|non-negative), got"):
        with torch.no_grad():
            fused(x)
    if not training:
        for block in (plain, fused):
            block.bn2.eps = 0.0
        with torch.no_grad():
            try:
                expected = plain(x)
            except ValueError:  # torch 2.11 and older refuse eps = 0 in eval too
                with pytest.raises(ValueError, match=r"expected `eps` to be positive \(this torch's"):
                    fused(x)
            else:
                torch.testing.assert_close(fused(x), expected, rtol=2e-5, atol=2e-5)  # the float32 policy above


@pytest.mark.parametrize("config", ["basic_stride2_downsample", "bottleneck_stride2_downsample"])
@pytest.mark.parametrize("last_bn_training", [True, False])
def test_bad_eps_of_the_last_batch_norm_raises_before_the_downsample_runs(config, last_bn_training):
    """Eager runs the last BatchNorm before the downsample, so a bad eps raises before the
    downsample's BatchNorm (training) moves its running statistics or counter; the fused
    forward too, whether it runs the dual op (both BatchNorms training) or composes."""
    plain, fused = pair(config, torch.float64)
    x = torch.randn(block_input_shape(config), dtype=torch.float64)
    downsample_bn = copy.deepcopy(fused.downsample[1].state_dict())
    op = "dual_bn_add_relu" if last_bn_training else "bn_add_relu"  # the op the fused forward calls
    for block, message in ((plain, "eps"), (fused, rf"^{op}\(\): expected `eps`")):
        block.train()
        last = getattr(block, fused._last_stage[1])
        last.train(last_bn_training)
        last.eps = 0.0 if last_bn_training else -1e-3
        with pytest.raises(ValueError, match=message):
            block(x)
    assert_close_scaled(dict(fused.downsample[1].state_dict()), downsample_bn, 0.0)
    assert_close_scaled(dict(fused.state_dict()), dict(plain.state_dict()), 1e-10)  # bn1's (and bn2's) moved


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_half_a_running_statistics_pair_in_eval_is_refused_by_name(missing):
    """Eval with one running statistic set to None: eager raises a RuntimeError ("must be
    defined in evaluation mode"); the fused block runs such a pair unfolded, where the op
    names the pair (the fold raised an AttributeError on None)."""
    plain, fused = pair("bottleneck_stride2_downsample")
    x = inputs_for("bottleneck_stride2_downsample", 1)[0]
    for block in (plain, fused):
        block.eval()
        setattr(block.bn2, missing, None)
    with pytest.raises(RuntimeError, match="must be defined in evaluation mode"), torch.no_grad():
        plain(x)
    with pytest.raises(ValueError, match=r"bn_relu\(\): expected `running_mean` and `running_var` to be given together"), \
            torch.no_grad():
        fused(x)


FOLD_SOURCES_OF_THE_WRONG_SIZE = {
    "bn1.running_mean": lambda block: setattr(block.bn1, "running_mean", torch.full((1,), 0.5)),
    "bn1.weight": lambda block: setattr(block.bn1, "weight", nn.Parameter(torch.ones(8))),
    "conv1.bias": lambda block: setattr(block.conv1, "bias", nn.Parameter(torch.zeros(1))),
}


@pytest.mark.parametrize("source", FOLD_SOURCES_OF_THE_WRONG_SIZE)
def test_a_folded_tensor_of_the_wrong_size_is_refused_by_name(source):
    """Eval under no_grad folds: a one-element tensor would broadcast over the channels (a
    silent wrong output) where eager raises; the fold names the tensor instead."""
    plain, fused = pair("basic")
    x = inputs_for("basic", 1)[0]
    for block in (plain, fused):
        block.eval()
        FOLD_SOURCES_OF_THE_WRONG_SIZE[source](block)
    with pytest.raises(RuntimeError), torch.no_grad():
        plain(x)
    name = source.replace("bn1", "bn").replace("conv1", "conv")
    with pytest.raises(ValueError, match=rf"fold\(\): expected `{name}` to be a 1-D tensor of 16 elements .* got shape"), \
            torch.no_grad():
        fused(x)


def test_a_block_left_on_the_meta_device_refuses_a_cpu_input_in_eval():
    """F.conv2d of a CPU input and meta weights returns uninitialized memory; eager's
    BatchNorm then raises, and so must the fused block, folded or not."""
    with torch.device("meta"):
        plain = make_block("basic")
    fused = fused_copy(plain)
    fused.eval()
    x = inputs_for("basic", 1)[0]
    with pytest.raises(ValueError, match=r"bn_relu\(\): expected `weight` on the device of `input` \(cpu\), got meta"), \
            torch.no_grad():
        fused(x)


def test_a_truthy_training_flag_is_training():
    """A BatchNorm's `training` set to 1 (not a bool): eager trains; so does the fused block."""
    plain, fused = pair("bottleneck_stride2_downsample")
    x = inputs_for("bottleneck_stride2_downsample", 1)[0]
    for block in (plain, fused):
        block.bn1.training = 1
    assert_close_scaled({"out": fused(x)}, {"out": plain(x)}, 1e-5)
    assert_close_scaled(dict(fused.state_dict()), dict(plain.state_dict()), 1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    plain, fused = pair("bottleneck_stride2_downsample", torch.float64)
    plain.train(training), fused.train(training)
    x = torch.randn(0, 32, 6, 6, dtype=torch.float64)
    assert fused(x).shape == plain(x).shape
    assert_close_scaled(dict(fused.state_dict()), dict(plain.state_dict()), 0.0)


# ------------------------------------------------------------------ BatchNorm semantics


def _momentum_none(block):
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None


def _untracked_with_buffers(block):  # buffers exist, but training must not update them
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False


def _frozen_bn1(block):  # the detection-style frozen BatchNorm: eval mode inside a training block
    block.bn1.eval()


def _downsample_bn_eval(block):  # bn3 batch statistics, downsample BN running: no dual op
    block.downsample[1].eval()


def _bn3_train_in_eval(block):  # eval block whose bn3 still trains
    block.eval()
    block.bn3.train()


def _downsample_bn_untracked(block):  # eval: bn3 folds, the downsample BN uses batch statistics
    block.downsample[1] = nn.BatchNorm2d(block.downsample[1].num_features, track_running_stats=False)


def _convolutions_with_bias(block):
    convs = [(block, name) for name in ("conv1", "conv2", "conv3") if hasattr(block, name)]
    convs += [(block.downsample, "0")] if block.downsample is not None else []
    for parent, name in convs:
        conv = getattr(parent, name)
        biased = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, bias=True)
        with torch.no_grad():
            biased.weight.copy_(conv.weight)
            biased.bias.normal_()
        setattr(parent, name, biased)


VARIANTS = {
    "momentum_none": (None, _momentum_none),
    "no_running_stats": (functools.partial(nn.BatchNorm2d, track_running_stats=False), None),
    "affine_false": (functools.partial(nn.BatchNorm2d, affine=False), None),
    "untracked_with_buffers": (None, _untracked_with_buffers),
    "frozen_bn1": (None, _frozen_bn1),
    "downsample_bn_eval": (None, _downsample_bn_eval),
    "downsample_bn_untracked": (None, _downsample_bn_untracked),
    "bn3_train_in_eval": (None, _bn3_train_in_eval),  # Bottleneck only
}
VARIANT_CASES = [
    (variant, config)
    for variant in VARIANTS
    for config in ("basic_stride2_downsample", "bottleneck_stride2_downsample")
    if not (variant == "bn3_train_in_eval" and config.startswith("basic"))
]


@pytest.mark.parametrize("variant,config", VARIANT_CASES)
def test_batch_norm_variants(variant, config):
    """Every BatchNorm mode eager supports, in training steps and then in eval, float64."""
    norm_layer, adjust = VARIANTS[variant]
    plain = make_block(config, norm_layer=norm_layer)
    if adjust:
        adjust(plain)
    plain = randomize_batch_norms(plain).double()
    fused = fused_copy(plain)
    inputs = inputs_for(config, 3, torch.float64)
    grads = random_like_outputs(plain, inputs)
    assert_close_scaled(train(fused, inputs, grads).tensors(), train(plain, inputs, grads).tensors(), 1e-10)
    x = inputs_for(config, 1, torch.float64)[0]
    if adjust is not _bn3_train_in_eval:
        plain.eval(), fused.eval()
    assert_eval_matches(fused, plain, x)
    assert_close_scaled(dict(fused.state_dict()), dict(plain.state_dict()), 1e-10)


@pytest.mark.parametrize("config", ["basic_stride2_downsample", "bottleneck_stride2_downsample"])
def test_convolutions_with_a_bias(config):
    """nn.Conv2d(bias=True) (not torchvision's, still fused): eval folds each conv bias
    through its BatchNorm's scale. In training a conv bias's gradient is 0 up to rounding
    (its BatchNorm subtracts the batch mean), so there it is held to 0 and the rest compared."""
    plain = make_block(config)
    _convolutions_with_bias(plain)
    plain = randomize_batch_norms(plain).double()
    fused = fused_copy(plain)
    inputs = inputs_for(config, 3, torch.float64)
    grads = random_like_outputs(plain, inputs)
    got, want = train(fused, inputs, grads).tensors(), train(plain, inputs, grads).tensors()
    biases = {f"{name}.bias" for name, m in plain.named_modules() if isinstance(m, nn.Conv2d)}
    for key in [k for k in want if ".grad." in k and k.split(".grad.")[1] in biases]:
        torch.testing.assert_close(got.pop(key), torch.zeros_like(want.pop(key)), rtol=0, atol=1e-12)
    assert_close_scaled(got, want, 1e-10)
    x = inputs_for(config, 1, torch.float64)[0]
    plain.eval(), fused.eval()
    upstream = assert_eval_matches(fused, plain, x)
    # Only the conv biases train, the input without a gradient: autograd must still run
    # unfolded, or their gradients would be lost.
    for model in (fused, plain):
        for name, param in model.named_parameters():
            param.requires_grad_(name in biases)
    got, want = (eval_with_gradients(m, x, upstream, input_grad=False) for m in (fused, plain))
    assert len(want) == 1 + len(biases)
    assert_close_scaled(got, want, 1e-10)


def assert_eval_matches(fused, plain, x):
    """Float64 outputs without autograd (the fold) and, with it, outputs and gradients (the
    ops with the BatchNorms' eval arguments) as torchvision's; returns the upstream gradient."""
    want = eval_output(plain, x)
    assert_close_scaled({"eval": eval_output(fused, x)}, {"eval": want}, 1e-10)
    upstream = torch.randn_like(want)
    assert_close_scaled(eval_with_gradients(fused, x, upstream), eval_with_gradients(plain, x, upstream), 1e-10)
    return upstream


def eval_with_gradients(model, x, upstream, input_grad=True):
    """A forward with autograd and the gradients of every parameter that requires one (and
    of the input, with ``input_grad``)."""
    x = x.clone().requires_grad_(input_grad)
    out = model(x)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    leaves = ([x] if input_grad else []) + [p for _, p in named]
    grads = list(torch.autograd.grad(out, leaves, upstream))
    result = {"output": out, **({"input gradient": grads.pop(0)} if input_grad else {})}
    return result | {f"gradient of {n}": g for (n, _), g in zip(named, grads)}


def test_batch_norm_call_reads_parameters_a_wrapper_keeps_as_plain_attributes():
    """A DataParallel replica (``_parameters = {}``) and FSDP keep a BatchNorm's weight and
    bias as plain attributes: what the fused forward passes still takes them."""
    bn = nn.BatchNorm2d(4).train()
    weight, bias = bn.weight, bn.bias
    bn._parameters = {}
    object.__setattr__(bn, "weight", weight)
    object.__setattr__(bn, "bias", bias)
    call = resnet_fused.modules.batch_norm_call(bn)
    assert call.weight is weight and call.bias is bias
    assert call.running_mean is bn.running_mean and call.running_var is bn.running_var and call.training
    assert int(bn.num_batches_tracked) == 1


def test_a_backend_that_cannot_run_raises_before_a_batch_norm_counts_the_batch():
    """A training forward on a backend that cannot run the input (CUDA kernels for CPU
    tensors) raises before any BatchNorm's running statistics or counter move."""
    _, fused = pair("bottleneck_stride2_downsample")
    fused.train()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda'"):
        fused(torch.randn(block_input_shape("bottleneck_stride2_downsample")))
    for name, value in fused.state_dict().items():
        assert torch.equal(value, before[name]), name


# ------------------------------------------------------------------ eval mode


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_eval_folded_float32(config, layout):
    plain, fused = pair(config, layout=layout)
    plain.eval(), fused.eval()
    x = inputs_for(config, 1, layout=layout)[0]
    y, expected = eval_output(fused, x), eval_output(plain, x)
    assert y.stride() == expected.stride()
    assert_close_scaled({"eval": y}, {"eval": expected}, 1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_eval_with_autograd(config):
    """Eval mode with gradients (frozen statistics, trainable weights): unfolded, differentiable."""
    plain, fused = pair(config, torch.float64)
    plain.eval(), fused.eval()
    inputs = inputs_for(config, 2, torch.float64)
    grads = random_like_outputs(plain, inputs)
    assert_close_scaled(train(fused, inputs, grads).tensors(), train(plain, inputs, grads).tensors(), 1e-10)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_eval_trainable_shortcut_only(device, no_tf32):
    """Frozen main branch, trainable downsample: the last stage must stay differentiable
    (the folded conv + bias + add + ReLU, cuDNN's on a GPU, has no derivative)."""
    plain, fused = pair("bottleneck_stride2_downsample", torch.float64 if device == "cpu" else torch.float32,
                        device=device)
    x = inputs_for("bottleneck_stride2_downsample", 1, plain.conv1.weight.dtype, device=device)[0]
    grads = []
    for block in (plain, fused):
        block.eval()
        for name, p in block.named_parameters():
            p.requires_grad_(name.startswith("downsample"))
        out = block(x)
        grads.append(dict(zip(["conv", "bn_weight", "bn_bias"],
                              torch.autograd.grad(out.square().sum(), list(block.downsample.parameters())))))
    assert_close_scaled(grads[1], grads[0], 1e-10 if device == "cpu" else 1e-4)


@pytest.mark.parametrize("config", CONFIGS)
def test_eval_bfloat16_autocast(config):
    plain, fused = pair(config, layout="nhwc")
    plain.eval(), fused.eval()
    x = inputs_for(config, 1, layout="nhwc", size=16)[0]
    y = eval_output(fused, x, dtype=torch.bfloat16)
    expected = eval_output(plain, x, dtype=torch.bfloat16)
    assert y.dtype == expected.dtype == torch.bfloat16 and y.stride() == expected.stride()
    assert_within_eager_error({"eval": y}, {"eval": expected}, {"eval": eval_output(plain, x)})


def test_eval_in_inference_mode():
    plain, fused = pair("bottleneck_stride2_downsample")
    plain.eval(), fused.eval()
    x = inputs_for("bottleneck_stride2_downsample", 1)[0]
    with torch.inference_mode():
        y = fused(x)
    # The cache built in inference mode serves later no_grad calls too.
    assert_close_scaled({"a": y, "b": eval_output(fused, x)}, {"a": eval_output(plain, x), "b": eval_output(plain, x)}, 1e-5)


GLOO = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)


class TestFoldCache:
    """Folded weights are cached and never stale (resnet_fused/folding.py lists what is tracked)."""

    config = "bottleneck_stride2_downsample"

    def setup_method(self):
        self.plain, self.fused = pair(self.config)
        self.plain.eval(), self.fused.eval()
        self.x = inputs_for(self.config, 1)[0]

    def check(self, tol=1e-5, **autocast):
        y, expected = eval_output(self.fused, self.x, **autocast), eval_output(self.plain, self.x, **autocast)
        assert y.dtype == expected.dtype
        assert_close_scaled({"eval": y}, {"eval": expected}, tol)

    def both(self, edit):
        edit(self.plain), edit(self.fused)

    def test_cached_between_calls(self, monkeypatch):
        calls = []
        fold = folding.fold
        monkeypatch.setattr(folding, "fold", lambda *a: calls.append(1) or fold(*a))
        self.check()
        assert len(calls) == 4  # conv1, conv2, conv3, downsample
        self.check()
        assert len(calls) == 4
        self.check(tol=2e-2, dtype=torch.bfloat16)  # autocast: entries of its own, kept side by side
        self.check()
        self.check(tol=2e-2, dtype=torch.bfloat16)
        assert len(calls) == 8
        other = nn.Linear(2, 2)  # an unrelated model's step: not a fused optimizer's
        other(torch.randn(1, 2)).sum().backward()
        torch.optim.SGD(other.parameters(), lr=0.1).step()
        self.check()
        assert len(calls) == 8

    def test_a_write_during_the_fold_leaves_no_stale_entry(self, monkeypatch):
        """Another thread writing a weight while the fold reads it (simulated inside the
        fold): the entry keeps the versions from before the fold, so the next forward folds
        again and matches eager."""
        fold = folding.fold

        def fold_then_write(conv, bn, dtype):
            folded = fold(conv, bn, dtype)
            if conv is self.fused.conv2:
                with torch.no_grad():
                    for block in (self.plain, self.fused):
                        block.conv2.weight.mul_(1.5)
            return folded

        monkeypatch.setattr(folding, "fold", fold_then_write)
        eval_output(self.fused, self.x)
        monkeypatch.setattr(folding, "fold", fold)
        self.check()

    def test_a_refold_publishes_a_new_dictionary(self, monkeypatch):
        """Threads may read a block's cache while another refolds: the dictionary they see
        (the one published while the fold runs) is never changed afterwards; a refold
        publishes a new one."""
        self.check()
        cache = self.fused.__dict__[resnet_fused.modules._CACHE_ATTRIBUTE]
        seen = []
        fold = folding.fold
        monkeypatch.setattr(folding, "fold", lambda *a: seen.append((cache._entries, dict(cache._entries))) or fold(*a))
        with torch.no_grad():
            self.both(lambda m: m.conv2.weight.mul_(0.5))
        self.check()
        assert len(seen) == 1
        (published, contents), = seen
        assert published == contents and cache._entries is not published

    def test_optimizer_step(self):
        self.check()
        for model in (self.plain, self.fused):  # an eval-mode step: no train()/eval() refresh
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            model(self.x).square().sum().backward()
            opt.step()
        self.check()

    @pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.SGD])
    def test_fused_optimizer_step(self, optimizer):
        """A fused optimizer (fused=True) writes the parameters without bumping their
        versions; the cache counts fused optimizers' steps instead."""
        self.check()
        for model in (self.plain, self.fused):
            opt = optimizer(model.parameters(), lr=0.1, fused=True)
            model(self.x).square().sum().backward()
            version = model.conv1.weight._version
            opt.step()
            assert model.conv1.weight._version == version  # what the count is for
        self.check()

    @pytest.mark.timeout(300)
    @GLOO
    def test_zero_redundancy_optimizer_step(self, tmp_path):
        """ZeroRedundancyOptimizer steps a shard of the parameters on each rank and
        broadcasts it into the others', in place and unversioned; the cache counts its
        steps as a fused optimizer's. Two ranks (gloo over loopback, child processes);
        each checks its own eval output (before, both were served stale: 8% and 1% off)."""
        env = child_env(str(Path(__file__).resolve().parent), GLOO_SOCKET_IFNAME="lo")
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", f"import test_modules as t; t._zero_redundancy_rank({rank}, {str(tmp_path)!r})"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for rank in range(2)
        ]
        try:
            for rank, child in enumerate(ranks):
                output, _ = child.communicate(timeout=120)  # a rank whose peer died gives up after 60 s
                assert child.returncode == 0, f"rank {rank}:\n{output[-3000:]}"
        finally:
            for child in ranks:
                if child.poll() is None:
                    child.kill()
                    child.wait()

    @GLOO
    def test_optimizer_over_dtensors(self, tmp_path):
        """FSDP2 (fully_shard) gathers its DTensor shards into the same unsharded parameters
        before each forward, their versions preserved: a step of an optimizer over DTensors
        is counted as a write no version shows."""
        import torch.distributed as dist
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        self.check()  # a cache exists: the steps are counted
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            shard = nn.Parameter(distribute_tensor(torch.randn(8), mesh, [Shard(0)]))
            shard.grad = distribute_tensor(torch.ones(8), mesh, [Shard(0)])
            steps = folding._optimizer_steps
            torch.optim.SGD([shard], lr=0.1).step()
            assert folding._optimizer_steps == steps + 1
        finally:
            dist.destroy_process_group()

    def test_a_copied_cache_starts_empty(self):
        """A FoldCache copied or pickled by itself (a block drops its own when copied)
        starts empty: its entries' weak references to storages are not duplicated (two
        copies released one reference twice and corrupted the heap)."""
        self.check()
        cache = self.fused.__dict__["_fold_cache"]
        assert cache._entries
        for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
            assert clone._entries == {}
        del clone
        gc.collect()
        for _ in range(3):
            torch.randn(4096)  # allocations where a released StorageImpl was
        self.check()

    @pytest.mark.parametrize("counter", ["kept", "None"])
    def test_running_statistics_of_a_training_downsample(self, counter):
        """torchvision's BatchNorm, which runs a training downsample's, updates the running
        statistics without bumping their versions, but bumps num_batches_tracked's. Without
        num_batches_tracked (the buffer set to None) nothing shows the update: such a pair
        is folded afresh on every call (it was served stale, 3% off)."""
        self.check()
        if counter == "None":
            self.both(lambda m: setattr(m.downsample[1], "num_batches_tracked", None))
            self.check()
        for model in (self.plain, self.fused):
            model.downsample[1].train()
            with torch.no_grad():
                model(self.x * 3 + 1)
            model.downsample[1].eval()
        self.check()

    def test_tensors_swapped_on_conversion(self):
        """Under torch.__future__.set_swap_module_params_on_conversion(True), load_state_dict
        and .to() swap the parameters' contents (torch.utils.swap_tensors), which refuses a
        tensor with a weak reference: the cache holds none (it did), and the swapped-in
        values take effect. A submodule converted alone too (the block's _apply does not
        run then)."""
        self.check()
        other = randomize_batch_norms(make_block(self.config)).state_dict()
        previous = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            self.both(lambda m: m.load_state_dict(other))
            self.check()
            self.both(lambda m: m.bn2.double().float())
            self.check()
            self.both(lambda m: m.double())
            self.x = self.x.double()
            self.check(1e-12)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(previous)

    def test_replaced_storage_is_freed(self):
        """After `param.data = new` the old storage is freed at once: an entry keeps a weak
        reference to it, not its memory (it kept the storage until the block refolded)."""
        self.check()
        weight = self.fused.conv2.weight
        old = weakref.ref(weight.untyped_storage())
        weight.data = torch.randn_like(weight)
        gc.collect()
        assert old() is None
        with torch.no_grad():
            self.plain.conv2.weight.copy_(weight)
        self.check()

    def test_another_storage_at_the_same_address_is_told_apart(self):
        """A storage freed by `param.data = ...` may see its address handed to the next
        one (seen: a 147 KB weight back at its address within 1-161 rounds): the Parameter,
        its version and data_ptr() unchanged, new values. The entry tells the storages
        apart (their StorageImpl, which its weak reference keeps from being reused). Made
        deterministic here by a second storage over the same memory, a NumPy array's."""
        self.check()
        weight = self.fused.conv2.weight
        memory = weight.detach().numpy()
        other_storage = torch.from_numpy(memory)
        memory *= 2  # through NumPy: no version counter sees it
        version, address = weight._version, weight.data_ptr()
        weight.data = other_storage
        assert (weight._version, weight.data_ptr()) == (version, address)
        with torch.no_grad():
            self.plain.conv2.weight.copy_(weight)
        self.check()

    def test_load_state_dict_assign_frees_the_old_weights(self):
        """load_state_dict(assign=True) replaces every source: neither they nor their
        folded copies are kept (both were, until the block ran again)."""
        self.check()
        entries = self.fused.__dict__["_fold_cache"]._entries.values()
        old = [weakref.ref(t.untyped_storage()) for t in self.fused.state_dict().values()]
        old += [weakref.ref(entry.folded.weight.untyped_storage()) for entry in entries]
        del entries
        other = randomize_batch_norms(make_block(self.config)).state_dict()
        self.both(lambda m: m.load_state_dict({k: v.clone() for k, v in other.items()}, assign=True))
        gc.collect()
        assert all(ref() is None for ref in old)
        self.check()

    def test_load_state_dict(self):
        self.check()
        other = randomize_batch_norms(make_block(self.config)).state_dict()
        self.both(lambda m: m.load_state_dict(other))
        self.check()

    def test_load_state_dict_assign(self):
        self.check()
        other = randomize_batch_norms(make_block(self.config)).state_dict()
        self.both(lambda m: m.load_state_dict(copy.deepcopy(other), assign=True))
        self.check()

    @pytest.mark.parametrize("name", ["conv1.weight", "bn2.weight", "bn3.bias", "bn1.running_mean", "downsample.1.running_var"])
    def test_in_place_edit(self, name):
        self.check()
        with torch.no_grad():
            self.both(lambda m: m.get_parameter(name).mul_(1.5) if "running" not in name else m.get_buffer(name).mul_(1.5))
        self.check()

    def test_copy_(self):
        self.check()
        new = torch.rand_like(self.plain.bn2.running_var) + 0.5
        self.both(lambda m: m.bn2.running_var.copy_(new))
        self.check()

    def test_data_assignment(self):
        self.check()
        new = torch.randn_like(self.plain.conv2.weight)
        self.both(lambda m: setattr(m.conv2.weight, "data", new.clone()))
        self.check()

    def test_eps(self):
        self.check()
        self.both(lambda m: setattr(m.bn1, "eps", 0.5))
        self.check()

    def test_to_dtype(self):
        self.check()
        self.both(lambda m: m.double())
        assert "_fold_cache" not in self.fused.__dict__  # the old tensors are not kept alive
        self.x = self.x.double()
        self.check(1e-12)

    def test_autocast_on_and_off(self):
        self.check()
        self.check(tol=2e-2, dtype=torch.bfloat16)  # bfloat16 convolutions: eager's own error
        self.check()

    def test_running_statistics_of_a_training_batch_norm(self):
        """A BatchNorm put in training on its own (the block stays in eval, its cache too)
        updates its running statistics through the fused op, which bumps their versions."""
        self.check()
        for model in (self.plain, self.fused):
            model.bn1.train()
            with torch.no_grad():
                model(self.x)
            model.bn1.eval()
        self.check()

    def test_data_in_place_edit_refreshed_by_eval(self):
        """A write through ``.data`` bumps no version counter; ``eval()`` drops the cache."""
        self.check()
        self.both(lambda m: m.bn1.running_var.data.mul_(3.0))
        self.both(lambda m: m.eval())
        self.check()

    def test_tensor_eps_changed_in_place(self):
        """F.batch_norm takes a 0-dim tensor eps; an entry keeps its value, not the tensor,
        which an in-place write would change under it."""
        self.both(lambda m: setattr(m.bn1, "eps", torch.tensor(1e-5)))
        self.check()
        self.both(lambda m: m.bn1.eps.fill_(10.0))
        self.check()

    def test_deepcopy_and_pickle(self):
        self.check()
        assert "_fold_cache" in self.fused.__dict__
        for clone in (copy.deepcopy(self.fused), pickle.loads(pickle.dumps(self.fused))):
            assert "_fold_cache" not in clone.__dict__
            assert_close_scaled({"eval": eval_output(clone, self.x)}, {"eval": eval_output(self.plain, self.x)}, 1e-5)

    def test_data_parallel_replica_has_a_cache_of_its_own(self):
        """nn.DataParallel copies a block's __dict__ into each replica: sharing the cache
        would let a replica's entries hold its tensors alive on its device."""
        self.check()
        cache = self.fused.__dict__["_fold_cache"]
        replica = self.fused._replicate_for_data_parallel()
        assert "_fold_cache" not in replica.__dict__
        assert_close_scaled({"eval": eval_output(replica, self.x)}, {"eval": eval_output(self.plain, self.x)}, 1e-5)
        assert replica.__dict__["_fold_cache"] is not cache and self.fused.__dict__["_fold_cache"] is cache

    def test_deepcopy_and_pickle_after_compile(self):
        """Module.compile() binds a compiled call to the block; a copy must not keep it (it
        would run the original block's weights) and pickling must not fail on it."""
        self.fused.compile()
        clone = copy.deepcopy(self.fused)
        assert "_compiled_call_impl" not in clone.__dict__
        with torch.no_grad():
            clone.conv3.weight.mul_(0.5), self.plain.conv3.weight.mul_(0.5)
        assert_close_scaled({"eval": eval_output(clone, self.x)}, {"eval": eval_output(self.plain, self.x)}, 1e-5)
        assert "_compiled_call_impl" not in pickle.loads(pickle.dumps(self.fused)).__dict__


def _zero_redundancy_rank(rank: int, directory: str) -> None:
    """One rank of TestFoldCache.test_zero_redundancy_optimizer_step: both ranks build the
    same pair, cache the fused block's folded weights, take a step of the optimizer from
    their own gradients (eval mode, so nothing refreshes the cache) and compare. Only the
    convolutions' weights are optimized, as when fine-tuning with frozen BatchNorms: each
    folded pair's one optimized source is then one rank's, and the other rank receives it."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        plain, fused = pair(TestFoldCache.config)
        plain.eval(), fused.eval()
        x = inputs_for(TestFoldCache.config, 1)[0]
        for model in (plain, fused):
            weights = [p for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()]
            optimizer = ZeroRedundancyOptimizer(weights, torch.optim.SGD, lr=0.1)
            eval_output(model, x)
            model(x + rank).square().mean().backward()
            optimizer.step()
        assert_close_scaled({"eval": eval_output(fused, x)}, {"eval": eval_output(plain, x)}, 1e-5)
    finally:
        dist.destroy_process_group()


def test_jit_trace_keeps_no_folded_weights():
    """A trace of an eval block records conv + fused op, not the cache's folded weights as
    constants: weights loaded into it afterwards take effect, whether the cache was warm
    or cold when it was traced (cold: torch.jit.trace's own check, which runs the block
    again, must see the same graph)."""
    config = "bottleneck_stride2_downsample"
    plain, fused = pair(config)
    plain.eval(), fused.eval()
    x = inputs_for(config, 1)[0]
    other = randomize_batch_norms(make_block(config)).state_dict()
    with torch.no_grad():
        traced_cold = torch.jit.trace(copy.deepcopy(fused), x)
        fused(x)  # the cache is warm now
        traced_warm = torch.jit.trace(fused, x)
    plain.load_state_dict(other)
    for traced in (traced_cold, traced_warm):
        traced.load_state_dict(other)
        assert_close_scaled({"eval": eval_output(traced, x)}, {"eval": eval_output(plain, x)}, 1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", ["basic", "bottleneck_stride2_downsample"])
def test_torch_export_traces_the_fused_ops(config, training):
    """torch.export.export records the fused ops (not torchvision's forward, not folded
    weights), and the exported module trains like torchvision's block: outputs, input and
    parameter gradients over SGD steps, running statistics and num_batches_tracked."""
    plain, fused = pair(config, torch.float64)
    plain.train(training), fused.train(training)
    inputs = inputs_for(config, 3, torch.float64)
    grads = random_like_outputs(plain, inputs)
    exported = torch.export.export(fused, (inputs[0],))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    last = "resnet_fused.dual_bn_add_relu.default" if fused.downsample is not None else "resnet_fused.bn_add_relu.default"
    assert {"resnet_fused.bn_relu.default", last} <= ops
    assert ("resnet_fused.batch_stats.default" in ops) == training
    assert not any("batch_norm" in op for op in ops), ops
    assert_close_scaled(train(exported.module(), inputs, grads).tensors(), train(plain, inputs, grads).tensors(), 1e-10)


def test_jit_script_says_what_to_do_instead():
    """TorchScript cannot compile the fused forward: a clear error, and the model is left
    as it was (a torchvision stand-in would be written into it); the unfused copy the
    message names scripts, and matches."""
    config = "bottleneck_stride2_downsample"
    plain, fused = pair(config)
    model = nn.Sequential(fused).eval()
    with pytest.raises(RuntimeError, match=r"cannot compile FusedBottleneck's fused forward.*resnet_fused\.unfuse"):
        torch.jit.script(model)
    assert model[0] is fused and type(fused) is FusedBottleneck
    scripted = torch.jit.script(resnet_fused.unfuse(copy.deepcopy(model)))
    x = inputs_for(config, 1)[0]
    assert_close_scaled({"eval": eval_output(scripted, x)}, {"eval": eval_output(plain.eval(), x)}, 1e-5)


# ------------------------------------------------------------------ the reference path


def test_unsupported_norm_layer_runs_torchvision_forward():
    norm = functools.partial(nn.GroupNorm, 4)
    torch.manual_seed(0)
    plain = make_block("bottleneck", norm_layer=norm)
    torch.manual_seed(0)
    fused = make_block("bottleneck", cls=FusedBottleneck, norm_layer=norm)
    x = inputs_for("bottleneck", 1)[0]
    with pytest.warns(RuntimeWarning, match="bn1 is GroupNorm"):
        y = fused(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        fused(x)
    assert torch.equal(y, plain(x))


def _register_logging_hook(kind, block, log):
    """A hook of ``kind`` that appends what it sees to ``log``; returns its handle."""
    if kind == "forward":
        return block.bn1.register_forward_hook(lambda m, i, o: log.append(("bn1", o.shape)))
    if kind == "full_backward_pre":
        return block.conv2.register_full_backward_pre_hook(lambda m, g: log.append(("conv2", g[0].shape)))
    return torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: log.append((type(m).__name__.removeprefix("Fused"), o.shape)))


@pytest.mark.parametrize("kind, reason", [("forward", "hooks on BatchNorm2d"), ("full_backward_pre", "hooks on Conv2d"),
                                          ("global_forward", "global module hooks are registered")])
def test_hooks_fusing_would_skip_run_torchvision_forward(kind, reason):
    """A hook on a submodule, forward or backward, or a global one: the block runs
    torchvision's forward (which calls them), says why, and gives its results bit for bit."""
    plain, fused = pair("basic")
    x = inputs_for("basic", 1)[0]
    runs = {}
    for name, block in (("plain", plain), ("fused", fused)):
        log = []
        handle = _register_logging_hook(kind, block, log)
        try:
            xi = x.clone().requires_grad_()
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                out = block(xi)
            out.backward(torch.ones_like(out))
        finally:
            handle.remove()
        runs[name] = out, xi.grad, log, [str(w.message) for w in warned]
    (out, grad, log, warned), (want_out, want_grad, want_log, _) = runs["fused"], runs["plain"]
    assert want_log and log == want_log
    assert torch.equal(out, want_out) and torch.equal(grad, want_grad)
    assert any(reason in message for message in warned), warned


def test_a_conv_padding_mode_other_than_zeros_runs_torchvision_forward():
    """Only zero padding is what the fused forward's F.conv2d does: a conv padding by
    reflection (set after construction) keeps the block on torchvision's forward."""
    plain = randomize_batch_norms(BasicBlock(16, 16))
    plain.conv1.padding_mode = "reflect"
    fused = FusedBasicBlock(16, 16)
    fused.load_state_dict(plain.state_dict())
    fused.conv1.padding_mode = "reflect"
    assert resnet_fused.modules.unsupported_reason(fused) == "conv1 pads with padding_mode='reflect'"
    x = torch.randn(2, 16, 6, 6)
    grads = random_like_outputs(plain, [x])
    with pytest.warns(RuntimeWarning, match="padding_mode='reflect'"):
        got = train(fused, [x], grads)
    assert_close_scaled(got.tensors(), train(plain, [x], grads).tensors(), 0)  # the same forward: the same bits


def test_a_forward_replaced_on_the_block_itself_is_left_alone():
    block = BasicBlock(16, 16)
    block.forward = functools.partial(BasicBlock.forward, block)
    assert resnet_fused.modules.unsupported_reason(block) == "its forward is replaced on the instance"


@pytest.mark.parametrize("cls", [BasicBlock, Bottleneck])
def test_a_block_without_downsample_that_reshapes_its_input_runs_torchvision_forward(cls):
    """Without a downsample torchvision adds the block's input to its output as it is:
    `out += identity` broadcasts a one-channel input (a grayscale stem feeding a block) or
    a 1x1 one and raises for other shapes; the fused ops need one shape."""
    torch.manual_seed(0)
    plain = randomize_batch_norms(cls(1, 16 // cls.expansion))  # 1 -> 16 channels
    reason = "no downsample, and the block maps 1 channels to 16"
    with pytest.warns(RuntimeWarning, match=reason):  # fuse leaves it as it is
        assert resnet_fused.fuse(copy.deepcopy(plain))[1].not_fused[0].reason == reason
    fused = FUSED[cls](1, 16 // cls.expansion)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 6, 6)
    grads = random_like_outputs(plain, [x])
    with pytest.warns(RuntimeWarning, match=reason):
        got = train(fused, [x], grads)
    assert_close_scaled(got.tensors(), train(plain, [x], grads).tensors(), 0)  # the same forward: the same bits

    strided = FUSED[cls](16, 16 // cls.expansion, stride=2)  # no downsample: eager's shapes do not add
    resized = "conv1" if cls is BasicBlock else "conv2"
    with pytest.warns(RuntimeWarning, match=f"no downsample, and {resized} changes the height or width"):
        with pytest.raises(RuntimeError, match="must match the size"):  # torchvision's own error
            strided(torch.randn(2, 16, 6, 6))
    assert strided(torch.randn(2, 16, 1, 1)).shape == (2, 16, 1, 1)  # a 1x1 input keeps its size: eager adds it


@pytest.mark.parametrize("attribute, value", [("padding", 1), ("padding", (1,)), ("stride", [1, 1]), ("stride", 1),
                                              ("kernel_size", 3)])
def test_conv_sizes_set_after_construction_as_f_conv2d_takes_them_keep_a_block_fused(attribute, value):
    """F.conv2d takes a size as a pair, one value or an int: a block without a downsample
    whose conv keeps the size in any such spelling still runs fused (and trains as
    torchvision's), and is not reported as changing the size."""
    plain = randomize_batch_norms(BasicBlock(16, 16))
    setattr(plain.conv1, attribute, value)
    assert resnet_fused.modules.unsupported_reason(plain) is None
    fused = fused_copy(plain)
    assert type(fused) is FusedBasicBlock
    x = torch.randn(2, 16, 6, 6)
    grads = random_like_outputs(plain, [x])
    assert_close_scaled(train(fused, [x], grads).tensors(), train(plain, [x], grads).tensors(), 2e-5)  # as test_train_float32
    bottleneck = Bottleneck(64, 16)
    bottleneck.conv1.padding = "valid"  # a 1x1 conv: no padding keeps the size
    assert resnet_fused.modules.unsupported_reason(bottleneck) is None


def test_compiled_block_with_a_hook_runs_torchvision_forward_in_one_graph():
    """torch.compile(fullgraph=True) traces torchvision's forward of a block with a hook, as
    it does torchvision's own block: the once-per-reason warning, which Dynamo cannot
    trace, is left to eager calls."""
    plain, fused = pair("basic")
    for block in (plain, fused):
        block.bn1.register_forward_hook(lambda m, i, o: o * 0.5)
    x = inputs_for("basic", 1)[0]
    torch._dynamo.reset()
    got = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, plain(x))


def test_forward_replaced_on_a_submodule_runs_torchvision_forward():
    """accelerate's hooks (cpu_offload, device maps) wrap a submodule's forward on the
    instance: the fused forward, which calls no submodule forward, would skip them."""
    plain, fused = pair("basic")
    x = inputs_for("basic", 1)[0]
    for block in (plain, fused):
        block.bn1.forward = functools.partial(lambda forward, t: forward(t) * 0.5, block.bn1.forward)
    with pytest.warns(RuntimeWarning, match="forward replaced on the instance of BatchNorm2d"):
        y = fused(x)
    assert torch.equal(y, plain(x))


@pytest.mark.parametrize("training", [True, False])
def test_autograd_transforms_run_torchvision_forward(training):
    """The fused ops have no jvp and no vmap rule: under forward-mode AD and torch.func
    transforms a block runs torchvision's forward (and says so once), as eager would."""
    import torch.autograd.forward_ad as fwAD

    plain, fused = pair("basic", torch.float64)
    plain.train(training), fused.train(training)
    x = inputs_for("basic", 1, torch.float64)[0]
    tangent = torch.randn_like(x)
    with pytest.warns(RuntimeWarning, match="forward-mode AD"):
        with fwAD.dual_level():
            y, dy = fwAD.unpack_dual(fused(fwAD.make_dual(x, tangent)))
    with fwAD.dual_level():
        y_plain, dy_plain = fwAD.unpack_dual(plain(fwAD.make_dual(x, tangent)))
    assert torch.equal(y, y_plain) and torch.equal(dy, dy_plain)
    if training:
        return  # vmap refuses a training BatchNorm's unbatched running statistics, in eager too
    batched = torch.stack([x, x * 2])
    with pytest.warns(RuntimeWarning, match="a torch.func transform"), torch.no_grad():
        out = torch.vmap(fused)(batched)
    with torch.no_grad():
        expected = torch.vmap(plain)(batched)
    assert torch.equal(out, expected)


AUTOCAST_REFUSALS = {
    # Autocast casts floating inputs only: an integer one reaches the convolution as is.
    "integer_input": (torch.float32, lambda shape: torch.randint(0, 5, shape)),
    # Autocast leaves float64 weights as they are: the input, cast to bfloat16, meets them.
    "float64_weights": (torch.float64, torch.randn),
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", AUTOCAST_REFUSALS)
def test_what_autocast_does_not_cast_raises_like_eager(case, training):
    """The convolution fails on what autocast leaves uncast, with eager's error, in eval
    (folded) too."""
    block_dtype, make_input = AUTOCAST_REFUSALS[case]
    plain, fused = pair("basic", block_dtype)
    plain.train(training), fused.train(training)
    x = make_input(block_input_shape("basic"))
    errors = []
    for block in (plain, fused):
        with pytest.raises(RuntimeError) as error, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            block(x)
        errors.append(str(error.value))
    assert errors[1] == errors[0]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("value", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25)], ids=lambda v: type(v).__name__)
def test_numpy_and_tensor_momentum_and_eps_as_in_eager(training, value):
    """A BatchNorm's momentum or eps may be a NumPy scalar or a 0-dim tensor, as eager's
    F.batch_norm takes them (a schema float); they were refused, after the counter moved."""
    plain, fused = pair("bottleneck_stride2_downsample", torch.float64)
    x = torch.randn(block_input_shape("bottleneck_stride2_downsample"), dtype=torch.float64)
    for block in (plain, fused):
        block.train(training)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum, m.eps = value, value * 1e-3
    for no_grad in (False, True):
        with torch.set_grad_enabled(not no_grad):
            assert_close_scaled({"out": fused(x)}, {"out": plain(x)}, 1e-10)
    assert_close_scaled(dict(fused.state_dict()), dict(plain.state_dict()), 1e-10)


def test_fake_tensor_forward_leaves_no_fake_folded_weights():
    """A forward under FakeTensorMode (shape inference, export's tracing) must not fold:
    the cache, keyed by the real parameters, would serve fake weights to the next real call."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    plain, fused = pair("bottleneck_stride2_downsample")
    plain.eval(), fused.eval()
    x = inputs_for("bottleneck_stride2_downsample", 1)[0]
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert isinstance(fused(mode.from_tensor(x)), FakeTensor)
    y = eval_output(fused, x)
    assert type(y) is torch.Tensor
    assert_close_scaled({"eval": y}, {"eval": eval_output(plain, x)}, 1e-5)


def test_meta_device_eval_returns_what_eager_returns():
    """Shape inference on the meta device, in eval without autograd: the meta device has no
    autocast state to ask (it raised) and nothing to fold."""
    plain, fused = pair("bottleneck_stride2_downsample", device="meta")
    plain.eval(), fused.eval()
    x = torch.empty(block_input_shape("bottleneck_stride2_downsample"), device="meta")
    with torch.no_grad():
        y, expected = fused(x), plain(x)
    assert y.is_meta and y.shape == expected.shape and y.stride() == expected.stride()


def test_unbatched_input_raises_like_eager():
    plain, fused = pair("basic")
    x = torch.randn(16, 6, 6)
    with pytest.raises(ValueError, match="expected 4D input"):
        plain(x)
    with pytest.raises(ValueError, match="expected 4D input"):
        fused(x)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_folded_add_relu_rejects_what_the_fused_op_rejects(backend):
    """conv_bias_add_relu calls the eager op, which leaves validation to its caller: it checks
    the op's arguments itself (a 3-D tensor once came back with a wrong shape)."""
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"backend {backend} is not available")
    conv, bn = nn.Conv2d(5, 5, 1).eval(), nn.BatchNorm2d(5).eval()
    folded = folding.fold(conv, bn, torch.float32)
    with use_backend(backend), torch.no_grad():
        good = folding.conv_bias_add_relu(torch.randn(2, 5, 5, 5), conv, folded, torch.randn(2, 5, 5, 5))
        assert good.shape == (2, 5, 5, 5)
        with pytest.raises(ValueError, match="expected `input` to be a 4-D"):
            folding.conv_bias_add_relu(torch.randn(5, 5, 5), conv, folded, torch.randn(1, 5, 5, 5))
        with pytest.raises(ValueError, match="expected `residual` to have the shape of `input`"):
            folding.conv_bias_add_relu(torch.randn(2, 5, 5, 5), conv, folded, torch.randn(2, 5, 5, 4))


def test_a_cudnn_refusal_is_remembered_only_once_the_fallback_ran(monkeypatch):
    """cuDNN's fused op raising makes its configuration take the fallback from then on, but
    not when the fallback raises too: bad input is no refusal (CPU: cuDNN faked)."""
    def refuse(*args):
        raise RuntimeError("no engine")

    monkeypatch.setattr(folding, "_cudnn_fused_applies", lambda x, conv: True)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", refuse)
    monkeypatch.setattr(folding, "_CUDNN_FUSED_REFUSED", set())
    conv, bn = nn.Conv2d(5, 5, 1).eval(), nn.BatchNorm2d(5).eval()
    folded = folding.fold(conv, bn, torch.float32)
    x = torch.randn(2, 5, 5, 5)
    with use_backend("reference"), torch.no_grad():
        with pytest.raises(ValueError, match="expected `residual` to have the shape of `input`"):
            folding.conv_bias_add_relu(x, conv, folded, torch.randn(2, 5, 5, 4))
        assert not folding._CUDNN_FUSED_REFUSED
        with pytest.warns(RuntimeWarning, match="does not run"):
            out = folding.conv_bias_add_relu(x, conv, folded, x)
        assert len(folding._CUDNN_FUSED_REFUSED) == 1
        torch.testing.assert_close(out, torch.relu(folding.conv_bias(x, conv, folded) + x))
        # another output width or padding is another configuration, asked of cuDNN afresh
        for other in (nn.Conv2d(5, 7, 1).eval(), nn.Conv2d(5, 5, 1, padding=1).eval()):
            folded_other = folding.fold(other, nn.BatchNorm2d(other.out_channels).eval(), torch.float32)
            residual = torch.randn(folding.conv_bias(x, other, folded_other).shape)
            with pytest.warns(RuntimeWarning, match="does not run"):
                folding.conv_bias_add_relu(x, other, folded_other, residual)
        assert len(folding._CUDNN_FUSED_REFUSED) == 3
        # TF32 admits other engines for float32: the precision setting is part of the
        # configuration, read as torch keeps it (allow_tf32 raises once the global setting is
        # "ieee" and the convolutions' differs)
        monkeypatch.setattr(torch.backends, "fp32_precision", "ieee")
        with pytest.warns(RuntimeWarning, match="does not run"):
            folding.conv_bias_add_relu(x, conv, folded, x)
        assert len(folding._CUDNN_FUSED_REFUSED) == 4


@pytest.mark.parametrize("attribute, value", [("padding", 1), ("padding", (1,)), ("padding", [1, 1]), ("stride", 1),
                                              ("stride", [1, 1]), ("dilation", (1,))])
def test_cudnn_fused_ops_take_conv_sizes_as_pairs(attribute, value, monkeypatch):
    """A conv size set after construction in a spelling F.conv2d takes (an int, a list, one
    value for both sides) reaches cuDNN's fused ops as the pair of ints their schema takes:
    an int raised there, a list made the configuration unhashable, a 1-tuple was read past
    its end (CPU: cuDNN faked by F.conv2d, the arguments recorded)."""
    sizes = []

    def conv_relu(x, weight, bias, stride, padding, dilation, groups):
        sizes.append((stride, padding, dilation))
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups).relu()

    def conv_add_relu(x, weight, z, alpha, bias, stride, padding, dilation, groups):
        sizes.append((stride, padding, dilation))
        return (F.conv2d(x, weight, bias, stride, padding, dilation, groups) + alpha * z).relu()

    monkeypatch.setattr(folding, "_cudnn_fused_applies", lambda x, conv: True)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", conv_relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", conv_add_relu)
    plain = randomize_batch_norms(BasicBlock(16, 16)).eval()
    setattr(plain.conv1, attribute, value)
    fused = fused_copy(plain)
    x = torch.randn(2, 16, 6, 6)
    assert_close_scaled({"eval": eval_output(fused, x)}, {"eval": eval_output(plain, x)}, 1e-5)
    assert len(sizes) == 2  # conv1 + ReLU, conv2 + add + ReLU
    assert all(type(size) is tuple and len(size) == 2 and all(type(v) is int for v in size)
               for sizes_of_one in sizes for size in sizes_of_one), sizes


# ------------------------------------------------------------------ CUDA

# The CUDA C++ kernels in every configuration; the Triton ones (which `auto` ranks second on
# sm_90) in one of each epilogue's: bn_relu, bn_add_relu, the dual downsample tail.
BACKEND_CASES = [("cuda", config) for config in CONFIGS] + [
    ("triton", config) for config in ("basic_stride2_downsample", "bottleneck", "bottleneck_stride2_downsample")
]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend, config", BACKEND_CASES)
def test_cuda_train_float32(backend, config, layout, no_tf32):
    plain, fused = pair(config, layout=layout, device="cuda")
    inputs = inputs_for(config, 1, layout=layout, device="cuda")
    grads = random_like_outputs(plain, inputs)
    with running_on(backend):
        fused_run = train(fused, inputs, grads)
    eager_run = train(plain, inputs, grads)
    assert_close_scaled(fused_run.tensors(), eager_run.tensors(), 2e-5)
    assert fused_run.outputs[0].stride() == eager_run.outputs[0].stride()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend, config", BACKEND_CASES)
def test_cuda_train_autocast(backend, config, dtype):
    plain, fused = pair(config, layout="nhwc", device="cuda")
    reference = copy.deepcopy(plain)
    inputs = inputs_for(config, 1, layout="nhwc", device="cuda", size=16)
    grads = random_like_outputs(plain, inputs)
    with running_on(backend):
        fused_run = train(fused, inputs, grads, autocast=dtype)
    eager_run = train(plain, inputs, grads, autocast=dtype)
    assert fused_run.outputs[0].dtype == dtype and fused_run.outputs[0].stride() == eager_run.outputs[0].stride()
    assert_within_eager_error(fused_run.tensors(), eager_run.tensors(), train(reference, inputs, grads).tensors())


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS)
def test_cuda_eval_folded(config, dtype, layout, no_tf32):
    """Folded eval on CUDA, through cuDNN's fused conv ops where they run."""
    plain, fused = pair(config, layout=layout, device="cuda")
    plain.eval(), fused.eval()
    x = inputs_for(config, 1, layout=layout, device="cuda", size=16)[0]
    autocast = {} if dtype == torch.float32 else {"dtype": dtype}
    folding._CUDNN_FUSED_REFUSED.clear()
    y, expected = eval_output(fused, x, **autocast), eval_output(plain, x, **autocast)
    assert y.dtype == expected.dtype and y.stride() == expected.stride()
    groups, dilation = BLOCK_CONFIGS[config][5], BLOCK_CONFIGS[config][7]
    if dtype != torch.float32 and layout == "nhwc" and groups == 1 and dilation == 1:
        # the configurations the H200 anchors measured: cuDNN has fused engines for them
        assert not folding._CUDNN_FUSED_REFUSED, folding._CUDNN_FUSED_REFUSED
    if dtype == torch.float32:
        assert_close_scaled({"eval": y}, {"eval": expected}, 1e-5)
    else:
        assert_within_eager_error({"eval": y}, {"eval": expected}, {"eval": eval_output(plain, x)})


@pytest.mark.cuda
def test_cuda_eval_on_another_stream_waits_for_the_fold(no_tf32):
    """A fold's kernels run on the stream of the forward that missed the cache; a forward on
    another stream that finds the entry waits for them (an event) before it reads the folded
    weights. Here the folding stream is held back by a sleep, so a read that did not wait
    would see memory not yet written. One copy per pair, whatever the streams."""
    plain, fused = pair("bottleneck_stride2_downsample", layout="nhwc", device="cuda")
    plain.eval(), fused.eval()
    x = inputs_for("bottleneck_stride2_downsample", 1, layout="nhwc", device="cuda")[0]
    expected = eval_output(plain, x)
    folding_stream, other = torch.cuda.Stream(), torch.cuda.Stream()
    for stream in (folding_stream, other):
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(folding_stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles before the fold's kernels
        first = eval_output(fused, x)
    with torch.cuda.stream(other):
        second = eval_output(fused, x)  # the cached entries, folded on the sleeping stream
    for stream in (folding_stream, other):
        torch.cuda.current_stream().wait_stream(stream)
    assert len(fused.__dict__[resnet_fused.modules._CACHE_ATTRIBUTE]._entries) == 4  # conv1-3, downsample
    for y in (first, second):
        assert_close_scaled({"eval": y}, {"eval": expected}, 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_of_an_eval_forward_reads_the_current_weights(backend, no_tf32):
    """An eval forward captured in a CUDA graph after the documented warm-up, then weights
    loaded in place (a server updating a captured model): each replay computes with the
    weights of then, as a torchvision block's replay does. The graph folds them itself;
    cached folded weights would be stale after the load, and freed once a later eager call
    folded them anew."""
    plain, fused = pair("bottleneck_stride2_downsample", layout="nhwc", device="cuda")
    plain.eval(), fused.eval()
    static_x = inputs_for("bottleneck_stride2_downsample", 1, layout="nhwc", device="cuda")[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with running_on(backend):
        with torch.cuda.stream(side):
            for _ in range(2):
                eval_output(fused, static_x)  # warm-up: folds and caches, as an eager caller would
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = eval_output(fused, static_x)
    new_state = randomize_batch_norms(make_block("bottleneck_stride2_downsample")).state_dict()
    for model in (plain, fused):
        model.load_state_dict(new_state)  # copy_ into the same tensors
    expected = eval_output(plain, static_x)
    graph.replay()
    assert_close_scaled({"eval": static_y}, {"eval": expected}, 1e-5)
    eval_output(fused, static_x)  # an eager call folds the new weights anew
    graph.replay()
    assert_close_scaled({"eval": static_y}, {"eval": expected}, 1e-5)


@pytest.mark.cuda
def test_cuda_fold_cache_follows_device_moves(no_tf32):
    plain, fused = pair("bottleneck_stride2_downsample")
    plain.eval(), fused.eval()
    x = inputs_for("bottleneck_stride2_downsample", 1)[0]
    for device in ("cpu", "cuda", "cpu"):
        plain.to(device), fused.to(device)
        x = x.to(device)
        assert_close_scaled({"eval": eval_output(fused, x)}, {"eval": eval_output(plain, x)}, 1e-5)
