// select_top_fraction (DESIGN.md 3.7): the arithmetic shared by the CPU and CUDA kernels.
//
// The op keeps the valid scores x >= t, t = torch.quantile(valid scores, q) with q = 1 - fraction
// and linear interpolation. To keep exactly torch's set, t is computed with torch's own roundings
// (ATen native/Sorting.cpp, quantile_impl, and native/Lerp.h), in the compute type T: float for
// float32 / bfloat16 / float16 scores (the 16-bit types widen exactly; torch.quantile itself
// refuses them), double for float64:
//
//   q      = T(1 - fraction)               the subtraction in double, then one rounding to T
//   rank   = q * T(n - 1)                  one rounding in T
//   lo     = int64(rank), hi = int64(ceil(rank)), w = rank - T(lo)   (exact)
//   t      = lerp(v[lo], v[hi], w)          v: the valid scores in ascending order
//   lerp   = |w| < 1/2 ? fma(w, d, v[lo]) : fma(d, w - 1, v[hi]),   d = v[hi] - v[lo] (rounded)
//
// ATen's lerp is written a + w (b - a) / b - (b - a)(1 - w); torch compiles it into fused
// multiply-adds both on CUDA and in its vectorized CPU kernels (checked against torch 2.13 on an
// AVX-512 CPU: the fused form agrees on every case where the two differ), so the fused form is
// the one replicated here. The quirks come with it: an infinite order statistic gives d = inf or
// NaN and t can be NaN (torch.quantile([inf]) is NaN) or inf, and then nothing, or only +inf, is
// kept.
//
// Torch refuses more than 2^24 values (the float rank would be inexact); above that the rank is
// computed in double for every score dtype and w rounded to T.
//
// The CUDA kernels order scores by an unsigned integer image (order_key) and compare keys instead
// of floats, which --use_fast_math's flush-to-zero cannot touch; the few floating-point operations
// of the threshold go through exact_sub / exact_fma, which round to nearest and keep subnormals
// on the device as well.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../common/macros.h"

namespace kdops {

// The unsigned integer with the bit width of T.
template <typename T>
using OrderKey = std::conditional_t<std::is_same_v<T, double>, uint64_t, uint32_t>;

template <typename To, typename From>
KD_HOST_DEVICE To bit_copy(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  __builtin_memcpy(&to, &from, sizeof(To));
  return to;
}

// Monotone map from T to its unsigned image: for non-NaN a, b: a < b <=> key(a) < key(b), and
// a == b <=> key(a) == key(b) (-0.0 is mapped as +0.0). Negative numbers have their bits flipped,
// positive ones their sign bit set. NaNs land above key(+inf) or below key(-inf).
template <typename T>
KD_HOST_DEVICE OrderKey<T> order_key(T x) {
  using Key = OrderKey<T>;
  constexpr Key kSign = Key(1) << (8 * sizeof(Key) - 1);
  Key bits = bit_copy<Key>(x);
  if (bits == kSign) bits = 0;
  return (bits & kSign) ? Key(~bits) : Key(bits | kSign);
}

template <typename T>
KD_HOST_DEVICE T from_order_key(OrderKey<T> key) {
  using Key = OrderKey<T>;
  constexpr Key kSign = Key(1) << (8 * sizeof(Key) - 1);
  return bit_copy<T>((key & kSign) ? Key(key ^ kSign) : Key(~key));
}

template <typename T>
KD_HOST_DEVICE bool is_nan_key(OrderKey<T> key) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  return key > order_key(kInf) || key < order_key(-kInf);
}

// a - b and a * b + c rounded once to nearest, subnormals kept (also under --use_fast_math).
KD_HOST_DEVICE float exact_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a - b;
#endif
}

KD_HOST_DEVICE double exact_sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

KD_HOST_DEVICE float exact_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
#else
  return std::fma(a, b, c);
#endif
}

KD_HOST_DEVICE double exact_fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Where torch.quantile reads the sorted values, and the interpolation weight.
template <typename T>
struct QuantileRanks {
  int64_t lo;  // rank of the lower order statistic (0-based)
  int64_t hi;  // lo or lo + 1
  T weight;    // in [0, 1)
};

// q is 1 - fraction already rounded to T; count >= 1 valid scores.
template <typename T>
KD_HOST_DEVICE QuantileRanks<T> quantile_ranks(T q, int64_t count) {
  constexpr int64_t kTorchMaxCount = int64_t(1) << 24;
  const int64_t last = count - 1;
  if (count > kTorchMaxCount) {
    const double rank = double(q) * double(last);
    const int64_t lo = static_cast<int64_t>(rank);
    return {lo, static_cast<int64_t>(std::ceil(rank)), static_cast<T>(rank - double(lo))};
  }
  const T rank = q * static_cast<T>(last);  // T(last) is exact: last < 2^24
  const int64_t lo = static_cast<int64_t>(rank);
  return {lo, static_cast<int64_t>(std::ceil(rank)), rank - static_cast<T>(lo)};
}

// torch.lerp(lo, hi, w) as compiled by torch (fused multiply-adds); w - 1 is exact for w >= 1/2.
template <typename T>
KD_HOST_DEVICE T quantile_lerp(T lo, T hi, T w) {
  const T diff = exact_sub(hi, lo);
  return w < T(0.5) ? exact_fma(w, diff, lo) : exact_fma(diff, exact_sub(w, T(1)), hi);
}

}  // namespace kdops
