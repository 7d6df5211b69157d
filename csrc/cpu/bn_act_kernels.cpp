// Picks the CPU kernel build for this machine: the widest instruction set ATen itself
// uses here (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).

#include "bn_act_kernels.h"

#include <ATen/Version.h>

#include "bn_act_kernels_isa.h"

namespace resnet_fused::cpu {
namespace {

struct KernelBuild {
  void (*batch_stats)(const BatchStatsParams&);
  void (*forward)(const BnActForwardParams&);
  void (*backward)(const BnActBackwardParams&);
};

#define RESNET_FUSED_KERNEL_BUILD(isa) KernelBuild{isa::batch_stats, isa::bn_act_forward, isa::bn_act_backward}

const KernelBuild& kernel_build() {
  static const KernelBuild build = [] {
#ifdef RESNET_FUSED_CPU_X86_VARIANTS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return RESNET_FUSED_KERNEL_BUILD(AVX512);
    if (capability == "AVX2") return RESNET_FUSED_KERNEL_BUILD(AVX2);
#endif
    return RESNET_FUSED_KERNEL_BUILD(DEFAULT);
  }();
  return build;
}

}  // namespace

void batch_stats(const BatchStatsParams& p) { kernel_build().batch_stats(p); }
void bn_act_forward(const BnActForwardParams& p) { kernel_build().forward(p); }
void bn_act_backward(const BnActBackwardParams& p) { kernel_build().backward(p); }

}  // namespace resnet_fused::cpu
