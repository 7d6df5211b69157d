// The ops of resnet_fused_eager: the fused forwards with their backward bound in C++.
//
// Each is one torch::autograd::Function around the registered ops of resnet_fused: the
// forward calls the fused op below the autograd layer (its CPU or CUDA kernel), the
// backward calls its backward op, and the formulas are resnet_fused/ops.py's
// (_backward_formulas, _statistics_grads, _param_grad) term for term, so gradients are
// bitwise those of the registered ops (tests/test_ops.py checks). A plain eager call then
// stays in C++ from the Python call to the kernels and back through the backward; the
// registered ops, with their Python autograd formulas, remain what torch.compile, export
// and the torch.func transforms see.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <utility>

#include "bn_act.h"

namespace resnet_fused::eager {

using resnet_fused::OptionalTensor;
using resnet_fused::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// The registered op resnet_fused::<name>, looked up on first use (after registration).
template <typename Signature>
c10::TypedOperatorHandle<Signature> registered(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using BnReluSignature = Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
                               const Tensor&, bool);
using BnReluBackwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptionalTensor&,
                                                                   const OptionalTensor&, const Tensor&, const Tensor&,
                                                                   bool);
using BnAddReluSignature = Tensor(const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                  const Tensor&, const Tensor&, bool);
using BnAddReluBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
    const Tensor&, bool);
using DualBnAddReluSignature = Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
                                      const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                      const Tensor&, const Tensor&, bool);
using DualBnAddReluBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&, const Tensor&,
    const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&, const Tensor&, bool);

// The forward op on its backend kernel, below the autograd layer.
template <typename Signature, typename... Args>
auto below_autograd(const c10::TypedOperatorHandle<Signature>& op, const Args&... args) {
  at::AutoDispatchBelowAutograd guard;
  return op.call(args...);
}

// A backward op. When the backward is itself recorded (create_graph=True), through the
// registered op, whose autograd formula makes its results fail when differentiated
// (ops.py: _no_double_backward), as the registered forwards' backward does.
template <typename Signature, typename... Args>
auto backward_op(const c10::TypedOperatorHandle<Signature>& op, const Args&... args) {
  if (at::GradMode::is_enabled()) return op.call(args...);
  return below_autograd(op, args...);
}

OptionalTensor optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// A per-channel gradient (accumulation dtype) in its parameter's dtype; none without one.
Tensor param_grad(const Tensor& grad, const Tensor& param) {
  return param.defined() ? in_dtype(grad, param.scalar_type()) : Tensor();
}

// Gradients of `mean` and `invstd` where they are constants of the graph that require
// grad (eval mode); in training they are the input's batch statistics, already in
// grad_input. out = relu(x * w * invstd + b - mean * w * invstd), so
// d/dmean = -w * invstd * sum(g) and d/dinvstd = w * sum(g * (x - mean)), with
// grad_bias = sum(g) and grad_weight = invstd * sum(g * (x - mean)).
std::pair<Tensor, Tensor> statistics_grads(bool needed, const Tensor& weight, const Tensor& mean,
                                           const Tensor& invstd, const Tensor& grad_weight,
                                           const Tensor& grad_bias) {
  if (!needed) return {};
  const at::ScalarType accumulation = grad_weight.scalar_type();
  const Tensor invstd_acc = in_dtype(invstd, accumulation);
  Tensor grad_mean, grad_invstd;
  if (weight.defined()) {
    const Tensor w = in_dtype(weight, accumulation);
    grad_mean = -w * invstd_acc * grad_bias;
    grad_invstd = w * grad_weight / invstd_acc;
  } else {  // w = 1: ops.py computes -1.0 * invstd and 1.0 * grad_weight, both exact
    grad_mean = -invstd_acc * grad_bias;
    grad_invstd = grad_weight / invstd_acc;
  }
  return {in_dtype(grad_mean, mean.scalar_type()), in_dtype(grad_invstd, invstd.scalar_type())};
}

void require_defined(const char* op, std::initializer_list<std::pair<const char*, const Tensor&>> tensors) {
  for (const auto& [name, t] : tensors) check_defined(op, name, t);
}

bool statistics_need_grad(bool training, const Tensor& mean, const Tensor& invstd) {
  return !training && (mean.requires_grad() || invstd.requires_grad());
}

}  // namespace

// relu(bn(input)).
struct BnRelu : torch::autograd::Function<BnRelu> {
  static constexpr bool is_traceable = true;  // compiled autograd traces the backward

  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, const Tensor& mean, const Tensor& invstd, bool training) {
    static const auto op = registered<BnReluSignature>("resnet_fused::bn_relu");
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["statistics_grads"] = statistics_need_grad(training, mean, invstd);
    return below_autograd(op, input, weight, bias, mean, invstd, training);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = registered<BnReluBackwardSignature>("resnet_fused::bn_relu_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    const bool training = ctx->saved_data["training"].toBool();
    auto [grad_input, grad_weight, grad_bias] =
        backward_op(op, grads[0], input, optional(weight), optional(bias), mean, invstd, training);
    auto [grad_mean, grad_invstd] = statistics_grads(ctx->saved_data["statistics_grads"].toBool(), weight, mean,
                                                     invstd, grad_weight, grad_bias);
    return {grad_input, param_grad(grad_weight, weight), param_grad(grad_bias, bias), grad_mean, grad_invstd,
            Tensor()};
  }
};

// relu(bn(input) + residual).
struct BnAddRelu : torch::autograd::Function<BnAddRelu> {
  static constexpr bool is_traceable = true;  // compiled autograd traces the backward

  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& residual,
                        const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& mean,
                        const Tensor& invstd, bool training) {
    static const auto op = registered<BnAddReluSignature>("resnet_fused::bn_add_relu");
    ctx->save_for_backward({input, residual, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["statistics_grads"] = statistics_need_grad(training, mean, invstd);
    return below_autograd(op, input, residual, weight, bias, mean, invstd, training);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = registered<BnAddReluBackwardSignature>("resnet_fused::bn_add_relu_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &residual = saved[1], &weight = saved[2], &bias = saved[3], &mean = saved[4],
                 &invstd = saved[5];
    const bool training = ctx->saved_data["training"].toBool();
    auto [grad_input, grad_residual, grad_weight, grad_bias] =
        backward_op(op, grads[0], input, residual, optional(weight), optional(bias), mean, invstd, training);
    auto [grad_mean, grad_invstd] = statistics_grads(ctx->saved_data["statistics_grads"].toBool(), weight, mean,
                                                     invstd, grad_weight, grad_bias);
    return {grad_input, grad_residual, param_grad(grad_weight, weight), param_grad(grad_bias, bias), grad_mean,
            grad_invstd, Tensor()};
  }
};

// relu(bn(input) + bn_d(input_d)).
struct DualBnAddRelu : torch::autograd::Function<DualBnAddRelu> {
  static constexpr bool is_traceable = true;  // compiled autograd traces the backward

  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, const Tensor& mean, const Tensor& invstd, const Tensor& input_d,
                        const OptionalTensor& weight_d, const OptionalTensor& bias_d, const Tensor& mean_d,
                        const Tensor& invstd_d, bool training) {
    static const auto op = registered<DualBnAddReluSignature>("resnet_fused::dual_bn_add_relu");
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd, input_d,
                            weight_d.value_or(Tensor()), bias_d.value_or(Tensor()), mean_d, invstd_d});
    ctx->saved_data["training"] = training;
    ctx->saved_data["statistics_grads"] = statistics_need_grad(training, mean, invstd);
    ctx->saved_data["statistics_grads_d"] = statistics_need_grad(training, mean_d, invstd_d);
    return below_autograd(op, input, weight, bias, mean, invstd, input_d, weight_d, bias_d, mean_d, invstd_d,
                          training);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = registered<DualBnAddReluBackwardSignature>("resnet_fused::dual_bn_add_relu_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    const Tensor &input_d = saved[5], &weight_d = saved[6], &bias_d = saved[7], &mean_d = saved[8],
                 &invstd_d = saved[9];
    const bool training = ctx->saved_data["training"].toBool();
    auto [grad_input, grad_weight, grad_bias, grad_input_d, grad_weight_d, grad_bias_d] =
        backward_op(op, grads[0], input, optional(weight), optional(bias), mean, invstd, input_d, optional(weight_d),
                    optional(bias_d), mean_d, invstd_d, training);
    auto [grad_mean, grad_invstd] = statistics_grads(ctx->saved_data["statistics_grads"].toBool(), weight, mean,
                                                     invstd, grad_weight, grad_bias);
    auto [grad_mean_d, grad_invstd_d] = statistics_grads(ctx->saved_data["statistics_grads_d"].toBool(), weight_d,
                                                         mean_d, invstd_d, grad_weight_d, grad_bias_d);
    return {grad_input,   param_grad(grad_weight, weight),     param_grad(grad_bias, bias),     grad_mean,
            grad_invstd,  grad_input_d,                        param_grad(grad_weight_d, weight_d),
            param_grad(grad_bias_d, bias_d),                   grad_mean_d,                     grad_invstd_d,
            Tensor()};
  }
};

}  // namespace resnet_fused::eager

// CompositeImplicitAutograd: the Function runs for every backend and records the graph
// itself (nothing below it is an op of this library).
TORCH_LIBRARY_IMPL(resnet_fused_eager, CompositeImplicitAutograd, m) {
  using namespace resnet_fused::eager;
  // An undefined (None) required tensor is refused before the Function reads its device.
  m.impl("bn_relu", [](const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                       const Tensor& mean, const Tensor& invstd, bool training) {
    require_defined("bn_relu", {{"input", input}, {"mean", mean}, {"invstd", invstd}});
    return BnRelu::apply(input, weight, bias, mean, invstd, training);
  });
  m.impl("bn_add_relu", [](const Tensor& input, const Tensor& residual, const OptionalTensor& weight,
                           const OptionalTensor& bias, const Tensor& mean, const Tensor& invstd, bool training) {
    require_defined("bn_add_relu", {{"input", input}, {"residual", residual}, {"mean", mean}, {"invstd", invstd}});
    return BnAddRelu::apply(input, residual, weight, bias, mean, invstd, training);
  });
  m.impl("dual_bn_add_relu",
         [](const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& mean,
            const Tensor& invstd, const Tensor& input_d, const OptionalTensor& weight_d,
            const OptionalTensor& bias_d, const Tensor& mean_d, const Tensor& invstd_d, bool training) {
           require_defined("dual_bn_add_relu", {{"input", input}, {"mean", mean}, {"invstd", invstd},
                                                {"input_d", input_d}, {"mean_d", mean_d}, {"invstd_d", invstd_d}});
           return DualBnAddRelu::apply(input, weight, bias, mean, invstd, input_d, weight_d, bias_d, mean_d,
                                       invstd_d, training);
         });
}
