// Depthwise 2-D convolution, CPU: the NCHW kernels (AVX2 + FMA + F16C). See depthwise_common.h.
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
#include "depthwise_common.h"

namespace pycompress {
namespace cpu {
namespace dw {
#if PYC_X86
namespace {

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
                              float* tile, float* otile, int64_t t0, int64_t t1) {
  const int64_t kk = P.kh * P.kw;
  __m256 wv[kMaxTaps];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / G, c0 = (t % G) * 8, nl = std::min<int64_t>(8, C - c0);
    for (int64_t k = 0; k < kk; ++k) wv[k] = _mm256_loadu_ps(wT + k * Cp + c0);
    const __m256 vs = _mm256_loadu_ps(sc + c0), vb = _mm256_loadu_ps(sb + c0);
    const T* s = src + (n * C + c0) * src_plane;
    T* o = out + (n * C + c0) * out_plane;
    with_square_k(P.kh, P.kw, [&](auto K) PYC_AVX2 {
      conv_lanes<decltype(K)::value, T>(P, s, src_plane, nl, wv, vs, vb, act, tile, otile, o, out_plane);
    });
  }
}

// The plane convolution over planes [N * C]: src plane p is src + p * src_plane, output plane p is
// out + p * out_plane. w: fp32 [C][kh * kw] in the plan's orientation.
template <typename T>
void conv_planes_avx2(const Plan& P, const T* src, int64_t src_plane, T* out, int64_t out_plane, int64_t N, int64_t C,
                      const float* w, const Affine& af, int act) {
  const int64_t kk = P.kh * P.kw;
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
      run_lanes_tasks(P, src, src_plane, out, out_plane, C, G, Cp, wT.data(), sc.data(), sb.data(), act, tile.data(),
                      otile.data(), t0, t1);
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
      with_square_k(P.kh, P.kw, [&](auto K) PYC_AVX2 {
        conv_plane<decltype(K)::value, T>(P, s, wc, af.scale[c], af.shift[c], act, buf.data(), o);
      });
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
    with_kw(P.kw, [&](auto KW) PYC_AVX2 { wgrad_band<decltype(KW)::value>(P, buf, gbuf, i1 - i0, sums); });
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

// The weight flipped in both spatial dimensions, fp32 [C][kh * kw].
std::vector<float> flipped(const std::vector<float>& w, int64_t C, int64_t kh, int64_t kw) {
  std::vector<float> f(w.size());
  for (int64_t c = 0; c < C; ++c)
    for (int64_t a = 0; a < kh; ++a)
      for (int64_t b = 0; b < kw; ++b)
        f[(c * kh + a) * kw + b] = w[(c * kh + (kh - 1 - a)) * kw + (kw - 1 - b)];
  return f;
}

}  // namespace

// y = act(conv(x, w) * scale + shift): planes through an L1 buffer, 8 output columns per vector,
// kernels 3x3 and 5x5 unrolled at compile time.
template <typename T>
void fwd_nchw_avx2(const T* x, T* y, const std::vector<float>& w, const Affine& af, int act, const DwGeom& g) {
  const Plan P = make_plan(g.H, g.W, 1, 1, g.ph, g.pw, g.Ho, g.Wo, g.sh, g.sw, g.dh, g.dw, g.kh, g.kw, kLanesBelowFwd);
  conv_planes_avx2<T>(P, x, g.H * g.W, y, g.Ho * g.Wo, g.N, g.C, w.data(), af, act);
}

// grad_x = conv_transpose(grad_out, w): the forward's plane kernel over grad_out upsampled by the
// stride (zeros inserted while filling the buffer) with the flipped kernel, stride 1.
template <typename T>
void bwd_input_nchw_avx2(const T* go, T* gx, const std::vector<float>& w, const DwGeom& g) {
  const Affine none(g.C);
  const std::vector<float> wf = flipped(w, g.C, g.kh, g.kw);
  const Plan P = make_plan(g.Ho, g.Wo, g.sh, g.sw, (g.kh - 1) * g.dh - g.ph, (g.kw - 1) * g.dw - g.pw, g.H, g.W, 1, 1,
                           g.dh, g.dw, g.kh, g.kw, kLanesBelowFwd);
  conv_planes_avx2<T>(P, go, g.Ho * g.Wo, gx, g.H * g.W, g.N, g.C, wf.data(), none, 0);
}

// One task per channel (planes through the forward's buffer, kw-wide fp32 vector accumulators per
// tap row; lanes mode: per group of 8 channels), fp64 across planes.
template <typename T>
void bwd_weight_nchw_avx2(const T* gp, const T* xp, float* gwp, float* gbp, const DwGeom& g) {
  const int64_t kh = g.kh, kw = g.kw, kk = kh * kw;
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
          const T* xs = xp + (n * g.C + c0) * xpl;
          const T* gs = gp + (n * g.C + c0) * gpl;
          double* sq = sums.data() + (q - q0) * kMaxTaps * 8;
          double* bq = bias.data() + (q - q0) * 8;
          with_kw(kw, [&](auto KW) PYC_AVX2 {
            wgrad_lanes<decltype(KW)::value, T>(P, xs, gs, nl, tile.data(), gtile.data(), sq, bq);
          });
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
        wgrad_plane<T>(P, xp + (n * g.C + c) * xpl, gp + (n * g.C + c) * gpl, buf.data(), gbuf.data(),
                              sums.data() + (c - c0) * kMaxTaps, gbp != nullptr ? &bias[c - c0] : nullptr);
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t t = 0; t < kk; ++t) gwp[c * kk + t] = static_cast<float>(sums[(c - c0) * kMaxTaps + t]);
      if (gbp != nullptr) gbp[c] = static_cast<float>(bias[c - c0]);
    }
  });
}

#define PYC_DW_INSTANTIATE(T)                                                                                   \
  template void fwd_nchw_avx2<T>(const T*, T*, const std::vector<float>&, const Affine&, int, const DwGeom&); \
  template void bwd_input_nchw_avx2<T>(const T*, T*, const std::vector<float>&, const DwGeom&);               \
  template void bwd_weight_nchw_avx2<T>(const T*, const T*, float*, float*, const DwGeom&);
PYC_DW_FOR_EACH_DTYPE(PYC_DW_INSTANTIATE)
#undef PYC_DW_INSTANTIATE

#endif  // PYC_X86
}  // namespace dw
}  // namespace cpu
}  // namespace pycompress
