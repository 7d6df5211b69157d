// The op set of resnet_fused: one schema per op, the only place they are declared.
//
// Implementations register per backend with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda);
// fake (meta) kernels and autograd formulas are registered from Python
// (resnet_fused/ops.py); the version bump of batch_stats' in-place writes is here. The
// fused forwards are declared a second time, in resnet_fused_eager, for plain eager calls
// (csrc/autograd.cpp).
// Per-channel arrays (mean, invstd, parameter gradients) are in the accumulation type:
// float64 for float64 activations, float32 otherwise.

#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

// `import resnet_fused._C` loads this shared object, which runs the static registrations
// below. The module itself is empty: everything is reached through torch.ops.resnet_fused.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "resnet_fused kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace {

// The fused forwards' schemas, declared in both libraries below. Each normalizes with the
// given per-channel mean and invstd; `training` says they are `input`'s own batch
// statistics, so the backward differentiates through them (eval mode: running statistics,
// constants).
constexpr char kBnRelu[] =
    "bn_relu(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
    "bool training) -> Tensor";
constexpr char kBnAddRelu[] =
    "bn_add_relu(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, Tensor mean, "
    "Tensor invstd, bool training) -> Tensor";
// relu(bn(input) + bn_d(input_d)): the last stage of a block with a conv+BN downsample.
constexpr char kDualBnAddRelu[] =
    "dual_bn_add_relu(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
    "Tensor input_d, Tensor? weight_d, Tensor? bias_d, Tensor mean_d, Tensor invstd_d, "
    "bool training) -> Tensor";

}  // namespace

TORCH_LIBRARY(resnet_fused, m) {
  // Training-mode statistics; folds them into the running statistics when given. Not
  // differentiable: the fused ops below account for the statistics in their backward.
  m.def(
      "batch_stats(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float momentum, float eps) -> (Tensor mean, Tensor invstd)");

  m.def(kBnRelu);
  m.def(
      "bn_relu_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, bool training) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  m.def(kBnAddRelu);
  m.def(
      "bn_add_relu_backward(Tensor grad_out, Tensor input, Tensor residual, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor invstd, bool training) "
      "-> (Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");

  m.def(kDualBnAddRelu);
  m.def(
      "dual_bn_add_relu_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, Tensor input_d, Tensor? weight_d, Tensor? bias_d, "
      "Tensor mean_d, Tensor invstd_d, bool training) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_input_d, "
      "Tensor grad_weight_d, Tensor grad_bias_d)");
}

// The fused forwards of resnet_fused again, their backward bound in C++: one
// torch::autograd::Function each around the same kernels and formulas (csrc/autograd.cpp).
// resnet_fused/ops.py calls them for plain eager calls of the C++ backends, where a
// forward and backward through torch.library's Python autograd layer cost tens of
// microseconds of host time per op; torch.compile, export and the torch.func transforms
// keep the ops above.
TORCH_LIBRARY(resnet_fused_eager, m) {
  m.def(kBnRelu);
  m.def(kBnAddRelu);
  m.def(kDualBnAddRelu);
}

namespace {

// batch_stats writes the running statistics in place (`Tensor(a!)?` in its schema): bump
// their version counters afterwards, as every in-place op does, so that autograd's
// saved-tensor checks and caches keyed on versions (the blocks' folded weights) see the
// update. (torch's autogradNotImplementedInplaceOrViewFallback bumps mutated outputs only.)
void bump_mutated_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                            torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t num_arguments = schema.arguments().size();
  const size_t first = stack->size() - num_arguments;
  std::vector<at::Tensor> mutated;
  for (size_t i = 0; i < num_arguments; ++i) {
    const c10::IValue& argument = (*stack)[first + i];
    if (schema.is_mutable({c10::SchemaArgType::input, i}) && argument.isTensor()) {
      mutated.push_back(argument.toTensor());
    }
  }
  {
    c10::impl::ExcludeDispatchKeyGuard below(c10::DispatchKey::ADInplaceOrView);
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : mutated) {
    // An inference tensor has no version counter (eager updates such running statistics
    // outside inference mode too, and bumps nothing).
    if (!t.is_inference()) torch::autograd::impl::bump_version(t);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, ADInplaceOrView, m) {
  m.impl("batch_stats", torch::CppFunction::makeFromBoxedFunction<&bump_mutated_arguments>());
}
