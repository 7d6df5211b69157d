// AVX-512 build of the CPU kernels (see bn_act_kernels_impl.h); the same instruction
// subset as ATen's AVX512 capability.
#include "bn_act_kernels_isa.h"

#ifdef RESNET_FUSED_CPU_X86_VARIANTS
// GCC 12 flags the intentionally undefined registers of its own intrinsics headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "avx2_feature_macros.h"  // and AVX-512's, the same way:
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
// No pop_options: templates are instantiated at the end of the translation unit and
// must still see the instruction set there.
#include "bn_act_kernels_impl.h"
#endif
