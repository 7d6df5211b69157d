// The per-instruction-set builds of the CPU kernels: their shared includes and their
// entry points. Everything but at::vec is included here, before a build enables its
// instruction set, so library code stays compiled for the baseline.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../bn_act_params.h"

// GCC on x86-64 builds AVX2 and AVX512 variants (#pragma GCC target); other compilers
// and architectures build the baseline only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RESNET_FUSED_CPU_X86_VARIANTS 1
#endif

#define RESNET_FUSED_DECLARE_CPU_KERNELS(isa)                   \
  namespace resnet_fused::cpu::isa {                            \
  void batch_stats(const BatchStatsParams& p);                  \
  void bn_act_forward(const BnActForwardParams& p);             \
  void bn_act_backward(const BnActBackwardParams& p);           \
  }

RESNET_FUSED_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef RESNET_FUSED_CPU_X86_VARIANTS
RESNET_FUSED_DECLARE_CPU_KERNELS(AVX2)
RESNET_FUSED_DECLARE_CPU_KERNELS(AVX512)
#endif
