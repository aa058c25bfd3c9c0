// Depthwise 2-D convolution, CPU: the portable scalar path (any CPU, any layout through strides;
// PYCOMPRESS_CPU_SCALAR=1 forces it). See depthwise_common.h.
#include "depthwise_common.h"

namespace pycompress {
namespace cpu {
namespace dw {

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

#define PYC_DW_INSTANTIATE(T)                                                                                        \
  template void fwd_scalar<T>(const T*, Strides, T*, Strides, const float*, const Affine&, int, const DwGeom&);    \
  template void bwd_input_scalar<T>(const T*, Strides, T*, Strides, const float*, const DwGeom&);                 \
  template void bwd_weight_scalar<T>(const T*, Strides, const T*, Strides, float*, float*, const DwGeom&);
PYC_DW_FOR_EACH_DTYPE(PYC_DW_INSTANTIATE)
#undef PYC_DW_INSTANTIATE

}  // namespace dw
}  // namespace cpu
}  // namespace pycompress
