"""The CUDA backend on a GPU: every op against eager PyTorch and the reference ops.

Marked ``cuda``: skipped without a GPU (tests/conftest.py); scripts/gpu_check.sh runs them.
With ``RESNET_FUSED_GPU_TESTS_ON=cpu`` they run on CPU tensors and the ``cpu`` backend instead,
all but those of what only a GPU has (``GPU_ONLY``): CI's check of the tests themselves, which
otherwise first run where a GPU is lent. It proves nothing about the CUDA kernels.

Each fused op runs through ``resnet_fused.functional`` with ``backend="cuda"`` (autograd,
running statistics) and is compared with eager ``F.batch_norm`` + ``relu`` (+ add)
composites in float64 on the very same rounded inputs, and with the reference backend on
the GPU; the raw backward ops are compared with the reference ops directly.

Tolerances: the kernels compute in float32 and round once to the activation dtype, so
against float64 eager an activation is within one rounding of itself (``EXACT_ROUNDING`` of
tests/test_ops.py: 2^-8 bfloat16, 2^-11 float16) plus float32 error (2e-5 absolute; a
gradient's, in training, with its largest element, as it sums terms that cancel). Against the
reference backend, itself rounded once on the GPU, two roundings (``ROUNDING``, relative =
absolute). Per-channel results are float32 reductions over N*H*W values on both sides: in
run_case weight and bias gradients within 4e-6 of their terms' magnitudes and running
statistics within 2e-6 (test_ops' ``CHANNEL_SUM_ERROR``, ``RUNNING_STATS_TOL``); the
raw backward ops' likewise; batch statistics here, 1e-4 relative.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resnet_fused
from resnet_fused import functional as RF
from helpers import LAYOUTS, activation, assert_opcheck, child_env, non_contiguous
import test_ops
from test_ops import (AFFINE_PAIRS, CHANNEL_SUM_ERROR, EMPTY_SHAPES, OUTLIER_SHAPES_ON_GPU, ROUNDING, STRIDE_SHAPES,
                      affine_pair_id, assert_channel_sums_close, assert_close, check_empty_input,
                      check_mask_of_the_rounded_output, check_nan_residual_gradients, check_non_finite_inputs_in_eval,
                      check_non_finite_statistics, check_results_strided_in_the_op_layout,
                      check_running_statistics_of_any_kind, check_statistics_far_from_zero,
                      check_statistics_with_an_outlier_first, check_tensors_over_2_to_the_31_elements,
                      check_torch_func_grad_matches_autograd, check_variance_past_float32_range,
                      unmasked_channel_sum_magnitude)

_ON = os.environ.get("RESNET_FUSED_GPU_TESTS_ON", "")
if _ON not in ("", "cpu"):  # a typo would otherwise skip everything, green
    raise ValueError(f"RESNET_FUSED_GPU_TESTS_ON={_ON!r}: expected 'cpu' or nothing")
ON_CPU = _ON == "cpu"
pytestmark = [] if ON_CPU else pytest.mark.cuda
# Tests of CUDA graphs, GPU memory, the CUDA kernels' own rules and launch grids.
GPU_ONLY = pytest.mark.skipif(ON_CPU, reason="RESNET_FUSED_GPU_TESTS_ON=cpu: needs the CUDA backend on a GPU")

DEVICE = "cpu" if ON_CPU else "cuda"
BACKEND = DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PER_CHANNEL_TOL = 1e-4
OPS = ["bn_relu", "bn_add_relu", "dual_bn_add_relu"]
SHAPES = [
    (4, 19, 5, 7),  # C and H*W odd: scalar accesses in both layouts
    (3, 8, 1, 1),  # H = W = 1
    (1, 1, 5, 5),  # one channel, batch of one
    (2, 67, 9, 11),  # several channel tiles, scalar
    (16, 64, 14, 14),  # 16-byte vectors in both layouts, many blocks per reduction
]


def dtype_id(d):
    return str(d).removeprefix("torch.")


def shape_id(s):
    return "x".join(map(str, s))


def run_case(op, shape, dtype, layout, training, **options):
    """The CUDA op against eager float64 and the reference backend (float32 math rounded once,
    as the kernels): outputs, every gradient, running statistics (test_ops.run_case)."""
    test_ops.run_case(op, BACKEND, shape, dtype, layout, training, device=DEVICE, same_dtype_oracle="reference",
                      **options)


def misaligned(x):
    """`x` copied into a dense tensor of its layout whose data starts one element past a
    16-byte boundary: the kernels must take their scalar path."""
    storage = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = storage.as_strided(x.shape, x.stride(), 1)
    return view.copy_(x)


# ---------------------------------------------------------------- every op against eager


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_training_matches_eager(op, layout, dtype, shape):
    run_case(op, shape, dtype, layout, training=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_eval_matches_eager(op, layout, dtype):
    run_case(op, (4, 32, 6, 8), dtype, layout, training=False)


@pytest.mark.parametrize("op", OPS)
def test_without_affine_or_running_stats(op):
    run_case(op, (4, 11, 3, 5), torch.float32, "nhwc", training=True, affine=False, track=False)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine, affine_d", AFFINE_PAIRS, ids=map(affine_pair_id, AFFINE_PAIRS))
def test_dual_branches_with_their_own_affine_parameters(layout, training, affine, affine_d):
    """C = 32: 16-byte vectors in channels_last; H*W = 15: the NCHW scalar path."""
    run_case("dual_bn_add_relu", (4, 32, 3, 5), torch.float32, layout, training, affine=affine, affine_d=affine_d)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_non_contiguous_inputs(op, layout):
    run_case(op, (2, 16, 4, 6), torch.bfloat16, layout, training=True, make_input=non_contiguous)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_misaligned_inputs(op, layout, dtype):
    x = misaligned(activation((2, 16, 4, 4), dtype, layout, DEVICE))
    assert x.data_ptr() % 16 != 0 and x.is_contiguous(memory_format=LAYOUTS[layout])
    run_case(op, (2, 16, 4, 4), dtype, layout, training=True, make_input=misaligned)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=shape_id)
def test_empty_input(shape, layout):
    check_empty_input(BACKEND, shape, layout, DEVICE)


@pytest.mark.parametrize("shape", STRIDE_SHAPES, ids=shape_id)
def test_results_strided_in_the_op_layout(shape):
    check_results_strided_in_the_op_layout(BACKEND, shape, DEVICE)


# ---------------------------------------------------------------- the raw ops


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("training", [True, False])
def test_backward_ops_match_reference_ops(layout, dtype, training):
    """The upstream gradient is zeroed where the pre-activation is within float32 rounding
    of 0: the kernel forms it with one fma, the reference with a multiply and an add, and
    there the two may take opposite sides of the ReLU."""
    shape = (6, 40, 7, 8)
    x, r, g = (activation(shape, dtype, layout, DEVICE) for _ in range(3))
    w = torch.rand(40, device=DEVICE) + 0.5
    b = torch.randn(40, device=DEVICE)
    mean, invstd = torch.ops.resnet_fused.batch_stats(x, None, None, 0.1, 1e-5)
    mean_r, invstd_r = torch.ops.resnet_fused.batch_stats(r, None, None, 0.1, 1e-5)

    def per_channel(t):
        return t.double().view(1, -1, 1, 1)

    pre = (x.double() - per_channel(mean)) * per_channel(invstd * w) + per_channel(b)
    pre_dual = pre + (r.double() - per_channel(mean_r)) * per_channel(invstd_r * w.flip(0))

    def masked(pre):  # g, 0 where the sign of pre is in doubt
        return torch.where(pre.abs() < 1e-5, 0.0, g.double()).to(dtype).contiguous(memory_format=LAYOUTS[layout])

    cases = {
        "bn_relu_backward": (masked(pre), x, w, b, mean, invstd, training),
        "bn_add_relu_backward": (masked(pre + r.double()), x, r, w, b, mean, invstd, training),
        "dual_bn_add_relu_backward": (masked(pre_dual), x, w, b, mean, invstd, r, w.flip(0), None, mean_r, invstd_r,
                                      training),
    }
    for name, args in cases.items():
        got = getattr(torch.ops.resnet_fused, name)(*args)
        want = getattr(torch.ops.resnet_fused_reference, name)(*args)
        for i, (a, e) in enumerate(zip(got, want)):
            assert a.dtype == e.dtype and a.stride() == e.stride(), f"{name} output {i}"
            # weight and bias gradients, float32 sums whose terms may cancel, on both sides: each
            # errs about as much as against float64, within twice float64's measured worst
            if a.dim() == 1:
                downsample = name == "dual_bn_add_relu_backward" and i > 2
                branch = (r, mean_r, invstd_r) if downsample else (x, mean, invstd)
                magnitude = unmasked_channel_sum_magnitude(args[0], *branch)
                assert_channel_sums_close(a, e, magnitude, CHANNEL_SUM_ERROR["eager64"][dtype], f"{name} output {i}")
                continue
            assert_close(a, e, 2 * ROUNDING[dtype], f"{name} output {i}")


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(4, 19, 5, 7), (16, 64, 14, 14)], ids=shape_id)
def test_backward_recomputes_the_forward_mask_exactly(layout, dtype, shape):
    """grad_residual is grad_out exactly where the forward's output is positive: the
    backward's pre-activation is the forward's, bit for bit (float32 and bfloat16 round no
    positive pre-activation to 0)."""
    x, r, g = (activation(shape, dtype, layout, DEVICE) for _ in range(3))
    w, b = torch.rand(shape[1], device=DEVICE) + 0.5, torch.randn(shape[1], device=DEVICE)
    mean, invstd = torch.ops.resnet_fused.batch_stats(x, None, None, 0.1, 1e-5)
    out = torch.ops.resnet_fused.bn_add_relu(x, r, w, b, mean, invstd, True)
    grad_residual = torch.ops.resnet_fused.bn_add_relu_backward(g, x, r, w, b, mean, invstd, True)[1]
    assert torch.equal(grad_residual, torch.where(out > 0, g, torch.zeros_like(g)))


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_batch_stats_and_running_statistics(layout, dtype):
    x = activation((16, 48, 13, 11), dtype, layout, DEVICE, scale=2.0, offset=0.5)
    rm, rv = torch.randn(48, device=DEVICE), torch.rand(48, device=DEVICE) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    mean, invstd = RF.batch_stats(x, rm, rv, 0.3, 1e-3, backend=BACKEND)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    m = x.numel() // 48
    assert mean.dtype == invstd.dtype == torch.float32
    assert_close(mean, mean64, PER_CHANNEL_TOL, "mean")
    assert_close(invstd, (var64 + 1e-3).rsqrt(), PER_CHANNEL_TOL, "invstd")
    assert_close(rm, 0.3 * mean64 + 0.7 * rm0.double(), PER_CHANNEL_TOL, "running_mean")
    assert_close(rv, 0.3 * var64 * m / (m - 1) + 0.7 * rv0.double(), PER_CHANNEL_TOL, "running_var")


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_statistics_are_stable_far_from_zero(layout, dtype):
    check_statistics_far_from_zero(BACKEND, (64, 32, 24, 24), layout, dtype, DEVICE)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_variance_past_float32_range(layout):
    check_variance_past_float32_range(BACKEND, layout, DEVICE)


def test_torch_func_grad_matches_autograd():
    check_torch_func_grad_matches_autograd(BACKEND, DEVICE)


@GPU_ONLY
def test_float64_is_rejected_by_the_cuda_kernels():
    x = torch.randn(2, 3, 4, 4, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match="do not support float64 `input`"):
        torch.ops.resnet_fused.batch_stats(x, None, None, 0.1, 1e-5)
    with pytest.raises(TypeError, match="supports dtypes"):
        RF.bn_relu(x, None, None, training=True, backend=BACKEND)


@GPU_ONLY
def test_parameters_on_another_device_are_rejected():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="`weight` on the device of `input`"):
        torch.ops.resnet_fused.bn_relu(x, torch.ones(3), None, torch.zeros(3, device=DEVICE),
                                       torch.ones(3, device=DEVICE), True)


# ---------------------------------------------------------------- determinism, graphs, opcheck


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_results_are_bitwise_reproducible(layout):
    shape = (32, 128, 28, 28)
    x, r, g = (activation(shape, torch.bfloat16, layout, DEVICE) for _ in range(3))
    w, b = torch.rand(128, device=DEVICE) + 0.5, torch.randn(128, device=DEVICE)
    ops = torch.ops.resnet_fused

    def run():
        mean, invstd = ops.batch_stats(x, None, None, 0.1, 1e-5)
        return (mean, invstd, ops.bn_add_relu(x, r, w, b, mean, invstd, True),
                *ops.bn_add_relu_backward(g, x, r, w, b, mean, invstd, True),
                *ops.dual_bn_add_relu_backward(g, x, w, b, mean, invstd, r, w, b, mean, invstd, True))

    first, second = run(), run()
    for i, (a, b_) in enumerate(zip(first, second)):
        assert torch.equal(a, b_), f"result {i} differs between two runs"



def _chained_results(cases, namespace, repeats=3):
    """Each case (x, r, g, w, b) through every op of ``namespace``, each op's input the
    output of the one before where it can be: statistics -> forward -> backward, so every
    kernel reads what its stream predecessor just wrote; cuDNN convolutions among them, as
    in a block (a library's kernel after one launched early, and one before it).
    ``repeats`` rounds, each on new input values (x shifted), so a kernel that read a
    reused buffer too early would find another round's values there, not equal ones."""
    ops = getattr(torch.ops, namespace)
    results = []
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for round in range(repeats):
            for x, r, g, w, b in cases:
                x = x + round
                channels = x.shape[1]
                kernel = torch.randn(channels, channels, 3, 3, device=x.device,
                                     generator=torch.Generator(x.device).manual_seed(round)).to(x.dtype) / channels
                mean, invstd = ops.batch_stats(x, None, None, 0.1, 1e-5)
                y = ops.bn_relu(x, w, b, mean, invstd, True)
                c = torch.nn.functional.conv2d(y, kernel, padding=1)
                mean_c, invstd_c = ops.batch_stats(c, None, None, 0.1, 1e-5)
                z = ops.bn_add_relu(c, r, w, b, mean_c, invstd_c, True)
                d = ops.dual_bn_add_relu(z, w, b, mean, invstd, r, w, b, mean_c, invstd_c, True)
                dual = ops.dual_bn_add_relu_backward(d, z, w, b, mean, invstd, r, w, b, mean_c, invstd_c, True)
                add = ops.bn_add_relu_backward(dual[0], c, r, w, b, mean_c, invstd_c, True)
                grad_y = torch.nn.functional.conv_transpose2d(add[0], kernel, padding=1)  # conv2d's input gradient
                relu = ops.bn_relu_backward(grad_y + g, x, w, b, mean, invstd, True)
                results += [mean, invstd, y, c, mean_c, invstd_c, z, d, *dual, *add, grad_y, *relu]
    return [t.cpu() for t in results]


def _launch_calls(x):
    """The CUDA runtime's launch calls (profiler names) of one statistics op on ``x``."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        torch.ops.resnet_fused.batch_stats(x, None, None, 0.1, 1e-5)
        torch.cuda.synchronize()
    return sorted({e.name for e in profile.events() if e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel"))})


def _launches_early(namespace, x) -> bool:
    """Whether this process launches ``namespace``'s kernels early, seen in one op on ``x``:
    for the CUDA backend in the runtime's launch calls (cudaLaunchKernelExC, with the
    programmatic attribute; in order, cudaLaunchKernel); Triton launches through
    cuLaunchKernelEx either way, so in the ``launch_pdl`` option each launch hands Triton."""
    if namespace == TRITON_NAMESPACE:
        from resnet_fused.triton import _runtime

        handed, original = [], _runtime.early_launch_arguments

        def recorded(early):
            arguments, options = original(early)
            handed.append(options["launch_pdl"])
            return arguments, options

        _runtime.forget_plans()  # each launch through Triton again, not replayed
        _runtime.early_launch_arguments = recorded
        try:
            torch.ops.resnet_fused_triton.batch_stats(x, None, None, 0.1, 1e-5)
            torch.cuda.synchronize()
        finally:
            _runtime.early_launch_arguments = original
        assert handed, "no launch through Triton seen"
        return all(handed)
    calls = _launch_calls(x)
    assert calls, "no kernel launch seen"
    return any(call.startswith("cudaLaunchKernelEx") for call in calls)  # a versioned name too


def _chained_results_to(namespace: str, inputs_path: str, results_path: str) -> None:
    """The subprocess's half of the test below (Triton's configuration pinned by the
    environment, as the parent pins it)."""
    cases = [[t.to(DEVICE) for t in case] for case in torch.load(inputs_path)]
    torch.save({"results": _chained_results(cases, namespace), "early": _launches_early(namespace, cases[0][0]),
                "module": resnet_fused.__file__}, results_path)


EARLY_LAUNCH_ENV = "RESNET_FUSED_PDL"
TRITON_NAMESPACE = "resnet_fused_triton"


@GPU_ONLY
@pytest.mark.timeout(120)  # the child compiles every Triton kernel's in-order variant afresh
@pytest.mark.skipif(os.environ.get(EARLY_LAUNCH_ENV) == "0", reason=f"{EARLY_LAUNCH_ENV}=0: this process launches in order")
@pytest.mark.parametrize("namespace", ["resnet_fused", TRITON_NAMESPACE], ids=["cuda", "triton"])
def test_early_launches_change_no_bit(namespace, tmp_path):
    """On sm_90 and later every kernel of both GPU backends is a programmatic dependent
    launch (it may start before the kernel before it ends, and waits for it first);
    RESNET_FUSED_PDL=0 (read once per process, so in a subprocess) launches in order. Same
    results, bit for bit, with every kernel reading what the one before it wrote (a kernel
    that read too early would differ), cuDNN's convolutions among them (one that launched
    its kernels early would start as ours trigger), at shapes from one block per reduction to one wave of many. This process launched early and the child did not (_launches_early). Triton's
    configurations are pinned in both: two autotuned processes may choose differently, and
    differ in the last bits for that reason alone."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("below sm_90 every launch is in order: nothing to compare")
    if namespace == TRITON_NAMESPACE and resnet_fused.backends.get("triton").unavailable:
        pytest.skip(f"the triton backend is unavailable: {resnet_fused.backends.get('triton').unavailable}")
    cases = []
    for shape in [(4, 19, 5, 7), (16, 64, 14, 14), (32, 64, 56, 56)]:
        for layout in ("nhwc", "nchw"):
            x, r, g = (activation(shape, torch.bfloat16, layout, DEVICE) for _ in range(3))
            cases.append([x, r, g, torch.rand(shape[1], device=DEVICE) + 0.5, torch.randn(shape[1], device=DEVICE)])
    inputs, results = tmp_path / "inputs.pt", tmp_path / "results.pt"
    torch.save([[t.cpu() for t in case] for case in cases], inputs)
    pinned = {}
    with contextlib.ExitStack() as stack:
        if namespace == TRITON_NAMESPACE:
            from resnet_fused.triton import _runtime

            stack.enter_context(_runtime.pinned_config(0))
            pinned = {_runtime.PIN_ENV: "0"}
        child = subprocess.Popen(
            [sys.executable, "-c",
             f"import test_cuda_ops as t; t._chained_results_to({namespace!r}, {str(inputs)!r}, {str(results)!r})"],
            env=child_env(str(Path(__file__).resolve().parent), **{EARLY_LAUNCH_ENV: "0", **pinned}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:  # this process's half meanwhile: the two compile their Triton variants at once
            early_results = _chained_results(cases, namespace)
            launched_early = _launches_early(namespace, cases[0][0])
            _, stderr = child.communicate(timeout=100)  # within the test's own timeout
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, stderr[-3000:]
        in_order = torch.load(results)
        assert Path(in_order["module"]).resolve() == Path(resnet_fused.__file__).resolve(), in_order["module"]
        assert launched_early and not in_order["early"]
    for i, (early, ordered) in enumerate(zip(early_results, in_order["results"], strict=True)):
        assert early.stride() == ordered.stride() and torch.equal(early, ordered), f"result {i} differs"


def _graph_case(layout):
    shape = (8, 64, 16, 16)
    x, r, g = (activation(shape, torch.bfloat16, layout, DEVICE) for _ in range(3))
    w, b = torch.rand(64, device=DEVICE) + 0.5, torch.randn(64, device=DEVICE)
    rm, rv = torch.zeros(64, device=DEVICE), torch.ones(64, device=DEVICE)
    return x, r, g, w, b, rm, rv


def _capture(fn):
    """fn captured in a CUDA graph after a warm-up on a side stream (as torch documents)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


@GPU_ONLY
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_cuda_graph_replay_equals_eager_ops(layout):
    x, r, g, w, b, rm, rv = _graph_case(layout)
    ops = torch.ops.resnet_fused

    def step():
        mean, invstd = ops.batch_stats(x, rm, rv, 0.1, 1e-5)
        y = ops.bn_relu(x, w, b, mean, invstd, True)
        z = ops.dual_bn_add_relu(y, w, b, mean, invstd, r, None, b, mean, invstd, True)
        return (mean, invstd, y, z, *ops.bn_add_relu_backward(g, y, r, w, b, mean, invstd, True),
                *ops.dual_bn_add_relu_backward(g, y, w, b, mean, invstd, r, None, b, mean, invstd, True))

    stats0 = rm.clone(), rv.clone()
    graph, captured = _capture(step)
    for _ in range(2):  # the second replay runs on new input values
        rm.copy_(stats0[0]), rv.copy_(stats0[1])
        graph.replay()
        torch.cuda.synchronize()
        replayed_stats = rm.clone(), rv.clone()
        rm.copy_(stats0[0]), rv.copy_(stats0[1])
        expected = step()
        for i, (a, e) in enumerate(zip(captured, expected)):
            assert torch.equal(a, e), f"output {i} of the replay differs from the eager call"
        assert torch.equal(replayed_stats[0], rm) and torch.equal(replayed_stats[1], rv), "running statistics"
        x.copy_(torch.randn_like(x))


@GPU_ONLY
def test_cuda_graph_replay_of_a_training_step():
    """Functional forward + autograd backward, captured whole, as a training loop would."""
    x, r, g, w, b, rm, rv = _graph_case("nhwc")
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()

    def train_step():
        y = RF.bn_add_relu(x, r, rm, rv, w, b, training=True, backend=BACKEND)
        return (y, *torch.autograd.grad(y, [x, w, b], g))

    graph, captured = _capture(train_step)
    graph.replay()
    expected = train_step()
    for i, (a, e) in enumerate(zip(captured, expected)):
        assert torch.equal(a, e), f"output {i} of the replayed training step differs from the eager one"


def test_opcheck_on_cuda_tensors():
    assert_opcheck(torch.ops.resnet_fused, DEVICE)


# ---------------------------------------------------------------- 64-bit indexing


@GPU_ONLY
@pytest.mark.xdist_group("over_2_31")
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_tensors_over_2_to_the_31_elements(layout, releases_gpu_memory):
    """2^31 + 2^18 values in many small planes (the Triton test has a few large ones)."""
    C, H, W = 64, 64, 64
    check_tensors_over_2_to_the_31_elements(BACKEND, (2**31 // (C * H * W) + 1, C, H, W), layout, DEVICE)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_nan_residual_passes_the_gradient_as_eager(layout):
    check_nan_residual_gradients(BACKEND, layout, DEVICE)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_non_finite_values_poison_only_their_channel(layout):
    check_non_finite_statistics(BACKEND, layout, DEVICE)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_non_finite_inputs_in_eval_keep_to_their_element(layout):
    check_non_finite_inputs_in_eval(BACKEND, layout, DEVICE)


def test_mask_of_the_rounded_output():
    check_mask_of_the_rounded_output(BACKEND, DEVICE)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_running_statistics_of_any_kind(layout):
    check_running_statistics_of_any_kind(BACKEND, layout, DEVICE)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("shape", OUTLIER_SHAPES_ON_GPU, ids=lambda s: "x".join(map(str, s)))
def test_statistics_with_an_outlier_first(shape, layout):
    check_statistics_with_an_outlier_first(BACKEND, shape, layout, DEVICE)
