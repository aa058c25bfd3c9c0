// Fake quantization, CPU kernels: AVX2 (+F16C) hot loops chosen at run time, a portable scalar path
// for other CPUs, parallel over large chunks with at::parallel_for (OpenMP).
//
// Math (all backends, see pycompress/ops/fake_quantize_ref.py), in fp32 whatever x's dtype:
//   v = x * inv_scale[c]   (one rounded product; the build passes -ffp-contract=off)
//   q = rint(v) + zp[c]    (round half to even: vroundps / std::nearbyint in the default mode)
//   qc = q < qmin ? qmin : (q > qmax ? qmax : q)   (maxps/minps with this operand order keep NaN)
//   out = (qc - zp[c]) * scale[c], cast once to x's dtype (RNE, c10 semantics for fp16 / bf16)
// Layout: x contiguous, viewed as [outer, C, inner]; element i has channel (i / inner) % C. The
// per-channel walk keeps a (channel, offset-in-row) cursor instead of dividing per element.
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
#include <tuple>
#include <vector>

#include "cpu_common.h"
#include "pycompress.h"

// Not "fma": the kernels must not contract (also not -march=native for the same reason).
#if PYC_X86
#define PYC_AVX2 PYC_AVX2_F16C  // cpu_common.h: AVX2 + F16C, no FMA
#endif

namespace pycompress {
namespace {

// Elements per parallel task: big enough to amortise scheduling, a multiple of 32 so a task owns
// whole mask words. Fixed (not derived from the thread count) so reductions are reproducible.
constexpr int64_t kChunk = int64_t(1) << 16;

struct Quant {
  const float* inv;
  const float* scale;
  const float* zp;
  int64_t C;
  int64_t inner;  // for C == 1 set to n, so the whole tensor is one "row"
  float qmin;
  float qmax;
  // Short rows (inner < 8) make the channel pattern repeat every M = C*inner elements. When
  // P = lcm(M, 8) is small, per-position copies of the parameters (pinv[k] = inv[(k % M) / inner],
  // k < P) let every 8-lane vector load its parameters contiguously. P == 0: not used.
  int64_t P = 0;
  const float* pinv = nullptr;
  const float* pscale = nullptr;
  const float* pzp = nullptr;
};

constexpr int64_t kMaxPeriod = 2048;

struct PeriodicTables {
  std::vector<float> inv, scale, zp;
  // Fills Q's periodic fields when the layout qualifies.
  void attach(Quant& Q) {
    if (Q.C == 1 || Q.inner >= 8) return;
    const int64_t M = Q.C * Q.inner;
    int64_t a = M, b = 8;
    while (b != 0) {
      const int64_t t = a % b;
      a = b;
      b = t;
    }
    const int64_t P = M / a * 8;
    if (P > kMaxPeriod) return;
    inv.resize(P);
    scale.resize(P);
    zp.resize(P);
    for (int64_t k = 0; k < P; ++k) {
      const int64_t c = (k % M) / Q.inner;
      inv[k] = Q.inv[c];
      scale[k] = Q.scale[c];
      zp[k] = Q.zp[c];
    }
    Q.P = P;
    Q.pinv = inv.data();
    Q.pscale = scale.data();
    Q.pzp = zp.data();
  }
};

using cpu::to_f;
using cpu::use_avx2;

// ------------------------------------------------------------------------------------------------
// Scalar path (any CPU; also the reference the AVX2 path must equal bit for bit).

// Returns t = qc - zp (the dequantised integer); out = t * scale.
inline float quant1(float x, float inv, float zp, float qmin, float qmax, bool& clamped) {
  const float v = x * inv;
  const float q = std::nearbyint(v) + zp;
  clamped = q < qmin || q > qmax;
  const float qc = q < qmin ? qmin : (q > qmax ? qmax : q);
  return qc - zp;
}

// Elements [b, e); b is a multiple of 8 (whole mask bytes).
template <typename T, bool MASK>
void fwd_scalar(const T* x, T* out, uint8_t* mask, int64_t b, int64_t e, const Quant& Q) {
  const int64_t row = b / Q.inner;
  int64_t o = b - row * Q.inner, c = row % Q.C;
  uint8_t byte = 0;
  for (int64_t i = b; i < e; ++i) {
    bool cl;
    const float t = quant1(to_f(x[i]), Q.inv[c], Q.zp[c], Q.qmin, Q.qmax, cl);
    out[i] = static_cast<T>(t * Q.scale[c]);
    if (MASK) {
      byte |= static_cast<uint8_t>(!cl) << (i & 7);
      if ((i & 7) == 7 || i + 1 == e) {
        mask[i >> 3] = byte;
        byte = 0;
      }
    }
    if (++o == Q.inner) {
      o = 0;
      if (++c == Q.C) c = 0;
    }
  }
}

// LSQ backward over [b, e), adding into acc_s / acc_z indexed by channel (fp64, one add per element).
template <typename T>
void lsq_scalar(const T* g, const T* x, T* gx, double* acc_s, double* acc_z, int64_t b, int64_t e, const Quant& Q) {
  const int64_t row = b / Q.inner;
  int64_t o = b - row * Q.inner, c = row % Q.C;
  for (int64_t i = b; i < e; ++i) {
    const float xf = to_f(x[i]), gf = to_f(g[i]);
    bool cl;
    const float t = quant1(xf, Q.inv[c], Q.zp[c], Q.qmin, Q.qmax, cl);
    const float out = t * Q.scale[c];
    if (cl) {
      gx[i] = static_cast<T>(0.0f);
      acc_s[c] += static_cast<double>(gf * t);
      acc_z[c] += static_cast<double>(-gf * Q.scale[c]);
    } else {
      gx[i] = g[i];
      acc_s[c] += static_cast<double>(gf * (out - xf) * Q.inv[c]);
    }
    if (++o == Q.inner) {
      o = 0;
      if (++c == Q.C) c = 0;
    }
  }
}

template <typename T>
void ste_scalar(const T* g, T* gx, const uint8_t* mask, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) gx[i] = ((mask[i >> 3] >> (i & 7)) & 1) ? g[i] : static_cast<T>(0.0f);
}

// ------------------------------------------------------------------------------------------------
// AVX2 path.
#if PYC_X86

using cpu::load8;
using cpu::store8;

// dst = clamped ? +0 : src, on the raw bits (so fp16/bf16 gradients pass through unchanged).
PYC_AVX2 inline void keep8(const float* src, float* dst, __m256 clamped) {
  _mm256_storeu_ps(dst, _mm256_andnot_ps(clamped, _mm256_loadu_ps(src)));
}
template <typename T>
PYC_AVX2 inline void keep8(const T* src, T* dst, __m256 clamped) {
  const __m256i m = _mm256_castps_si256(clamped);
  const __m128i m16 = _mm_packs_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_andnot_si128(m16, s));
}

struct QV {
  __m256 qmin, qmax;
};

// The math of the header comment on 8 lanes. Returns out; t = qc - zp; clamped = all-ones lanes
// where q was outside [qmin, qmax] (NaN compares unordered, so it is "not clamped").
PYC_AVX2 inline __m256 fq8(__m256 x, __m256 inv, __m256 s, __m256 zp, const QV& b, __m256& t, __m256& clamped) {
  const __m256 v = _mm256_mul_ps(x, inv);
  const __m256 q = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
  // maxps(a, b) = a > b ? a : b and returns b when either is NaN: q < qmin ? qmin : q exactly.
  const __m256 qc = _mm256_min_ps(b.qmax, _mm256_max_ps(b.qmin, q));
  clamped = _mm256_cmp_ps(qc, q, _CMP_NEQ_OQ);
  t = _mm256_sub_ps(qc, zp);
  return _mm256_mul_ps(t, s);
}

PYC_AVX2 inline double hsum_pd(__m256d d) {
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

// Walks elements [p, end) of the [outer, C, inner] view, calling on the kernel object k:
//   k.run(p, nv, c, inv, s, zp)       nv full vectors at p, all of channel c (broadcast params)
//   k.contig(p, c, inv, s, zp)        one vector whose lanes are channels c .. c+7 (inner == 1)
//   k.lanes(p, r, ch, inv, s, zp)     one vector of r <= 8 valid lanes with per-lane channels ch
// Rows of >= 8 elements give one run plus at most one mixed vector per row.
template <class K>
PYC_AVX2 void walk(K& k, int64_t p, int64_t end, const Quant& Q) {
  const int64_t C = Q.C, inner = Q.inner;
  const int64_t row = p / inner;
  int64_t o = p - row * inner, c = row % C;
  while (p < end) {
    const int64_t left = end - p;
    if (left >= 8) {
      if (inner == 1) {
        if (c + 8 <= C) {
          k.contig(p, c, _mm256_loadu_ps(Q.inv + c), _mm256_loadu_ps(Q.scale + c), _mm256_loadu_ps(Q.zp + c));
          p += 8;
          c += 8;
          if (c == C) c = 0;
          continue;
        }
      } else if (o + 8 <= inner) {
        const int64_t nv = std::min((inner - o) >> 3, left >> 3);
        k.run(p, nv, c, _mm256_set1_ps(Q.inv[c]), _mm256_set1_ps(Q.scale[c]), _mm256_set1_ps(Q.zp[c]));
        p += nv * 8;
        o += nv * 8;
        if (o == inner) {
          o = 0;
          if (++c == C) c = 0;
        }
        continue;
      }
    }
    const int r = static_cast<int>(std::min<int64_t>(left, 8));
    alignas(32) float a[8], s[8], z[8];
    int64_t ch[8];
    for (int l = 0; l < 8; ++l) {  // lanes past r get valid (unused) channels
      ch[l] = c;
      a[l] = Q.inv[c];
      s[l] = Q.scale[c];
      z[l] = Q.zp[c];
      if (++o == inner) {
        o = 0;
        if (++c == C) c = 0;
      }
    }
    k.lanes(p, r, ch, _mm256_load_ps(a), _mm256_load_ps(s), _mm256_load_ps(z));
    p += r;
  }
}

// As walk, for Q.P > 0 and p a multiple of 8: the "channel" handed to k.contig / k.lanes is the
// position in the period (pos .. pos+7), whose parameters are contiguous in the periodic tables.
template <class K>
PYC_AVX2 void walk_periodic(K& k, int64_t p, int64_t end, const Quant& Q) {
  const int64_t P = Q.P;
  int64_t pos = p % P;  // a multiple of 8, as P is
  for (; end - p >= 8; p += 8) {
    k.contig(p, pos, _mm256_loadu_ps(Q.pinv + pos), _mm256_loadu_ps(Q.pscale + pos), _mm256_loadu_ps(Q.pzp + pos));
    pos += 8;
    if (pos == P) pos = 0;
  }
  if (p < end) {
    int64_t ch[8];
    for (int l = 0; l < 8; ++l) ch[l] = pos + l;
    k.lanes(p, static_cast<int>(end - p), ch, _mm256_loadu_ps(Q.pinv + pos), _mm256_loadu_ps(Q.pscale + pos),
            _mm256_loadu_ps(Q.pzp + pos));
  }
}

// Forward. Every vector starts at a multiple of 8 (tasks start at multiples of 32), so each vector
// owns one mask byte.
template <typename T, bool MASK>
struct FwdK {
  const T* x;
  T* out;
  uint8_t* mask;
  QV b;

  PYC_AVX2 inline uint8_t one(const T* xs, T* os, __m256 inv, __m256 s, __m256 zp) const {
    __m256 t, cl;
    store8(os, fq8(load8(xs), inv, s, zp, b, t, cl));
    return static_cast<uint8_t>(~_mm256_movemask_ps(cl));
  }
  PYC_AVX2 inline void run(int64_t p, int64_t nv, int64_t, __m256 inv, __m256 s, __m256 zp) {
    for (int64_t v = 0; v < nv; ++v, p += 8) {
      const uint8_t keep = one(x + p, out + p, inv, s, zp);
      if (MASK) mask[p >> 3] = keep;
    }
  }
  PYC_AVX2 inline void contig(int64_t p, int64_t c, __m256 inv, __m256 s, __m256 zp) { run(p, 1, c, inv, s, zp); }
  PYC_AVX2 inline void lanes(int64_t p, int r, const int64_t*, __m256 inv, __m256 s, __m256 zp) {
    if (r == 8) return run(p, 1, 0, inv, s, zp);
    T xb[8], ob[8];
    std::memset(static_cast<void*>(xb), 0, sizeof(xb));
    std::memcpy(static_cast<void*>(xb), x + p, r * sizeof(T));
    const uint8_t keep = one(xb, ob, inv, s, zp);
    std::memcpy(static_cast<void*>(out + p), ob, r * sizeof(T));
    if (MASK) mask[p >> 3] = keep & static_cast<uint8_t>((1u << r) - 1);
  }
};

// LSQ backward: grad_x and per-channel sums of the fp32 per-element terms, accumulated in fp64.
template <typename T>
struct LsqK {
  const T* g;
  const T* x;
  T* gx;
  double* acc_s;
  double* acc_z;
  QV b;

  PYC_AVX2 inline void one(const T* gs, const T* xs, T* gxs, __m256 inv, __m256 s, __m256 zp, __m256& ds,
                           __m256& dz) const {
    const __m256 xv = load8(xs), gv = load8(gs);
    __m256 t, cl;
    const __m256 out = fq8(xv, inv, s, zp, b, t, cl);
    keep8(gs, gxs, cl);
    const __m256 in_range = _mm256_mul_ps(_mm256_mul_ps(gv, _mm256_sub_ps(out, xv)), inv);
    ds = _mm256_blendv_ps(in_range, _mm256_mul_ps(gv, t), cl);
    dz = _mm256_and_ps(cl, _mm256_xor_ps(_mm256_mul_ps(gv, s), _mm256_set1_ps(-0.0f)));
  }
  PYC_AVX2 inline void run(int64_t p, int64_t nv, int64_t c, __m256 inv, __m256 s, __m256 zp) {
    // fp64 lanes: the per-element terms cancel (g has both signs), so fp32 running sums would lose
    // digits relative to the result; the two converts and adds per vector are cheap here.
    __m256d as0 = _mm256_setzero_pd(), as1 = as0, az0 = as0, az1 = as0;
    for (int64_t v = 0; v < nv; ++v, p += 8) {
      __m256 ds, dz;
      one(g + p, x + p, gx + p, inv, s, zp, ds, dz);
      as0 = _mm256_add_pd(as0, _mm256_cvtps_pd(_mm256_castps256_ps128(ds)));
      as1 = _mm256_add_pd(as1, _mm256_cvtps_pd(_mm256_extractf128_ps(ds, 1)));
      az0 = _mm256_add_pd(az0, _mm256_cvtps_pd(_mm256_castps256_ps128(dz)));
      az1 = _mm256_add_pd(az1, _mm256_cvtps_pd(_mm256_extractf128_ps(dz, 1)));
    }
    acc_s[c] += hsum_pd(_mm256_add_pd(as0, as1));
    acc_z[c] += hsum_pd(_mm256_add_pd(az0, az1));
  }
  PYC_AVX2 inline void add_pd8(double* a, __m256 v) {
    _mm256_storeu_pd(a, _mm256_add_pd(_mm256_loadu_pd(a), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
    _mm256_storeu_pd(a + 4, _mm256_add_pd(_mm256_loadu_pd(a + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
  }
  PYC_AVX2 inline void contig(int64_t p, int64_t c, __m256 inv, __m256 s, __m256 zp) {
    __m256 ds, dz;
    one(g + p, x + p, gx + p, inv, s, zp, ds, dz);
    add_pd8(acc_s + c, ds);
    add_pd8(acc_z + c, dz);
  }
  PYC_AVX2 inline void lanes(int64_t p, int r, const int64_t* ch, __m256 inv, __m256 s, __m256 zp) {
    alignas(32) float dsa[8], dza[8];
    __m256 ds, dz;
    if (r == 8) {
      one(g + p, x + p, gx + p, inv, s, zp, ds, dz);
    } else {
      T gb[8], xb[8], ob[8];
      std::memset(static_cast<void*>(gb), 0, sizeof(gb));
      std::memset(static_cast<void*>(xb), 0, sizeof(xb));
      std::memcpy(static_cast<void*>(gb), g + p, r * sizeof(T));
      std::memcpy(static_cast<void*>(xb), x + p, r * sizeof(T));
      one(gb, xb, ob, inv, s, zp, ds, dz);
      std::memcpy(static_cast<void*>(gx + p), ob, r * sizeof(T));
    }
    _mm256_store_ps(dsa, ds);
    _mm256_store_ps(dza, dz);
    for (int l = 0; l < r; ++l) {
      acc_s[ch[l]] += dsa[l];
      acc_z[ch[l]] += dza[l];
    }
  }
};

template <typename T, bool MASK>
PYC_AVX2 void fwd_avx2(const T* x, T* out, uint8_t* mask, int64_t b, int64_t e, const Quant& Q) {
  FwdK<T, MASK> k{x, out, mask, {_mm256_set1_ps(Q.qmin), _mm256_set1_ps(Q.qmax)}};
  if (Q.P > 0)
    walk_periodic(k, b, e, Q);
  else
    walk(k, b, e, Q);
}

// acc_s / acc_z are indexed by channel, or by period position when Q.P > 0.
template <typename T>
PYC_AVX2 void lsq_avx2(const T* g, const T* x, T* gx, double* acc_s, double* acc_z, int64_t b, int64_t e,
                       const Quant& Q) {
  LsqK<T> k{g, x, gx, acc_s, acc_z, {_mm256_set1_ps(Q.qmin), _mm256_set1_ps(Q.qmax)}};
  if (Q.P > 0)
    walk_periodic(k, b, e, Q);
  else
    walk(k, b, e, Q);
}

// Straight-through backward on raw bits: 32 elements (one mask word) per step, b a multiple of 32.
PYC_AVX2 void ste_avx2_32(const uint32_t* g, uint32_t* gx, const uint8_t* mask, int64_t b, int64_t e) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const __m256i bits = _mm256_set1_epi32(mask[i >> 3]);
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(bits, sel), sel);
    const __m256i gv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(gx + i), _mm256_and_si256(keep, gv));
  }
  for (; i < e; ++i) gx[i] = ((mask[i >> 3] >> (i & 7)) & 1) ? g[i] : 0u;
}

PYC_AVX2 void ste_avx2_16(const uint16_t* g, uint16_t* gx, const uint8_t* mask, int64_t b, int64_t e) {
  const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                        static_cast<short>(0x8000));
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    uint16_t word;
    std::memcpy(&word, mask + (i >> 3), 2);
    const __m256i bits = _mm256_set1_epi16(static_cast<short>(word));
    const __m256i keep = _mm256_cmpeq_epi16(_mm256_and_si256(bits, sel), sel);
    const __m256i gv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(gx + i), _mm256_and_si256(keep, gv));
  }
  for (; i < e; ++i) gx[i] = ((mask[i >> 3] >> (i & 7)) & 1) ? g[i] : uint16_t(0);
}

#endif  // PYC_X86

// ------------------------------------------------------------------------------------------------
// Dispatch helpers.

template <typename T, bool MASK>
void fwd_range(const T* x, T* out, uint8_t* mask, int64_t b, int64_t e, const Quant& Q) {
#if PYC_X86
  if (use_avx2()) return fwd_avx2<T, MASK>(x, out, mask, b, e, Q);
#endif
  fwd_scalar<T, MASK>(x, out, mask, b, e, Q);
}

template <typename T>
void lsq_range(const T* g, const T* x, T* gx, double* acc_s, double* acc_z, int64_t b, int64_t e, const Quant& Q) {
#if PYC_X86
  if (use_avx2()) return lsq_avx2<T>(g, x, gx, acc_s, acc_z, b, e, Q);
#endif
  lsq_scalar<T>(g, x, gx, acc_s, acc_z, b, e, Q);
}

Quant make_quant(const at::Tensor& inv_scale, const at::Tensor& scale, const at::Tensor& zero_point, int64_t C,
                 int64_t inner, int64_t n, int64_t qmin, int64_t qmax) {
  return Quant{inv_scale.data_ptr<float>(), scale.data_ptr<float>(), zero_point.data_ptr<float>(), C,
               C == 1 ? std::max<int64_t>(n, 1) : inner, static_cast<float>(qmin), static_cast<float>(qmax)};
}

using cpu::empty_output;


}  // namespace

// Forward: out = fake_quantize(x) (math in the header comment: fp32, rint half-to-even, cast once
// to x's dtype) and the packed keep-mask. x contiguous [outer, C, inner]. Parallel over
// 32-element mask words (tasks of >= kChunk elements, so a task owns whole words); AVX2 vectors
// of 8 lanes, one mask byte per vector from movemask. Per-tensor and long rows: broadcast
// parameters per row run; inner == 1: contiguous parameter loads; short periods: periodic tables.
std::tuple<at::Tensor, at::Tensor> fake_quantize_fwd_cpu(const at::Tensor& x, const at::Tensor& inv_scale,
                                                         const at::Tensor& scale, const at::Tensor& zero_point,
                                                         int64_t qmin, int64_t qmax, int64_t inner, bool with_mask) {
  const int64_t C = check_fake_quantize_args(x, inv_scale, scale, zero_point, qmin, qmax, inner);
  TORCH_CHECK(x.device().is_cpu(), "fake_quantize_fwd_cpu: x must be a CPU tensor");
  const int64_t n = x.numel();
  at::Tensor out = empty_output(x.sizes(), x.options());
  at::Tensor mask = at::empty({with_mask ? packed_mask_bytes(n) : 0}, x.options().dtype(at::kByte));
  if (n == 0) return {out, mask};
  Quant Q = make_quant(inv_scale, scale, zero_point, C, inner, n, qmin, qmax);
  PeriodicTables tables;
  if (use_avx2()) tables.attach(Q);
  uint8_t* mp = with_mask ? mask.data_ptr<uint8_t>() : nullptr;
  if (with_mask) {  // bytes past the last element's byte are padding and must be 0
    const int64_t used = (n + 7) / 8;
    std::memset(mp + used, 0, packed_mask_bytes(n) - used);
  }
  const int64_t words = (n + 31) / 32;
  PYC_DISPATCH_FLOATS(x.scalar_type(), "fake_quantize_fwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, words, kChunk / 32, [&](int64_t w0, int64_t w1) {
      const int64_t b = w0 * 32, e = std::min(n, w1 * 32);
      if (with_mask)
        fwd_range<scalar_t, true>(xp, op, mp, b, e, Q);
      else
        fwd_range<scalar_t, false>(xp, op, nullptr, b, e, Q);
    });
  });
  return {out, mask};
}

// Straight-through backward: grad_x[i] = bit i of the packed mask ? grad[i] : +0, done on the raw
// bits (no float conversion, bit-exact for any dtype). Parallel over mask words; AVX2 expands a
// mask byte (fp32, 8 lanes) or two (fp16/bf16, 16 lanes) into a lane mask with and + cmpeq.
at::Tensor fake_quantize_bwd_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  const auto dt = grad.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fake_quantize_bwd_cpu: grad must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(grad.device().is_cpu() && mask.device().is_cpu(), "fake_quantize_bwd_cpu: tensors must be on the CPU");
  TORCH_CHECK(grad.is_contiguous(), "fake_quantize_bwd_cpu: grad must be contiguous");
  const int64_t n = grad.numel();
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.numel() == packed_mask_bytes(n),
              "fake_quantize_bwd_cpu: mask must be contiguous uint8 with ", packed_mask_bytes(n), " bytes");
  at::Tensor gx = empty_output(grad.sizes(), grad.options());
  if (n == 0) return gx;
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t words = (n + 31) / 32;
  const bool wide = grad.element_size() == 4;
  const void* gp = grad.data_ptr();
  void* op = gx.data_ptr();
  at::parallel_for(0, words, kChunk / 32, [&](int64_t w0, int64_t w1) {
    const int64_t b = w0 * 32, e = std::min(n, w1 * 32);
#if PYC_X86
    if (use_avx2()) {
      if (wide)
        ste_avx2_32(static_cast<const uint32_t*>(gp), static_cast<uint32_t*>(op), mp, b, e);
      else
        ste_avx2_16(static_cast<const uint16_t*>(gp), static_cast<uint16_t*>(op), mp, b, e);
      return;
    }
#endif
    if (wide)
      ste_scalar(static_cast<const uint32_t*>(gp), static_cast<uint32_t*>(op), mp, b, e);
    else
      ste_scalar(static_cast<const uint16_t*>(gp), static_cast<uint16_t*>(op), mp, b, e);
  });
  return gx;
}

// LSQ backward: grad_x, and per channel sum(d_scale) * grad_factor, sum(d_zero) * grad_factor
// (per-element formulas in fake_quantize_ref.py, computed in fp32 exactly as the reference; the
// forward is recomputed from x). Sums accumulate in fp64; the final fp32 sum is multiplied by
// grad_factor in fp32 (as torch does for the reference's `sum * grad_factor`).
// Reproducible whatever the thread count: the work split depends only on the shape.
//   C == 1: fixed kChunk-element tasks, one fp64 partial pair per task, summed in task order.
//   short period (see Quant::P): fixed kChunk-element tasks, a [C] partial slice per task.
//   otherwise: tasks are (block of channels) x (block of outer rows); each writes fp64 partials for its
//          channels into its row block's [C] slice, and the slices are summed in row-block order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_bwd_learnable_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& inv_scale, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t qmin, int64_t qmax, int64_t inner, double grad_factor) {
  const int64_t C = check_fake_quantize_args(x, inv_scale, scale, zero_point, qmin, qmax, inner);
  TORCH_CHECK(x.device().is_cpu() && grad.device().is_cpu(), "fake_quantize_bwd_learnable_cpu: tensors must be on the CPU");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && grad.is_contiguous() && grad.numel() == x.numel(),
              "fake_quantize_bwd_learnable_cpu: grad must be contiguous with x's dtype and size");
  const int64_t n = x.numel();
  at::Tensor gx = empty_output(x.sizes(), x.options());
  const auto fopts = inv_scale.options();
  if (n == 0) return {gx, at::zeros({C}, fopts), at::zeros({C}, fopts)};
  Quant Q = make_quant(inv_scale, scale, zero_point, C, inner, n, qmin, qmax);
  PeriodicTables tables;
  if (use_avx2()) tables.attach(Q);

  std::vector<double> ps, pz;  // partials
  int64_t slices = 0;          // number of [C] slices (C > 1) or scalars (C == 1)
  PYC_DISPATCH_FLOATS(x.scalar_type(), "fake_quantize_bwd_learnable_cpu", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    if (C == 1) {
      slices = (n + kChunk - 1) / kChunk;
      ps.assign(slices, 0.0);
      pz.assign(slices, 0.0);
      at::parallel_for(0, slices, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          double s = 0.0, z = 0.0;
          lsq_range<scalar_t>(gp, xp, op, &s, &z, t * kChunk, std::min(n, (t + 1) * kChunk), Q);
          ps[t] = s;
          pz[t] = z;
        }
      });
      return;
    }
    const int64_t outer = n / (C * inner), M = C * inner;
    if (Q.P > 0) {
      // Short period: fixed element tasks with per-position fp64 sums, folded into per-task [C]
      // partials (C <= P is small).
      slices = (n + kChunk - 1) / kChunk;
      ps.assign(slices * C, 0.0);
      pz.assign(slices * C, 0.0);
      at::parallel_for(0, slices, 1, [&](int64_t t0, int64_t t1) {
        std::vector<double> as(Q.P), az(Q.P);
        for (int64_t t = t0; t < t1; ++t) {
          std::fill(as.begin(), as.end(), 0.0);
          std::fill(az.begin(), az.end(), 0.0);
          lsq_range<scalar_t>(gp, xp, op, as.data(), az.data(), t * kChunk, std::min(n, (t + 1) * kChunk), Q);
          for (int64_t k = 0; k < Q.P; ++k) {
            const int64_t c = (k % M) / inner;
            ps[t * C + c] += as[k];
            pz[t * C + c] += az[k];
          }
        }
      });
      return;
    }
    const int64_t cbs = std::min(C, std::max<int64_t>(1, kChunk / inner));  // channels per task
    const int64_t ncb = (C + cbs - 1) / cbs;
    int64_t rbs = std::min(outer, std::max<int64_t>(1, kChunk / (cbs * inner)));  // outer rows per task
    int64_t nrb = (outer + rbs - 1) / rbs;
    // Keep the partial buffer small (<= n/32 entries) when channels are many and rows short.
    if (nrb > 1 && nrb * C > std::max<int64_t>(n / 32, C)) {
      const int64_t want = std::max<int64_t>(1, n / (32 * C));
      rbs = (outer + want - 1) / want;
      nrb = (outer + rbs - 1) / rbs;
    }
    slices = nrb;
    ps.assign(nrb * C, 0.0);
    pz.assign(nrb * C, 0.0);
    at::parallel_for(0, ncb * nrb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t cb = t % ncb, rb = t / ncb;
        const int64_t c0 = cb * cbs, c1 = std::min(C, c0 + cbs);
        double* as = ps.data() + rb * C;
        double* az = pz.data() + rb * C;
        for (int64_t o = rb * rbs, oe = std::min(outer, (rb + 1) * rbs); o < oe; ++o)
          lsq_range<scalar_t>(gp, xp, op, as, az, o * M + c0 * inner, o * M + c1 * inner, Q);
      }
    });
  });

  at::Tensor d_scale = at::empty({C}, fopts), d_zero = at::empty({C}, fopts);
  float* dsp = d_scale.data_ptr<float>();
  float* dzp = d_zero.data_ptr<float>();
  const float gf = static_cast<float>(grad_factor);  // as torch: fp32 sum times the scalar in fp32
  if (C == 1) {
    double s = 0.0, z = 0.0;
    for (int64_t t = 0; t < slices; ++t) {
      s += ps[t];
      z += pz[t];
    }
    dsp[0] = static_cast<float>(s) * gf;
    dzp[0] = static_cast<float>(z) * gf;
  } else {
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0, z = 0.0;
      for (int64_t r = 0; r < slices; ++r) {
        s += ps[r * C + c];
        z += pz[r * C + c];
      }
      dsp[c] = static_cast<float>(s) * gf;
      dzp[c] = static_cast<float>(z) * gf;
    }
  }
  return {gx, d_scale, d_zero};
}

}  // namespace pycompress

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("_fake_quantize_fwd", &pycompress::fake_quantize_fwd_cpu);
  m.impl("_fake_quantize_bwd", &pycompress::fake_quantize_bwd_cpu);
  m.impl("_fake_quantize_bwd_learnable", &pycompress::fake_quantize_bwd_learnable_cpu);
}
