// The polynomial core of the float32 natural log, shared by the CPU (cpu_math.h) and CUDA
// (cuda_math.cuh) builds: each splits its argument with its own bit casts and handles 0, inf and
// NaN itself; the arithmetic between is this one function.
#pragma once

#include <cmath>

#include "macros.h"

namespace kdops {

// a * b + c, fused on the GPU and where the CPU build targets FMA hardware; a plain multiply-add
// elsewhere (the baseline CPU build would otherwise call libm's software fma in the hot loop).
KD_HOST_DEVICE float fma_f32(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#elif defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// log(2^e (1 + m)) for x = 2^e (1 + m) with 1 + m in [sqrt(1/2), sqrt(2)): Cephes logf's minimax
// polynomial in m (about 1 ulp), the e ln 2 term split in two for accuracy.
KD_HOST_DEVICE float log_reduced_f32(float m, float e) {
  const float z = m * m;
  float poly = 7.0376836292e-2f;
  poly = fma_f32(poly, m, -1.1514610310e-1f);
  poly = fma_f32(poly, m, 1.1676998740e-1f);
  poly = fma_f32(poly, m, -1.2420140846e-1f);
  poly = fma_f32(poly, m, 1.4249322787e-1f);
  poly = fma_f32(poly, m, -1.6668057665e-1f);
  poly = fma_f32(poly, m, 2.0000714765e-1f);
  poly = fma_f32(poly, m, -2.4999993993e-1f);
  poly = fma_f32(poly, m, 3.3333331174e-1f);
  float y = poly * m * z;
  y = fma_f32(e, -2.12194440e-4f, y);
  y = fma_f32(z, -0.5f, y);
  return fma_f32(e, 0.693359375f, m + y);
}

}  // namespace kdops
