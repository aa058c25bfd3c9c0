// Fake quantization, CUDA kernels.
//
// Math (all backends, see pycompress/ops/fake_quantize_ref.py), in fp32 whatever x's dtype:
//   v = x * inv_scale[c]    __fmul_rn: one rounded product, never fused (the build also passes
//                           --fmad=false)
//   q = rintf(v) + zp[c]    rintf = cvt.rni: round half to even
//   qc = q < qmin ? qmin : (q > qmax ? qmax : q)   (ternaries, not fminf/fmaxf: a NaN q stays NaN)
//   out = (qc - zp[c]) * scale[c], cast once to x's dtype (RNE; bf16 rounding as c10::BFloat16)
// Layout: x contiguous, viewed as [outer, C, inner]; element i has channel (i / inner) % C.
// Packed mask: bit (i % 8) of byte (i / 8) = element i not clamped (NaN: not clamped); a warp
// writes whole 32-bit words, padding bits are 0.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_common.cuh"
#include "pycompress.h"

namespace pycompress {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xffffffffu;

// Element traits and 16-byte vectors (cuda_common.cuh).
using cuda::Elem;
using cuda::load16;
using cuda::store16;

// ------------------------------------------------------------------------------------------------
// Integer division by a run-time constant. DivU32: multiply-high magic (as PyTorch's IntDivider),
// exact for dividends < 2^31; Div64: plain division for tensors past that.

struct DivU32 {
  uint32_t d, m, s;
  explicit DivU32(int64_t divisor = 1) : d(static_cast<uint32_t>(divisor)) {
    for (s = 0; s < 32; ++s)
      if ((uint64_t(1) << s) >= d) break;
    const uint64_t one = 1;
    m = static_cast<uint32_t>(((one << 32) * ((one << s) - d)) / d + 1);
  }
  __device__ __forceinline__ uint64_t div(uint64_t n) const {
    const uint32_t n32 = static_cast<uint32_t>(n);
    return (__umulhi(n32, m) + n32) >> s;
  }
};
struct Div64 {
  uint64_t d;
  __host__ __device__ explicit Div64(int64_t divisor = 1) : d(static_cast<uint64_t>(divisor)) {}
  __device__ __forceinline__ uint64_t div(uint64_t n) const { return n / d; }
};

struct QP {
  const float* inv;
  const float* scale;
  const float* zp;
  float qmin, qmax;
  int64_t C, inner;
};

// Returns t = qc - zp (out = t * scale); clamped = q outside [qmin, qmax] (false for NaN).
__device__ __forceinline__ float quant1(float x, float inv, float zp, float qmin, float qmax, bool& clamped) {
  const float v = __fmul_rn(x, inv);
  const float q = __fadd_rn(rintf(v), zp);
  clamped = (q < qmin) || (q > qmax);
  const float qc = q < qmin ? qmin : (q > qmax ? qmax : q);
  return __fsub_rn(qc, zp);
}

// Channel of flat element e: (e / inner) % C, plus the offset inside its row.
template <class Div>
__device__ __forceinline__ void channel_of(uint64_t e, const QP& P, const Div& dinner, const Div& dC, int64_t& c,
                                           int64_t& off) {
  const uint64_t row = dinner.div(e);
  off = static_cast<int64_t>(e - row * static_cast<uint64_t>(P.inner));
  c = static_cast<int64_t>(row - dC.div(row) * static_cast<uint64_t>(P.C));
}

// Grid for a grid-stride kernel of kThreads-thread blocks (cuda_common.cuh).
template <typename Kernel>
int64_t grid_for(Kernel kernel, int64_t threads) {
  return cuda::resident_grid(kernel, threads, kThreads);
}

// ------------------------------------------------------------------------------------------------
// Forward, vector path (x and out 16-byte aligned).
// A warp owns a tile of 32*V consecutive elements (V = 4 fp32 / 8 fp16|bf16), lane l the V at
// l*V: one 16-byte load and store per lane. The V keep bits of a lane are ORed across the 32/V
// lanes of each mask word with xor-shuffles; grid-stride over tiles with a grid sized to the GPU.
template <typename T, bool PC, bool MASK, class Div>
__global__ void __launch_bounds__(kThreads) fq_fwd_vec_kernel(const T* __restrict__ xp, T* __restrict__ outp,
                                                              uint32_t* __restrict__ mask, int64_t n, QP P,
                                                              Div dinner, Div dC) {
  using E = Elem<T>;
  using R = typename E::raw;
  constexpr int V = E::V;
  constexpr int LPW = 32 / V;  // lanes per mask word
  const R* x = reinterpret_cast<const R*>(xp);
  R* out = reinterpret_cast<R*>(outp);
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t ntiles = (n + 32 * V - 1) / (32 * V);
  const int64_t nwords = (n + 31) / 32;
  float inv = 0.f, sc = 0.f, zp = 0.f;
  if (!PC) {
    inv = __ldg(P.inv);
    sc = __ldg(P.scale);
    zp = __ldg(P.zp);
  }
  for (int64_t tile = warp; tile < ntiles; tile += nwarps) {
    const int64_t e0 = tile * (32 * V) + lane * V;
    const bool full = e0 + V <= n;
    R xr[V];
    if (full) {
      load16<R, V>(x + e0, xr);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) xr[j] = e0 + j < n ? x[e0 + j] : R(0);
    }
    int64_t c = 0, off = 0;
    if (PC) {
      channel_of(static_cast<uint64_t>(e0), P, dinner, dC, c, off);
      inv = __ldg(P.inv + c);
      sc = __ldg(P.scale + c);
      zp = __ldg(P.zp + c);
    }
    R orr[V];
    uint32_t bits = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      bool cl;
      const float t = quant1(E::to_f(xr[j]), inv, zp, P.qmin, P.qmax, cl);
      orr[j] = E::from_f(__fmul_rn(t, sc));
      bits |= static_cast<uint32_t>(!cl && e0 + j < n) << j;
      if (PC && j + 1 < V && ++off == P.inner) {  // next element starts a new row
        off = 0;
        c = c + 1 == P.C ? 0 : c + 1;
        inv = __ldg(P.inv + c);
        sc = __ldg(P.scale + c);
        zp = __ldg(P.zp + c);
      }
    }
    if (full) {
      store16<R, V>(out + e0, orr);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (e0 + j < n) out[e0 + j] = orr[j];
    }
    if (MASK) {
      uint32_t w = bits << ((lane % LPW) * V);
#pragma unroll
      for (int o = 1; o < LPW; o <<= 1) w |= __shfl_xor_sync(kFull, w, o);
      const int64_t word = tile * V + lane / LPW;
      if (lane % LPW == 0 && word < nwords) mask[word] = w;
    }
  }
}

// Forward, scalar path (x not 16-byte aligned): a warp owns one 32-element mask word per step,
// lane l element 32*w + l, and __ballot_sync builds the word.
template <typename T, bool PC, bool MASK>
__global__ void __launch_bounds__(kThreads) fq_fwd_scalar_kernel(const T* __restrict__ xp, T* __restrict__ outp,
                                                                 uint32_t* __restrict__ mask, int64_t n, QP P) {
  using E = Elem<T>;
  using R = typename E::raw;
  const R* x = reinterpret_cast<const R*>(xp);
  R* out = reinterpret_cast<R*>(outp);
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t nwords = (n + 31) / 32;
  const Div64 dinner(P.inner), dC(P.C);
  for (int64_t w = warp; w < nwords; w += nwarps) {
    const int64_t e = w * 32 + lane;
    const bool valid = e < n;
    int64_t c = 0, off;
    if (PC) channel_of(static_cast<uint64_t>(e), P, dinner, dC, c, off);
    bool cl = true;
    if (valid) {
      const float t = quant1(E::to_f(x[e]), __ldg(P.inv + c), __ldg(P.zp + c), P.qmin, P.qmax, cl);
      out[e] = E::from_f(__fmul_rn(t, __ldg(P.scale + c)));
    }
    const uint32_t word = __ballot_sync(kFull, !cl);
    if (MASK && lane == 0) mask[w] = word;
  }
}

// ------------------------------------------------------------------------------------------------
// Straight-through backward: grad_x = mask bit ? grad : +0 on raw bits. Vector path: V elements
// (one 16-byte load/store) per step whose V bits sit in one mask byte.
template <typename R>
__global__ void __launch_bounds__(kThreads) ste_vec_kernel(const R* __restrict__ g, R* __restrict__ gx,
                                                           const uint8_t* __restrict__ mask, int64_t n) {
  constexpr int V = 16 / sizeof(R);
  const int64_t nv = n / V;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nv; v += stride) {
    const int64_t e0 = v * V;
    const uint32_t bits = static_cast<uint32_t>(__ldg(mask + (e0 >> 3))) >> (e0 & 7);
    R r[V];
    load16<R, V>(g + e0, r);
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (!((bits >> j) & 1u)) r[j] = R(0);
    store16<R, V>(gx + e0, r);
  }
  for (int64_t e = nv * V + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride)
    gx[e] = ((__ldg(mask + (e >> 3)) >> (e & 7)) & 1) ? g[e] : R(0);
}

template <typename R>
__global__ void __launch_bounds__(kThreads) ste_scalar_kernel(const R* __restrict__ g, R* __restrict__ gx,
                                                              const uint8_t* __restrict__ mask, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride)
    gx[e] = ((__ldg(mask + (e >> 3)) >> (e & 7)) & 1) ? g[e] : R(0);
}

// ------------------------------------------------------------------------------------------------
// LSQ backward. Per element (fp32, as the reference):
//   in range: grad_x = g, d_scale = g * (out - x) * inv_scale, d_zero = 0
//   clamped:  grad_x = 0, d_scale = g * (qc - zp),             d_zero = -g * scale
// Sums: each thread adds its fp32 terms into fp64, a block reduces in fp64 in a fixed tree and
// writes one partial; a finalize kernel sums a channel's partials in a fixed order. No atomics, so
// the result is reproducible for a given GPU model (the grid depends on the SM count).

struct LsqTerm {
  float ds, dz;
  bool clamped;
};

__device__ __forceinline__ LsqTerm lsq1(float g, float x, float inv, float sc, float zp, float qmin, float qmax) {
  LsqTerm r;
  const float t = quant1(x, inv, zp, qmin, qmax, r.clamped);
  if (r.clamped) {
    r.ds = __fmul_rn(g, t);
    r.dz = -__fmul_rn(g, sc);
  } else {
    const float out = __fmul_rn(t, sc);
    r.ds = __fmul_rn(__fmul_rn(g, __fsub_rn(out, x)), inv);
    r.dz = 0.f;
  }
  return r;
}

// Sums (a, b) over the block; the result is valid in thread 0. blockDim.x is a multiple of 32.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double sa[32], sb[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(kFull, a, o);
    b += __shfl_down_sync(kFull, b, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x >> 5;
    a = lane < nw ? sa[lane] : 0.0;
    b = lane < nw ? sb[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      a += __shfl_down_sync(kFull, a, o);
      b += __shfl_down_sync(kFull, b, o);
    }
  }
}

// V terms of one vector, raw grad_x out; returns the fp32 sums of the V terms.
template <typename T>
__device__ __forceinline__ void lsq_vec(const typename Elem<T>::raw (&gr)[Elem<T>::V],
                                        const typename Elem<T>::raw (&xr)[Elem<T>::V],
                                        typename Elem<T>::raw (&gxr)[Elem<T>::V], float inv, float sc, float zp,
                                        float qmin, float qmax, double& as, double& az) {
  using E = Elem<T>;
  float s = 0.f, z = 0.f;
#pragma unroll
  for (int j = 0; j < E::V; ++j) {
    const LsqTerm t = lsq1(E::to_f(gr[j]), E::to_f(xr[j]), inv, sc, zp, qmin, qmax);
    gxr[j] = t.clamped ? typename E::raw(0) : gr[j];
    s = __fadd_rn(s, t.ds);
    z = __fadd_rn(z, t.dz);
  }
  as += s;
  az += z;
}

// Per-tensor: flat grid-stride over vectors (VEC: g, x, grad_x all 16-byte aligned), then the
// < V tail element-wise; one partial per block.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) lsq_flat_kernel(const T* __restrict__ gp, const T* __restrict__ xp,
                                                            T* __restrict__ gxp, double* __restrict__ part_s,
                                                            double* __restrict__ part_z, int64_t n, QP P) {
  using E = Elem<T>;
  using R = typename E::raw;
  constexpr int V = E::V;
  const R* g = reinterpret_cast<const R*>(gp);
  const R* x = reinterpret_cast<const R*>(xp);
  R* gx = reinterpret_cast<R*>(gxp);
  const float inv = __ldg(P.inv), sc = __ldg(P.scale), zp = __ldg(P.zp);
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  double as = 0.0, az = 0.0;
  int64_t done = 0;
  if (VEC) {
    const int64_t nv = n / V;
    for (int64_t v = tid; v < nv; v += stride) {
      R gr[V], xr[V], gxr[V];
      load16<R, V>(g + v * V, gr);
      load16<R, V>(x + v * V, xr);
      lsq_vec<T>(gr, xr, gxr, inv, sc, zp, P.qmin, P.qmax, as, az);
      store16<R, V>(gx + v * V, gxr);
    }
    done = nv * V;
  }
  for (int64_t e = done + tid; e < n; e += stride) {
    const LsqTerm t = lsq1(E::to_f(g[e]), E::to_f(x[e]), inv, sc, zp, P.qmin, P.qmax);
    gx[e] = t.clamped ? R(0) : g[e];
    as += t.ds;
    az += t.dz;
  }
  block_sum2(as, az);
  if (threadIdx.x == 0) {
    part_s[blockIdx.x] = as;
    part_z[blockIdx.x] = az;
  }
}

// Per-channel, rows of >= 32 bytes: block b handles channel c = b / S and the s = b % S-th slice of
// that channel's outer*inner elements (rows of `inner` contiguous elements, C*inner apart),
// in units of U elements (U = V when VEC: inner % V == 0 and the pointers aligned, else 1).
// Writes part[c * S + s].
template <typename T, bool VEC, class Div>
__global__ void __launch_bounds__(kThreads) lsq_rows_kernel(const T* __restrict__ gp, const T* __restrict__ xp,
                                                            T* __restrict__ gxp, double* __restrict__ part_s,
                                                            double* __restrict__ part_z, int64_t units_per_row,
                                                            int64_t units, int S, QP P, Div drow) {
  using E = Elem<T>;
  using R = typename E::raw;
  constexpr int U = VEC ? E::V : 1;
  const R* g = reinterpret_cast<const R*>(gp);
  const R* x = reinterpret_cast<const R*>(xp);
  R* gx = reinterpret_cast<R*>(gxp);
  const int64_t c = blockIdx.x / S, s = blockIdx.x % S;
  const float inv = __ldg(P.inv + c), sc = __ldg(P.scale + c), zp = __ldg(P.zp + c);
  const int64_t begin = units * s / S, end = units * (s + 1) / S;
  double as = 0.0, az = 0.0;
  for (int64_t u = begin + threadIdx.x; u < end; u += blockDim.x) {
    const int64_t o = static_cast<int64_t>(drow.div(static_cast<uint64_t>(u)));
    const int64_t e0 = (o * P.C + c) * P.inner + (u - o * units_per_row) * U;
    if constexpr (VEC) {
      R gr[U], xr[U], gxr[U];
      load16<R, U>(g + e0, gr);
      load16<R, U>(x + e0, xr);
      lsq_vec<T>(gr, xr, gxr, inv, sc, zp, P.qmin, P.qmax, as, az);
      store16<R, U>(gx + e0, gxr);
    } else {
      const LsqTerm t = lsq1(E::to_f(g[e0]), E::to_f(x[e0]), inv, sc, zp, P.qmin, P.qmax);
      gx[e0] = t.clamped ? R(0) : g[e0];
      as += t.ds;
      az += t.dz;
    }
  }
  block_sum2(as, az);
  if (threadIdx.x == 0) {
    part_s[blockIdx.x] = as;
    part_z[blockIdx.x] = az;
  }
}

// Per-channel, short rows: x seen as rows of W = G*C*inner columns (G whole periods so that W is
// wide enough to coalesce); column j always has channel (j % (C*inner)) / inner. Thread (column j,
// row slice s) sums its column over the slice's rows: part[s * W + j]. Coalesced scalar accesses.
template <typename T>
__global__ void __launch_bounds__(kThreads) lsq_cols_kernel(const T* __restrict__ gp, const T* __restrict__ xp,
                                                            T* __restrict__ gxp, double* __restrict__ part_s,
                                                            double* __restrict__ part_z, int64_t n, int64_t W,
                                                            int64_t rows, QP P) {
  using E = Elem<T>;
  using R = typename E::raw;
  const R* g = reinterpret_cast<const R*>(gp);
  const R* x = reinterpret_cast<const R*>(xp);
  R* gx = reinterpret_cast<R*>(gxp);
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= W) return;  // no block-level sync below
  const int64_t S = gridDim.y, s = blockIdx.y;
  const int64_t c = (j % (P.C * P.inner)) / P.inner;
  const float inv = __ldg(P.inv + c), sc = __ldg(P.scale + c), zp = __ldg(P.zp + c);
  double as = 0.0, az = 0.0;
  for (int64_t r = rows * s / S, re = rows * (s + 1) / S; r < re; ++r) {
    const int64_t e = r * W + j;
    if (e >= n) break;
    const LsqTerm t = lsq1(E::to_f(g[e]), E::to_f(x[e]), inv, sc, zp, P.qmin, P.qmax);
    gx[e] = t.clamped ? R(0) : g[e];
    as += t.ds;
    az += t.dz;
  }
  part_s[s * W + j] = as;
  part_z[s * W + j] = az;
}

// One block per channel: sums that channel's partials in a fixed order, then (as torch) the fp32
// sum times grad_factor in fp32.
//   cols == false: partials part[c * S + k], k < S
//   cols == true:  partials part[s * W + g * M + c * inner + k], s < S, g < G, k < inner
__global__ void __launch_bounds__(kThreads) lsq_finalize_kernel(const double* __restrict__ part_s,
                                                                const double* __restrict__ part_z, bool cols,
                                                                int64_t S, int64_t W, int64_t M, int64_t G,
                                                                int64_t inner, float grad_factor,
                                                                float* __restrict__ d_scale,
                                                                float* __restrict__ d_zero) {
  const int64_t c = blockIdx.x;
  const int64_t count = cols ? S * G * inner : S;
  double a = 0.0, b = 0.0;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    int64_t idx;
    if (cols) {
      const int64_t s = k / (G * inner), rem = k - s * (G * inner);
      const int64_t gi = rem / inner, ki = rem - gi * inner;
      idx = s * W + gi * M + c * inner + ki;
    } else {
      idx = c * S + k;
    }
    a += part_s[idx];
    b += part_z[idx];
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    d_scale[c] = __fmul_rn(static_cast<float>(a), grad_factor);
    d_zero[c] = __fmul_rn(static_cast<float>(b), grad_factor);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

using cuda::aligned;

QP make_qp(const at::Tensor& inv_scale, const at::Tensor& scale, const at::Tensor& zero_point, int64_t C,
           int64_t inner, int64_t qmin, int64_t qmax) {
  return QP{inv_scale.data_ptr<float>(), scale.data_ptr<float>(), zero_point.data_ptr<float>(),
            static_cast<float>(qmin),     static_cast<float>(qmax),  C, inner};
}


template <typename T, bool PC, bool MASK>
void launch_fwd(const T* x, T* out, uint32_t* mask, int64_t n, const QP& P, cudaStream_t stream) {
  constexpr int V = Elem<T>::V;
  if (aligned(x, 16) && aligned(out, 16)) {
    const int64_t threads = ((n + 32 * V - 1) / (32 * V)) * 32;
    // Magic division needs every dividend (element index, row index) < 2^31.
    if (n + 32 * V < (int64_t(1) << 31)) {
      auto k = fq_fwd_vec_kernel<T, PC, MASK, DivU32>;
      k<<<grid_for(k, threads), kThreads, 0, stream>>>(x, out, mask, n, P, DivU32(P.inner), DivU32(P.C));
    } else {
      auto k = fq_fwd_vec_kernel<T, PC, MASK, Div64>;
      k<<<grid_for(k, threads), kThreads, 0, stream>>>(x, out, mask, n, P, Div64(P.inner), Div64(P.C));
    }
  } else {
    auto k = fq_fwd_scalar_kernel<T, PC, MASK>;
    k<<<grid_for(k, ((n + 31) / 32) * 32), kThreads, 0, stream>>>(x, out, mask, n, P);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fake_quantize_fwd_cuda(const at::Tensor& x, const at::Tensor& inv_scale,
                                                          const at::Tensor& scale, const at::Tensor& zero_point,
                                                          int64_t qmin, int64_t qmax, int64_t inner, bool with_mask) {
  const int64_t C = check_fake_quantize_args(x, inv_scale, scale, zero_point, qmin, qmax, inner);
  TORCH_CHECK(x.is_cuda(), "fake_quantize_fwd_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor mask = at::empty({with_mask ? packed_mask_bytes(n) : 0}, x.options().dtype(at::kByte));
  if (n == 0) return {out, mask};
  const QP P = make_qp(inv_scale, scale, zero_point, C, C == 1 ? 1 : inner, qmin, qmax);
  uint32_t* mp = with_mask ? reinterpret_cast<uint32_t*>(mask.data_ptr<uint8_t>()) : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYC_DISPATCH_FLOATS(x.scalar_type(), "fake_quantize_fwd_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (C == 1) {
      if (with_mask)
        launch_fwd<scalar_t, false, true>(xp, op, mp, n, P, stream);
      else
        launch_fwd<scalar_t, false, false>(xp, op, mp, n, P, stream);
    } else {
      if (with_mask)
        launch_fwd<scalar_t, true, true>(xp, op, mp, n, P, stream);
      else
        launch_fwd<scalar_t, true, false>(xp, op, mp, n, P, stream);
    }
  });
  return {out, mask};
}

at::Tensor fake_quantize_bwd_cuda(const at::Tensor& grad, const at::Tensor& mask) {
  const auto dt = grad.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fake_quantize_bwd_cuda: grad must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(grad.is_cuda() && mask.device() == grad.device(), "fake_quantize_bwd_cuda: tensors must be on one GPU");
  TORCH_CHECK(grad.is_contiguous(), "fake_quantize_bwd_cuda: grad must be contiguous");
  const int64_t n = grad.numel();
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.numel() == packed_mask_bytes(n),
              "fake_quantize_bwd_cuda: mask must be contiguous uint8 with ", packed_mask_bytes(n), " bytes");
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor gx = at::empty(grad.sizes(), grad.options());
  if (n == 0) return gx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const bool vec = aligned(grad.data_ptr(), 16) && aligned(gx.data_ptr(), 16);
  auto run = [&](auto tag) {
    using R = decltype(tag);
    const R* g = static_cast<const R*>(grad.data_ptr());
    R* o = static_cast<R*>(gx.data_ptr());
    if (vec) {
      constexpr int V = 16 / sizeof(R);
      auto k = ste_vec_kernel<R>;
      k<<<grid_for(k, std::max<int64_t>(n / V, 1)), kThreads, 0, stream>>>(g, o, mp, n);
    } else {
      auto k = ste_scalar_kernel<R>;
      k<<<grid_for(k, n), kThreads, 0, stream>>>(g, o, mp, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (grad.element_size() == 4)
    run(uint32_t{});
  else
    run(uint16_t{});
  return gx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_bwd_learnable_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& inv_scale, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t qmin, int64_t qmax, int64_t inner, double grad_factor) {
  const int64_t C = check_fake_quantize_args(x, inv_scale, scale, zero_point, qmin, qmax, inner);
  TORCH_CHECK(x.is_cuda() && grad.device() == x.device(), "fake_quantize_bwd_learnable_cuda: tensors must be on one GPU");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && grad.is_contiguous() && grad.numel() == x.numel(),
              "fake_quantize_bwd_learnable_cuda: grad must be contiguous with x's dtype and size");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  at::Tensor gx = at::empty(x.sizes(), x.options());
  const auto fopts = inv_scale.options();
  if (n == 0) return {gx, at::zeros({C}, fopts), at::zeros({C}, fopts)};
  at::Tensor d_scale = at::empty({C}, fopts), d_zero = at::empty({C}, fopts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float gf = static_cast<float>(grad_factor);
  const int64_t target_blocks = int64_t(cuda::sm_count()) * (2048 / kThreads) * 2;
  const auto dopts = x.options().dtype(at::kDouble);

  PYC_DISPATCH_FLOATS(x.scalar_type(), "fake_quantize_bwd_learnable_cuda", [&] {
    using E = Elem<scalar_t>;
    constexpr int V = E::V;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    const bool ptrs_aligned = aligned(gp, 16) && aligned(xp, 16) && aligned(op, 16);
    if (C == 1) {
      const QP P = make_qp(inv_scale, scale, zero_point, 1, 1, qmin, qmax);
      auto k = ptrs_aligned ? lsq_flat_kernel<scalar_t, true> : lsq_flat_kernel<scalar_t, false>;
      const int64_t blocks = grid_for(k, std::max<int64_t>(1, ptrs_aligned ? n / V : n));
      at::Tensor ps = at::empty({blocks}, dopts), pz = at::empty({blocks}, dopts);
      k<<<blocks, kThreads, 0, stream>>>(gp, xp, op, ps.data_ptr<double>(), pz.data_ptr<double>(), n, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      lsq_finalize_kernel<<<1, kThreads, 0, stream>>>(ps.data_ptr<double>(), pz.data_ptr<double>(), false, blocks,
                                                      0, 0, 0, 1, gf, d_scale.data_ptr<float>(),
                                                      d_zero.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const QP P = make_qp(inv_scale, scale, zero_point, C, inner, qmin, qmax);
    const int64_t outer = n / (C * inner), M = C * inner;
    if (inner * static_cast<int64_t>(sizeof(scalar_t)) >= 32) {
      // Rows of at least one 32-byte sector: one channel per block.
      const bool vec = ptrs_aligned && inner % V == 0;
      const int64_t U = vec ? V : 1;
      const int64_t units_per_row = inner / U, units = outer * units_per_row;
      // Blocks per channel: enough blocks for the GPU, each thread still doing >= 4 units.
      const int64_t S = std::max<int64_t>(
          1, std::min<int64_t>((target_blocks + C - 1) / C, (units + 4 * kThreads - 1) / (4 * kThreads)));
      TORCH_CHECK(C * S < (int64_t(1) << 31), "fake_quantize_bwd_learnable_cuda: too many channels");
      at::Tensor ps = at::empty({C * S}, dopts), pz = at::empty({C * S}, dopts);
      const bool small = units < (int64_t(1) << 31);
      auto launch = [&](auto vec_tag, auto div) {
        constexpr bool VEC = decltype(vec_tag)::value;
        using D = decltype(div);
        lsq_rows_kernel<scalar_t, VEC, D><<<C * S, kThreads, 0, stream>>>(
            gp, xp, op, ps.data_ptr<double>(), pz.data_ptr<double>(), units_per_row, units, static_cast<int>(S), P,
            div);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec) {
        if (small)
          launch(std::true_type{}, DivU32(units_per_row));
        else
          launch(std::true_type{}, Div64(units_per_row));
      } else {
        if (small)
          launch(std::false_type{}, DivU32(units_per_row));
        else
          launch(std::false_type{}, Div64(units_per_row));
      }
      lsq_finalize_kernel<<<C, kThreads, 0, stream>>>(ps.data_ptr<double>(), pz.data_ptr<double>(), false, S, 0, 0,
                                                      0, 1, gf, d_scale.data_ptr<float>(), d_zero.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      // Short rows: columns of a [rows, W] view, W a whole number of [C, inner] periods >= 512.
      const int64_t G = std::max<int64_t>(1, std::min<int64_t>((512 + M - 1) / M, outer));
      const int64_t W = G * M;
      const int64_t rows = (n + W - 1) / W;
      const int64_t col_blocks = (W + kThreads - 1) / kThreads;
      // Row slices: fill the GPU, but keep >= 8 rows per thread and the partials small.
      const int64_t S = std::max<int64_t>(
          1, std::min<int64_t>({(target_blocks + col_blocks - 1) / col_blocks, (rows + 7) / 8, int64_t(65535)}));
      TORCH_CHECK(col_blocks < (int64_t(1) << 31), "fake_quantize_bwd_learnable_cuda: tensor too large");
      at::Tensor ps = at::empty({S * W}, dopts), pz = at::empty({S * W}, dopts);
      const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(S));
      lsq_cols_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(gp, xp, op, ps.data_ptr<double>(),
                                                               pz.data_ptr<double>(), n, W, rows, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      lsq_finalize_kernel<<<C, kThreads, 0, stream>>>(ps.data_ptr<double>(), pz.data_ptr<double>(), true, S, W, M,
                                                      G, inner, gf, d_scale.data_ptr<float>(),
                                                      d_zero.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, d_scale, d_zero};
}

}  // namespace pycompress

TORCH_LIBRARY_IMPL(pycompress, CUDA, m) {
  m.impl("_fake_quantize_fwd", &pycompress::fake_quantize_fwd_cuda);
  m.impl("_fake_quantize_bwd", &pycompress::fake_quantize_bwd_cuda);
  m.impl("_fake_quantize_bwd_learnable", &pycompress::fake_quantize_bwd_learnable_cuda);
}
