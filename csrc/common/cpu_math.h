// Scalar math for the CPU kernels, written so that GCC and Clang vectorize the loops that call it:
// no calls into libm, no branches (selects only), bit casts instead of frexp/ldexp. float gets
// polynomial exp/log (Cephes-style minimax, about 1 ulp on the ranges used here); double keeps
// libm, since double inputs exist for gradcheck, not for speed.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "log_poly.h"

// Everything here sits in the innermost loops: force inlining, so that a loop never keeps a call
// that would stop it from vectorizing once the kernels grow past the inliner's budget.
#define KD_CPU_INLINE inline __attribute__((always_inline))

namespace kdops::cpu {

// exp for x <= 88 (kernels only call it on x - rowmax <= 0); exp(-inf) = 0, NaN stays NaN.
KD_CPU_INLINE float exp_f32(float x) {
  constexpr float kMin = -87.33654475f;  // below this the result is under FLT_MIN: flush to 0
  constexpr float kMax = 88.0f;
  float xc = x < kMin ? kMin : x;  // written as selects so NaN falls through untouched
  xc = xc > kMax ? kMax : xc;
  // x = n ln2 + r, |r| <= ln2 / 2; the magic constant rounds to nearest without a libm call
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  float r = fma_f32(n, -0.693359375f, xc);
  r = fma_f32(n, 2.12194440e-4f, r);
  float poly = 1.9875691500e-4f;
  poly = fma_f32(poly, r, 1.3981999507e-3f);
  poly = fma_f32(poly, r, 8.3334519073e-3f);
  poly = fma_f32(poly, r, 4.1665795894e-2f);
  poly = fma_f32(poly, r, 1.6666665459e-1f);
  poly = fma_f32(poly, r, 5.0000001201e-1f);
  const float er = fma_f32(poly * r, r, r + 1.0f);
  const int32_t biased = static_cast<int32_t>(n) + 127;
  const float two_n = std::bit_cast<float>(biased << 23);
  return x < kMin ? 0.0f : er * two_n;
}

// Natural log for x >= 0 (denormals included); log(0) = -inf, NaN stays NaN. Callers never pass
// negative numbers or +inf (the arguments are probabilities).
KD_CPU_INLINE float log_f32(float x) {
  constexpr float kMinNormal = 1.17549435e-38f;
  const bool tiny = x < kMinNormal;
  const float xs = tiny ? x * 8388608.0f : x;  // 2^23 lifts denormals into the normal range
  const int32_t bits = std::bit_cast<int32_t>(xs);
  // split x = 2^e * m with m in [sqrt(1/2), sqrt(2))
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float m = std::bit_cast<float>((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float fe = static_cast<float>(e) - (tiny ? 23.0f : 0.0f);
  float result = log_reduced_f32(m, fe);
  result = x == 0.0f ? -INFINITY : result;
  return x != x ? x : result;
}

template <typename T>
struct Math;

template <>
struct Math<float> {
  KD_CPU_INLINE static float exp(float x) { return exp_f32(x); }
  KD_CPU_INLINE static float log(float x) { return log_f32(x); }
};

template <>
struct Math<double> {
  KD_CPU_INLINE static double exp(double x) { return std::exp(x); }
  KD_CPU_INLINE static double log(double x) { return std::log(x); }
};

// Storage type of a kernel's floating-point input, as the per-ISA objects (no torch headers) name it.
enum class Storage : int32_t { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Storage types. bf16 and fp16 are converted by hand (bit shifts, _Float16) so the conversion
// vectorizes inside the kernel loops instead of calling into c10.
struct BFloat16Bits {
  uint16_t bits;
};

KD_CPU_INLINE float load(float x) { return x; }
KD_CPU_INLINE double load(double x) { return x; }
KD_CPU_INLINE float load(BFloat16Bits x) { return std::bit_cast<float>(static_cast<uint32_t>(x.bits) << 16); }
KD_CPU_INLINE float load(_Float16 x) { return static_cast<float>(x); }

template <typename Storage, typename Acc>
KD_CPU_INLINE Storage store(Acc x);
template <>
KD_CPU_INLINE float store<float, float>(float x) { return x; }
template <>
KD_CPU_INLINE double store<double, double>(double x) { return x; }
template <>
KD_CPU_INLINE _Float16 store<_Float16, float>(float x) { return static_cast<_Float16>(x); }
template <>
KD_CPU_INLINE BFloat16Bits store<BFloat16Bits, float>(float x) {
  // round to nearest even; a NaN keeps a quiet-NaN pattern instead of rounding into inf
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return BFloat16Bits{static_cast<uint16_t>(x != x ? 0x7fc0u : rounded)};
}

}  // namespace kdops::cpu
