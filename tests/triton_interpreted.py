"""The Triton kernels on CPU tensors under TRITON_INTERPRET=1, against the reference.

Triton reads TRITON_INTERPRET when it is imported, so these tests need a process of
their own: ``test_triton_ops.py::test_kernels_under_the_interpreter`` runs this file as

    TRITON_INTERPRET=1 python -m pytest tests/triton_interpreted.py

and a plain ``pytest`` of the suite thereby runs it (the name does not match
``test_*.py``, so pytest never collects it into a process without the variable).

The interpreter runs float16 and float32 (NumPy has no bfloat16) at about a
millisecond per program per few dozen operations: shapes are tiny, and the interpreter
launch configuration (``_runtime.TUNING``) cuts them into several programs, row blocks,
lane blocks and chunks, every one with a tail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton

import resnet_fused
from resnet_fused import functional as RF
from resnet_fused.triton import _reduce, _runtime, batch_stats, bn_act
from block_helpers import block_input_shape, fused_copy, make_block
from helpers import activation, assert_compiles_like_eager, assert_opcheck, non_contiguous
from test_ops import (AFFINE_PAIRS, EMPTY_SHAPES, OPS, OUTLIER_CASES, STRIDE_SHAPES, affine_pair_id,
                      check_empty_input, check_results_strided_in_the_op_layout, check_mask_of_the_rounded_output,
                      check_nan_residual_gradients, check_non_finite_inputs_in_eval, check_non_finite_statistics,
                      check_running_statistics_of_any_kind, check_statistics_far_from_zero,
                      check_statistics_with_an_outlier_first, check_torch_func_grad_matches_autograd,
                      check_variance_past_float32_range, run_case)
from test_triton_ops import check_functional_training, check_ops_against_reference

if not _runtime.INTERPRET:
    pytest.skip("run with TRITON_INTERPRET=1 (test_triton_ops.py does)", allow_module_level=True)

DTYPES = [torch.float32, torch.float16]
LAYOUTS = ["nhwc", "nchw"]
T = torch.ops.resnet_fused_triton
R = torch.ops.resnet_fused_reference


def dtype_id(d):
    return str(d).removeprefix("torch.")


def test_backend_runs_cpu_tensors_here():
    assert "triton" in resnet_fused.available_backends("cpu")
    x = activation((2, 3, 2, 2), torch.bfloat16)
    with pytest.raises(TypeError, match="backend 'triton' supports dtypes float16, float32, got torch.bfloat16"):
        RF.bn_relu(x, None, None, training=True, backend="triton")
    with pytest.raises(TypeError, match=r"bn_relu\(\): the Triton kernels run float16, float32 `input` under TRITON_"):
        T.bn_relu(x, None, None, torch.zeros(3), torch.ones(3), True)


# ---------------------------------------------------------------- through the functional API


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (3, 9, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_training_matches_eager(op, layout, dtype, shape):
    """Outputs, running statistics and every gradient; C odd, H = W = 1, tails everywhere."""
    run_case(op, "triton", shape, dtype, layout, training=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_matches_eager(op, layout):
    run_case(op, "triton", (2, 7, 2, 3), torch.float32, layout, training=False)


@pytest.mark.parametrize("op", OPS)
def test_without_affine_or_running_stats(op):
    run_case(op, "triton", (2, 5, 2, 3), torch.float32, "nhwc", training=True, affine=False, track=False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine, affine_d", AFFINE_PAIRS, ids=map(affine_pair_id, AFFINE_PAIRS))
def test_dual_branches_with_their_own_affine_parameters(layout, training, affine, affine_d):
    run_case("dual_bn_add_relu", "triton", (2, 5, 3, 3), torch.float32, layout, training,
             affine=affine, affine_d=affine_d)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs(layout):
    run_case("bn_add_relu", "triton", (2, 6, 2, 3), torch.float32, layout, training=True, make_input=non_contiguous)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_empty_input(shape, layout):
    check_empty_input("triton", shape, layout)


@pytest.mark.parametrize("shape", STRIDE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_results_strided_in_the_op_layout(shape):
    check_results_strided_in_the_op_layout("triton", shape)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_residual_passes_the_gradient_as_eager(layout):
    check_nan_residual_gradients("triton", layout)


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_empty_batch_statistics_match_the_reference(eps):
    """mean 0, invstd = 1 / sqrt(eps), as in the reference; eps <= 0 is refused by both, as eager refuses it."""
    x = torch.empty(0, 3, 2, 2)
    got = torch.ops.resnet_fused_triton.batch_stats(x, None, None, 0.1, eps)
    want = torch.ops.resnet_fused_reference.batch_stats(x, None, None, 0.1, eps)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for ops in (torch.ops.resnet_fused_triton, torch.ops.resnet_fused_reference):
        with pytest.raises(ValueError, match=r"batch_stats\(\): expected `eps` to be positive in training, got 0.0"):
            ops.batch_stats(x, None, None, 0.1, 0.0)


# ---------------------------------------------------------------- the raw ops


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(2, 7, 3, 3), (9, 3, 2, 3), (1, 2, 3, 5)], ids=lambda s: "x".join(map(str, s)))
def test_ops_match_reference(shape, layout, dtype):
    """Every op, forward and backward ops, training and eval (the GPU tests' check).
    In NCHW, 9 images take several row blocks per chunk; 1 image splits H*W into chunks."""
    check_ops_against_reference("cpu", dtype, layout, shape)


def test_pinned_configuration_launches_the_kernels_directly():
    """The path the GPU tests take (no autotuner), here with the interpreter's one configuration."""
    with _runtime.pinned_config(0):
        check_ops_against_reference("cpu", torch.float32, "nchw", (2, 5, 3, 3))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_functional_training_matches_reference(op, layout):
    check_functional_training("cpu", op, torch.float16, layout, (2, 6, 3, 2))


@pytest.fixture
def chunks_per_program(request, monkeypatch):
    """The reductions' interpreter configuration with ``CHUNKS_PER_PROGRAM`` = the param,
    and 8 chunks per "SM" (32 in all), so that programs of 2 to 4 chunks meet several channel
    groups and a last program with fewer chunks than the others."""
    config = [triton.Config({"TILE": 16, "STAGES": 2, "CHUNKS_PER_PROGRAM": request.param}, num_warps=1,
                            num_stages=1)]
    for kernel in (batch_stats._batch_stats_partials_kernel, bn_act._bn_act_backward_reduce_kernel):
        monkeypatch.setattr(kernel, "configs", config)
        monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(_runtime, "TUNING", dataclasses.replace(_runtime.TUNING, reduce_chunks_per_sm=8))
    _reduce._partition.cache_clear()  # partitions of the patched tuning: not kept past the test
    yield request.param
    _reduce._partition.cache_clear()


# At 8 chunks per SM, channels_last: 11 chunks in each of 2 groups, 13 in 2, 9 in 3, 8 in 1,
# so the last program takes fewer chunks than the others at every K below but two; NCHW:
# chunks of whole planes (programs take K of them) in the first three, 8 chunks of one
# plane's lanes in the last (programs take one).
PARTIAL_SHAPES = {(7, 6, 3, 1): ((2, 11), 1), (5, 6, 5, 1): ((2, 13), 1), (13, 9, 2, 1): ((3, 9), 1),
                  (1, 3, 4, 4): ((1, 8), 8)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", PARTIAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("chunks_per_program", [2, 3, 4], indirect=True)
def test_partials_kernels_write_every_slot(chunks_per_program, shape, layout):
    """A program takes CHUNKS_PER_PROGRAM adjacent chunks where they span whole rows of
    lanes (else one) and writes an empty partial into each slot but its first. With the
    partials full of NaN before the launches, no slot is left, and the statistics and
    gradients match the reference."""
    x = activation(shape, layout=layout)
    channels_last = layout == "nhwc"
    part = _reduce.partition(x, channels_last)
    groups_and_chunks, nchw_lane_chunks = PARTIAL_SHAPES[shape]
    if channels_last:
        assert (part.groups, part.chunks) == groups_and_chunks
    else:
        assert part.lane_chunks == nchw_lane_chunks and part.chunks > 1
    c = shape[1]
    mean, invstd = torch.empty(c), torch.empty(c)
    partials = batch_stats.empty_partials(part, x.device).fill_(float("nan"))
    _runtime.run(batch_stats.launches(part, x, partials, mean, invstd, None, None, 0.1, 0.9, 1e-5))
    assert not partials.isnan().any()
    want_mean, want_invstd = R.batch_stats(x, None, None, 0.1, 1e-5)
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(invstd, want_invstd, rtol=1e-5, atol=0)

    grad, weight, bias = activation(shape, layout=layout), torch.rand(c) + 0.5, torch.randn(c)
    grad_input, grad_weight, grad_bias = torch.empty_like(x), torch.empty(c), torch.empty(c)
    partials, coefficients = bn_act.empty_backward_scratch(part, bn_act.RELU.value, x.device)
    partials.fill_(float("nan"))
    view = bn_act._Elementwise.of(x, channels_last)
    no_y = (None,) * 5  # y and the absent downsample branch
    _runtime.run(bn_act.backward_launches(
        bn_act.RELU.value, True, part, view, grad, x, weight, bias, mean, invstd, *no_y, partials, coefficients,
        grad_input, grad_weight, grad_bias, None, None, None,
    ))
    assert not partials.isnan().any()
    want = R.bn_relu_backward(grad, x, weight, bias, mean, invstd, True)
    for got, expected in zip((grad_input, grad_weight, grad_bias), want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(9, 3, 2, 5), (1, 2, 3, 5), (33, 3, 3, 7)], ids=lambda s: "x".join(map(str, s)))
def test_statistics_are_stable_far_from_zero(shape, layout):
    """The shapes give lanes several Welford updates, in row and lane blocks and chunks with
    tails; 33x3x3x7 several partials per channel, whose merge in the finalize must correct
    for its rounded mean too."""
    check_statistics_far_from_zero("triton", shape, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_variance_past_float32_range(layout):
    check_variance_past_float32_range("triton", layout)


@pytest.mark.parametrize("shape, layout", OUTLIER_CASES)
def test_statistics_with_an_outlier_first(shape, layout):
    check_statistics_with_an_outlier_first("triton", shape, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_running_statistics_of_any_kind(layout):
    check_running_statistics_of_any_kind("triton", layout)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_values_poison_only_their_channel(layout):
    check_non_finite_statistics("triton", layout)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the weight gradient: 0 * -Inf, as eager
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_inputs_in_eval_keep_to_their_element(layout):
    check_non_finite_inputs_in_eval("triton", layout)


def test_mask_of_the_rounded_output():
    check_mask_of_the_rounded_output("triton", dtypes=(torch.float16,))  # the interpreter has no bfloat16


def test_forward_recomputes_the_mask_of_the_backward():
    """Where the forward output is 0 the backward passes no gradient, and vice versa."""
    x, r = activation((2, 5, 3, 4)), activation((2, 5, 3, 4))
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    mean, invstd = T.batch_stats(x, None, None, 0.1, 1e-5)
    out = T.bn_add_relu(x, r, w, b, mean, invstd, True)
    _, grad_residual, _, _ = T.bn_add_relu_backward(torch.ones_like(x), x, r, w, b, mean, invstd, True)
    assert torch.equal(grad_residual, (out > 0).float())


# ---------------------------------------------------------------- registration


def test_a_dtype_the_backend_cannot_run_raises_before_a_batch_norm_counts_the_batch():
    """Under CPU autocast a block's convolutions give bfloat16, which the interpreter cannot
    run: the fused forward raises before bn1 counts the batch or moves its statistics."""
    block = fused_copy(make_block("basic_stride2_downsample")).train()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x = torch.randn(block_input_shape("basic_stride2_downsample"))
    with resnet_fused.use_backend("triton"), torch.autocast("cpu", torch.bfloat16):
        with pytest.raises(TypeError, match="backend 'triton' supports dtypes float16, float32, got torch.bfloat16"):
            block(x)
    for name, value in block.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_torch_func_grad_matches_autograd():
    check_torch_func_grad_matches_autograd("triton")


def test_opcheck():
    assert_opcheck(T, reduced_dtypes=(torch.float16,))  # the interpreter has no bfloat16


def test_compile_fullgraph():
    """A block tail through torch.compile(fullgraph=True) (Inductor): no graph break."""
    assert_compiles_like_eager("triton", shape=(2, 6, 3, 3))

