"""The op set shared by every backend: fake (meta) kernels and autograd formulas.

Each backend implements the same seven ops in its own namespace:

============================  ==================================================
``resnet_fused``              C++ CPU and CUDA kernels; schemas in ``csrc/ops.cpp``
``resnet_fused_reference``    plain PyTorch (:mod:`resnet_fused.reference`)
``resnet_fused_triton``       Triton kernels (:mod:`resnet_fused.triton`)
============================  ==================================================

:func:`register` attaches one set of fake kernels and autograd formulas to a namespace,
so every backend behaves identically under autograd, ``torch.compile`` and
``torch.library.opcheck``; :func:`eager_ops` runs the same implementations and formulas
in plain eager mode without torch.library's Python layers (for ``resnet_fused``, through
``resnet_fused_eager``: the fused forwards again, their formulas in C++ autograd Functions,
``csrc/autograd.cpp``). Each fused forward's backward
is its own op (``bn_relu`` -> ``bn_relu_backward``, ...). ``batch_stats`` mutates the
running statistics and is not differentiable; the fused ops account for the statistics
instead: with
``training=True`` their ``mean`` and ``invstd`` are ``input``'s batch statistics and
their gradient is part of ``grad_input``; with ``training=False`` they are constants of
the graph (running statistics) and get gradients of their own if they require them.
"""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from . import _checks
from .reference import accumulation_dtype

OP_NAMES = (
    "batch_stats",
    "bn_relu",
    "bn_relu_backward",
    "bn_add_relu",
    "bn_add_relu_backward",
    "dual_bn_add_relu",
    "dual_bn_add_relu_backward",
)
MUTATED_ARGS = {"batch_stats": ("running_mean", "running_var")}

# The Python implementation of each op, per namespace defined by `define`, as written: the
# registered ops validate their arguments first (`_validated`); the eager calls do not again,
# because their callers have (`functional` checks every argument before the first op runs,
# `folding` those of its add + ReLU; a backward op gets what its validated forward saved and autograd's
# gradient of that forward's output, of the output's shape, dtype and device): a second
# validation would cost about 5 us an op on a 2-core Xeon.
_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {}


def define(namespace: str, implementations: object) -> None:
    """Defines the op set in ``namespace`` from Python functions named like the ops.

    Schemas are inferred from the functions' annotations; tests check they equal the
    C++ schemas of ``csrc/ops.cpp``. Each registered op validates its arguments
    (``_checks.OP_CHECKS``) before the implementation runs, as the C++ ops do; the eager
    calls (:func:`eager_ops`) leave that to their callers.
    """
    raw = {name: getattr(implementations, name) for name in OP_NAMES}
    for name, implementation in raw.items():
        torch.library.custom_op(f"{namespace}::{name}", _validated(name, implementation),
                                mutates_args=MUTATED_ARGS.get(name, ()))
    _IMPLEMENTATIONS[namespace] = raw


def _validated(name: str, implementation):
    check = _checks.OP_CHECKS[name]

    @functools.wraps(implementation)  # keeps the signature the schema is inferred from
    def op(*args):
        check(*args)
        return implementation(*args)

    return op


# ---------------------------------------------------------------- fake kernels


def _per_channel_like(input: Tensor) -> Tensor:
    return input.new_empty(input.shape[1], dtype=accumulation_dtype(input.dtype))


def _activation_like(input: Tensor) -> Tensor:
    return torch.empty_like(input, memory_format=_checks.activation_memory_format(input))


def _branch_grads(input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _activation_like(input), _per_channel_like(input), _per_channel_like(input)


# What each op returns, from its arguments (all activations take the main input's layout).
_FAKE_OUTPUTS = {
    "batch_stats": lambda input, *_: (_per_channel_like(input), _per_channel_like(input)),
    "bn_relu": lambda input, *_: _activation_like(input),
    "bn_relu_backward": lambda grad_out, input, *_: _branch_grads(input),
    "bn_add_relu": lambda input, *_: _activation_like(input),
    "bn_add_relu_backward": lambda grad_out, input, *_: (
        _activation_like(input), _activation_like(input), _per_channel_like(input), _per_channel_like(input)
    ),
    "dual_bn_add_relu": lambda input, *_: _activation_like(input),
    "dual_bn_add_relu_backward": lambda grad_out, input, *_: (*_branch_grads(input), *_branch_grads(input)),
}


def _fake(name: str):
    check, outputs = _checks.OP_CHECKS[name], _FAKE_OUTPUTS[name]

    def fake(*args):
        check(*args)
        return outputs(*args)

    return fake


# ---------------------------------------------------------------- autograd


def _param_grad(grad: Tensor, param: Optional[Tensor]) -> Optional[Tensor]:
    # `grad` itself where the dtypes match, as `to` returns it, without its ~0.7 us a call
    return None if param is None else grad if grad.dtype == param.dtype else grad.to(param.dtype)


def _statistics_grads(ctx, first: int, weight, mean, invstd, grad_weight, grad_bias):
    """Gradients for ``mean`` and ``invstd`` (op arguments ``first``, ``first + 1``).

    Training: they are the input's batch statistics, already accounted for in
    grad_input. Eval: out = relu(x * w * invstd + b - mean * w * invstd), so
    d/d mean = -w * invstd * sum(g) and d/d invstd = w * sum(g * (x - mean)), where
    grad_bias = sum(g) and grad_weight = invstd * sum(g * (x - mean)).
    """
    if ctx.training or not (ctx.needs_input_grad[first] or ctx.needs_input_grad[first + 1]):
        return None, None
    w = 1.0 if weight is None else weight.to(grad_weight.dtype)
    grad_mean = -w * invstd.to(grad_weight.dtype) * grad_bias
    grad_invstd = w * grad_weight / invstd.to(grad_weight.dtype)
    return grad_mean.to(mean.dtype), grad_invstd.to(invstd.dtype)


def _bn_relu_setup(ctx, inputs, output):
    input, weight, bias, mean, invstd, training = inputs
    ctx.save_for_backward(input, weight, bias, mean, invstd)
    ctx.training = training


def _bn_add_relu_setup(ctx, inputs, output):
    input, residual, weight, bias, mean, invstd, training = inputs
    ctx.save_for_backward(input, residual, weight, bias, mean, invstd)
    ctx.training = training


def _dual_bn_add_relu_setup(ctx, inputs, output):
    *tensors, training = inputs
    ctx.save_for_backward(*tensors)
    ctx.training = training


def _backward_formulas(ops):
    """Backward functions of the three fused forwards, calling ``ops``' backward ops."""

    def bn_relu(ctx, grad_out):
        input, weight, bias, mean, invstd = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = ops.bn_relu_backward(
            grad_out, input, weight, bias, mean, invstd, ctx.training
        )
        stats = _statistics_grads(ctx, 3, weight, mean, invstd, grad_weight, grad_bias)
        return grad_input, _param_grad(grad_weight, weight), _param_grad(grad_bias, bias), *stats, None

    def bn_add_relu(ctx, grad_out):
        input, residual, weight, bias, mean, invstd = ctx.saved_tensors
        grad_input, grad_residual, grad_weight, grad_bias = ops.bn_add_relu_backward(
            grad_out, input, residual, weight, bias, mean, invstd, ctx.training
        )
        stats = _statistics_grads(ctx, 4, weight, mean, invstd, grad_weight, grad_bias)
        return (
            grad_input, grad_residual, _param_grad(grad_weight, weight), _param_grad(grad_bias, bias), *stats, None,
        )

    def dual_bn_add_relu(ctx, grad_out):
        input, weight, bias, mean, invstd, input_d, weight_d, bias_d, mean_d, invstd_d = ctx.saved_tensors
        grads = ops.dual_bn_add_relu_backward(
            grad_out, input, weight, bias, mean, invstd, input_d, weight_d, bias_d, mean_d, invstd_d, ctx.training
        )
        grad_input, grad_weight, grad_bias, grad_input_d, grad_weight_d, grad_bias_d = grads
        stats = _statistics_grads(ctx, 3, weight, mean, invstd, grad_weight, grad_bias)
        stats_d = _statistics_grads(ctx, 8, weight_d, mean_d, invstd_d, grad_weight_d, grad_bias_d)
        return (
            grad_input, _param_grad(grad_weight, weight), _param_grad(grad_bias, bias), *stats,
            grad_input_d, _param_grad(grad_weight_d, weight_d), _param_grad(grad_bias_d, bias_d), *stats_d,
            None,
        )

    return {
        "bn_relu": (bn_relu, _bn_relu_setup),
        "bn_add_relu": (bn_add_relu, _bn_add_relu_setup),
        "dual_bn_add_relu": (dual_bn_add_relu, _dual_bn_add_relu_setup),
    }


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "resnet_fused: the backward ops are not differentiable (double backward, e.g. a gradient "
        "penalty, is not supported); use the reference composites of torch.nn.functional instead"
    )


def _no_setup(ctx, inputs, output):
    pass


def register(namespace: str) -> None:
    """Registers the fake kernels and autograd formulas of every op in ``namespace``."""
    for name in OP_NAMES:
        torch.library.register_fake(f"{namespace}::{name}", _fake(name))
    for name, (backward, setup_context) in _backward_formulas(getattr(torch.ops, namespace)).items():
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup_context)
    # Differentiating a backward op must fail loudly, not silently give zero gradients.
    for name in OP_NAMES:
        if name.endswith("_backward"):
            torch.library.register_autograd(f"{namespace}::{name}", _no_double_backward, setup_context=_no_setup)
    _EAGER_OPS[namespace] = _build_eager_ops(namespace)


# ---------------------------------------------------------------- eager mode
#
# A call through ``torch.ops`` crosses into Python three times (torch.library's autograd
# kernel, its autograd.Function, the redispatch) and rebuilds the argument list from the
# schema (``fill_defaults``): tens of microseconds per op, which bound a training step on a
# GPU whose host is slower than its kernels. In plain eager mode each fused forward is
# instead one autograd Function over the implementation itself, with the same formulas: C++
# for the C++ backends (csrc/autograd.cpp), Python for the others; whatever traces a graph
# (torch.compile, export, dispatch modes, torch.func transforms other than grad and jvp)
# gets the registered ops. Compiled autograd traces an eager forward's backward: a Python
# Function's through the registered backward ops, a C++ one as one node (is_traceable).

_EAGER_OPS: dict[str, SimpleNamespace] = {}


def eager_ops(namespace: str) -> SimpleNamespace:
    """The ops of ``namespace`` for plain eager mode (built by :func:`register`). The caller
    validates the arguments first: the Python implementations do not (``_IMPLEMENTATIONS``)."""
    return _EAGER_OPS[namespace]


def _autograd_function(name: str, **methods: Callable) -> type:
    return type(name, (torch.autograd.Function,), {k: staticmethod(f) for k, f in methods.items()})


def _registered(namespace: str, name: str):
    """The registered op ``torch.ops.<namespace>.<name>``."""
    return getattr(getattr(torch.ops, namespace), name)


def _direct(namespace: str, name: str) -> Callable:
    """``namespace::name`` without the dispatcher's autograd layer: the Python
    implementation itself, or the C++ op below autograd (its ADInplaceOrView kernel, then
    its CPU or CUDA kernel)."""
    implementation = _IMPLEMENTATIONS.get(namespace, {}).get(name)
    if implementation is not None:
        return implementation
    op = _registered(namespace, name).default

    def below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return below_autograd


def _backward_op(namespace: str, name: str) -> Callable:
    direct, registered = _direct(namespace, name), _registered(namespace, name)
    # create_graph=True (torch.func.grad differentiates with it too): the gradients it
    # returns must fail when differentiated, as the registered ops' do.
    guarded = _autograd_function(f"{namespace}_{name}", forward=direct, setup_context=_no_setup,
                                 backward=_no_double_backward)

    def backward_op(*args):
        if torch.compiler.is_compiling():  # compiled autograd traces the backward
            return registered(*args)
        return guarded.apply(*args) if torch.is_grad_enabled() else direct(*args)

    return backward_op


def _batch_stats(namespace: str) -> Callable:
    direct = _direct(namespace, "batch_stats")
    if namespace not in _IMPLEMENTATIONS:
        return direct  # the C++ op bumps the running statistics' versions itself (csrc/ops.cpp)
    registered = _registered(namespace, "batch_stats")

    def batch_stats(input, running_mean, running_var, momentum, eps):
        if _differentiating_transform():  # the dispatcher unwraps torch.func.grad's tensors
            return registered(input, running_mean, running_var, momentum, eps)
        result = direct(input, running_mean, running_var, momentum, eps)
        # As the registered op does for a mutated argument: a kernel that writes through a
        # raw pointer (Triton) bumps no version counter.
        torch.autograd.graph.increment_version([t for t in (running_mean, running_var) if t is not None])
        return result

    return batch_stats


def _build_eager_ops(namespace: str, native: bool = True) -> SimpleNamespace:
    backward_ops = SimpleNamespace(**{name: _backward_op(namespace, name) for name in OP_NAMES if name.endswith("_backward")})
    functions = {
        name: _function(namespace, name, setup_context, backward, native)
        for name, (backward, setup_context) in _backward_formulas(backward_ops).items()
    }
    return SimpleNamespace(batch_stats=_batch_stats(namespace), **functions)


@contextlib.contextmanager
def python_eager_autograd(namespace: str) -> Iterator[None]:
    """Inside, plain eager calls of ``namespace`` use Python autograd.Functions even where
    C++ ones exist (``NATIVE_EAGER_NAMESPACES``): what benchmarks/host_overhead.py compares."""
    native = _EAGER_OPS[namespace]
    _EAGER_OPS[namespace] = _build_eager_ops(namespace, native=False)
    try:
        yield
    finally:
        _EAGER_OPS[namespace] = native


_DIFFERENTIATING_TRANSFORMS = ("Grad", "Jvp")


def _differentiating_transform() -> bool:
    """Whether the innermost torch.func transform is a grad or jvp; raises where another
    transform encloses it: the backward ops would then be differentiated or batched, which
    none supports (and a Python implementation would be handed tensors it cannot read)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    if torch._C._functorch.peek_interpreter_stack().key().name not in _DIFFERENTIATING_TRANSFORMS:
        return False
    if torch._C._functorch.get_dynamic_layer_stack_depth() > 1:
        raise NotImplementedError(
            "resnet_fused: nested torch.func transforms are not supported (grad of grad is a double backward, "
            "vmap of grad batches the backward ops: neither has a rule); use the reference composites of "
            "torch.nn.functional instead"
        )
    return True

# The C++ backends' fused forwards with the same formulas in a C++ autograd.Function
# (csrc/autograd.cpp): a plain eager call and its backward never enter Python.
NATIVE_EAGER_NAMESPACES = {"resnet_fused": "resnet_fused_eager"}


def _native_eager(namespace: str, name: str) -> Optional[Callable]:
    """``torch.ops.resnet_fused_eager.<name>`` for the C++ ops, if the extension has it."""
    native = NATIVE_EAGER_NAMESPACES.get(namespace)
    if native is None:
        return None
    try:
        return _registered(native, name).default
    except (AttributeError, RuntimeError):  # an extension built before these ops existed
        return None


def _function(namespace: str, name: str, setup_context: Callable, backward: Callable, native: bool) -> Callable:
    """The fused forward ``namespace::name`` with ``backward``: one autograd Function for
    plain eager calls (with ``native``, the C++ one of csrc/autograd.cpp where it exists) and
    a Python one with a separate ``setup_context`` for torch.func.grad, which requires it
    (vmap and functionalize get the registered op). Two Python ones elsewhere, because
    Function.apply binds default arguments (``inspect.signature``, ~10 us a call) whenever
    ``setup_context`` is separate."""
    op, registered = _direct(namespace, name), _registered(namespace, name)

    def forward(ctx, *inputs):
        output = op(*inputs)
        setup_context(ctx, inputs, output)
        return output

    transformable = _autograd_function(f"{namespace}_{name}_transformable", forward=op,
                                       setup_context=setup_context, backward=backward)
    plain = (native and _native_eager(namespace, name)) or _autograd_function(
        f"{namespace}_{name}", forward=forward, backward=backward).apply

    def apply(*inputs):
        if not torch._C._are_functorch_transforms_active():
            return plain(*inputs)
        if _differentiating_transform():
            return transformable.apply(*inputs)
        return registered(*inputs)

    return apply
