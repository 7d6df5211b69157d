// Included right after a `#pragma GCC target` that enables AVX2, FMA and F16C: the pragma
// enables the instructions but not their feature macros, which sleef.h (pulled in by
// at::vec) keys its vector declarations on.
#pragma once

#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
