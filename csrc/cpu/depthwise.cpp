// Depthwise 2-D convolution, CPU kernels: forward with the fused per-channel affine + activation
// epilogue, backward to the input and backward to the weight (and bias). AVX2 (+FMA, F16C) kernels
// chosen at run time, a portable scalar path for other CPUs; parallel with at::parallel_for (the
// AVX2 paths: cpu::parallel_chunks, pieces handed out dynamically).
//
// Math (pycompress/ops/depthwise_ref.py): fp32 accumulation whatever the dtype,
//   y[n, c, i, j] = act(sum_{a,b} x[n, c, i*sh - ph + a*dh, j*sw - pw + b*dw] * w[c, a, b] * scale[c] + shift[c])
// (one multiply, then one add, in the epilogue; taps outside the image are 0), stored once in x's
// dtype. The summation order differs from torch's (tolerance-level differences only).
//
// NCHW (AVX2): a task owns whole (n, c) planes. For a band of output rows, the rows of the
// zero-padded input it reads are copied once, as fp32, into a small buffer (L1 sized, zeroed once
// per task: only the positions that hold source data are rewritten per plane); the convolution
// then runs over the buffer with no bounds checks at all, 2 rows x 2 vectors of 8 output columns
// per step (four independent FMA chains), 3x3 and 5x5 unrolled at compile time. Each buffer row is
// stored as `sw` phases (phase p holds padded columns p, p + sw, ...), so for stride 2 every tap is
// again one contiguous unaligned load. Rows are padded past the last output vector so the last
// (partial) vector stays inside the buffer; its extra lanes are discarded (masked store).
// Stride 1 (forward and backward to the input) takes its own path: blocks of 4 output rows x 2
// vectors that load each input vector once per tap column, visited right to left so that a row's
// last partial vector can be stored whole (the spill lands in the next row, written later).
// Small planes (at most 8 output columns) would waste vector lanes: "lanes" mode takes 8 planes
// (8 channels of one image) at a time, transposed into an [rows][cols][8] tile, one output per
// vector (at stride 1, four outputs of a row per sliding window), and transposes the results back.
// The backward to the input is the same kernel: a stride-1 convolution with the flipped kernel over
// grad_out, zero-upsampled by the stride while it is copied into the buffer.
// NHWC (AVX2): vectorised over channels; per output pixel the list of taps inside the image is built
// once and the channel loop runs over it without checks. Interior pixels go four at a time (one
// weight load per four FMAs; for stride 1, 3x3 / 5x5, a sliding window that loads each input pixel
// of a tap row once); outputs over 8 MiB are written with streaming stores.
// Backward to the weight: a task owns a range of channels (NCHW: single channels; lanes mode and
// NHWC: groups of 8) and walks the batch image by image, so its reads are contiguous blocks; each
// channel's sums are fp32 vector accumulators within a plane (row, for NHWC) added to fp64 per
// plane, in an order fixed by the shapes: deterministic whatever the thread count.
//
// Set PYCOMPRESS_CPU_SCALAR=1 (read once per process) to force the portable path, for testing it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "pycompress.h"

// Explicit FMA intrinsics only (the accumulation order is not specified bit for bit; the epilogue
// keeps its separate multiply and add).
#if PYC_X86
#define PYC_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace pycompress {
namespace {

constexpr int kMaxK = 7;
constexpr int kMaxTaps = kMaxK * kMaxK;

bool use_avx2() {
  static const bool ok = cpu::avx2_available(/*need_fma=*/true);
  return ok;
}

inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }

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

// The weight as fp32 [C][kh * kw].
std::vector<float> weight_f32(const at::Tensor& weight) {
  at::Tensor w = weight.contiguous().to(at::kFloat);
  const float* p = w.data_ptr<float>();
  return std::vector<float>(p, p + w.numel());
}

// Parallel grain: about 32K output elements per task piece.
inline int64_t grain_for(int64_t per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_item)); }

// ------------------------------------------------------------------------------------------------
// Portable scalar path: direct loops with bounds checks, any layout through strides.

struct Strides {
  int64_t n, c, h, w;
};
Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename T>
void fwd_scalar(const T* x, Strides xs, T* y, Strides ys, const float* w, const Affine& af, int act, const DwGeom& g) {
  const int64_t kk = g.kh * g.kw;
  at::parallel_for(0, g.N * g.C, grain_for(g.Ho * g.Wo * kk), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / g.C, c = p % g.C;
      const T* xp = x + n * xs.n + c * xs.c;
      T* yp = y + n * ys.n + c * ys.c;
      const float* wc = w + c * kk;
      for (int64_t i = 0; i < g.Ho; ++i)
        for (int64_t j = 0; j < g.Wo; ++j) {
          float acc = 0.0f;
          for (int64_t a = 0; a < g.kh; ++a) {
            const int64_t ih = i * g.sh - g.ph + a * g.dh;
            if (ih < 0 || ih >= g.H) continue;
            for (int64_t b = 0; b < g.kw; ++b) {
              const int64_t iw = j * g.sw - g.pw + b * g.dw;
              if (iw < 0 || iw >= g.W) continue;
              acc += wc[a * g.kw + b] * to_f(xp[ih * xs.h + iw * xs.w]);
            }
          }
          yp[i * ys.h + j * ys.w] = static_cast<T>(act_f(acc * af.scale[c] + af.shift[c], act));
        }
    }
  });
}

template <typename T>
void bwd_input_scalar(const T* go, Strides gs, T* gx, Strides xs, const float* w, const DwGeom& g) {
  const int64_t kk = g.kh * g.kw;
  at::parallel_for(0, g.N * g.C, grain_for(g.H * g.W * kk), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / g.C, c = p % g.C;
      const T* gp = go + n * gs.n + c * gs.c;
      T* xp = gx + n * xs.n + c * xs.c;
      const float* wc = w + c * kk;
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t v = 0; v < g.W; ++v) {
          float acc = 0.0f;
          for (int64_t a = 0; a < g.kh; ++a) {
            const int64_t ti = h + g.ph - a * g.dh;
            if (ti < 0 || ti % g.sh != 0 || ti / g.sh >= g.Ho) continue;
            for (int64_t b = 0; b < g.kw; ++b) {
              const int64_t tj = v + g.pw - b * g.dw;
              if (tj < 0 || tj % g.sw != 0 || tj / g.sw >= g.Wo) continue;
              acc += wc[a * g.kw + b] * to_f(gp[(ti / g.sh) * gs.h + (tj / g.sw) * gs.w]);
            }
          }
          xp[h * xs.h + v * xs.w] = static_cast<T>(acc);
        }
    }
  });
}

// One task per channel: fp32 sums over each plane, fp64 across planes.
template <typename T>
void bwd_weight_scalar(const T* go, Strides gs, const T* x, Strides xs, float* gw, float* gb, const DwGeom& g) {
  const int64_t kk = g.kh * g.kw;
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double tw[kMaxTaps] = {0.0};
      double tb = 0.0;
      for (int64_t n = 0; n < g.N; ++n) {
        const T* gp = go + n * gs.n + c * gs.c;
        const T* xp = x + n * xs.n + c * xs.c;
        float pw_[kMaxTaps] = {0.0f};
        float pb = 0.0f;
        for (int64_t i = 0; i < g.Ho; ++i)
          for (int64_t j = 0; j < g.Wo; ++j) {
            const float gv = to_f(gp[i * gs.h + j * gs.w]);
            pb += gv;
            for (int64_t a = 0; a < g.kh; ++a) {
              const int64_t ih = i * g.sh - g.ph + a * g.dh;
              if (ih < 0 || ih >= g.H) continue;
              for (int64_t b = 0; b < g.kw; ++b) {
                const int64_t iw = j * g.sw - g.pw + b * g.dw;
                if (iw < 0 || iw >= g.W) continue;
                pw_[a * g.kw + b] += gv * to_f(xp[ih * xs.h + iw * xs.w]);
              }
            }
          }
        for (int64_t t = 0; t < kk; ++t) tw[t] += pw_[t];
        tb += pb;
      }
      for (int64_t t = 0; t < kk; ++t) gw[c * kk + t] = static_cast<float>(tw[t]);
      if (gb != nullptr) gb[c] = static_cast<float>(tb);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// AVX2 path.
#if PYC_X86

using cpu::load8;
using cpu::store8;

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

// ---------------------------------------------------------------- NCHW: planes through a buffer

// One plane convolution over a zero-padded (and possibly zero-upsampled) source plane:
//   img(r, c) = src((r - top) / up_h, (c - left) / up_w) when both divisions are exact and inside
//               the H x W source, else 0   (top / left may be negative: the image is then cropped)
//   out(i, j) = sum_{a, b} wt[a][b] * img(i * sh + a * dh, j * sw + b * dw),  0 <= i < Ho, 0 <= j < Wo
// The forward is up = 1, top = ph, left = pw. The backward to the input is up = stride, stride 1,
// top = (kh - 1) dh - ph, left = (kw - 1) dw - pw, with the kernel flipped.
//
// Two ways to run it, chosen by the shape:
//   rows:  a plane at a time; bands of image rows in a buffer whose rows hold sw phases of L floats
//          (phase p, index q = column p + q sw), 8 output columns per vector.
//   lanes: small planes (Wo < lanes_below: at most a vector of outputs per row): 8 planes (8
//          channels of one image) at a time, the image as a tile [img_rows][cols][8] with lanes
//          over the planes, one output per vector.
constexpr int64_t kBufferFloats = 8192;  // 32 KB: a band stays in L1
constexpr int64_t kLanesBelowFwd = 9, kLanesBelowWgrad = 9;
constexpr int64_t kLanesMaxTile = 4096;  // image positions of a lanes tile (x 8 floats)

struct Plan {
  int64_t H, W, up_h, up_w, top, left;
  int64_t Ho, Wo, sh, sw, dh, dw, kh, kw;
  int64_t img_rows, cols;  // image rows / columns any output reads
  // rows mode
  int64_t Wv;    // Wo rounded up to whole vectors
  int64_t L;     // floats per phase of a buffer row
  int64_t ld;    // floats per buffer row (sw phases)
  int64_t band;  // output rows per band
  int64_t rows;  // buffer rows of a full band
  int64_t off[kMaxK];           // tap b's offset in a buffer row: phase (b dw) % sw, index (b dw) / sw
  int64_t lo[2], hi[2];         // up_w == 1: per phase, the indices [lo, hi) that hold source columns
  int64_t k0, k1;               // up_w > 1: source columns [k0, k1) land on columns k up_w + left
  // lanes mode
  bool lanes;
  // up == 1: image rows [rlo, rhi) and columns [clo, chi) hold source rows / columns r - top, c - left
  int64_t rlo, rhi, clo, chi;
  std::vector<int64_t> fill_dst, fill_src;  // up > 1: tile position <- source offset, where the source is
};

Plan make_plan(int64_t H, int64_t W, int64_t up_h, int64_t up_w, int64_t top, int64_t left, int64_t Ho, int64_t Wo,
               int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t kh, int64_t kw, int64_t lanes_below) {
  Plan P{H, W, up_h, up_w, top, left, Ho, Wo, sh, sw, dh, dw, kh, kw};
  P.img_rows = (Ho - 1) * sh + (kh - 1) * dh + 1;
  P.cols = (Wo - 1) * sw + (kw - 1) * dw + 1;
  P.Wv = round_up(Wo, 8);
  P.L = round_up(P.Wv + (kw - 1) * dw / sw, 8);
  P.ld = sw * P.L;
  const int64_t halo = (kh - 1) * dh + 1;
  const int64_t fit = (kBufferFloats / P.ld - halo) / sh + 1;
  P.band = std::max<int64_t>(1, std::min(Ho, fit));
  P.rows = (P.band - 1) * sh + halo;
  for (int64_t b = 0; b < kw; ++b) P.off[b] = ((b * dw) % sw) * P.L + (b * dw) / sw;
  // columns c < min(cols, left + W) with c - left >= 0 hold source data (never past what outputs read)
  const int64_t cend = std::min(P.cols, left + W);
  for (int64_t p = 0; p < sw; ++p) {
    P.lo[p] = std::min(std::max<int64_t>(0, ceil_div(left - p, sw)), P.L);
    P.hi[p] = std::max(P.lo[p], std::min(P.L, ceil_div(cend - p, sw)));
  }
  P.k0 = std::max<int64_t>(0, ceil_div(-left, up_w));
  P.k1 = std::max(P.k0, std::min(W, dw_floor_div(std::min(P.L, P.cols) - 1 - left, up_w) + 1));
  P.lanes = Wo < lanes_below && P.img_rows * P.cols <= kLanesMaxTile;
  P.rlo = std::min(std::max<int64_t>(0, top), P.img_rows);
  P.rhi = std::max(P.rlo, std::min(P.img_rows, top + H));
  P.clo = std::min(std::max<int64_t>(0, left), P.cols);
  P.chi = std::max(P.clo, std::min(P.cols, left + W));
  if (P.lanes && (up_h > 1 || up_w > 1)) {
    for (int64_t r = 0; r < P.img_rows; ++r) {
      const int64_t u = r - top;
      if (u < 0 || u % up_h != 0 || u / up_h >= H) continue;
      for (int64_t c = 0; c < P.cols; ++c) {
        const int64_t v = c - left;
        if (v < 0 || v % up_w != 0 || v / up_w >= W) continue;
        P.fill_dst.push_back((r * P.cols + c) * 8);
        P.fill_src.push_back((u / up_h) * W + v / up_w);
      }
    }
  }
  return P;
}

// Image row r into buffer row d. The buffer is zeroed when a task starts and only the
// plan-constant positions that hold source data are written afterwards, so the other positions
// stay 0; a row outside the source is zeroed (it may hold another band's row).
template <typename T>
PYC_AVX2 void fill_row(const Plan& P, const T* src, int64_t r, float* d) {
  const int64_t u = r - P.top;
  if (u < 0 || u % P.up_h != 0 || u / P.up_h >= P.H) {
    for (int64_t k = 0; k < P.ld; k += 8) _mm256_storeu_ps(d + k, _mm256_setzero_ps());
    return;
  }
  const T* s = src + (u / P.up_h) * P.W;
  if (P.up_w == 1) {
    if (P.sw == 1) {
      to_f32(s + (P.lo[0] - P.left), d + P.lo[0], P.hi[0] - P.lo[0]);
      return;
    }
    for (int64_t p = 0; p < P.sw; ++p) {
      float* dp = d + p * P.L;
      const T* sp = s + p - P.left;
      for (int64_t q = P.lo[p]; q < P.hi[p]; ++q) dp[q] = to_f(sp[q * P.sw]);
    }
    return;
  }
  for (int64_t k = P.k0; k < P.k1; ++k) d[k * P.up_w + P.left] = to_f(s[k]);
}

// NR output rows x NV vectors of 8 columns from `base` (buffer row of output row i, column j);
// K > 0: a K x K kernel known at compile time. nlast: valid lanes of the last vector.
template <int K, int NR, int NV, typename T>
PYC_AVX2 inline void conv_tile(const Plan& P, const float* base, const __m256* wv, const int64_t* off, __m256 vs,
                               __m256 vb, int act, T* o, int64_t nlast) {
  const int64_t kh = K ? K : P.kh, kw = K ? K : P.kw;
  const int64_t rs = P.sh * P.ld, as = P.dh * P.ld, Wo = P.Wo;
  __m256 acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t a = 0; a < kh; ++a) {
    const float* ra = base + a * as;
    for (int64_t b = 0; b < kw; ++b) {
      const __m256 w = wv[a * kw + b];
      const float* rb = ra + off[b];
      for (int r = 0; r < NR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(rb + r * rs + 8 * v), acc[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) {
      const __m256 e = epilogue(acc[r][v], vs, vb, act);
      T* p = o + r * Wo + 8 * v;
      if (v == NV - 1 && nlast < 8)
        store_part(p, e, nlast);
      else
        store8(p, e);
    }
}

// Output rows [i0, i1) of one plane from the buffer (holding image rows from i0 * sh on): two rows
// and two vectors at a time (four independent accumulation chains).
template <int K, int NR, typename T>
PYC_AVX2 inline void conv_rows(const Plan& P, const float* base, const __m256* wv, const int64_t* off, __m256 vs,
                               __m256 vb, int act, T* orow) {
  int64_t j = 0;
  for (; j + 16 <= P.Wv; j += 16)
    conv_tile<K, NR, 2, T>(P, base + j, wv, off, vs, vb, act, orow + j, std::min<int64_t>(8, P.Wo - j - 8));
  if (j < P.Wv) conv_tile<K, NR, 1, T>(P, base + j, wv, off, vs, vb, act, orow + j, std::min<int64_t>(8, P.Wo - j));
}

// Image rows r0 .. r0 + nrows - 1 into buffer rows 0 .. nrows - 1, for up == 1 and sw == 1: fill_row
// without its divisions and call per row.
// fp32 rows end in one masked load, which writes zeros past the row's source columns: they are zero
// anyway (padding, or columns that no output reads).
template <typename T>
PYC_AVX2 inline void fill_rows_s1(const Plan& P, const T* src, int64_t r0, int64_t nrows, float* buf) {
  const int64_t lo = P.lo[0], n = P.hi[0] - P.lo[0], nfull = n / 8 * 8, ld = P.ld;
  const bool masked = std::is_same<T, float>::value && lo + round_up(n, 8) <= ld;
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - nfull)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t u = r0 + r - P.top;
    float* d = buf + r * ld;
    if (u < 0 || u >= P.H) {
      for (int64_t k = 0; k < ld; k += 8) _mm256_storeu_ps(d + k, _mm256_setzero_ps());
      continue;
    }
    const T* s = src + u * P.W + (lo - P.left);
    float* dp = d + lo;
    for (int64_t k = 0; k < nfull; k += 8) _mm256_storeu_ps(dp + k, load8(s + k));
    if (nfull == n) continue;
    if (masked)
      _mm256_storeu_ps(dp + nfull, _mm256_maskload_ps(reinterpret_cast<const float*>(s) + nfull, tail));
    else
      for (int64_t k = nfull; k < n; ++k) dp[k] = to_f(s[k]);
  }
}

// Image rows r0 .. r0 + nrows - 1 into buffer rows 0 .. nrows - 1 (every caller fills consecutive
// rows): fill_rows_s1 when it applies, else fill_row per row.
template <typename T>
PYC_AVX2 inline void fill_rows(const Plan& P, const T* src, int64_t r0, int64_t nrows, float* buf) {
  if (P.up_h == 1 && P.up_w == 1 && P.sw == 1)
    fill_rows_s1(P, src, r0, nrows, buf);
  else  // strided rows, or the backward to the input of a strided convolution (zeros between)
    for (int64_t r = 0; r < nrows; ++r) fill_row(P, src, r0 + r, buf + r * P.ld);
}

// Stride 1, dilation 1, a K x K kernel known at compile time (3 or 5; the forward and the stride-1
// backward to the input): R output rows x NV vectors of 8 columns from buffer rows base... Each
// input vector is loaded once per tap column and used for every output row it feeds: a 3x3 block
// of 4 rows x 2 vectors takes 36 input loads for 72 FMAs (conv_tile: 72), in 8 independent
// chains (fewer leave the FMA units waiting on their latency). Blocks go right to left
// (s1_rows), so a whole-vector store of a row's last, partial vector spills only into the
// following output rows, which later blocks write; rows whose spill would leave the plane (block
// rows q >= exact_q) store their partial vector exactly. nlast: valid lanes of the block's last
// vector.
template <int K, int R, int NV, typename T>
PYC_AVX2 inline void s1_block(const float* base, int64_t ld, const __m256 (&wk)[K * K], __m256 vs, __m256 vb,
                              int act, T* o, int64_t Wo, int64_t nlast, int64_t exact_q) {
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int q = 0; q < R; ++q)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[q][v] = _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int r = 0; r < R + K - 1; ++r) {
    const float* row = base + r * ld;
#pragma GCC unroll 8
    for (int b = 0; b < K; ++b) {
      __m256 xv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) xv[v] = _mm256_loadu_ps(row + b + 8 * v);
#pragma GCC unroll 8
      for (int q = 0; q < R; ++q) {
        const int a = r - q;
        if (a < 0 || a >= K) continue;
        const __m256 w = wk[a * K + b];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[q][v] = _mm256_fmadd_ps(w, xv[v], acc[q][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < R; ++q)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const __m256 e = epilogue(acc[q][v], vs, vb, act);
      T* p = o + q * Wo + 8 * v;
      if (v == NV - 1 && q >= exact_q && nlast < 8)
        store_part(p, e, nlast);
      else
        store8(p, e);
    }
}

// R output rows (buffer rows from base, output rows from o), every column, right to left.
template <int K, int R, typename T>
PYC_AVX2 inline void s1_rows(const Plan& P, const float* base, const __m256 (&wk)[K * K], __m256 vs, __m256 vb,
                             int act, T* o, int64_t exact_q) {
  constexpr int NV = 2;  // 4 rows x 2 vectors: 8 independent FMA chains, enough to hide the FMA latency
  const int64_t nv = P.Wv / 8, tail = P.Wo - (P.Wv - 8);
  int64_t v = nv;
  if (NV == 2 && (nv & 1)) {
    --v;
    s1_block<K, R, 1, T>(base + 8 * v, P.ld, wk, vs, vb, act, o + 8 * v, P.Wo, tail, exact_q);
  }
  while (v >= NV) {
    v -= NV;
    s1_block<K, R, NV, T>(base + 8 * v, P.ld, wk, vs, vb, act, o + 8 * v, P.Wo, v + NV == nv ? tail : 8, exact_q);
  }
}

// Output rows [i0, i1) of one plane, the buffer holding image rows from i0: 4 rows at a time.
template <int K, typename T>
PYC_AVX2 void s1_band(const Plan& P, const float* buf, int64_t i0, int64_t i1, const __m256 (&wk)[K * K], __m256 vs,
                      __m256 vb, int act, T* out) {
  // rows i >= exact_from would spill past the plane (i Wo + Wv > Ho Wo)
  const int64_t exact_from = dw_floor_div(P.Ho * P.Wo - P.Wv, P.Wo) + 1;
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4)
    s1_rows<K, 4, T>(P, buf + (i - i0) * P.ld, wk, vs, vb, act, out + i * P.Wo, exact_from - i);
  const float* b = buf + (i - i0) * P.ld;
  switch (i1 - i) {
    case 3: s1_rows<K, 3, T>(P, b, wk, vs, vb, act, out + i * P.Wo, exact_from - i); break;
    case 2: s1_rows<K, 2, T>(P, b, wk, vs, vb, act, out + i * P.Wo, exact_from - i); break;
    case 1: s1_rows<K, 1, T>(P, b, wk, vs, vb, act, out + i * P.Wo, exact_from - i); break;
    default: break;
  }
}

template <int K, typename T>
PYC_AVX2 void conv_plane(const Plan& P, const T* src, const float* w, float s, float b, int act, float* buf, T* out) {
  __m256 wv[kMaxTaps];
  for (int64_t t = 0; t < P.kh * P.kw; ++t) wv[t] = _mm256_set1_ps(w[t]);
  int64_t off[kMaxK];
  for (int64_t k = 0; k < P.kw; ++k) off[k] = P.off[k];
  const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b);
  if constexpr (K != 0) {
    if (P.sh == 1 && P.sw == 1 && P.dh == 1 && P.dw == 1) {
      __m256 wk[K * K];
      for (int t = 0; t < K * K; ++t) wk[t] = _mm256_set1_ps(w[t]);
      for (int64_t i0 = 0; i0 < P.Ho; i0 += P.band) {
        const int64_t i1 = std::min(P.Ho, i0 + P.band);
        fill_rows(P, src, i0, i1 - i0 + K - 1, buf);
        s1_band<K, T>(P, buf, i0, i1, wk, vs, vb, act, out);
      }
      return;
    }
  }
  for (int64_t i0 = 0; i0 < P.Ho; i0 += P.band) {
    const int64_t i1 = std::min(P.Ho, i0 + P.band);
    const int64_t nrows = (i1 - 1 - i0) * P.sh + (P.kh - 1) * P.dh + 1;
    fill_rows(P, src, i0 * P.sh, nrows, buf);
    int64_t i = i0;
    for (; i + 2 <= i1; i += 2)
      conv_rows<K, 2, T>(P, buf + (i - i0) * P.sh * P.ld, wv, off, vs, vb, act, out + i * P.Wo);
    if (i < i1) conv_rows<K, 1, T>(P, buf + (i - i0) * P.sh * P.ld, wv, off, vs, vb, act, out + i * P.Wo);
  }
}

// Elements off .. off + 3 of 8 fp32 planes p[0..7] to 4 vectors at dst (dst[k * 8 + l] =
// p[l][off + k]): two 4x4 transposes.
PYC_AVX2 inline void planes4_to_lanes(const float* const* p, int64_t off, float* dst) {
  __m128 q[8];
  for (int l = 0; l < 8; ++l) q[l] = _mm_loadu_ps(p[l] + off);
  _MM_TRANSPOSE4_PS(q[0], q[1], q[2], q[3]);
  _MM_TRANSPOSE4_PS(q[4], q[5], q[6], q[7]);
  for (int k = 0; k < 4; ++k)
    _mm256_storeu_ps(dst + k * 8, _mm256_insertf128_ps(_mm256_castps128_ps256(q[k]), q[4 + k], 1));
}

// Lanes mode: the image tile of planes src + l * plane (l < nl; lanes past nl keep stale values,
// whose outputs are never stored). fp32 planes move 4 columns x 8 planes per 4x4 transpose pair.
template <typename T>
PYC_AVX2 void fill_tile(const Plan& P, const T* src, int64_t plane, int64_t nl, float* tile) {
  if (P.up_h > 1 || P.up_w > 1) {
    const int64_t n = static_cast<int64_t>(P.fill_dst.size());
    const int64_t* dst = P.fill_dst.data();
    const int64_t* so = P.fill_src.data();
    for (int64_t l = 0; l < nl; ++l) {
      const T* s = src + l * plane;
      float* t = tile + l;
      for (int64_t k = 0; k < n; ++k) t[dst[k]] = to_f(s[so[k]]);
    }
    return;
  }
  const T* lp[8];
  for (int64_t l = 0; l < 8; ++l) lp[l] = src + (l < nl ? l : 0) * plane;
  for (int64_t r = P.rlo; r < P.rhi; ++r) {
    const int64_t so = (r - P.top) * P.W - P.left;
    float* trow = tile + r * P.cols * 8;
    int64_t c = P.clo;
    if (std::is_same<T, float>::value) {
      const float* const* fp = reinterpret_cast<const float* const*>(lp);
      for (; c + 4 <= P.chi; c += 4) planes4_to_lanes(fp, so + c, trow + c * 8);
    }
    for (; c < P.chi; ++c)
      for (int64_t l = 0; l < nl; ++l) trow[c * 8 + l] = to_f(lp[l][so + c]);
  }
}

// Lanes mode: n outputs of the tile (8 lanes each) to planes out + l * plane, l < nl.
template <typename T>
PYC_AVX2 void store_tile(const float* otile, int64_t n, int64_t nl, T* out, int64_t plane) {
  int64_t e = 0;
  if (std::is_same<T, float>::value) {
    float* o = reinterpret_cast<float*>(out);
    for (; e + 4 <= n; e += 4) {
      __m128 lo[4], hi[4];
      for (int k = 0; k < 4; ++k) {
        const __m256 v = _mm256_loadu_ps(otile + (e + k) * 8);
        lo[k] = _mm256_castps256_ps128(v);
        hi[k] = _mm256_extractf128_ps(v, 1);
      }
      _MM_TRANSPOSE4_PS(lo[0], lo[1], lo[2], lo[3]);
      _MM_TRANSPOSE4_PS(hi[0], hi[1], hi[2], hi[3]);
      for (int64_t l = 0; l < nl; ++l) _mm_storeu_ps(o + l * plane + e, l < 4 ? lo[l] : hi[l - 4]);
    }
  }
  for (int64_t l = 0; l < nl; ++l) {
    T* o = out + l * plane;
    for (int64_t k = e; k < n; ++k) o[k] = static_cast<T>(otile[k * 8 + l]);
  }
}

// Lanes mode, one group of nl <= 8 planes: wv / vs / vb hold the group's 8 channels per lane.
template <int K, typename T>
PYC_AVX2 void conv_lanes(const Plan& P, const T* src, int64_t src_plane, int64_t nl, const __m256* wv, __m256 vs,
                         __m256 vb, int act, float* tile, float* otile, T* out, int64_t out_plane) {
  const int64_t kh = K ? K : P.kh, kw = K ? K : P.kw;
  fill_tile(P, src, src_plane, nl, tile);
  const int64_t cols = P.cols;
  if constexpr (K != 0) {
    if (P.sh == 1 && P.sw == 1 && P.dh == 1 && P.dw == 1 && P.Wo >= 4) {
      // stride 1: four outputs of a row at a time with a sliding window along each tap row (the
      // K + 3 tile positions of a tap row loaded once for 4 K FMAs, four independent chains); the
      // last block of a row ends at Wo, recomputing the same values for outputs already written
      for (int64_t i = 0; i < P.Ho; ++i)
        for (int64_t j = 0; j < P.Wo; j += 4) {
          const int64_t j0 = std::min(j, P.Wo - 4);
          __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
#pragma GCC unroll 8
          for (int a = 0; a < K; ++a) {
            const float* row = tile + ((i + a) * cols + j0) * 8;
#pragma GCC unroll 8
            for (int m = 0; m < K + 3; ++m) {
              const __m256 xv = _mm256_loadu_ps(row + m * 8);
#pragma GCC unroll 4
              for (int q = 0; q < 4; ++q) {
                const int b = m - q;
                if (b >= 0 && b < K) acc[q] = _mm256_fmadd_ps(wv[a * K + b], xv, acc[q]);
              }
            }
          }
          for (int q = 0; q < 4; ++q) _mm256_storeu_ps(otile + (i * P.Wo + j0 + q) * 8, epilogue(acc[q], vs, vb, act));
        }
      store_tile(otile, P.Ho * P.Wo, nl, out, out_plane);
      return;
    }
  }
  for (int64_t i = 0; i < P.Ho; ++i)
    for (int64_t j = 0; j < P.Wo; ++j) {
      const float* base = tile + (i * P.sh * cols + j * P.sw) * 8;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t a = 0; a < kh; ++a)
        for (int64_t b = 0; b < kw; ++b)
          acc = _mm256_fmadd_ps(wv[a * kw + b], _mm256_loadu_ps(base + (a * P.dh * cols + b * P.dw) * 8), acc);
      _mm256_storeu_ps(otile + (i * P.Wo + j) * 8, epilogue(acc, vs, vb, act));
    }
  store_tile(otile, P.Ho * P.Wo, nl, out, out_plane);
}

// Lanes-mode tasks [t0, t1): task t is image t / G, channels 8 (t % G) .. + 8 (fewer in the last group).
template <typename T>
PYC_AVX2 void run_lanes_tasks(const Plan& P, const T* src, int64_t src_plane, T* out, int64_t out_plane, int64_t C,
                              int64_t G, int64_t Cp, const float* wT, const float* sc, const float* sb, int act,
                              bool k3, bool k5, float* tile, float* otile, int64_t t0, int64_t t1) {
  const int64_t kk = P.kh * P.kw;
  __m256 wv[kMaxTaps];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / G, c0 = (t % G) * 8, nl = std::min<int64_t>(8, C - c0);
    for (int64_t k = 0; k < kk; ++k) wv[k] = _mm256_loadu_ps(wT + k * Cp + c0);
    const __m256 vs = _mm256_loadu_ps(sc + c0), vb = _mm256_loadu_ps(sb + c0);
    const T* s = src + (n * C + c0) * src_plane;
    T* o = out + (n * C + c0) * out_plane;
    if (k3)
      conv_lanes<3, T>(P, s, src_plane, nl, wv, vs, vb, act, tile, otile, o, out_plane);
    else if (k5)
      conv_lanes<5, T>(P, s, src_plane, nl, wv, vs, vb, act, tile, otile, o, out_plane);
    else
      conv_lanes<0, T>(P, s, src_plane, nl, wv, vs, vb, act, tile, otile, o, out_plane);
  }
}

// The plane convolution over planes [N * C]: src plane p is src + p * src_plane, output plane p is
// out + p * out_plane. w: fp32 [C][kh * kw] in the plan's orientation.
template <typename T>
void conv_planes_avx2(const Plan& P, const T* src, int64_t src_plane, T* out, int64_t out_plane, int64_t N, int64_t C,
                      const float* w, const Affine& af, int act) {
  const int64_t kk = P.kh * P.kw;
  const bool k3 = P.kh == 3 && P.kw == 3, k5 = P.kh == 5 && P.kw == 5;
  if (P.lanes) {
    // channel-major, padded to whole vectors: wT[t][c], scale[c], shift[c]
    const int64_t G = (C + 7) / 8, Cp = G * 8;
    std::vector<float> wT(kk * Cp, 0.0f), sc(Cp, 1.0f), sb(Cp, 0.0f);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < kk; ++t) wT[t * Cp + c] = w[c * kk + t];
      sc[c] = af.scale[c];
      sb[c] = af.shift[c];
    }
    const int64_t tile_floats = P.img_rows * P.cols * 8, out_floats = P.Ho * P.Wo * 8;
    cpu::parallel_chunks(0, N * G, grain_for(8 * P.Ho * P.Wo * kk / 4), [&](int64_t t0, int64_t t1) {
      std::vector<float> tile(tile_floats + 8, 0.0f), otile(out_floats + 8);
      run_lanes_tasks(P, src, src_plane, out, out_plane, C, G, Cp, wT.data(), sc.data(), sb.data(), act, k3, k5,
                      tile.data(), otile.data(), t0, t1);
    });
    return;
  }
  cpu::parallel_chunks(0, N * C, grain_for(P.Ho * P.Wo * kk / 4), [&](int64_t p0, int64_t p1) {
    std::vector<float> buf(P.rows * P.ld + 8, 0.0f);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      const T* s = src + p * src_plane;
      T* o = out + p * out_plane;
      const float* wc = w + c * kk;
      if (k3)
        conv_plane<3, T>(P, s, wc, af.scale[c], af.shift[c], act, buf.data(), o);
      else if (k5)
        conv_plane<5, T>(P, s, wc, af.scale[c], af.shift[c], act, buf.data(), o);
      else
        conv_plane<0, T>(P, s, wc, af.scale[c], af.shift[c], act, buf.data(), o);
    }
  });
}

// Weight gradient, rows mode, one plane band: sums[a * KW + b] += sum_{i, j} g(i, j) img(i sh + a dh, j sw + b dw)
// (fp32 vector accumulation within the band, then added to fp64). gbuf: the band's grad_out rows
// as fp32, Wv floats each, zero past Wo. The lanes past Wo of the last vector are masked out of
// the products: their image values may be real data (even inf / NaN) that no output reads.
template <int KW>
PYC_AVX2 void wgrad_band(const Plan& P, const float* buf, const float* gbuf, int64_t nrows_out, double* sums) {
  int64_t off[KW];
  for (int64_t b = 0; b < KW; ++b) off[b] = P.off[b];
  const int64_t full = P.Wo / 8 * 8;
  const int64_t rest = P.Wo - full;
  const __m256 tail_mask = _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rest)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  for (int64_t a = 0; a < P.kh; ++a) {
    __m256 acc0[KW], acc1[KW];
    for (int b = 0; b < KW; ++b) acc0[b] = acc1[b] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nrows_out; ++i) {
      const float* r = buf + (i * P.sh + a * P.dh) * P.ld;
      const float* gr = gbuf + i * P.Wv;
      int64_t j = 0;
      for (; j + 16 <= full; j += 16) {
        const __m256 g0 = _mm256_loadu_ps(gr + j), g1 = _mm256_loadu_ps(gr + j + 8);
        for (int b = 0; b < KW; ++b) {
          acc0[b] = _mm256_fmadd_ps(g0, _mm256_loadu_ps(r + off[b] + j), acc0[b]);
          acc1[b] = _mm256_fmadd_ps(g1, _mm256_loadu_ps(r + off[b] + j + 8), acc1[b]);
        }
      }
      if (j < full) {
        const __m256 g0 = _mm256_loadu_ps(gr + j);
        for (int b = 0; b < KW; ++b) acc0[b] = _mm256_fmadd_ps(g0, _mm256_loadu_ps(r + off[b] + j), acc0[b]);
        j += 8;
      }
      if (rest) {
        const __m256 g1 = _mm256_loadu_ps(gr + j);
        for (int b = 0; b < KW; ++b)
          acc1[b] = _mm256_add_ps(acc1[b], _mm256_and_ps(tail_mask, _mm256_mul_ps(g1, _mm256_loadu_ps(r + off[b] + j))));
      }
    }
    for (int b = 0; b < KW; ++b) sums[a * KW + b] += hsum(_mm256_add_ps(acc0[b], acc1[b]));
  }
}

// Weight gradient of plane xs / gs (one image, one channel), added to sums / *bias.
template <typename T>
PYC_AVX2 void wgrad_plane(const Plan& P, const T* xs, const T* gs, float* buf, float* gbuf, double* sums,
                          double* bias) {
  __m256 bacc = _mm256_setzero_ps();
  for (int64_t i0 = 0; i0 < P.Ho; i0 += P.band) {
    const int64_t i1 = std::min(P.Ho, i0 + P.band);
    const int64_t nrows = (i1 - 1 - i0) * P.sh + (P.kh - 1) * P.dh + 1;
    fill_rows(P, xs, i0 * P.sh, nrows, buf);
    for (int64_t i = i0; i < i1; ++i) {
      float* gr = gbuf + (i - i0) * P.Wv;  // the zeros past Wo were written when the task started
      to_f32(gs + i * P.Wo, gr, P.Wo);
      if (bias != nullptr)
        for (int64_t j = 0; j < P.Wv; j += 8) bacc = _mm256_add_ps(bacc, _mm256_loadu_ps(gr + j));
    }
    switch (P.kw) {
      case 1: wgrad_band<1>(P, buf, gbuf, i1 - i0, sums); break;
      case 3: wgrad_band<3>(P, buf, gbuf, i1 - i0, sums); break;
      case 5: wgrad_band<5>(P, buf, gbuf, i1 - i0, sums); break;
      default: wgrad_band<7>(P, buf, gbuf, i1 - i0, sums); break;
    }
  }
  if (bias != nullptr) *bias += hsum(bacc);
}

// d[l] += v[l] for the 8 lanes of v, in fp64.
PYC_AVX2 inline void add_lanes(double* d, __m256 v) {
  _mm256_storeu_pd(d, _mm256_add_pd(_mm256_loadu_pd(d), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
  _mm256_storeu_pd(d + 4, _mm256_add_pd(_mm256_loadu_pd(d + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
}

// Weight gradient, lanes mode: planes x + l * plane, go + l * plane (l < nl: channels of one
// image) added to sums[t * 8 + l] (fp64) and bias[l]: fp32 vector accumulators, then fp64 lanes.
template <int KW, typename T>
PYC_AVX2 void wgrad_lanes(const Plan& P, const T* x, const T* go, int64_t nl, float* tile, float* gtile, double* sums,
                          double* bias) {
  const int64_t x_plane = P.H * P.W, g_plane = P.Ho * P.Wo, n_out = P.Ho * P.Wo, cols = P.cols;
  {
    fill_tile(P, x, x_plane, nl, tile);
    int64_t e0 = 0;
    if (std::is_same<T, float>::value) {  // 4 outputs x 8 planes per pair of 4x4 transposes
      const float* gp[8];
      for (int64_t l = 0; l < 8; ++l) gp[l] = reinterpret_cast<const float*>(go) + (l < nl ? l : 0) * g_plane;
      for (; e0 + 4 <= n_out; e0 += 4) planes4_to_lanes(gp, e0, gtile + e0 * 8);
    }
    for (int64_t l = 0; l < nl; ++l) {
      const T* g = go + l * g_plane;
      for (int64_t e = e0; e < n_out; ++e) gtile[e * 8 + l] = to_f(g[e]);
    }
    if (bias != nullptr) {
      __m256 bs = _mm256_setzero_ps();
      for (int64_t e = 0; e < n_out; ++e) bs = _mm256_add_ps(bs, _mm256_loadu_ps(gtile + e * 8));
      add_lanes(bias, bs);
    }
    if (KW == 3 && P.kh == 3) {
      // 3x3: the nine taps in one pass over the outputs, nine independent FMA chains
      __m256 acc[9];
      for (int t = 0; t < 9; ++t) acc[t] = _mm256_setzero_ps();
      const int64_t as = P.dh * cols * 8, bs = P.dw * 8;
      for (int64_t i = 0; i < P.Ho; ++i)
        for (int64_t j = 0; j < P.Wo; ++j) {
          const __m256 gv = _mm256_loadu_ps(gtile + (i * P.Wo + j) * 8);
          const float* base = tile + ((i * P.sh) * cols + j * P.sw) * 8;
#pragma GCC unroll 3
          for (int a = 0; a < 3; ++a)
#pragma GCC unroll 3
            for (int b = 0; b < 3; ++b)
              acc[a * 3 + b] = _mm256_fmadd_ps(gv, _mm256_loadu_ps(base + a * as + b * bs), acc[a * 3 + b]);
        }
      for (int t = 0; t < 9; ++t) {
        add_lanes(sums + t * 8, acc[t]);
      }
      return;
    }
    for (int64_t a = 0; a < P.kh; ++a) {
      __m256 acc[KW];
      for (int b = 0; b < KW; ++b) acc[b] = _mm256_setzero_ps();
      for (int64_t i = 0; i < P.Ho; ++i)
        for (int64_t j = 0; j < P.Wo; ++j) {
          const __m256 gv = _mm256_loadu_ps(gtile + (i * P.Wo + j) * 8);
          const float* base = tile + ((i * P.sh + a * P.dh) * cols + j * P.sw) * 8;
          for (int b = 0; b < KW; ++b) acc[b] = _mm256_fmadd_ps(gv, _mm256_loadu_ps(base + b * P.dw * 8), acc[b]);
        }
      for (int b = 0; b < KW; ++b) {
        add_lanes(sums + (a * KW + b) * 8, acc[b]);
      }
    }
  }
}

// ---------------------------------------------------------------- NHWC: vectors over channels

struct Tap {
  int64_t w;    // tap index a * kw + b (rows of the transposed weight)
  int64_t off;  // source pixel offset in elements
};

// dst[c] = epilogue(sum_t wT[taps[t].w][c] * src[taps[t].off + c]) for all C channels.
template <typename T>
PYC_AVX2 void gather_pixel(const Tap* taps, int nt, const T* src, const float* wT, int64_t C, const float* sc,
                           const float* sb, int act, T* dst) {
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int t = 0; t < nt; ++t) {
      const float* wr = wT + taps[t].w * C + c;
      const T* xr = src + taps[t].off + c;
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr), load8(xr), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 8), load8(xr + 8), a1);
    }
    store8(dst + c, epilogue(a0, _mm256_loadu_ps(sc + c), _mm256_loadu_ps(sb + c), act));
    store8(dst + c + 8, epilogue(a1, _mm256_loadu_ps(sc + c + 8), _mm256_loadu_ps(sb + c + 8), act));
  }
  for (; c + 8 <= C; c += 8) {
    __m256 a0 = _mm256_setzero_ps();
    for (int t = 0; t < nt; ++t)
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wT + taps[t].w * C + c), load8(src + taps[t].off + c), a0);
    store8(dst + c, epilogue(a0, _mm256_loadu_ps(sc + c), _mm256_loadu_ps(sb + c), act));
  }
  for (; c < C; ++c) {
    float acc = 0.0f;
    for (int t = 0; t < nt; ++t) acc += wT[taps[t].w * C + c] * to_f(src[taps[t].off + c]);
    dst[c] = static_cast<T>(act_f(acc * sc[c] + sb[c], act));
  }
}

// The valid 1-D taps of output index o: forward (k index, source index) pairs with
// src = o * s - p + k * d inside [0, n); transposed (backward to the input): src = (o + p - k d) / s
// exact and inside [0, n).
inline int taps_1d(int64_t o, int64_t k, int64_t s, int64_t p, int64_t d, int64_t n, bool transposed, int64_t* kidx,
                   int64_t* src) {
  int cnt = 0;
  for (int64_t t = 0; t < k; ++t) {
    int64_t v;
    if (transposed) {
      const int64_t q = o + p - t * d;
      if (q < 0 || q % s != 0) continue;
      v = q / s;
    } else {
      v = o * s - p + t * d;
    }
    if (v < 0 || v >= n) continue;
    kidx[cnt] = t;
    src[cnt] = v;
    ++cnt;
  }
  return cnt;
}

// store8, streaming (non-temporal) when Stream.
template <bool Stream, typename T>
PYC_AVX2 inline void put8(T* p, __m256 v) {
  if (Stream)
    cpu::store8_stream(p, v);
  else
    store8(p, v);
}

// Four adjacent output pixels at once (`step` elements apart in src, C apart in dst) sharing one
// tap list: each weight vector is loaded once for the four, so a tap costs 5 loads per 4 FMAs
// instead of 2 per FMA. Only for pixels whose taps are all inside (interior columns).
template <bool Stream, typename T>
PYC_AVX2 void gather_pixels4(const Tap* taps, int nt, int64_t step, const T* src, const float* wT, int64_t C,
                             const float* sc, const float* sb, int act, T* dst) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int t = 0; t < nt; ++t) {
      const __m256 wv = _mm256_loadu_ps(wT + taps[t].w * C + c);
      const T* xr = src + taps[t].off + c;
      a0 = _mm256_fmadd_ps(wv, load8(xr), a0);
      a1 = _mm256_fmadd_ps(wv, load8(xr + step), a1);
      a2 = _mm256_fmadd_ps(wv, load8(xr + 2 * step), a2);
      a3 = _mm256_fmadd_ps(wv, load8(xr + 3 * step), a3);
    }
    const __m256 s = _mm256_loadu_ps(sc + c), b = _mm256_loadu_ps(sb + c);
    put8<Stream>(dst + c, epilogue(a0, s, b, act));
    put8<Stream>(dst + C + c, epilogue(a1, s, b, act));
    put8<Stream>(dst + 2 * C + c, epilogue(a2, s, b, act));
    put8<Stream>(dst + 3 * C + c, epilogue(a3, s, b, act));
  }
  for (; c < C; ++c)
    for (int q = 0; q < 4; ++q) {
      float acc = 0.0f;
      for (int t = 0; t < nt; ++t) acc += wT[taps[t].w * C + c] * to_f(src[taps[t].off + q * step + c]);
      dst[q * C + c] = static_cast<T>(act_f(acc * sc[c] + sb[c], act));
    }
}

// Stride 1, dilation 1, kernel width KW known: four adjacent interior outputs per channel vector
// with a sliding window along each tap row: the KW + 3 input pixels of a tap row are loaded once
// and each feeds every output it touches, the row's KW weight vectors once per row
// (na (2 KW + 3) loads for 4 na KW FMAs). rows[x]: tap row x's leftmost source pixel (forward:
// column j - pw; the backward to the input, Flip: j + pw - (KW - 1), taps in reverse order);
// wrow[x]: its first tap index ka * KW.
template <int KW, bool Flip, bool Stream, typename T>
PYC_AVX2 void slide_pixels4(const T* const* rows, const int64_t* wrow, int na, const float* wT, int64_t C,
                            const float* sc, const float* sb, int act, T* dst) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int x = 0; x < na; ++x) {
      const T* p = rows[x] + c;
      const float* wr = wT + wrow[x] * C + c;
      __m256 w[KW];
      for (int b = 0; b < KW; ++b) w[b] = _mm256_loadu_ps(wr + (Flip ? KW - 1 - b : b) * C);
      for (int m = 0; m < KW + 3; ++m) {
        const __m256 xv = load8(p + m * C);
        for (int q = 0; q < 4; ++q) {
          const int b = m - q;
          if (b >= 0 && b < KW) acc[q] = _mm256_fmadd_ps(w[b], xv, acc[q]);
        }
      }
    }
    const __m256 s = _mm256_loadu_ps(sc + c), b = _mm256_loadu_ps(sb + c);
    for (int q = 0; q < 4; ++q) put8<Stream>(dst + q * C + c, epilogue(acc[q], s, b, act));
  }
  for (; c < C; ++c)
    for (int q = 0; q < 4; ++q) {
      float acc = 0.0f;
      for (int x = 0; x < na; ++x)
        for (int b = 0; b < KW; ++b)
          acc += wT[(wrow[x] + (Flip ? KW - 1 - b : b)) * C + c] * to_f(rows[x][(q + b) * C + c]);
      dst[q * C + c] = static_cast<T>(act_f(acc * sc[c] + sb[c], act));
    }
}

// Forward (transposed = false: out [N, Ho, Wo, C] from src = x [N, H, W, C]) or backward to the
// input (transposed = true: out = grad_x [N, H, W, C] from src = grad_out [N, Ho, Wo, C]).
// Parallel over output rows. Within a row, output columns whose kw taps are all inside form one
// contiguous range where the tap list of column j + 1 is that of column j shifted by one source
// step (forward: sw pixels; transposed, stride 1 only: one pixel): those run four at a time.
template <typename T>
void gather_nhwc_avx2(const T* src, T* out, const float* wT, const Affine& af, int act, const DwGeom& g,
                      bool transposed) {
  const int64_t OH = transposed ? g.H : g.Ho, OW = transposed ? g.W : g.Wo;
  const int64_t SH = transposed ? g.Ho : g.H, SW = transposed ? g.Wo : g.W;
  const int64_t C = g.C;
  // interior columns [jlo, jhi): every width tap inside, and a constant shift between neighbours
  int64_t jlo = 0, jhi = 0;
  if (!transposed || g.sw == 1) {
    int64_t kb[kMaxK], sb[kMaxK];
    jlo = OW;
    for (int64_t j = 0; j < OW; ++j)
      if (taps_1d(j, g.kw, g.sw, g.pw, g.dw, SW, transposed, kb, sb) == g.kw) {
        if (jlo == OW) jlo = j;
        jhi = j + 1;
      }
    if (jhi <= jlo) jlo = jhi = 0;
  }
  const int64_t src_step = (transposed ? 1 : g.sw) * C;
  // the sliding window: stride 1 and dilation 1 in width, 3 or 5 wide (forward and its transpose)
  const bool slide = g.sw == 1 && g.dw == 1 && (g.kw == 3 || g.kw == 5);
  // outputs far larger than the caches: streaming stores (no read of each destination line first)
  const bool stream = g.N * OH * OW * C * int64_t(sizeof(T)) > (int64_t(8) << 20);
  cpu::parallel_chunks(0, g.N * OH, grain_for(OW * C * g.kh * g.kw), [&](int64_t r0, int64_t r1) {
    Tap taps[kMaxTaps];
    int64_t ka[kMaxK], sa[kMaxK], kb[kMaxK], sb[kMaxK];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / OH, i = r % OH;
      const int na = taps_1d(i, g.kh, g.sh, g.ph, g.dh, SH, transposed, ka, sa);
      T* orow = out + r * OW * C;
      auto tap_list = [&](int64_t j) {
        const int nb = taps_1d(j, g.kw, g.sw, g.pw, g.dw, SW, transposed, kb, sb);
        int nt = 0;
        for (int x = 0; x < na; ++x)
          for (int y = 0; y < nb; ++y) {
            taps[nt].w = ka[x] * g.kw + kb[y];
            taps[nt].off = ((n * SH + sa[x]) * SW + sb[y]) * C;
            ++nt;
          }
        return nt;
      };
      int64_t j = 0;
      while (j < OW) {
        if (slide && j >= jlo && j < jhi && jhi - jlo >= 4) {
          // the last block of four ends at jhi, recomputing (the same values for) pixels already
          // written, rather than leaving up to three pixels to the single-pixel path
          j = std::min(j, jhi - 4);
          const T* rows[kMaxK];
          int64_t wrow[kMaxK];
          const int64_t col0 = transposed ? j + g.pw - (g.kw - 1) : j - g.pw;
          for (int x = 0; x < na; ++x) {
            rows[x] = src + ((n * SH + sa[x]) * SW + col0) * C;
            wrow[x] = ka[x] * g.kw;
          }
          const float *sc = af.scale.data(), *sb = af.shift.data();
          T* o = orow + j * C;
          if (g.kw == 3 && !transposed)
            stream ? slide_pixels4<3, false, true, T>(rows, wrow, na, wT, C, sc, sb, act, o)
                   : slide_pixels4<3, false, false, T>(rows, wrow, na, wT, C, sc, sb, act, o);
          else if (g.kw == 3)
            stream ? slide_pixels4<3, true, true, T>(rows, wrow, na, wT, C, sc, sb, act, o)
                   : slide_pixels4<3, true, false, T>(rows, wrow, na, wT, C, sc, sb, act, o);
          else if (!transposed)
            stream ? slide_pixels4<5, false, true, T>(rows, wrow, na, wT, C, sc, sb, act, o)
                   : slide_pixels4<5, false, false, T>(rows, wrow, na, wT, C, sc, sb, act, o);
          else
            stream ? slide_pixels4<5, true, true, T>(rows, wrow, na, wT, C, sc, sb, act, o)
                   : slide_pixels4<5, true, false, T>(rows, wrow, na, wT, C, sc, sb, act, o);
          j += 4;
        } else if (j >= jlo && j + 4 <= jhi) {
          const int nt = tap_list(j);
          if (stream)
            gather_pixels4<true, T>(taps, nt, src_step, src, wT, C, af.scale.data(), af.shift.data(), act, orow + j * C);
          else
            gather_pixels4<false, T>(taps, nt, src_step, src, wT, C, af.scale.data(), af.shift.data(), act, orow + j * C);
          j += 4;
        } else {
          const int nt = tap_list(j);
          gather_pixel<T>(taps, nt, src, wT, C, af.scale.data(), af.shift.data(), act, orow + j * C);
          ++j;
        }
      }
    }
    if (stream) cpu::stream_fence();
  });
}

// Weight gradient, NHWC: channel vectors [v0, v1) (8 channels each, the last maybe partial) over
// the whole batch, in a fixed order: fp32 accumulators per (n, row i, tap row a), added in fp32 to
// the plane's partials, which are added to fp64 per plane.
template <int KW, typename T>
PYC_AVX2 void wgrad_nhwc_block(const T* go, const T* x, const DwGeom& g, int64_t v0, int64_t v1, double* sums,
                               double* bias) {
  const int64_t C = g.C, kk = g.kh * KW, nv = v1 - v0;
  std::vector<float> part(nv * kk * 8), bpart(nv * 8);
  // interior output columns: every tap inside the image
  const int64_t jlo = std::min(g.Wo, ceil_div(g.pw, g.sw));
  const int64_t jhi = std::max(jlo, std::min(g.Wo, dw_floor_div(g.W - 1 + g.pw - (KW - 1) * g.dw, g.sw) + 1));
  for (int64_t n = 0; n < g.N; ++n) {
    std::fill(part.begin(), part.end(), 0.0f);
    std::fill(bpart.begin(), bpart.end(), 0.0f);
    for (int64_t i = 0; i < g.Ho; ++i) {
      const T* grow = go + ((n * g.Ho + i) * g.Wo) * C;
      for (int64_t v = v0; v < v1; ++v) {
        const int64_t c = v * 8;
        if (c + 8 > C) continue;  // the partial vector: scalar, below
        float* pv = part.data() + (v - v0) * kk * 8;
        if (bias != nullptr) {
          __m256 bs = _mm256_setzero_ps();
          for (int64_t j = 0; j < g.Wo; ++j) bs = _mm256_add_ps(bs, load8(grow + j * C + c));
          float* bp = bpart.data() + (v - v0) * 8;
          _mm256_storeu_ps(bp, _mm256_add_ps(_mm256_loadu_ps(bp), bs));
        }
        for (int64_t a = 0; a < g.kh; ++a) {
          const int64_t ih = i * g.sh - g.ph + a * g.dh;
          if (ih < 0 || ih >= g.H) continue;
          const T* xrow = x + ((n * g.H + ih) * g.W) * C + c;
          __m256 acc[KW];
          for (int b = 0; b < KW; ++b) acc[b] = _mm256_setzero_ps();
          // border columns check each tap (a lambda would lose the target attribute)
          for (int64_t j = 0; j < g.Wo; ++j) {
            const __m256 gv = load8(grow + j * C + c);
            if (j >= jlo && j < jhi) {
              const T* xp = xrow + (j * g.sw - g.pw) * C;
              for (int b = 0; b < KW; ++b) acc[b] = _mm256_fmadd_ps(gv, load8(xp + b * g.dw * C), acc[b]);
              continue;
            }
            for (int b = 0; b < KW; ++b) {
              const int64_t iw = j * g.sw - g.pw + b * g.dw;
              if (iw >= 0 && iw < g.W) acc[b] = _mm256_fmadd_ps(gv, load8(xrow + iw * C), acc[b]);
            }
          }
          for (int b = 0; b < KW; ++b) {
            float* pp = pv + (a * KW + b) * 8;
            _mm256_storeu_ps(pp, _mm256_add_ps(_mm256_loadu_ps(pp), acc[b]));
          }
        }
      }
      // channels of a partial last vector, one at a time in the same order
      for (int64_t v = v0; v < v1; ++v) {
        const int64_t cb = v * 8;
        if (cb + 8 <= C) continue;
        float* pv = part.data() + (v - v0) * kk * 8;
        for (int64_t c = cb; c < C; ++c) {
          const int64_t l = c - cb;
          if (bias != nullptr) {
            float bs = 0.0f;
            for (int64_t j = 0; j < g.Wo; ++j) bs += to_f(grow[j * C + c]);
            bpart[(v - v0) * 8 + l] += bs;
          }
          for (int64_t a = 0; a < g.kh; ++a) {
            const int64_t ih = i * g.sh - g.ph + a * g.dh;
            if (ih < 0 || ih >= g.H) continue;
            const T* xrow = x + ((n * g.H + ih) * g.W) * C + c;
            float acc[KW] = {0.0f};
            for (int64_t j = 0; j < g.Wo; ++j) {
              const float gv = to_f(grow[j * C + c]);
              for (int b = 0; b < KW; ++b) {
                const int64_t iw = j * g.sw - g.pw + b * g.dw;
                if (iw >= 0 && iw < g.W) acc[b] += gv * to_f(xrow[iw * C]);
              }
            }
            for (int b = 0; b < KW; ++b) pv[(a * KW + b) * 8 + l] += acc[b];
          }
        }
      }
    }
    for (int64_t k = 0; k < nv * kk * 8; ++k) sums[k] += part[k];
    if (bias != nullptr)
      for (int64_t k = 0; k < nv * 8; ++k) bias[k] += bpart[k];
  }
}

#endif  // PYC_X86

// ------------------------------------------------------------------------------------------------
// Drivers.

void check_cpu(const char* fn, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": tensors must be on the CPU, got ", t.device());
}

// The weight flipped in both spatial dimensions, fp32 [C][kh * kw].
std::vector<float> flipped(const std::vector<float>& w, int64_t C, int64_t kh, int64_t kw) {
  std::vector<float> f(w.size());
  for (int64_t c = 0; c < C; ++c)
    for (int64_t a = 0; a < kh; ++a)
      for (int64_t b = 0; b < kw; ++b)
        f[(c * kh + a) * kw + b] = w[(c * kh + (kh - 1 - a)) * kw + (kw - 1 - b)];
  return f;
}

// fp32 [kh * kw][C] from [C][kh * kw].
std::vector<float> transposed(const std::vector<float>& w, int64_t C, int64_t kk) {
  std::vector<float> t(w.size());
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < kk; ++k) t[k * C + c] = w[c * kk + k];
  return t;
}

at::Tensor empty_like_format(at::IntArrayRef sizes, const at::Tensor& like, bool channels_last) {
  at::Tensor t = at::empty(sizes, like.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous));
  cpu::advise_huge_pages(t);  // large outputs: fewer page faults on first touch
  return t;
}

}  // namespace

// y = act(conv(x, w) * scale + shift). NCHW: planes through an L1 buffer, 8 output columns per
// vector, kernels 3x3 and 5x5 unrolled at compile time. NHWC: per-pixel tap lists, 16 channels per
// step. Scalar: direct loops.
at::Tensor depthwise_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale,
                             const at::Tensor& shift, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                             int64_t dw, int64_t act) {
  const char* fn = "depthwise_fwd_cpu";
  const DwGeom g = dw_check_fwd(fn, x_in, weight, sh, sw, ph, pw, dh, dw);
  check_cpu(fn, x_in);
  dw_check_channel_vector(fn, "scale", scale, g.C, x_in.device());
  dw_check_channel_vector(fn, "shift", shift, g.C, x_in.device());
  TORCH_CHECK(act >= 0 && act <= 2, fn, ": act must be 0 (none), 1 (relu) or 2 (relu6), got ", act);
  const at::Tensor x = dw_layout(x_in);
  const bool cl = dw_channels_last(x);
  at::Tensor y = empty_like_format({g.N, g.C, g.Ho, g.Wo}, x, cl);
  if (y.numel() == 0) return y;
  const std::vector<float> w = weight_f32(weight);
  const Affine af(scale, shift, g.C);
  const int a = static_cast<int>(act);
  PYC_DISPATCH_FLOATS(x.scalar_type(), fn, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
#if PYC_X86
    if (use_avx2()) {
      if (cl) {
        const std::vector<float> wT = transposed(w, g.C, g.kh * g.kw);
        gather_nhwc_avx2<scalar_t>(xp, yp, wT.data(), af, a, g, false);
      } else {
        const Plan P = make_plan(g.H, g.W, 1, 1, g.ph, g.pw, g.Ho, g.Wo, g.sh, g.sw, g.dh, g.dw, g.kh, g.kw,
                                 kLanesBelowFwd);
        conv_planes_avx2<scalar_t>(P, xp, g.H * g.W, yp, g.Ho * g.Wo, g.N, g.C, w.data(), af, a);
      }
      return;
    }
#endif
    fwd_scalar<scalar_t>(xp, strides_of(x), yp, strides_of(y), w.data(), af, a, g);
  });
  return y;
}

// grad_x = conv_transpose(grad_out, w). NCHW: the forward's plane kernel over grad_out upsampled by
// the stride (zeros inserted while filling the buffer) with the flipped kernel, stride 1. NHWC:
// per-pixel lists of the taps whose (h + p - k d) / s is exact and inside.
at::Tensor depthwise_bwd_input_cpu(const at::Tensor& go_in, const at::Tensor& weight, int64_t H, int64_t W, int64_t sh,
                                   int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  const char* fn = "depthwise_bwd_input_cpu";
  const DwGeom g = dw_check_bwd_input(fn, go_in, weight, H, W, sh, sw, ph, pw, dh, dw);
  check_cpu(fn, go_in);
  const at::Tensor go = dw_layout(go_in);
  const bool cl = dw_channels_last(go);
  at::Tensor gx = empty_like_format({g.N, g.C, H, W}, go, cl);
  if (gx.numel() == 0) return gx;
  const std::vector<float> w = weight_f32(weight);
  PYC_DISPATCH_FLOATS(go.scalar_type(), fn, [&] {
    const scalar_t* gp = go.data_ptr<scalar_t>();
    scalar_t* xp = gx.data_ptr<scalar_t>();
#if PYC_X86
    if (use_avx2()) {
      const Affine none(g.C);
      if (cl) {
        const std::vector<float> wT = transposed(w, g.C, g.kh * g.kw);
        gather_nhwc_avx2<scalar_t>(gp, xp, wT.data(), none, 0, g, true);
      } else {
        const std::vector<float> wf = flipped(w, g.C, g.kh, g.kw);
        const Plan P = make_plan(g.Ho, g.Wo, g.sh, g.sw, (g.kh - 1) * g.dh - g.ph, (g.kw - 1) * g.dw - g.pw, H, W, 1, 1,
                                 g.dh, g.dw, g.kh, g.kw, kLanesBelowFwd);
        conv_planes_avx2<scalar_t>(P, gp, g.Ho * g.Wo, xp, H * W, g.N, g.C, wf.data(), none, 0);
      }
      return;
    }
#endif
    bwd_input_scalar<scalar_t>(gp, strides_of(go), xp, strides_of(gx), w.data(), g);
  });
  return gx;
}

// (grad_w fp32 [C, 1, kh, kw], grad_b fp32 [C] or empty). One task per channel (NCHW: planes through
// the forward's buffer, kw-wide fp32 vector accumulators per tap row) or per block of 8 channels
// (NHWC), fp64 across planes: the order depends only on the shapes.
std::tuple<at::Tensor, at::Tensor> depthwise_bwd_weight_cpu(const at::Tensor& go_in, const at::Tensor& x_in,
                                                            int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                                                            int64_t pw, int64_t dh, int64_t dw, bool with_bias) {
  const char* fn = "depthwise_bwd_weight_cpu";
  const DwGeom g = dw_check_bwd_weight(fn, go_in, x_in, kh, kw, sh, sw, ph, pw, dh, dw);
  check_cpu(fn, x_in);
  const at::Tensor x = dw_layout(x_in);
  const bool cl = dw_channels_last(x);
  // grad_out in x's layout (the kernels index both the same way)
  const at::Tensor go = cl ? go_in.contiguous(at::MemoryFormat::ChannelsLast) : go_in.contiguous();
  const auto fopts = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gw = at::zeros({g.C, 1, kh, kw}, fopts);
  at::Tensor gb = with_bias ? at::zeros({g.C}, fopts) : at::empty({0}, fopts);
  if (g.N == 0 || g.C == 0) return {gw, gb};
  const int64_t kk = kh * kw;
  float* gwp = gw.data_ptr<float>();
  float* gbp = with_bias ? gb.data_ptr<float>() : nullptr;
  PYC_DISPATCH_FLOATS(x.scalar_type(), fn, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = go.data_ptr<scalar_t>();
#if PYC_X86
    if (use_avx2()) {
      if (cl) {
        const int64_t nvec = (g.C + 7) / 8;
        // static shares: a piece of one vector (32 B of each 64-B line) would split lines between threads
        at::parallel_for(0, nvec, 1, [&](int64_t v0, int64_t v1) {
          std::vector<double> sums((v1 - v0) * kk * 8, 0.0), bias((v1 - v0) * 8, 0.0);
          switch (kw) {
            case 1: wgrad_nhwc_block<1, scalar_t>(gp, xp, g, v0, v1, sums.data(), with_bias ? bias.data() : nullptr); break;
            case 3: wgrad_nhwc_block<3, scalar_t>(gp, xp, g, v0, v1, sums.data(), with_bias ? bias.data() : nullptr); break;
            case 5: wgrad_nhwc_block<5, scalar_t>(gp, xp, g, v0, v1, sums.data(), with_bias ? bias.data() : nullptr); break;
            default: wgrad_nhwc_block<7, scalar_t>(gp, xp, g, v0, v1, sums.data(), with_bias ? bias.data() : nullptr); break;
          }
          for (int64_t v = v0; v < v1; ++v)
            for (int64_t l = 0; l < 8 && v * 8 + l < g.C; ++l) {
              const int64_t c = v * 8 + l;
              for (int64_t t = 0; t < kk; ++t) gwp[c * kk + t] = static_cast<float>(sums[((v - v0) * kk + t) * 8 + l]);
              if (gbp != nullptr) gbp[c] = static_cast<float>(bias[(v - v0) * 8 + l]);
            }
        });
      } else {
        const Plan P = make_plan(g.H, g.W, 1, 1, g.ph, g.pw, g.Ho, g.Wo, g.sh, g.sw, g.dh, g.dw, kh, kw, kLanesBelowWgrad);
        // a task owns channels (lanes: groups of 8) and walks the batch image by image, so its
        // reads are contiguous blocks of planes; each channel's sum runs over n in order.
        const int64_t xpl = g.H * g.W, gpl = g.Ho * g.Wo;
        if (P.lanes) {
          const int64_t G = (g.C + 7) / 8;
          cpu::parallel_chunks(0, G, 1, [&](int64_t q0, int64_t q1) {
            std::vector<float> tile(P.img_rows * P.cols * 8 + 8, 0.0f), gtile(g.Ho * g.Wo * 8 + 8, 0.0f);
            std::vector<double> sums((q1 - q0) * kMaxTaps * 8, 0.0), bias((q1 - q0) * 8, 0.0);
            for (int64_t n = 0; n < g.N; ++n)
              for (int64_t q = q0; q < q1; ++q) {
                const int64_t c0 = q * 8, nl = std::min<int64_t>(8, g.C - c0);
                const scalar_t* xs = xp + (n * g.C + c0) * xpl;
                const scalar_t* gs = gp + (n * g.C + c0) * gpl;
                double* sq = sums.data() + (q - q0) * kMaxTaps * 8;
                double* bq = bias.data() + (q - q0) * 8;
                switch (kw) {
                  case 1: wgrad_lanes<1, scalar_t>(P, xs, gs, nl, tile.data(), gtile.data(), sq, bq); break;
                  case 3: wgrad_lanes<3, scalar_t>(P, xs, gs, nl, tile.data(), gtile.data(), sq, bq); break;
                  case 5: wgrad_lanes<5, scalar_t>(P, xs, gs, nl, tile.data(), gtile.data(), sq, bq); break;
                  default: wgrad_lanes<7, scalar_t>(P, xs, gs, nl, tile.data(), gtile.data(), sq, bq); break;
                }
              }
            for (int64_t q = q0; q < q1; ++q)
              for (int64_t l = 0; l < 8 && q * 8 + l < g.C; ++l) {
                const int64_t c = q * 8 + l;
                for (int64_t t = 0; t < kk; ++t) gwp[c * kk + t] = static_cast<float>(sums[((q - q0) * kMaxTaps + t) * 8 + l]);
                if (gbp != nullptr) gbp[c] = static_cast<float>(bias[(q - q0) * 8 + l]);
              }
          });
          return;
        }
        cpu::parallel_chunks(0, g.C, 1, [&](int64_t c0, int64_t c1) {
          std::vector<float> buf(P.rows * P.ld + 8, 0.0f), gbuf(P.band * P.Wv + 8, 0.0f);
          std::vector<double> sums((c1 - c0) * kMaxTaps, 0.0), bias(c1 - c0, 0.0);
          for (int64_t n = 0; n < g.N; ++n)
            for (int64_t c = c0; c < c1; ++c)
              wgrad_plane<scalar_t>(P, xp + (n * g.C + c) * xpl, gp + (n * g.C + c) * gpl, buf.data(), gbuf.data(),
                                    sums.data() + (c - c0) * kMaxTaps, gbp != nullptr ? &bias[c - c0] : nullptr);
          for (int64_t c = c0; c < c1; ++c) {
            for (int64_t t = 0; t < kk; ++t) gwp[c * kk + t] = static_cast<float>(sums[(c - c0) * kMaxTaps + t]);
            if (gbp != nullptr) gbp[c] = static_cast<float>(bias[c - c0]);
          }
        });
      }
      return;
    }
#endif
    bwd_weight_scalar<scalar_t>(gp, strides_of(go), xp, strides_of(x), gwp, gbp, g);
  });
  return {gw, gb};
}

}  // namespace pycompress

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("_depthwise_fwd", &pycompress::depthwise_fwd_cpu);
  m.impl("_depthwise_bwd_input", &pycompress::depthwise_bwd_input_cpu);
  m.impl("_depthwise_bwd_weight", &pycompress::depthwise_bwd_weight_cpu);
}
