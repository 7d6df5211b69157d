// AVX2 + FMA build of the CPU kernels (see bn_act_kernels_impl.h).
#include "bn_act_kernels_isa.h"

#ifdef RESNET_FUSED_CPU_X86_VARIANTS
// GCC 12 flags the intentionally undefined registers of its own intrinsics headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "avx2_feature_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// No pop_options: templates are instantiated at the end of the translation unit and
// must still see the instruction set there.
#include "bn_act_kernels_impl.h"
#endif
