// Depthwise 2-D convolution, CPU kernels: forward with the fused per-channel affine + activation
// epilogue, backward to the input and backward to the weight (and bias). AVX2 (+FMA, F16C) kernels
// chosen at run time, a portable scalar path for other CPUs; parallel with at::parallel_for (the
// AVX2 paths: cpu::parallel_chunks, pieces handed out dynamically).
//
// Files: depthwise.cpp (the op entry points: checks, layout, dispatch), depthwise_scalar.cpp (the
// portable path), depthwise_nchw.cpp and depthwise_nhwc.cpp (the AVX2 kernels by memory layout);
// this header declares what crosses between them and holds the helpers they share.
//
// Math (pycompress/ops/depthwise_ref.py): fp32 accumulation whatever the dtype,
//   y[n, c, i, j] = act(sum_{a,b} x[n, c, i*sh - ph + a*dh, j*sw - pw + b*dw] * w[c, a, b] * scale[c] + shift[c])
// (one multiply, then one add, in the epilogue; taps outside the image are 0), stored once in x's
// dtype. The summation order differs from torch's (tolerance-level differences only).
//
// Backward to the weight: a task owns a range of channels (NCHW: single channels; lanes mode and
// NHWC: groups of 8) and walks the batch image by image, so its reads are contiguous blocks; each
// channel's sums are fp32 vector accumulators within a plane (row, for NHWC) added to fp64 per
// plane, in an order fixed by the shapes: deterministic whatever the thread count.
//
// Set PYCOMPRESS_CPU_SCALAR=1 (read once per process) to force the portable path, for testing it.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "pycompress.h"

// Explicit FMA intrinsics only (the accumulation order is not specified bit for bit; the epilogue
// keeps its separate multiply and add).
#if PYC_X86
#define PYC_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

// Explicit instantiations of a kernel file's entry templates: M(T) for each kernel dtype.
#define PYC_DW_FOR_EACH_DTYPE(M) M(float) M(c10::Half) M(c10::BFloat16)

namespace pycompress {
namespace cpu {
namespace dw {

constexpr int kMaxK = 7;
constexpr int kMaxTaps = kMaxK * kMaxK;

inline int64_t ceil_div(int64_t a, int64_t b) { return -dw_floor_div(-a, b); }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// relu / relu6 that keep NaN (as torch.relu and torch.clamp).
inline float act_f(float z, int act) {
  if (act == 1) return z < 0.0f ? 0.0f : z;
  if (act == 2) return z < 0.0f ? 0.0f : (z > 6.0f ? 6.0f : z);
  return z;
}

// The epilogue's per-channel parameters as full fp32 arrays: an empty scale is 1, an empty shift
// is -0.0 (z + -0.0 == z for every z, signed zeros included; z * 1 == z).
struct Affine {
  std::vector<float> scale, shift;
  explicit Affine(int64_t C) : scale(C, 1.0f), shift(C, -0.0f) {}
  Affine(const at::Tensor& s, const at::Tensor& b, int64_t C) : scale(C, 1.0f), shift(C, -0.0f) {
    if (s.numel()) std::memcpy(scale.data(), s.contiguous().data_ptr<float>(), C * sizeof(float));
    if (b.numel()) std::memcpy(shift.data(), b.contiguous().data_ptr<float>(), C * sizeof(float));
  }
};

// Parallel grain: about 32K output elements per task piece.
inline int64_t grain_for(int64_t per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_item)); }

// ------------------------------------------------------------------------------------------------
// Portable scalar path (depthwise_scalar.cpp): direct loops with bounds checks, any layout through
// strides.

struct Strides {
  int64_t n, c, h, w;
};
inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename T>
void fwd_scalar(const T* x, Strides xs, T* y, Strides ys, const float* w, const Affine& af, int act, const DwGeom& g);
template <typename T>
void bwd_input_scalar(const T* go, Strides gs, T* gx, Strides xs, const float* w, const DwGeom& g);
// One task per channel: fp32 sums over each plane, fp64 across planes.
template <typename T>
void bwd_weight_scalar(const T* go, Strides gs, const T* x, Strides xs, float* gw, float* gb, const DwGeom& g);

// ------------------------------------------------------------------------------------------------
// AVX2 path.
#if PYC_X86

// The first n < 8 lanes of v.
template <typename T>
PYC_AVX2 inline void store_part(T* p, __m256 v, int64_t n) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<T>(t[k]);
}

// act(z * s + b): maxps / minps return their second operand when either is NaN, so NaN stays NaN.
PYC_AVX2 inline __m256 epilogue(__m256 z, __m256 s, __m256 b, int act) {
  z = _mm256_add_ps(_mm256_mul_ps(z, s), b);
  if (act != 0) z = _mm256_max_ps(_mm256_setzero_ps(), z);
  if (act == 2) z = _mm256_min_ps(_mm256_set1_ps(6.0f), z);
  return z;
}

PYC_AVX2 inline double hsum(__m256 v) {
  const __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

// n elements of src as fp32 into dst.
template <typename T>
PYC_AVX2 inline void to_f32(const T* src, float* dst, int64_t n) {
  // inline: rows are short, a libc call costs more than the copy
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, load8(src + k));
  for (; k < n; ++k) dst[k] = to_f(src[k]);
}

// The first n < 8 lanes of v (fp32: a masked store).
PYC_AVX2 inline void store_part(float* p, __m256 v, int64_t n) {
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_maskstore_ps(p, m, v);
}

// The kernel sizes compiled as templates. A generic lambda f (marked PYC_AVX2, so that it and the
// kernel it calls inline into the caller as a switch written out would) is called with K as
// std::integral_constant<int, K>:
//   with_kw:       the kernel width, K = 1, 3, 5 or 7 (the weight-gradient kernels: every odd kw);
//   with_square_k: K = 3 for 3x3, 5 for 5x5, else 0 (sizes read at run time).
template <typename F>
PYC_AVX2 inline void with_kw(int64_t kw, F&& f) {
  switch (kw) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, 7>{}); break;
  }
}
template <typename F>
PYC_AVX2 inline void with_square_k(int64_t kh, int64_t kw, F&& f) {
  if (kh == 3 && kw == 3)
    f(std::integral_constant<int, 3>{});
  else if (kh == 5 && kw == 5)
    f(std::integral_constant<int, 5>{});
  else
    f(std::integral_constant<int, 0>{});
}

// NCHW kernels (depthwise_nchw.cpp). w: the weight as fp32 [C][kh * kw] (weight_f32); gw, gb: fp32
// [C][kh * kw] and [C] (gb nullptr: no bias gradient).
template <typename T>
void fwd_nchw_avx2(const T* x, T* y, const std::vector<float>& w, const Affine& af, int act, const DwGeom& g);
template <typename T>
void bwd_input_nchw_avx2(const T* go, T* gx, const std::vector<float>& w, const DwGeom& g);
template <typename T>
void bwd_weight_nchw_avx2(const T* go, const T* x, float* gw, float* gb, const DwGeom& g);

// NHWC (channels_last) kernels (depthwise_nhwc.cpp), the same arguments.
template <typename T>
void fwd_nhwc_avx2(const T* x, T* y, const std::vector<float>& w, const Affine& af, int act, const DwGeom& g);
template <typename T>
void bwd_input_nhwc_avx2(const T* go, T* gx, const std::vector<float>& w, const DwGeom& g);
template <typename T>
void bwd_weight_nhwc_avx2(const T* go, const T* x, float* gw, float* gb, const DwGeom& g);

#endif  // PYC_X86

}  // namespace dw
}  // namespace cpu
}  // namespace pycompress
