// CPU backend: binds the op schemas to the CPU kernels.

#include "../bn_act.h"
#include "bn_act_kernels.h"

namespace resnet_fused {
namespace {

size_t no_workspace(const ActivationGeometry&) { return 0; }
size_t no_backward_workspace(const ActivationGeometry&, Epilogue) { return 0; }

constexpr BnActKernels kCpuKernels{
    "CPU",
    /*supports_float64=*/true,
    no_workspace,
    cpu::batch_stats,
    cpu::bn_act_forward,
    no_backward_workspace,
    cpu::bn_act_backward,
};

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { register_bn_act_ops<kCpuKernels>(m); }

}  // namespace resnet_fused
