"""resnet_fused.fuse / unfuse on torchvision's ResNets and on users' own networks.

Whole models train in float64 on 2x3x64x64 images, so the last stage normalizes over 8
values per channel: at the small inputs CI affords, float32 gradients of such a network
are ill-conditioned enough that eager's own float32 run differs from its float64 run by
tens of percent (float32 precision is covered block by block in test_modules.py). Even in
float64 two SGD steps amplify rounding: eager run in channels_last and in NCHW differ by
up to 3.6e-9 (resnet152); the tolerance 1e-7 is about 25 times that.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from block_helpers import (
    assert_close_scaled,
    assert_within_eager_error,
    calibrate_running_stats,
    no_tf32,  # noqa: F401  (fixture)
    random_like_outputs,
    randomize_batch_norms,
    running_on,
    sgd,
    train,
)
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import resnet_fused
from resnet_fused.modules import FusedBasicBlock, FusedBottleneck

MODELS = {  # name -> (fused class, number of blocks)
    "resnet18": (FusedBasicBlock, 8),
    "resnet34": (FusedBasicBlock, 16),
    "resnet50": (FusedBottleneck, 16),
    "resnet101": (FusedBottleneck, 33),
    "resnet152": (FusedBottleneck, 50),
    "resnext50_32x4d": (FusedBottleneck, 16),
    "wide_resnet50_2": (FusedBottleneck, 16),
}


TRAIN_TOL = 1e-7


def images(count: int, dtype=torch.float64, size: int = 64, device="cpu") -> list[torch.Tensor]:
    return [torch.randn(2, 3, size, size, dtype=dtype, device=device) for _ in range(count)]


def torchvision_model(name: str, dtype=torch.float64) -> nn.Module:
    model = randomize_batch_norms(getattr(torchvision.models, name)(num_classes=10)).to(dtype)
    return calibrate_running_stats(model, images(1, dtype)[0])


def classes(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


# Every model in NCHW; one of each block type in channels_last as well (the CPU kernels'
# other layout: their reductions walk it another way).
LAYOUT_CASES = [(name, "nchw") for name in MODELS] + [("resnet18", "nhwc"), ("resnet50", "nhwc")]


@pytest.mark.parametrize("name, layout", LAYOUT_CASES)
def test_torchvision_model(name, layout):
    """Fused in place, sharing parameters with an optimizer built before; evaluates and trains like eager."""
    fused_class, count = MODELS[name]
    memory_format = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    eager = torchvision_model(name).to(memory_format=memory_format)
    model = copy.deepcopy(eager)
    parameters = list(model.parameters())
    optimizer = sgd(model)  # built before fuse: must keep working

    result, report = resnet_fused.fuse(model)

    assert result is model
    assert len(report.fused) == count and not report.not_fused and not report.already_fused
    assert sum(type(m) is fused_class for m in model.modules()) == count
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    x = images(1)[0].contiguous(memory_format=memory_format)
    model.eval(), eager.eval()
    with torch.no_grad():
        reference = {"eval": eager(x)}
        assert_close_scaled({"eval": model(x)}, reference, 1e-10)
        # float32 through 17-50 blocks: judged against eager's own float32 error.
        fused32, eager32 = {"eval": model.float()(x.float())}, {"eval": eager.float()(x.float())}
        assert_within_eager_error(fused32, eager32, reference)
    model.double().train(), eager.double().train()
    inputs = [t.contiguous(memory_format=memory_format) for t in images(2)]
    grads = random_like_outputs(eager, inputs)
    assert_close_scaled(train(model, inputs, grads, optimizer=optimizer).tensors(), train(eager, inputs, grads).tensors(), TRAIN_TOL)


def test_fuse_unfuse_fuse_is_idempotent():
    model = torchvision_model("resnet18", torch.float32)
    plain_classes, parameters, buffers = classes(model), list(model.parameters()), list(model.buffers())
    state = copy.deepcopy(model.state_dict())

    _, first = resnet_fused.fuse(model)
    fused_classes = classes(model)
    _, again = resnet_fused.fuse(model)
    assert classes(model) == fused_classes
    assert len(first.fused) == 8 and len(again.already_fused) == 8 and not again.fused
    assert resnet_fused.unfuse(model) is model
    assert classes(model) == plain_classes
    resnet_fused.fuse(model)
    assert classes(model) == fused_classes

    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert all(a is b for a, b in zip(model.buffers(), buffers))
    assert_close_scaled(dict(model.state_dict()), state, 0.0)


@pytest.mark.parametrize("model", [None, [], BasicBlock], ids=["None", "list", "a class"])
def test_fuse_and_unfuse_refuse_what_is_not_a_module_by_name(model):
    for call in (resnet_fused.fuse, resnet_fused.unfuse):
        with pytest.raises(TypeError, match=rf"{call.__name__}\(\): expected `model` to be an nn.Module"):
            call(model)


def test_state_dict_round_trip():
    eager = torchvision_model("resnet50", torch.float32)
    fused, _ = resnet_fused.fuse(torchvision.models.resnet50(num_classes=10))
    fused.load_state_dict(eager.state_dict())  # strict: same keys
    back = torchvision.models.resnet50(num_classes=10)
    back.load_state_dict(fused.state_dict())
    assert list(fused.state_dict()) == list(eager.state_dict()) == list(back.state_dict())
    eager.eval(), fused.eval(), back.eval()
    x = images(1, torch.float32)[0]
    with torch.no_grad():
        assert torch.equal(back(x), eager(x))
        assert_close_scaled({"eval": fused(x)}, {"eval": eager(x)}, 1e-4)


class UserNet(nn.Module):
    """A user's network from torchvision's blocks: in Sequential, as attributes, in a ModuleList."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stage = nn.Sequential(
            BasicBlock(16, 16),
            BasicBlock(16, 32, 2, nn.Sequential(conv1x1(16, 32, 2), nn.BatchNorm2d(32))),
        )
        self.bottleneck = Bottleneck(32, 8)
        self.branches = nn.ModuleList([nn.Sequential(BasicBlock(32, 32))])
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.bottleneck(self.stage(self.stem(x)))
        x = self.branches[0](x)
        return self.head(x.mean((2, 3)))


def test_user_network():
    eager = randomize_batch_norms(UserNet()).double()
    model, report = resnet_fused.fuse(copy.deepcopy(eager))
    assert [b.name for b in report.fused] == ["stage.0", "stage.1", "bottleneck", "branches.0.0"]
    assert type(model.bottleneck) is FusedBottleneck and type(model.branches[0][0]) is FusedBasicBlock
    inputs = [torch.randn(4, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    grads = random_like_outputs(eager, inputs)
    assert_close_scaled(train(model, inputs, grads).tensors(), train(eager, inputs, grads).tensors(), 1e-10)


def test_model_that_is_a_block():
    block = BasicBlock(8, 8)
    result, report = resnet_fused.fuse(block)
    assert result is block and type(block) is FusedBasicBlock
    assert [(b.name, b.status) for b in report.blocks] == [("", "fused")]
    assert "<model> (BasicBlock)" not in str(report)  # fused blocks are counted, not listed


class SubclassedBlock(BasicBlock):
    pass


def test_unsupported_blocks_are_reported_and_keep_eager_results():
    eager = torchvision.models.resnet18(num_classes=10)
    eager.layer1[0].bn2 = nn.GroupNorm(4, 64)
    eager.layer2[0].downsample = nn.Sequential(nn.AvgPool2d(2, 2), conv1x1(64, 128), nn.BatchNorm2d(128))
    eager.layer3[1].extra = nn.Identity()
    eager.layer4[1] = SubclassedBlock(512, 512)
    eager.layer3[0].bn1.register_forward_hook(lambda *args: None)
    eager = randomize_batch_norms(eager).double()
    model = copy.deepcopy(eager)

    with pytest.warns(RuntimeWarning, match="3 of 8 residual blocks fused"):
        _, report = resnet_fused.fuse(model)

    reasons = {b.name: b.reason for b in report.not_fused}
    assert reasons.keys() == {"layer1.0", "layer2.0", "layer3.0", "layer3.1", "layer4.1"}
    assert "bn2 is GroupNorm, not nn.BatchNorm2d" in reasons["layer1.0"]
    assert "downsample is not nn.Sequential(nn.Conv2d, nn.BatchNorm2d)" in reasons["layer2.0"]
    assert "hooks on BatchNorm2d" in reasons["layer3.0"]
    assert "extra submodules extra" in reasons["layer3.1"]
    assert "subclass of torchvision's BasicBlock" in reasons["layer4.1"]
    text = str(report)
    assert all(f"{name} (" in text and reason in text for name, reason in reasons.items())
    assert type(model.layer1[0]) is BasicBlock and type(model.layer1[1]) is FusedBasicBlock

    inputs = images(2)
    grads = random_like_outputs(eager, inputs)
    assert_close_scaled(train(model, inputs, grads).tensors(), train(eager, inputs, grads).tensors(), TRAIN_TOL)
    model.eval(), eager.eval()
    x = images(1)[0]
    with torch.no_grad():
        assert_close_scaled({"eval": model(x)}, {"eval": eager(x)}, 1e-10)


def test_a_class_named_like_the_expected_one_is_named_by_its_module():
    """QAT's prepare swaps in torch.ao.nn.qat.Conv2d: the reason says which Conv2d it is."""
    block = BasicBlock(8, 8)
    block.conv1 = torch.ao.nn.qat.Conv2d(8, 8, 3, padding=1, bias=False,
                                         qconfig=torch.ao.quantization.get_default_qat_qconfig())
    with pytest.warns(RuntimeWarning, match="0 of 1 residual blocks fused"):
        _, report = resnet_fused.fuse(nn.Sequential(block))
    (reason,) = [b.reason for b in report.not_fused]
    assert "conv1 is torch.ao.nn.qat.modules.conv.Conv2d, not nn.Conv2d" in reason, reason


def test_report_text():
    _, report = resnet_fused.fuse(torchvision.models.resnet50(num_classes=10))
    assert str(report) == "resnet_fused.fuse: 16 of 16 residual blocks fused (FusedBottleneck x16)"
    _, report = resnet_fused.fuse(nn.Sequential(nn.Linear(2, 2)))
    assert str(report) == "resnet_fused.fuse: no torchvision BasicBlock or Bottleneck found"


def test_report_text_groups_blocks_that_share_a_reason():
    model = nn.Sequential(SubclassedBlock(8, 8), BasicBlock(8, 8), SubclassedBlock(8, 8), BasicBlock(8, 8))
    model[3].bn1 = nn.Identity()
    with pytest.warns(RuntimeWarning):
        _, report = resnet_fused.fuse(model)
    subclass = "a subclass of torchvision's BasicBlock; only the exact class is fused (its forward may differ)"
    assert str(report).splitlines() == [
        "resnet_fused.fuse: 1 of 4 residual blocks fused (FusedBasicBlock x1)",
        "  3 left as they were (torchvision's forward):",
        f"    0, 2 (SubclassedBlock): {subclass}",
        "    3 (BasicBlock): bn1 is Identity, not nn.BatchNorm2d",
    ]
    model[1].bn2 = nn.Identity()  # a fused block that became unsupported
    with pytest.warns(RuntimeWarning):
        _, report = resnet_fused.fuse(model)
    assert str(report).splitlines()[:3] == [
        "resnet_fused.fuse: 0 of 4 residual blocks fused",
        "  1 already fused; 1 of them runs torchvision's forward:",
        "    1 (FusedBasicBlock): bn2 is Identity, not nn.BatchNorm2d",
    ]


def test_fusing_a_supported_model_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resnet_fused.fuse(torchvision.models.resnet18(num_classes=10))


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_resnet18(training):
    """torch.compile traces a fused ResNet-18 with no graph break (aot_eager on the CPU: it
    exercises dynamo, the fake kernels and AOT autograd; inductor's CPU compile takes a minute)."""
    model, _ = resnet_fused.fuse(torchvision_model("resnet18", torch.float32))
    model.train(training)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = images(1, torch.float32)[0]
    grad = random_like_outputs(reference, [x])
    assert_close_scaled(_uncompiled_names(train(compiled, [x], grad)), train(reference, [x], grad).tensors(), 1e-6)


def test_compile_dynamic_batch_sizes_take_one_graph_as_torchvision():
    """Under dynamic shapes the fused block recompiles no more than torchvision's: the
    layout check guards each size against 1, not the sizes' order (a batch size passing the
    spatial size recompiled the block; in a whole model, every stage)."""
    from torch._dynamo.utils import counters

    plain = BasicBlock(4, 4)
    fused = resnet_fused.fuse(copy.deepcopy(plain))[0]
    graphs = {}
    for name, block in (("torchvision", plain), ("fused", fused)):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(block, backend="aot_eager", dynamic=True, fullgraph=True)
        graphs[name] = []
        for n in (2, 3, 4, 5, 6):  # H = W = 4: the batch passes the spatial size
            before = counters["stats"]["unique_graphs"]
            compiled(torch.randn(n, 4, 4, 4))
            graphs[name].append(counters["stats"]["unique_graphs"] - before)
    torch._dynamo.reset()
    assert graphs["fused"] == graphs["torchvision"] == [1, 0, 0, 0, 0], graphs


def test_fx_symbolic_trace_traces_torchvision_forward(monkeypatch):
    """torch.fx.symbolic_trace (FX graph-mode quantization, create_feature_extractor) passes
    Proxies the fused forward cannot branch on: the blocks trace torchvision's forward,
    the conv / BatchNorm / ReLU graph those tools expect, and say so once."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = resnet_fused.fuse(torchvision_model("resnet18", torch.float64))[0].eval()
    monkeypatch.setattr(resnet_fused.modules, "_warned", set())
    with pytest.warns(RuntimeWarning, match="torch.fx symbolic tracing") as caught:
        traced = torch.fx.symbolic_trace(model)
    assert len([w for w in caught if "symbolic tracing" in str(w.message)]) == 1  # once per block class
    assert not any("resnet_fused" in str(n.target) for n in traced.graph.nodes)
    assert sum(n.op == "call_module" and isinstance(traced.get_submodule(n.target), nn.BatchNorm2d)
               for n in traced.graph.nodes) == 20  # 2 per block and 4 downsample, as torchvision's
    x = images(1, torch.float64)[0]
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-12, atol=1e-12)
        features = create_feature_extractor(model, {"layer2": "c3"})(x)["c3"]
        torch.testing.assert_close(features, model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(
            model.conv1(x)))))), rtol=1e-12, atol=1e-12)


def _uncompiled_names(run):
    return {name.replace("_orig_mod.", ""): t for name, t in run.tensors().items()}


# ------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_cuda_torchvision_model_autocast(name, no_tf32):
    """The GPU path as users run it: channels_last, bfloat16 autocast; judged against eager's error."""
    reference = torchvision_model(name, torch.float32).cuda().to(memory_format=torch.channels_last)
    eager = copy.deepcopy(reference)
    model, report = resnet_fused.fuse(copy.deepcopy(reference))
    assert not report.not_fused
    inputs = [x.contiguous(memory_format=torch.channels_last) for x in images(1, torch.float32, size=128, device="cuda")]
    grads = random_like_outputs(eager, inputs)
    assert_within_eager_error(
        train(model, inputs, grads, autocast=torch.bfloat16).tensors(),
        train(eager, inputs, grads, autocast=torch.bfloat16).tensors(),
        train(reference, inputs, grads).tensors(),
    )
    model.eval(), eager.eval(), reference.eval()
    with torch.no_grad():
        x = inputs[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused_out, eager_out = {"eval": model(x)}, {"eval": eager(x)}
        assert_within_eager_error(fused_out, eager_out, {"eval": reference(x)})


@pytest.mark.cuda
@pytest.mark.timeout(120)  # a cold Inductor compile of a whole model beside other test processes (H200: 23 s)
@pytest.mark.parametrize("training", [True, False])
def test_cuda_compile_inductor_resnet18(training, no_tf32):
    model, _ = resnet_fused.fuse(torchvision_model("resnet18", torch.float32).cuda())
    model = model.to(memory_format=torch.channels_last).train(training)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    # 128x128 images: 32 values per channel in the last stage keep float32 gradients well conditioned.
    x = images(1, torch.float32, size=128, device="cuda")[0].contiguous(memory_format=torch.channels_last)
    grad = random_like_outputs(reference, [x])
    assert_close_scaled(_uncompiled_names(train(compiled, [x], grad)), train(reference, [x], grad).tensors(), 1e-3)


@pytest.mark.cuda
@pytest.mark.timeout(120)  # two whole-model warm-up steps, deterministic cuDNN algorithms chosen afresh
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_of_whole_training_steps(backend, no_tf32, monkeypatch):
    """A fused model's whole training step (forward, backward, SGD) captured in one CUDA graph,
    torch.cuda.graph's recipe for a host-bound loop (docs/modules.md): each replay trains as
    the same step run eagerly does, outputs, parameters, momenta, running statistics and
    num_batches_tracked. A replay runs the eager step's own kernels (deterministic cuDNN
    algorithms, the autotuner's cached choices), so the two should agree to the bit; 1e-6
    allows float32 rounding, and a replay that missed an update or read stale memory is off
    by O(1). (Any rounding difference grows over the steps where a ReLU mask flips: on the
    CPU, two thread counts give outputs 2e-6 apart after one step and momenta 10% apart
    after two, so a small error in step0.output with larger ones later means another
    algorithm ran, not a broken replay.)"""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model, _ = resnet_fused.fuse(torchvision_model("resnet18", torch.float32).cuda())
    model = model.to(memory_format=torch.channels_last)
    optimizer = sgd(model)
    # 128x128 images: 32 values per channel in the last stage (see test_cuda_compile_inductor_resnet18).
    steps = [(x.contiguous(memory_format=torch.channels_last), torch.randn(2, 10, device="cuda"))
             for x in images(4, torch.float32, size=128, device="cuda")]
    static_x, static_grad = (torch.empty_like(t) for t in steps[0])

    def step(model, optimizer, x, grad):
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        out.backward(grad)
        optimizer.step()
        return out

    with running_on(backend):
        side = torch.cuda.Stream()  # warm-up (autotuners, momentum buffers) off the capture stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for x, grad in steps[:2]:
                step(model, optimizer, x, grad)
        torch.cuda.current_stream().wait_stream(side)
        eager_model = copy.deepcopy(model)
        eager_optimizer = sgd(eager_model)
        eager_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # its own momentum buffers
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_out = step(model, optimizer, static_x, static_grad)
        for i, (x, grad) in enumerate(steps[2:]):
            static_x.copy_(x), static_grad.copy_(grad)
            graph.replay()
            eager_out = step(eager_model, eager_optimizer, x, grad)
            assert_close_scaled({f"step{i}.output": static_out}, {f"step{i}.output": eager_out.detach()}, 1e-6)
    momenta = {f"momentum.{n}": optimizer.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    eager_momenta = {f"momentum.{n}": eager_optimizer.state[p]["momentum_buffer"] for n, p in eager_model.named_parameters()}
    assert_close_scaled({**model.state_dict(), **momenta}, {**eager_model.state_dict(), **eager_momenta}, 1e-6)
