// Depthwise 2-D convolution, CPU: the NHWC (channels_last) kernels (AVX2 + FMA + F16C). See
// depthwise_common.h.
//
// NHWC (AVX2): vectorised over channels; per output pixel the list of taps inside the image is built
// once and the channel loop runs over it without checks. Interior pixels go four at a time (one
// weight load per four FMAs; for stride 1, 3x3 / 5x5, a sliding window that loads each input pixel
// of a tap row once); outputs over 8 MiB are written with streaming stores.
#include "depthwise_common.h"

namespace pycompress {
namespace cpu {
namespace dw {
#if PYC_X86
namespace {

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

// fp32 [kh * kw][C] from [C][kh * kw].
std::vector<float> transposed(const std::vector<float>& w, int64_t C, int64_t kk) {
  std::vector<float> t(w.size());
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < kk; ++k) t[k * C + c] = w[c * kk + k];
  return t;
}

}  // namespace

// y = act(conv(x, w) * scale + shift): per-pixel tap lists, 16 channels per step.
template <typename T>
void fwd_nhwc_avx2(const T* x, T* y, const std::vector<float>& w, const Affine& af, int act, const DwGeom& g) {
  const std::vector<float> wT = transposed(w, g.C, g.kh * g.kw);
  gather_nhwc_avx2<T>(x, y, wT.data(), af, act, g, false);
}

// grad_x = conv_transpose(grad_out, w): per-pixel lists of the taps whose (h + p - k d) / s is exact
// and inside.
template <typename T>
void bwd_input_nhwc_avx2(const T* go, T* gx, const std::vector<float>& w, const DwGeom& g) {
  const Affine none(g.C);
  const std::vector<float> wT = transposed(w, g.C, g.kh * g.kw);
  gather_nhwc_avx2<T>(go, gx, wT.data(), none, 0, g, true);
}

// One task per block of 8 channels, fp64 across planes.
template <typename T>
void bwd_weight_nhwc_avx2(const T* gp, const T* xp, float* gwp, float* gbp, const DwGeom& g) {
  const int64_t kw = g.kw, kk = g.kh * kw;
  const bool with_bias = gbp != nullptr;
  const int64_t nvec = (g.C + 7) / 8;
  // static shares: a piece of one vector (32 B of each 64-B line) would split lines between threads
  at::parallel_for(0, nvec, 1, [&](int64_t v0, int64_t v1) {
    std::vector<double> sums((v1 - v0) * kk * 8, 0.0), bias((v1 - v0) * 8, 0.0);
    with_kw(kw, [&](auto KW) PYC_AVX2 {
      wgrad_nhwc_block<decltype(KW)::value, T>(gp, xp, g, v0, v1, sums.data(), with_bias ? bias.data() : nullptr);
    });
    for (int64_t v = v0; v < v1; ++v)
      for (int64_t l = 0; l < 8 && v * 8 + l < g.C; ++l) {
        const int64_t c = v * 8 + l;
        for (int64_t t = 0; t < kk; ++t) gwp[c * kk + t] = static_cast<float>(sums[((v - v0) * kk + t) * 8 + l]);
        if (gbp != nullptr) gbp[c] = static_cast<float>(bias[(v - v0) * 8 + l]);
      }
  });
}

#define PYC_DW_INSTANTIATE(T)                                                                                   \
  template void fwd_nhwc_avx2<T>(const T*, T*, const std::vector<float>&, const Affine&, int, const DwGeom&); \
  template void bwd_input_nhwc_avx2<T>(const T*, T*, const std::vector<float>&, const DwGeom&);               \
  template void bwd_weight_nhwc_avx2<T>(const T*, const T*, float*, float*, const DwGeom&);
PYC_DW_FOR_EACH_DTYPE(PYC_DW_INSTANTIATE)
#undef PYC_DW_INSTANTIATE

#endif  // PYC_X86
}  // namespace dw
}  // namespace cpu
}  // namespace pycompress
