"""The Triton backend (resnet_fused.triton).

Without a GPU, as CI runs it:
  - the op schemas equal the reference's and the C++ ones;
  - the backend is unavailable with a clear reason, and importable without Triton;
  - every kernel runs under TRITON_INTERPRET=1 on CPU tensors against the reference, in a
    process of its own (tests/triton_interpreted.py: Triton reads the variable on import);
  - every kernel with every autotune configuration compiles for sm_90, and its register
    and spill report is printed (the same as scripts/triton_report.py); spills fail.
With a GPU (``pytest -m cuda``): every op against the reference in float32, float16 and
bfloat16, both layouts, more than 2^31 elements, a replayed launch plan against Triton's own
launch path, CUDA graph capture and replay, opcheck.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resnet_fused
from resnet_fused import _extension, functional as RF, ops
from helpers import LAYOUTS, activation, assert_compiles_like_eager, assert_opcheck, child_env, log_elementwise_margin
from test_ops import (EMPTY_SHAPES, OUTLIER_SHAPES_ON_GPU, STRIDE_SHAPES, check_empty_input,
                      check_mask_of_the_rounded_output, check_nan_residual_gradients,
                      check_results_strided_in_the_op_layout, check_non_finite_inputs_in_eval,
                      check_non_finite_statistics, check_running_statistics_of_any_kind,
                      check_statistics_far_from_zero, check_statistics_with_an_outlier_first,
                      check_tensors_over_2_to_the_31_elements, check_torch_func_grad_matches_autograd,
                      check_variance_past_float32_range)

pytest.importorskip("triton")
from resnet_fused.triton import _runtime, compile_report  # noqa: E402
from resnet_fused.triton import batch_stats as batch_stats_module, bn_act as bn_act_module  # noqa: E402

T = torch.ops.resnet_fused_triton
R = torch.ops.resnet_fused_reference
ROUNDING = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}
PER_CHANNEL_TOL = 1e-4  # fp32 sums of the same terms in another order, relative to their size
not_interpreting = pytest.mark.skipif(_runtime.INTERPRET, reason="run without TRITON_INTERPRET")


# ---------------------------------------------------------------- shared checks (also run by the interpreter)


def assert_matches(got, want, tol, what, *, cancels=True):
    """Same dtype, shape and strides; values within ``tol`` relative to each element and,
    absolutely, ``tol`` relative to the largest of them for results that cancel towards 0
    (gradients, per-channel sums), else ``tol`` itself: the forward outputs, at most a
    rounding apart elementwise, are unit-scale here."""
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride(), what
    scale = max(want.abs().max().item(), 1e-30) if want.numel() and cancels else 1.0
    log_elementwise_margin(what, got, want, tol, tol * scale)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def normalized64(x, weight, bias, mean, invstd):
    """(x - mean) * invstd * weight + bias in float64."""
    def per_channel(t):
        return t.double().view(1, -1, 1, 1)

    return (x.double() - per_channel(mean)) * per_channel(invstd * weight) + per_channel(bias)


def check_ops_against_reference(device, dtype, layout, shape):
    """Every Triton op against the reference op on the same inputs, training and eval.

    The upstream gradient is zeroed where the pre-activations are within float32 rounding
    of 0: the kernels form them with one fma, the reference with a multiply and an add,
    and there the two may take opposite sides of the ReLU.
    """
    C = shape[1]
    x, r, g = (activation(shape, dtype, layout, device) for _ in range(3))
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    w_d, b_d = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)

    running_mean, running_var = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    ours, theirs = (running_mean.clone(), running_var.clone()), (running_mean.clone(), running_var.clone())
    got = T.batch_stats(x, *ours, 0.1, 1e-5) + ours
    want = R.batch_stats(x, *theirs, 0.1, 1e-5) + theirs
    for name, a, e in zip(("mean", "invstd", "running_mean", "running_var"), got, want):
        assert_matches(a, e, PER_CHANNEL_TOL, f"batch_stats {name}")
    mean, invstd = want[:2]
    mean_d, invstd_d = R.batch_stats(r, None, None, 0.1, 1e-3)

    def preactivation(epilogue):
        pre = normalized64(x, w, b, mean, invstd)
        if epilogue == "add":
            pre = pre + r.double()
        if epilogue == "dual":
            pre = pre + normalized64(r, w_d, b_d, mean_d, invstd_d)
        return pre

    for training in (True, False):
        cases = {
            "bn_relu": ("relu", (x, w, b, mean, invstd, training)),
            "bn_add_relu": ("add", (x, r, w, b, mean, invstd, training)),
            "dual_bn_add_relu": ("dual", (x, w, b, mean, invstd, r, w_d, b_d, mean_d, invstd_d, training)),
            "bn_relu_backward": ("relu", (g, x, w, b, mean, invstd, training)),
            "bn_add_relu_backward": ("add", (g, x, r, w, b, mean, invstd, training)),
            "dual_bn_add_relu_backward": (
                "dual", (g, x, w, b, mean, invstd, r, w_d, b_d, mean_d, invstd_d, training)
            ),
        }
        for name, (epilogue, args) in cases.items():
            if name.endswith("backward"):
                grad = torch.where(preactivation(epilogue).abs() < 1e-5, 0.0, g.double()).to(dtype)
                args = (grad.contiguous(memory_format=LAYOUTS[layout]),) + args[1:]
            got, want = getattr(T, name)(*args), getattr(R, name)(*args)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            for i, (a, e) in enumerate(zip(got, want)):
                tol = 2 * ROUNDING[dtype] if a.dim() == 4 else PER_CHANNEL_TOL
                assert_matches(a, e, tol, f"{name}(training={training}) output {i}", cancels=name.endswith("backward"))


def check_functional_training(device, op, dtype, layout, shape):
    """``op`` through autograd with backend='triton' against backend='reference':
    output, running statistics and every gradient. The upstream gradient is zeroed only
    where the float64 pre-activation, from the reference's batch statistics, is within
    1e-3 of 0 (the two backends' statistics differ in their last float32 bits, which may
    flip the ReLU there: ~0.1% of the elements), so a wrong mask shows."""
    C = shape[1]
    inputs = [activation(shape, dtype, layout, device) for _ in range(2)]
    params = [torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)] * 2
    stats = [torch.randn(C, device=device), torch.rand(C, device=device) + 0.5] * 2
    upstream = activation(shape, dtype, layout, device)
    x, other = inputs
    pre = normalized64(x, params[0], params[1], *R.batch_stats(x, None, None, 0.1, 1e-5))
    if op == "bn_add_relu":
        pre = pre + other.double()
    elif op == "dual_bn_add_relu":
        pre = pre + normalized64(other, params[2], params[3], *R.batch_stats(other, None, None, 0.1, 1e-5))
    grad = torch.where(pre.abs() < 1e-3, 0.0, upstream.double()).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    results = {}
    for backend in ("triton", "reference"):
        x, other = (t.detach().clone().requires_grad_() for t in inputs)
        w, b, w_d, b_d = (t.detach().clone().requires_grad_() for t in params)
        rm, rv, rm_d, rv_d = (t.clone() for t in stats)
        if op == "bn_relu":
            out = RF.bn_relu(x, rm, rv, w, b, True, backend=backend)
            leaves = [x, w, b]
        elif op == "bn_add_relu":
            out = RF.bn_add_relu(x, other, rm, rv, w, b, True, backend=backend)
            leaves = [x, other, w, b]
        else:
            out = RF.dual_bn_add_relu(x, other, rm, rv, rm_d, rv_d, w, b, w_d, b_d, True, backend=backend)
            leaves = [x, other, w, b, w_d, b_d]
        results[backend] = (out, torch.autograd.grad(out, leaves, grad), (rm, rv, rm_d, rv_d))
    (out, grads, running), (want_out, want_grads, want_running) = results["triton"], results["reference"]
    assert_matches(out, want_out, 2 * ROUNDING[dtype], "output", cancels=False)
    for i, (a, e) in enumerate(zip(grads, want_grads)):
        assert_matches(a, e, 2 * ROUNDING[dtype] if a.dim() == 4 else PER_CHANNEL_TOL, f"gradient {i}")
    for a, e in zip(running, want_running):
        assert_matches(a, e, PER_CHANNEL_TOL, "running statistics")


# ---------------------------------------------------------------- registration


def _schema(namespace, name):
    schema = getattr(getattr(torch.ops, namespace), name).default._schema
    arguments = [(a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments]
    return arguments, [str(r.type) for r in schema.returns]


@pytest.mark.parametrize("namespace", ["resnet_fused_reference", "resnet_fused"])
def test_schemas_equal(namespace):
    """Argument names, types and mutability, and return types (C++ names its returns)."""
    if namespace == "resnet_fused" and not _extension.LOADED:
        pytest.skip("resnet_fused._C not built")
    for name in ops.OP_NAMES:
        assert _schema("resnet_fused_triton", name) == _schema(namespace, name), name


@not_interpreting
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_unavailable_without_a_gpu_says_why():
    assert "triton" not in resnet_fused.available_backends("cpu")
    assert "triton" not in resnet_fused.available_backends("cuda")
    x = activation((2, 3, 2, 2))
    with pytest.raises(RuntimeError, match="backend 'triton' is not available: no CUDA device"):
        RF.bn_relu(x, None, None, training=True, backend="triton")
    with resnet_fused.use_backend("triton"), pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        RF.batch_stats(x)
    with pytest.raises(RuntimeError, match=r"bn_relu\(\): the Triton kernels run on CUDA tensors"):
        T.bn_relu(x, None, None, torch.zeros(3), torch.ones(3), True)


def test_import_without_triton():
    """Triton absent (as with CPU-only torch): the package imports, the backend says why."""
    code = (
        "import sys, torch\n"  # torch first: it probes for Triton itself
        "assert 'triton' not in sys.modules\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'triton': raise ModuleNotFoundError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import resnet_fused\n"
        "from resnet_fused import backends\n"
        "print('triton' in resnet_fused.available_backends('cuda'), backends.get('triton').unavailable)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env())
    assert out.stdout.strip() == "False Triton cannot be imported (blocked for the test)", out.stdout + out.stderr


def test_import_with_a_triton_too_old():
    """Triton 3.2 (what torch 2.6 ships) lacks what the kernels use and failed the package's
    import: the backend is unavailable, saying which Triton it needs, and the rest works."""
    code = (
        "import torch, triton\n"
        "triton.__version__ = '3.2.0'\n"
        "import resnet_fused\n"
        "from resnet_fused import backends\n"
        "print(resnet_fused.available_backends('cpu'), '|', backends.get('triton').unavailable)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env())
    backends_here = "['cpu', 'reference']" if "cpu" in resnet_fused.available_backends("cpu") else "['reference']"
    assert out.stdout.strip() == (f"{backends_here} | Triton 3.2.0 is older than 3.6, the oldest the kernels run with "
                                  "(torch pins its Triton: torch 2.11 and later ship 3.6 or newer)"), out.stdout + out.stderr


# ---------------------------------------------------------------- CI without a GPU


@not_interpreting
def test_kernels_under_the_interpreter(capsys):
    """tests/triton_interpreted.py in a TRITON_INTERPRET=1 process; its summary is printed."""
    module = Path(__file__).with_name("triton_interpreted.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(module)],
        cwd=module.parent.parent, env=child_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    with capsys.disabled():
        print(f"\nTRITON_INTERPRET=1 {module.name}: {summary}")
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in summary and "skipped" not in summary, summary


@not_interpreting
@pytest.mark.parametrize("dtype", compile_report.DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_kernel_compiles_for_sm90_without_spills(dtype, capsys):
    rows = compile_report.compile_all((dtype,))
    with capsys.disabled():
        print(f"\nTriton kernels for {compile_report.TARGET} ({dtype}):\n{compile_report.format_table(rows)}")
    kernels = {r.kernel for r in rows}
    assert kernels == {
        "_batch_stats_partials_kernel", "_batch_stats_finalize_kernel", "_bn_act_forward_kernel",
        "_bn_act_backward_reduce_kernel", "_bn_act_backward_finalize_kernel", "_bn_act_backward_elementwise_kernel",
    }
    assert all(r.local_bytes == 0 for r in rows), [r for r in rows if r.local_bytes]
    # Launched early on sm_90 (unless RESNET_FUSED_PDL=0): each waits for the kernel before it first.
    waits = True if _runtime.early_launch_enabled_by_env() else None
    assert all(r.waits_first is waits for r in rows), [r for r in rows if r.waits_first is not waits]
    elementwise = [r for r in rows if r.kernel in compile_report.ELEMENTWISE_KERNELS]
    assert elementwise and all(r.narrow_stores == 0 for r in elementwise), [r for r in elementwise if r.narrow_stores]
    # The reductions are partitioned for one wave at 16 warps per SM (resnet_fused/triton/_reduce.py), which
    # every configuration must hold (their register cap, _runtime.TUNING).
    one_wave = [r for r in rows if r.kernel in ("_batch_stats_partials_kernel", "_bn_act_backward_reduce_kernel")]
    assert one_wave and all(r.resident_warps >= 16 for r in one_wave), [r for r in one_wave if r.resident_warps < 16]
    # Offsets formed in 64 bits wherever an argument (a channel count, a row stride) is a factor.
    assert all(r.narrow_products == 0 for r in rows), [r for r in rows if r.narrow_products]


@not_interpreting
def test_the_compile_report_counts_32_bit_products_that_become_offsets():
    """The check above has teeth: a product of an argument formed in 32 bits, then used as a
    pointer offset or widened, is counted; the same product formed in 64 bits is not."""
    import triton
    import triton.language as tl

    @triton.jit
    def offsets_probe(x_ptr, out_ptr, n, WIDE: tl.constexpr):
        rows = tl.arange(0, 16)
        if WIDE:
            start, offsets = x_ptr + tl.cast(n, tl.int64) * 64, rows.to(tl.int64) + tl.cast(n, tl.int64) * 64
            strided = rows.to(tl.int64) * n
        else:
            start, offsets = x_ptr + n * 64, rows.to(tl.int64) + n * 64  # wrap from n = 2^25
            strided = rows * n  # a tile of products: wraps from n = 2^27
        tl.store(out_ptr + rows, tl.load(start + rows) + tl.load(x_ptr + offsets) + tl.load(x_ptr + strided))

    counts = []
    for wide in (False, True):
        args = dict(x_ptr=torch.empty(64), out_ptr=torch.empty(16), n=1000, WIDE=wide)
        compiled = triton.compile(compile_report._source(offsets_probe, args), target=compile_report.TARGET)
        counts.append(compile_report._narrow_address_products(compiled.asm["ttir"]))
    assert counts == [3, 0]


def test_resident_warps_follow_the_sm90_limits():
    assert compile_report.resident_warps(128, 4, 16384) == 16  # registers: 4 programs
    assert compile_report.resident_warps(154, 4, 0) == 12  # 160 a thread: 12 warps, 3 programs
    assert compile_report.resident_warps(64, 8, 98304) == 16  # shared memory: 2 programs
    assert compile_report.resident_warps(32, 1, 0) == 32  # 32 programs at most


@not_interpreting
def test_pinning_selects_one_configuration_and_names_a_bad_index():
    kernel = bn_act_module._bn_act_forward_kernel
    with _runtime.pinned_config(None):
        assert _runtime.pinned_config_of(kernel) is None
        with _runtime.pinned_config(2):
            assert _runtime.pinned_config_of(kernel) is kernel.configs[2]
            assert _runtime.pinned_config_of(bn_act_module._bn_act_backward_finalize_kernel) is None  # not autotuned
        assert _runtime.pinned_index() is None
        with _runtime.pinned_config(len(kernel.configs)), pytest.raises(ValueError, match="_bn_act_forward_kernel has 4 conf"):
            _runtime.pinned_config_of(kernel)
        with pytest.raises(ValueError, match="pinned_config: index must be >= 0 or None, got -1"):
            with _runtime.pinned_config(-1):
                pass
    code = "import resnet_fused.triton._runtime"
    for bad in ("first", "\u00b2"):  # a word; a superscript 2, which str.isdigit accepts and int() does not
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=child_env(RESNET_FUSED_TRITON_CONFIG=bad))
        assert result.returncode != 0 and f"RESNET_FUSED_TRITON_CONFIG={bad!r}: expected the index" in result.stderr
    result = subprocess.run([sys.executable, "-c", code + "; print(resnet_fused.triton._runtime.pinned_index())"],
                            capture_output=True, text=True, check=True, env=child_env(RESNET_FUSED_TRITON_CONFIG="3"))
    assert result.stdout.strip() == "3"


@not_interpreting
def test_precompile_plans_each_kernel_specialization_once():
    """scripts/triton_precompile.py's work list: every compilation of a spec, shared ones once."""
    spec = ("bfloat16", (128, 64, 56, 56), "nhwc")
    planned = compile_report.distinct_compilations([spec])
    launched = compile_report._compilations(spec)
    assert 0 < len(planned) <= len(launched)
    assert {fn.__name__ for fn, _, _ in launched} == {launched[i][0].__name__ for _, i in planned}
    assert compile_report.distinct_compilations([spec, spec]) == planned
    other_dtype = compile_report.distinct_compilations([spec, ("float32",) + spec[1:]])
    assert len(planned) < len(other_dtype) < 2 * len(planned)  # the finalize kernels read no activation


# ---------------------------------------------------------------- on a GPU

cuda = pytest.mark.cuda
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_SHAPES = [(4, 19, 5, 7), (3, 8, 1, 1), (2, 67, 9, 11), (8, 256, 14, 14), (2, 64, 56, 56)]
REDUCTION_KERNELS = [batch_stats_module._batch_stats_partials_kernel, bn_act_module._bn_act_backward_reduce_kernel]
ELEMENTWISE_KERNELS = [bn_act_module._bn_act_forward_kernel, bn_act_module._bn_act_backward_elementwise_kernel]


@pytest.fixture(autouse=True)
def _one_configuration(request):
    """Each test runs one autotune configuration (RESNET_FUSED_TRITON_CONFIG, default the
    first): autotuning would compile and time every configuration at each new shape,
    minutes over the suite. test_every_configuration_on_cuda checks each configuration,
    and tests marked ``autotune`` let the autotuner choose."""
    if request.node.get_closest_marker("autotune") or _runtime.INTERPRET:
        yield
        return
    with _runtime.pinned_config(_runtime.pinned_index() or 0):
        yield


def dtype_id(d):
    return str(d).removeprefix("torch.")


@cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ops_match_reference_on_cuda(shape, dtype, layout):
    check_ops_against_reference("cuda", dtype, layout, shape)


# Cases of test_every_configuration_on_cuda: dtype and shape per layout. Triton pipelines
# a reduction's loads (STAGES > 1) only where they are 16-byte vectors, so "pipelined"
# has rows of a multiple of 16 elements (C in channels_last, H*W in NCHW) and loops of
# more steps than a pipeline has stages (channels_last statistics 5/3/2 steps at TILE
# 1024/2048/4096, backward reduction 9/5/3; NCHW 5/3/2 row tiles of 5 lane blocks, so
# the loop moves on to the next row tile within a pipeline), with tails in rows and
# lanes. "one_step": aligned too, every loop a single step (a pipeline's prologue
# alone), in float32 (four values per vector). "tails": unaligned scalar loads, tails
# in rows and lanes for every TILE.
CONFIGURATION_CASES = {
    "pipelined": (torch.bfloat16, {"nhwc": (3, 208, 107, 107), "nchw": (66, 528, 24, 24)}),
    "one_step": (torch.float32, {"nhwc": (2, 208, 1, 3), "nchw": (2, 200, 4, 4)}),
    "tails": (torch.bfloat16, {"nhwc": (3, 200, 13, 11), "nchw": (3, 200, 13, 11)}),
}


@cuda
@pytest.mark.parametrize("index", range(len(_runtime.TUNING.reduce)))
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("case", list(CONFIGURATION_CASES))
def test_every_configuration_on_cuda(index, layout, case, monkeypatch):
    """Every op with the index-th configuration of every autotuned kernel, in each case of
    CONFIGURATION_CASES."""
    assert all(k.configs == _runtime.TUNING.reduce for k in REDUCTION_KERNELS)
    assert all(k.configs == _runtime.TUNING.elementwise for k in ELEMENTWISE_KERNELS)
    repeats, rest = divmod(len(_runtime.TUNING.reduce), len(_runtime.TUNING.elementwise))
    assert rest == 0
    for kernel in ELEMENTWISE_KERNELS:  # the shorter list, repeated: index i pins its i % len
        monkeypatch.setattr(kernel, "configs", kernel.configs * repeats)
    with _runtime.pinned_config(index):
        dtype, shapes = CONFIGURATION_CASES[case]
        check_ops_against_reference("cuda", dtype, layout, shapes[layout])


@cuda
@pytest.mark.autotune
def test_autotuned_ops_match_reference_on_cuda():
    check_ops_against_reference("cuda", torch.bfloat16, "nhwc", (8, 96, 28, 28))


@cuda
@pytest.mark.parametrize("op", ["bn_relu", "bn_add_relu", "dual_bn_add_relu"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
def test_functional_training_matches_reference_on_cuda(op, layout, dtype):
    check_functional_training("cuda", op, dtype, layout, (4, 40, 9, 7))


@cuda
@pytest.mark.xdist_group("over_2_31")
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_more_than_2_31_elements(layout, releases_gpu_memory):
    """2^31 + 2^17 values in eight planes of 2^28 (the CUDA test has many small ones)."""
    check_tensors_over_2_to_the_31_elements("triton", (2, 4, 16384, 16385), layout, "cuda")


@cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_deterministic(layout):
    x, g = (activation((16, 96, 28, 28), torch.bfloat16, layout, "cuda") for _ in range(2))
    w, b = torch.rand(96, device="cuda") + 0.5, torch.randn(96, device="cuda")
    first = T.batch_stats(x, None, None, 0.1, 1e-5)
    first_grads = T.bn_relu_backward(g, x, w, b, *first, True)
    for _ in range(3):
        again = T.batch_stats(x, None, None, 0.1, 1e-5)
        assert all(torch.equal(a, e) for a, e in zip(again, first))
        assert all(torch.equal(a, e) for a, e in zip(T.bn_relu_backward(g, x, w, b, *again, True), first_grads))


@cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_a_replayed_call_equals_one_through_triton(layout, monkeypatch):
    """Every op called once (its launch plan recorded), then with fresh tensors of the same
    shapes (replayed, nothing through Triton): bit for bit what the same call gives with
    every launch through Triton, and with the running statistics updated alike."""
    shape, C = (5, 40, 9, 7), 40

    def operands():
        x, y, g = (activation(shape, torch.bfloat16, layout, "cuda") for _ in range(3))
        per_channel = [torch.rand(C, device="cuda") + 0.5 for _ in range(8)]
        return x, y, g, per_channel

    def calls(x, y, g, p):
        w, b, mean, invstd, w_d, b_d, mean_d, invstd_d = p
        running = (p[2].clone(), p[3].clone())
        return {
            "batch_stats": (*T.batch_stats(x, *running, 0.3, 1e-5), *running),
            "bn_relu": T.bn_relu(x, w, b, mean, invstd, True),
            "bn_add_relu": T.bn_add_relu(x, y, w, None, mean, invstd, True),
            "dual_bn_add_relu": T.dual_bn_add_relu(x, w, b, mean, invstd, y, None, b_d, mean_d, invstd_d, True),
            "bn_relu_backward": T.bn_relu_backward(g, x, w, b, mean, invstd, False),
            "bn_add_relu_backward": T.bn_add_relu_backward(g, x, y, w, b, mean, invstd, True),
            "dual_bn_add_relu_backward": T.dual_bn_add_relu_backward(
                g, x, w, b, mean, invstd, y, w_d, b_d, mean_d, invstd_d, True),
        }

    _runtime.forget_plans()
    with _runtime.replaying(True):
        recorded = operands()  # kept alive: the fresh tensors get addresses of their own
        calls(*recorded)
        assert len(_runtime._plans) == 7
        fresh = operands()
        launched = []
        monkeypatch.setattr(_runtime.Launch, "through_triton", lambda self: launched.append(self))
        replayed = calls(*fresh)
        assert launched == [], "a replayed call went through Triton"
        monkeypatch.undo()
    with _runtime.replaying(False):
        through_triton = calls(*fresh)
    for name, got in replayed.items():
        got, want = (got, through_triton[name]) if isinstance(got, tuple) else ((got,), (through_triton[name],))
        assert all(torch.equal(a, e) for a, e in zip(got, want, strict=True)), name


@cuda
@pytest.mark.autotune
def test_cuda_graph_capture_and_replay():
    """A training step's ops captured once (after autotuning) and replayed on new data."""
    shape, C = (8, 64, 28, 28), 64
    x, r, g = (activation(shape, torch.bfloat16, "nhwc", "cuda") for _ in range(3))
    w, b = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
    rm0, rv0 = torch.randn(C, device="cuda"), torch.rand(C, device="cuda") + 0.5
    rm, rv = rm0.clone(), rv0.clone()

    def step():
        mean, invstd = T.batch_stats(x, rm, rv, 0.1, 1e-5)
        out = T.bn_add_relu(x, r, w, b, mean, invstd, True)
        return (out, *T.bn_add_relu_backward(g, x, r, w, b, mean, invstd, True))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # autotuning benchmarks here, not under capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in (x, r, g):
        t.copy_(torch.randn_like(t, dtype=torch.float32))
    want_rm, want_rv = rm0.clone(), rv0.clone()
    mean, invstd = R.batch_stats(x, want_rm, want_rv, 0.1, 1e-5)
    pre = normalized64(x, w, b, mean, invstd) + r.double()
    g.masked_fill_(pre.abs() < 1e-5, 0)  # 0 where fma and mul+add may disagree on the ReLU (see above)
    rm.copy_(rm0)
    rv.copy_(rv0)
    graph.replay()
    torch.cuda.synchronize()
    want = (R.bn_add_relu(x, r, w, b, mean, invstd, True), *R.bn_add_relu_backward(g, x, r, w, b, mean, invstd, True))
    for i, (a, e) in enumerate(zip(captured, want)):
        assert_matches(a, e, 2 * ROUNDING[torch.bfloat16] if a.dim() == 4 else PER_CHANNEL_TOL, f"replayed output {i}",
                       cancels=i > 0)
    assert_matches(rm, want_rm, PER_CHANNEL_TOL, "running_mean")
    assert_matches(rv, want_rv, PER_CHANNEL_TOL, "running_var")


@cuda
def test_opcheck_on_cuda():
    assert_opcheck(T, "cuda")


@cuda
def test_compile_fullgraph_on_cuda():
    assert_compiles_like_eager("triton", shape=(4, 32, 8, 8), dtype=torch.bfloat16, device="cuda")


@cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_nan_residual_passes_the_gradient_as_eager_on_cuda(layout):
    check_nan_residual_gradients("triton", layout, "cuda")


@cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_non_finite_values_poison_only_their_channel_on_cuda(layout):
    check_non_finite_statistics("triton", layout, "cuda")


@cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_non_finite_inputs_in_eval_keep_to_their_element_on_cuda(layout):
    check_non_finite_inputs_in_eval("triton", layout, "cuda")


@cuda
def test_mask_of_the_rounded_output_on_cuda():
    check_mask_of_the_rounded_output("triton", "cuda")


@cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_empty_input_on_cuda(shape, layout):
    check_empty_input("triton", shape, layout, "cuda")


@cuda
@pytest.mark.parametrize("shape", STRIDE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_results_strided_in_the_op_layout_on_cuda(shape):
    check_results_strided_in_the_op_layout("triton", shape, "cuda")


@cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_running_statistics_of_any_kind_on_cuda(layout):
    check_running_statistics_of_any_kind("triton", layout, "cuda")


@cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("shape", OUTLIER_SHAPES_ON_GPU, ids=lambda s: "x".join(map(str, s)))
def test_statistics_with_an_outlier_first_on_cuda(shape, layout):
    check_statistics_with_an_outlier_first("triton", shape, layout, "cuda")


@cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_statistics_are_stable_far_from_zero_on_cuda(layout, dtype):
    check_statistics_far_from_zero("triton", (64, 32, 24, 24), layout, dtype, "cuda")


@cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_variance_past_float32_range_on_cuda(layout):
    check_variance_past_float32_range("triton", layout, "cuda")


@cuda
def test_torch_func_grad_matches_autograd_on_cuda():
    check_torch_func_grad_matches_autograd("triton", "cuda")
