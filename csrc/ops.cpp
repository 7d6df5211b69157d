// The op set of resnet_fused: one schema per op, the only place they are declared.
//
// Implementations register per backend with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda);
// fake (meta) kernels and autograd formulas are registered from Python
// (resnet_fused/ops.py). Per-channel arrays (mean, invstd, parameter gradients) are in the
// accumulation type: float64 for float64 activations, float32 otherwise.

#include <Python.h>
#include <torch/library.h>

// `import resnet_fused._C` loads this shared object, which runs the static registrations
// below. The module itself is empty: everything is reached through torch.ops.resnet_fused.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "resnet_fused kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(resnet_fused, m) {
  // Training-mode statistics; folds them into the running statistics when given. Not
  // differentiable: the fused ops below account for the statistics in their backward.
  m.def(
      "batch_stats(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float momentum, float eps) -> (Tensor mean, Tensor invstd)");

  // Each fused op normalizes with the given per-channel mean and invstd. `training` says
  // they are `input`'s own batch statistics, so the backward differentiates through them
  // (eval mode: running statistics, constants).
  m.def(
      "bn_relu(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "bool training) -> Tensor");
  m.def(
      "bn_relu_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, bool training) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  m.def(
      "bn_add_relu(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, bool training) -> Tensor");
  m.def(
      "bn_add_relu_backward(Tensor grad_out, Tensor input, Tensor residual, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor invstd, bool training) "
      "-> (Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");

  // relu(bn(input) + bn_d(input_d)): the last stage of a block with a conv+BN downsample.
  m.def(
      "dual_bn_add_relu(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "Tensor input_d, Tensor? weight_d, Tensor? bias_d, Tensor mean_d, Tensor invstd_d, "
      "bool training) -> Tensor");
  m.def(
      "dual_bn_add_relu_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, Tensor input_d, Tensor? weight_d, Tensor? bias_d, "
      "Tensor mean_d, Tensor invstd_d, bool training) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_input_d, "
      "Tensor grad_weight_d, Tensor grad_bias_d)");
}
