// Depthwise 2-D convolution, CUDA kernels: forward with the fused per-channel affine + activation
// epilogue, backward to the input, backward to the weight (and bias).
//
// Math (pycompress/ops/depthwise_ref.py): fp32 accumulation whatever the dtype,
//   y = act(conv(x, w)[n, c, i, j] * scale[c] + shift[c])  (__fmul_rn then __fadd_rn in the
// epilogue; the build also passes --fmad=false), stored once in x's dtype (RNE).
//
// NCHW (forward and backward to the input): one "plane convolution" kernel. A block owns a tile of
// TH x TW outputs of PB planes (PB > 1 packs several small planes into one block); it stages the
// tile's zero-padded input window in shared memory as fp32 (coalesced loads, 4 in flight per
// thread), then each thread computes RY = 4 outputs of one column: with a 3x3 / 5x5 kernel,
// dilation 1 (compile-time), it slides down the window so each shared-memory row is read once for
// the RY outputs (4.5 reads per output for 3x3 instead of 9); warps span consecutive columns, so
// shared reads are conflict free (stride 1) and global stores coalesced. The backward to the input
// is the same kernel over grad_out zero-upsampled by the stride (the zeros are never loaded) with
// the kernel flipped. Windows too large for shared memory (huge dilations) use a direct kernel.
// NHWC: threads over channels (coalesced), each computing PX = 4 consecutive output columns of one
// row from one register window per kernel row (3x3 / 5x5, dilation 1); other cases and the
// backward to the input use a per-output kernel with the taps checked.
// Weight gradient: deterministic, no atomics. Stage 1: block (channel [block], chunk s) sums
// grad_out x input tap over a fixed chunk of the batch's outputs (the chunking depends only on the
// shapes), per-thread fp32 partials reduced in shared memory in a fixed order, one fp32 partial per
// (channel, chunk, tap). Stage 2: one thread per (channel, tap) adds the chunk partials in order in
// fp64. The result is bit-identical run to run and GPU to GPU.
//
// The kernels between "core: begin" and "core: end" use only CUDA built-ins a CPU shim can provide
// (threadIdx, blockIdx, blockDim, __syncthreads, shared memory, fmaf), so their index logic can be
// exercised on a machine without a GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "cuda_common.cuh"
#include "pycompress.h"

namespace pycompress {
namespace {

using cuda::check_cuda;
using cuda::Elem;

// Element load (read-only path) / store with the fp32 conversion (fp16 / bf16: cuda::Elem).
__device__ __forceinline__ float ld_f(const float* p) { return __ldg(p); }
template <typename T>
__device__ __forceinline__ float ld_f(const T* p) {
  return Elem<T>::to_f(__ldg(reinterpret_cast<const typename Elem<T>::raw*>(p)));
}
__device__ __forceinline__ void st_f(float* p, float v) { *p = v; }
template <typename T>
__device__ __forceinline__ void st_f(T* p, float v) {
  *reinterpret_cast<typename Elem<T>::raw*>(p) = Elem<T>::from_f(v);
}
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }

#define PYC_DYN_SMEM(name) extern __shared__ float name[]

// ===================================================================================== core: begin

constexpr int kThreads = 256;
constexpr int kRY = 4;  // output rows per thread (NCHW plane kernel)
constexpr int kPX = 4;  // output columns per thread (NHWC forward)

// act(z * s + b); NaN stays NaN (comparisons are false for NaN).
__device__ __forceinline__ float dw_epilogue(float z, float s, float b, int act) {
  z = add_rn(mul_rn(z, s), b);
  if (act >= 1 && z < 0.0f) z = 0.0f;
  if (act == 2 && z > 6.0f) z = 6.0f;
  return z;
}

// One plane convolution over a zero-padded (and possibly zero-upsampled) source plane, as in
// csrc/cpu/depthwise.cpp:
//   img(r, c) = src((r - top) / up_h, (c - left) / up_w) when exact and inside SH x SW, else 0
//   out(i, j) = sum_{a, b} w'[a][b] img(i sh + a dh, j sw + b dw), w' = w or w flipped
struct PlaneConv {
  long long NP;  // planes (N * C); plane p has channel p % C
  int C, SH, SW, up_h, up_w, top, left;
  int OH, OW, sh, sw, dh, dw, kh, kw, flip, act;
  // tiling (see plan_tiles)
  int TW, G, TH, PB, TR, TC, tiles_w, tiles;  // tiles: per plane (tiles_w per tile row)
};

// Stage the block's input windows (PB planes x TR x TC) in shared memory.
template <typename T>
__device__ __forceinline__ void stage_tile(const PlaneConv& P, const T* __restrict__ src, float* tile, long long p0,
                                           int oi0, int oj0) {
  const int per = P.TR * P.TC, total = per * P.PB;
  const int r0 = oi0 * P.sh - P.top, c0 = oj0 * P.sw - P.left;
  const long long plane = static_cast<long long>(P.SH) * P.SW;
  for (int e0 = threadIdx.x; e0 < total; e0 += 4 * blockDim.x) {
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int e = e0 + k * blockDim.x;
      v[k] = 0.0f;
      if (e < total) {
        const int pl = e / per, rem = e - pl * per;
        const int r = rem / P.TC, c = rem - r * P.TC;
        const int u = r0 + r, w = c0 + c;
        if (p0 + pl < P.NP && u >= 0 && w >= 0 && u % P.up_h == 0 && w % P.up_w == 0) {
          const int su = u / P.up_h, sv = w / P.up_w;
          if (su < P.SH && sv < P.SW) v[k] = ld_f(src + (p0 + pl) * plane + static_cast<long long>(su) * P.SW + sv);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int e = e0 + k * blockDim.x;
      if (e < total) tile[e] = v[k];
    }
  }
}

// K > 0: K x K kernel, stride SH_ rows, dilation 1, known at compile time (sliding window);
// K == 0: any kernel, read tap by tap.
template <int K, int SH_, typename T>
__global__ void __launch_bounds__(kThreads) plane_conv_kernel(const T* __restrict__ src, const float* __restrict__ w,
                                                              const float* __restrict__ scale,
                                                              const float* __restrict__ shift, T* __restrict__ out,
                                                              PlaneConv P) {
  PYC_DYN_SMEM(tile);
  // blocks run tile-fastest, so the tiles of a plane (sharing halo rows) are resident together
  const long long pb = blockIdx.x / P.tiles;
  const int tix = static_cast<int>(blockIdx.x - pb * P.tiles);
  const long long p0 = pb * P.PB;
  const int ty = tix / P.tiles_w, tx = tix - ty * P.tiles_w;
  const int oi0 = ty * P.TH, oj0 = tx * P.TW;
  stage_tile(P, src, tile, p0, oi0, oj0);
  __syncthreads();

  const int tid = threadIdx.x, per_plane = P.TW * P.G;
  const int pl = tid / per_plane, rem = tid - pl * per_plane;
  const int y = rem / P.TW, j = rem - y * P.TW;
  const long long p = p0 + pl;
  const int oj = oj0 + j;
  if (pl >= P.PB || p >= P.NP || oj >= P.OW) return;
  const int c = static_cast<int>(p % P.C);
  const int kk = P.kh * P.kw;
  const float s = scale != nullptr ? scale[c] : 1.0f;
  const float b = shift != nullptr ? shift[c] : -0.0f;  // z + -0.0 == z
  const float* tp = tile + pl * P.TR * P.TC + (y * kRY * P.sh) * P.TC + j * P.sw;
  float acc[kRY];
#pragma unroll
  for (int q = 0; q < kRY; ++q) acc[q] = 0.0f;
  if (K > 0) {
    float wr[K > 0 ? K * K : 1];
#pragma unroll
    for (int t = 0; t < K * K; ++t) wr[t] = w[c * kk + (P.flip ? K * K - 1 - t : t)];
#pragma unroll
    for (int rr = 0; rr < (kRY - 1) * SH_ + K; ++rr) {
      float v[K > 0 ? K : 1];
#pragma unroll
      for (int bb = 0; bb < K; ++bb) v[bb] = tp[rr * P.TC + bb];
#pragma unroll
      for (int q = 0; q < kRY; ++q) {
        const int a = rr - q * SH_;
        if (a >= 0 && a < K) {
#pragma unroll
          for (int bb = 0; bb < K; ++bb) acc[q] = fmaf(wr[a * K + bb], v[bb], acc[q]);
        }
      }
    }
  } else {
    for (int a = 0; a < P.kh; ++a)
      for (int bb = 0; bb < P.kw; ++bb) {
        const int t = a * P.kw + bb;
        const float wv = w[c * kk + (P.flip ? kk - 1 - t : t)];
        const float* tap = tp + a * P.dh * P.TC + bb * P.dw;
#pragma unroll
        for (int q = 0; q < kRY; ++q) acc[q] = fmaf(wv, tap[q * P.sh * P.TC], acc[q]);
      }
  }
  T* op = out + p * static_cast<long long>(P.OH) * P.OW + oj;
#pragma unroll
  for (int q = 0; q < kRY; ++q) {
    const int oi = oi0 + y * kRY + q;
    if (oi < P.OH) st_f(op + static_cast<long long>(oi) * P.OW, dw_epilogue(acc[q], s, b, P.act));
  }
}

// The same convolution without shared memory (windows that do not fit): one output per thread,
// taps read from global memory with bounds checks.
template <typename I, typename T>
__global__ void __launch_bounds__(kThreads) plane_conv_direct_kernel(const T* __restrict__ src,
                                                                     const float* __restrict__ w,
                                                                     const float* __restrict__ scale,
                                                                     const float* __restrict__ shift,
                                                                     T* __restrict__ out, PlaneConv P) {
  const I total = static_cast<I>(P.NP) * P.OH * P.OW;
  const int kk = P.kh * P.kw;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    const I p = e / (static_cast<I>(P.OH) * P.OW);
    const int rem = static_cast<int>(e - p * P.OH * P.OW);
    const int i = rem / P.OW, j = rem - i * P.OW;
    const int c = static_cast<int>(p % P.C);
    const T* sp = src + p * static_cast<long long>(P.SH) * P.SW;
    float acc = 0.0f;
    for (int a = 0; a < P.kh; ++a) {
      const int u = i * P.sh + a * P.dh - P.top;
      if (u < 0 || u % P.up_h != 0 || u / P.up_h >= P.SH) continue;
      for (int bb = 0; bb < P.kw; ++bb) {
        const int v = j * P.sw + bb * P.dw - P.left;
        if (v < 0 || v % P.up_w != 0 || v / P.up_w >= P.SW) continue;
        const int t = a * P.kw + bb;
        acc = fmaf(w[c * kk + (P.flip ? kk - 1 - t : t)], ld_f(sp + (u / P.up_h) * P.SW + v / P.up_w), acc);
      }
    }
    const float s = scale != nullptr ? scale[c] : 1.0f;
    const float b = shift != nullptr ? shift[c] : -0.0f;
    st_f(out + e, dw_epilogue(acc, s, b, P.act));
  }
}

// NHWC shapes and convolution parameters.
struct Nhwc {
  int N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, act;
};

// NHWC forward, K x K kernel, column stride SW_, dilation 1: thread = (n, i, block of kPX columns,
// channel c), channels fastest (coalesced). wT: fp32 [K * K][C].
// I: the index type of the grid-stride loop (int when the work fits: 64-bit division is slow).
template <int K, int SW_, typename I, typename T>
__global__ void __launch_bounds__(kThreads) nhwc_fwd_kernel(const T* __restrict__ x, const float* __restrict__ wT,
                                                            const float* __restrict__ scale,
                                                            const float* __restrict__ shift, T* __restrict__ y,
                                                            Nhwc D) {
  const int nJB = (D.Wo + kPX - 1) / kPX;
  const I total = static_cast<I>(D.N) * D.Ho * nJB * D.C;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(e % D.C);
    I r = e / D.C;
    const int jb = static_cast<int>(r % nJB);
    r /= nJB;
    const int i = static_cast<int>(r % D.Ho);
    const int n = static_cast<int>(r / D.Ho);
    const int j0 = jb * kPX;
    float acc[kPX];
#pragma unroll
    for (int q = 0; q < kPX; ++q) acc[q] = 0.0f;
    constexpr int NV = (kPX - 1) * SW_ + K;
    const int iw0 = j0 * SW_ - D.pw;
#pragma unroll
    for (int a = 0; a < K; ++a) {
      const int ih = i * D.sh - D.ph + a;
      if (ih < 0 || ih >= D.H) continue;
      const T* row = x + (static_cast<long long>(n) * D.H + ih) * D.W * D.C + c;
      float v[NV];
#pragma unroll
      for (int m = 0; m < NV; ++m) {
        const int iw = iw0 + m;
        v[m] = (iw >= 0 && iw < D.W) ? ld_f(row + static_cast<long long>(iw) * D.C) : 0.0f;
      }
      float wr[K];
#pragma unroll
      for (int bb = 0; bb < K; ++bb) wr[bb] = wT[(a * K + bb) * D.C + c];
#pragma unroll
      for (int q = 0; q < kPX; ++q)
#pragma unroll
        for (int bb = 0; bb < K; ++bb) acc[q] = fmaf(wr[bb], v[q * SW_ + bb], acc[q]);
    }
    const float s = scale != nullptr ? scale[c] : 1.0f;
    const float b = shift != nullptr ? shift[c] : -0.0f;
    T* op = y + ((static_cast<long long>(n) * D.Ho + i) * D.Wo + j0) * D.C + c;
#pragma unroll
    for (int q = 0; q < kPX; ++q)
      if (j0 + q < D.Wo) st_f(op + static_cast<long long>(q) * D.C, dw_epilogue(acc[q], s, b, D.act));
  }
}

// NHWC, any kernel: one output element per thread. Forward (TRANSPOSED = false: out [N, Ho, Wo, C]
// from src = x) or backward to the input (TRANSPOSED = true: out = grad_x [N, H, W, C] from
// src = grad_out, taps where (h + p - k d) / s is exact and inside).
template <bool TRANSPOSED, typename I, typename T>
__global__ void __launch_bounds__(kThreads) nhwc_gather_kernel(const T* __restrict__ src, const float* __restrict__ wT,
                                                               const float* __restrict__ scale,
                                                               const float* __restrict__ shift, T* __restrict__ out,
                                                               Nhwc D) {
  const int OH = TRANSPOSED ? D.H : D.Ho, OW = TRANSPOSED ? D.W : D.Wo;
  const int SH = TRANSPOSED ? D.Ho : D.H, SW = TRANSPOSED ? D.Wo : D.W;
  const I total = static_cast<I>(D.N) * OH * OW * D.C;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(e % D.C);
    I r = e / D.C;
    const int oj = static_cast<int>(r % OW);
    r /= OW;
    const int oi = static_cast<int>(r % OH);
    const int n = static_cast<int>(r / OH);
    float acc = 0.0f;
    for (int a = 0; a < D.kh; ++a) {
      int si;
      if (TRANSPOSED) {
        const int q = oi + D.ph - a * D.dh;
        if (q < 0 || q % D.sh != 0) continue;
        si = q / D.sh;
      } else {
        si = oi * D.sh - D.ph + a * D.dh;
      }
      if (si < 0 || si >= SH) continue;
      for (int bb = 0; bb < D.kw; ++bb) {
        int sj;
        if (TRANSPOSED) {
          const int q = oj + D.pw - bb * D.dw;
          if (q < 0 || q % D.sw != 0) continue;
          sj = q / D.sw;
        } else {
          sj = oj * D.sw - D.pw + bb * D.dw;
        }
        if (sj < 0 || sj >= SW) continue;
        acc = fmaf(wT[(a * D.kw + bb) * D.C + c],
                   ld_f(src + ((static_cast<long long>(n) * SH + si) * SW + sj) * D.C + c), acc);
      }
    }
    const float s = scale != nullptr ? scale[c] : 1.0f;
    const float b = shift != nullptr ? shift[c] : -0.0f;
    st_f(out + e, dw_epilogue(acc, s, b, D.act));
  }
}

// Weight gradient, stage 1. Chunks: the batch's N * Ho * Wo outputs (NCHW: of one channel; NHWC:
// pixels) split into S chunks of E (the last one shorter), fixed by the shapes.
// part[(c * S + s) * KB + t]: t < kk taps, t == kk the bias (KB = kk + 1).
struct Wgrad {
  int N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
  int S;
  long long E;
};

// Block-wide sums of KB per-thread values, in groups of 8 taps: every thread writes its 8 values,
// then thread k < 8 * 32 sums the 8-value segment (k % 32) of tap (k / 32) in order, then 8 threads
// sum the 32 segment sums in order. red: 8 * kThreads floats; seg: 8 * 32 floats.
template <int KB>
__device__ __forceinline__ void block_sums_nchw(const float (&acc)[KB], float* red, float* seg, float* dst) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int g0 = 0; g0 < KB; g0 += 8) {
#pragma unroll
    for (int t = 0; t < 8; ++t)
      if (g0 + t < KB) red[t * kThreads + tid] = acc[g0 + t < KB ? g0 + t : 0];
    __syncthreads();
    {
      const int t = tid / 32, sgm = tid % 32;  // kThreads == 8 * 32
      float s = 0.0f;
      if (g0 + t < KB)
        for (int k = 0; k < kThreads / 32; ++k) s += red[t * kThreads + sgm * (kThreads / 32) + k];
      seg[t * 32 + sgm] = s;
    }
    __syncthreads();
    if (tid < 8 && g0 + tid < KB) {
      float s = 0.0f;
      for (int k = 0; k < 32; ++k) s += seg[tid * 32 + k];
      dst[g0 + tid] = s;
    }
    __syncthreads();
  }
}

// NCHW stage 1: block (c, s); thread-strided over the chunk's outputs. K: kernel width known at
// compile time (1, 3, 5, 7; kh may be smaller), accumulators for K * K taps + bias.
template <int K, typename T>
__global__ void __launch_bounds__(kThreads) wgrad_nchw_kernel(const T* __restrict__ go, const T* __restrict__ x,
                                                              float* __restrict__ part, Wgrad D) {
  constexpr int KB = K * K + 1;
  __shared__ float red[8 * kThreads];
  __shared__ float seg[8 * 32];
  const int c = blockIdx.x, s = blockIdx.y;
  const long long plane_o = static_cast<long long>(D.Ho) * D.Wo, plane_i = static_cast<long long>(D.H) * D.W;
  const long long total = static_cast<long long>(D.N) * plane_o;
  const long long e0 = s * D.E, e1 = e0 + D.E < total ? e0 + D.E : total;
  float acc[KB];
#pragma unroll
  for (int t = 0; t < KB; ++t) acc[t] = 0.0f;
  // (n, rem) of e, advanced incrementally (no 64-bit division in the loop)
  long long e = e0 + threadIdx.x;
  int n = static_cast<int>(e / plane_o);
  long long rem = e - n * plane_o;
  for (; e < e1; e += blockDim.x) {
    const int i = static_cast<int>(rem / D.Wo), j = static_cast<int>(rem - static_cast<long long>(i) * D.Wo);
    const long long pc = static_cast<long long>(n) * D.C + c;
    const float g = ld_f(go + pc * plane_o + rem);
    const T* xp = x + pc * plane_i;
    acc[KB - 1] += g;
#pragma unroll
    for (int a = 0; a < K; ++a) {
      const int ih = i * D.sh - D.ph + a * D.dh;
      if (a >= D.kh || ih < 0 || ih >= D.H) continue;
#pragma unroll
      for (int bb = 0; bb < K; ++bb) {
        const int iw = j * D.sw - D.pw + bb * D.dw;
        if (bb < D.kw && iw >= 0 && iw < D.W)
          acc[a * K + bb] = fmaf(g, ld_f(xp + static_cast<long long>(ih) * D.W + iw), acc[a * K + bb]);
      }
    }
    rem += blockDim.x;
    while (rem >= plane_o) {
      rem -= plane_o;
      ++n;
    }
  }
  block_sums_nchw<KB>(acc, red, seg, part + (static_cast<long long>(c) * D.S + s) * KB);
}

// NHWC stage 1: block (32 channels, chunk s); thread (channel lane tid % 32, pixel lane tid / 32)
// walks the chunk's pixels 8 apart; the 8 pixel lanes of a channel are added in order.
template <int K, typename T>
__global__ void __launch_bounds__(kThreads) wgrad_nhwc_kernel(const T* __restrict__ go, const T* __restrict__ x,
                                                              float* __restrict__ part, Wgrad D) {
  constexpr int KB = K * K + 1;
  constexpr int LANES = kThreads / 32;
  __shared__ float red[8 * kThreads];
  const int cl = threadIdx.x % 32, pl = threadIdx.x / 32;
  const int c = blockIdx.x * 32 + cl, s = blockIdx.y;
  const long long total = static_cast<long long>(D.N) * D.Ho * D.Wo;
  const long long e0 = s * D.E, e1 = e0 + D.E < total ? e0 + D.E : total;
  float acc[KB];
#pragma unroll
  for (int t = 0; t < KB; ++t) acc[t] = 0.0f;
  if (c < D.C) {
    const int plane = D.Ho * D.Wo;
    long long e = e0 + pl;
    int n = static_cast<int>(e / plane);
    int rem = static_cast<int>(e - static_cast<long long>(n) * plane);
    for (; e < e1; e += LANES) {
      const int i = rem / D.Wo, j = rem - i * D.Wo;
      const float g = ld_f(go + e * D.C + c);
      acc[KB - 1] += g;
#pragma unroll
      for (int a = 0; a < K; ++a) {
        const int ih = i * D.sh - D.ph + a * D.dh;
        if (a >= D.kh || ih < 0 || ih >= D.H) continue;
        const T* xr = x + (static_cast<long long>(n) * D.H + ih) * D.W * D.C + c;
#pragma unroll
        for (int bb = 0; bb < K; ++bb) {
          const int iw = j * D.sw - D.pw + bb * D.dw;
          if (bb < D.kw && iw >= 0 && iw < D.W)
            acc[a * K + bb] = fmaf(g, ld_f(xr + static_cast<long long>(iw) * D.C), acc[a * K + bb]);
        }
      }
      rem += LANES;
      while (rem >= plane) {
        rem -= plane;
        ++n;
      }
    }
  }
#pragma unroll
  for (int g0 = 0; g0 < KB; g0 += 8) {
#pragma unroll
    for (int t = 0; t < 8; ++t)
      if (g0 + t < KB) red[(t * LANES + pl) * 32 + cl] = acc[g0 + t < KB ? g0 + t : 0];
    __syncthreads();
    {
      const int t = pl;  // 8 taps x 32 channels: one sum each
      if (g0 + t < KB) {
        float sm = 0.0f;
        for (int k = 0; k < LANES; ++k) sm += red[(t * LANES + k) * 32 + cl];
        if (c < D.C) part[(static_cast<long long>(c) * D.S + s) * KB + g0 + t] = sm;
      }
    }
    __syncthreads();
  }
}

// Stage 2: (c, t) adds its S chunk partials in order, in fp64. The kernel is K x K in part's layout
// (KB = K * K + 1) and kh x kw in the output.
__global__ void __launch_bounds__(kThreads) wgrad_finish_kernel(const float* __restrict__ part, float* __restrict__ gw,
                                                                float* __restrict__ gb, int C, int S, int K, int kh,
                                                                int kw) {
  const int KB = K * K + 1;
  const int kk = kh * kw;
  const long long total = static_cast<long long>(C) * (kk + 1);
  for (long long e = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(e / (kk + 1)), t = static_cast<int>(e % (kk + 1));
    const int src_t = t == kk ? KB - 1 : (t / kw) * K + (t % kw);
    if (t == kk && gb == nullptr) continue;
    double sum = 0.0;
    const float* p = part + static_cast<long long>(c) * S * KB + src_t;
    for (int s = 0; s < S; ++s) sum += static_cast<double>(p[static_cast<long long>(s) * KB]);
    if (t == kk)
      gb[c] = static_cast<float>(sum);
    else
      gw[c * kk + t] = static_cast<float>(sum);
  }
}

// ===================================================================================== core: end

// ------------------------------------------------------------------------------------------------
// Host side.

constexpr int kMaxSmemBytes = 48 * 1024;

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride kernel over `work` items: enough for a few waves, never more than needed.
unsigned grid_for(int64_t work) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div64(work, kThreads), int64_t(1) << 20)));
}

// Tiling of the plane kernel: TW = min(OW, 64) columns, G row groups of kRY rows (G TW <= 256),
// PB planes per block to fill 256 threads with small planes; shrunk until the window fits in
// shared memory. Returns false when even one row group of one plane does not fit.
// Whether a grid-stride loop over `work` items (plus one grid of slack) can index with int.
bool fits_int(int64_t work) { return work + (int64_t(1) << 28) < (int64_t(1) << 31); }

bool plan_tiles(PlaneConv& P) {
  P.TW = static_cast<int>(std::min<int64_t>(P.OW, 64));
  P.G = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kThreads / P.TW, ceil_div64(P.OH, kRY))));
  P.PB = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kThreads / (P.TW * P.G), P.NP)));
  for (;;) {
    P.TH = P.G * kRY;
    P.TR = (P.TH - 1) * P.sh + (P.kh - 1) * P.dh + 1;
    P.TC = (P.TW - 1) * P.sw + (P.kw - 1) * P.dw + 1;
    const int64_t bytes = int64_t(P.PB) * P.TR * P.TC * 4;
    if (bytes <= kMaxSmemBytes) break;
    if (P.PB > 1)
      P.PB = std::max(1, P.PB / 2);
    else if (P.G > 1)
      P.G = std::max(1, P.G / 2);
    else if (P.TW > 8)
      P.TW = std::max(8, P.TW / 2);
    else
      return false;
  }
  P.tiles_w = static_cast<int>(ceil_div64(P.OW, P.TW));
  P.tiles = static_cast<int>(P.tiles_w * ceil_div64(P.OH, P.TH));
  return true;
}

template <typename T>
void launch_plane_conv(PlaneConv P, const T* src, const float* w, const float* scale, const float* shift, T* out,
                       cudaStream_t stream) {
  if (!plan_tiles(P)) {
    const int64_t work = P.NP * P.OH * P.OW;
    if (fits_int(work))
      plane_conv_direct_kernel<int, T><<<grid_for(work), kThreads, 0, stream>>>(src, w, scale, shift, out, P);
    else
      plane_conv_direct_kernel<long long, T><<<grid_for(work), kThreads, 0, stream>>>(src, w, scale, shift, out, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t blocks = ceil_div64(P.NP, P.PB) * P.tiles;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "depthwise: too many blocks (", blocks, ") for one launch");
  const dim3 grid(static_cast<unsigned>(blocks));
  const int threads = P.PB * P.TW * P.G;
  const size_t smem = size_t(P.PB) * P.TR * P.TC * sizeof(float);
  const bool dil1 = P.dh == 1 && P.dw == 1;
  if (dil1 && P.kh == 3 && P.kw == 3 && P.sh == 1)
    plane_conv_kernel<3, 1, T><<<grid, threads, smem, stream>>>(src, w, scale, shift, out, P);
  else if (dil1 && P.kh == 3 && P.kw == 3 && P.sh == 2)
    plane_conv_kernel<3, 2, T><<<grid, threads, smem, stream>>>(src, w, scale, shift, out, P);
  else if (dil1 && P.kh == 5 && P.kw == 5 && P.sh == 1)
    plane_conv_kernel<5, 1, T><<<grid, threads, smem, stream>>>(src, w, scale, shift, out, P);
  else if (dil1 && P.kh == 5 && P.kw == 5 && P.sh == 2)
    plane_conv_kernel<5, 2, T><<<grid, threads, smem, stream>>>(src, w, scale, shift, out, P);
  else
    plane_conv_kernel<0, 1, T><<<grid, threads, smem, stream>>>(src, w, scale, shift, out, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Nhwc nhwc_of(const DwGeom& g, int64_t act) {
  return Nhwc{static_cast<int>(g.N), static_cast<int>(g.C), static_cast<int>(g.H), static_cast<int>(g.W),
              static_cast<int>(g.Ho), static_cast<int>(g.Wo), static_cast<int>(g.kh), static_cast<int>(g.kw),
              static_cast<int>(g.sh), static_cast<int>(g.sw), static_cast<int>(g.ph), static_cast<int>(g.pw),
              static_cast<int>(g.dh), static_cast<int>(g.dw), static_cast<int>(act)};
}

// Index arithmetic inside the kernels is 32-bit within a plane / pixel row and 64-bit across them.
void check_sizes(const char* fn, const DwGeom& g) {
  constexpr int64_t kInt = (int64_t(1) << 31) - 1;
  TORCH_CHECK(g.H * g.W <= kInt && g.Ho * g.Wo <= kInt && g.W * g.C <= kInt && g.N <= kInt && g.C <= kInt, fn,
              ": tensor dimensions too large for the CUDA kernels");
}

at::Tensor alloc_like_format(at::IntArrayRef sizes, const at::Tensor& like, bool cl) {
  return at::empty(sizes, like.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

template <typename I, typename T>
void launch_nhwc_fwd(const DwGeom& g, int64_t sw, bool dil1, unsigned blocks, const T* xp, const float* wp,
                     const float* scp, const float* sfp, T* yp, const Nhwc& D, cudaStream_t stream) {
  if (dil1 && g.kh == 3 && g.kw == 3 && sw == 1)
    nhwc_fwd_kernel<3, 1, I, T><<<blocks, kThreads, 0, stream>>>(xp, wp, scp, sfp, yp, D);
  else if (dil1 && g.kh == 3 && g.kw == 3 && sw == 2)
    nhwc_fwd_kernel<3, 2, I, T><<<blocks, kThreads, 0, stream>>>(xp, wp, scp, sfp, yp, D);
  else if (dil1 && g.kh == 5 && g.kw == 5 && sw == 1)
    nhwc_fwd_kernel<5, 1, I, T><<<blocks, kThreads, 0, stream>>>(xp, wp, scp, sfp, yp, D);
  else if (dil1 && g.kh == 5 && g.kw == 5 && sw == 2)
    nhwc_fwd_kernel<5, 2, I, T><<<blocks, kThreads, 0, stream>>>(xp, wp, scp, sfp, yp, D);
  else
    nhwc_gather_kernel<false, I, T><<<grid_for(g.N * g.Ho * g.Wo * g.C), kThreads, 0, stream>>>(xp, wp, scp, sfp, yp, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor depthwise_fwd_cuda(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale,
                              const at::Tensor& shift, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                              int64_t dw, int64_t act) {
  const char* fn = "depthwise_fwd_cuda";
  const DwGeom g = dw_check_fwd(fn, x_in, weight, sh, sw, ph, pw, dh, dw);
  check_cuda(fn, x_in);
  dw_check_channel_vector(fn, "scale", scale, g.C, x_in.device());
  dw_check_channel_vector(fn, "shift", shift, g.C, x_in.device());
  TORCH_CHECK(act >= 0 && act <= 2, fn, ": act must be 0 (none), 1 (relu) or 2 (relu6), got ", act);
  check_sizes(fn, g);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dw_layout(x_in);
  const bool cl = dw_channels_last(x);
  at::Tensor y = alloc_like_format({g.N, g.C, g.Ho, g.Wo}, x, cl);
  if (y.numel() == 0) return y;
  const at::Tensor sc = scale.numel() ? scale.contiguous() : scale;
  const at::Tensor sf = shift.numel() ? shift.contiguous() : shift;
  const float* scp = scale.numel() ? sc.data_ptr<float>() : nullptr;
  const float* sfp = shift.numel() ? sf.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYC_DISPATCH_FLOATS(x.scalar_type(), fn, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (cl) {
      const at::Tensor wT = weight.to(at::kFloat).reshape({g.C, g.kh * g.kw}).t().contiguous();
      const Nhwc D = nhwc_of(g, act);
      const int64_t nJB = ceil_div64(g.Wo, kPX);
      const unsigned blocks = grid_for(g.N * g.Ho * nJB * g.C);
      const float* wp = wT.data_ptr<float>();
      const bool dil1 = dh == 1 && dw == 1;
      const bool small = fits_int(g.N * g.Ho * nJB * g.C) && fits_int(g.N * g.Ho * g.Wo * g.C);
      if (small)
        launch_nhwc_fwd<int, scalar_t>(g, sw, dil1, blocks, xp, wp, scp, sfp, yp, D, stream);
      else
        launch_nhwc_fwd<long long, scalar_t>(g, sw, dil1, blocks, xp, wp, scp, sfp, yp, D, stream);
    } else {
      const at::Tensor wf = weight.to(at::kFloat).contiguous();
      PlaneConv P{};
      P.NP = g.N * g.C;
      P.C = static_cast<int>(g.C);
      P.SH = static_cast<int>(g.H);
      P.SW = static_cast<int>(g.W);
      P.up_h = P.up_w = 1;
      P.top = static_cast<int>(ph);
      P.left = static_cast<int>(pw);
      P.OH = static_cast<int>(g.Ho);
      P.OW = static_cast<int>(g.Wo);
      P.sh = static_cast<int>(sh);
      P.sw = static_cast<int>(sw);
      P.dh = static_cast<int>(dh);
      P.dw = static_cast<int>(dw);
      P.kh = static_cast<int>(g.kh);
      P.kw = static_cast<int>(g.kw);
      P.flip = 0;
      P.act = static_cast<int>(act);
      launch_plane_conv<scalar_t>(P, xp, wf.data_ptr<float>(), scp, sfp, yp, stream);
    }
  });
  return y;
}

at::Tensor depthwise_bwd_input_cuda(const at::Tensor& go_in, const at::Tensor& weight, int64_t H, int64_t W,
                                    int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  const char* fn = "depthwise_bwd_input_cuda";
  const DwGeom g = dw_check_bwd_input(fn, go_in, weight, H, W, sh, sw, ph, pw, dh, dw);
  check_cuda(fn, go_in);
  check_sizes(fn, g);
  const c10::cuda::CUDAGuard guard(go_in.device());
  const at::Tensor go = dw_layout(go_in);
  const bool cl = dw_channels_last(go);
  at::Tensor gx = alloc_like_format({g.N, g.C, H, W}, go, cl);
  if (gx.numel() == 0) return gx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYC_DISPATCH_FLOATS(go.scalar_type(), fn, [&] {
    const scalar_t* gp = go.data_ptr<scalar_t>();
    scalar_t* xp = gx.data_ptr<scalar_t>();
    if (cl) {
      const at::Tensor wT = weight.to(at::kFloat).reshape({g.C, g.kh * g.kw}).t().contiguous();
      const Nhwc D = nhwc_of(g, 0);
      const int64_t work = g.N * H * W * g.C;
      if (fits_int(work))
        nhwc_gather_kernel<true, int, scalar_t><<<grid_for(work), kThreads, 0, stream>>>(
            gp, wT.data_ptr<float>(), nullptr, nullptr, xp, D);
      else
        nhwc_gather_kernel<true, long long, scalar_t><<<grid_for(work), kThreads, 0, stream>>>(
            gp, wT.data_ptr<float>(), nullptr, nullptr, xp, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      // grad_x = conv(grad_out upsampled by the stride, flipped kernel), stride 1
      const at::Tensor wf = weight.to(at::kFloat).contiguous();
      PlaneConv P{};
      P.NP = g.N * g.C;
      P.C = static_cast<int>(g.C);
      P.SH = static_cast<int>(g.Ho);
      P.SW = static_cast<int>(g.Wo);
      P.up_h = static_cast<int>(sh);
      P.up_w = static_cast<int>(sw);
      P.top = static_cast<int>((g.kh - 1) * dh - ph);
      P.left = static_cast<int>((g.kw - 1) * dw - pw);
      P.OH = static_cast<int>(H);
      P.OW = static_cast<int>(W);
      P.sh = P.sw = 1;
      P.dh = static_cast<int>(dh);
      P.dw = static_cast<int>(dw);
      P.kh = static_cast<int>(g.kh);
      P.kw = static_cast<int>(g.kw);
      P.flip = 1;
      P.act = 0;
      launch_plane_conv<scalar_t>(P, gp, wf.data_ptr<float>(), nullptr, nullptr, xp, stream);
    }
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor> depthwise_bwd_weight_cuda(const at::Tensor& go_in, const at::Tensor& x_in,
                                                             int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                                             int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                                                             bool with_bias) {
  const char* fn = "depthwise_bwd_weight_cuda";
  const DwGeom g = dw_check_bwd_weight(fn, go_in, x_in, kh, kw, sh, sw, ph, pw, dh, dw);
  check_cuda(fn, x_in);
  check_sizes(fn, g);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dw_layout(x_in);
  const bool cl = dw_channels_last(x);
  const at::Tensor go = cl ? go_in.contiguous(at::MemoryFormat::ChannelsLast) : go_in.contiguous();
  const auto fopts = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gw = at::zeros({g.C, 1, kh, kw}, fopts);
  at::Tensor gb = with_bias ? at::zeros({g.C}, fopts) : at::empty({0}, fopts);
  if (g.N == 0 || g.C == 0) return {gw, gb};
  const int K = static_cast<int>(std::max(kh, kw));  // 1, 3, 5 or 7
  const int KB = K * K + 1;
  Wgrad D{static_cast<int>(g.N), static_cast<int>(g.C), static_cast<int>(g.H), static_cast<int>(g.W),
          static_cast<int>(g.Ho), static_cast<int>(g.Wo), static_cast<int>(kh), static_cast<int>(kw),
          static_cast<int>(sh), static_cast<int>(sw), static_cast<int>(ph), static_cast<int>(pw),
          static_cast<int>(dh), static_cast<int>(dw), 1, 0};
  // The chunking depends only on the shapes: NCHW ~4096 outputs per block (16 per thread), NHWC
  // ~256 pixels per block (32 per thread), at most 1024 chunks.
  const int64_t total = g.N * g.Ho * g.Wo;
  const int64_t per_chunk = cl ? 256 : 4096;
  D.S = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(1024, ceil_div64(total, per_chunk))));
  D.E = ceil_div64(total, D.S);
  at::Tensor part = at::empty({g.C * D.S * KB}, fopts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYC_DISPATCH_FLOATS(x.scalar_type(), fn, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = go.data_ptr<scalar_t>();
    float* pp = part.data_ptr<float>();
    if (cl) {
      const dim3 grid(static_cast<unsigned>(ceil_div64(g.C, 32)), static_cast<unsigned>(D.S));
      switch (K) {
        case 1: wgrad_nhwc_kernel<1, scalar_t><<<grid, kThreads, 0, stream>>>(gp, xp, pp, D); break;
        case 3: wgrad_nhwc_kernel<3, scalar_t><<<grid, kThreads, 0, stream>>>(gp, xp, pp, D); break;
        case 5: wgrad_nhwc_kernel<5, scalar_t><<<grid, kThreads, 0, stream>>>(gp, xp, pp, D); break;
        default: wgrad_nhwc_kernel<7, scalar_t><<<grid, kThreads, 0, stream>>>(gp, xp, pp, D); break;
      }
    } else {
      const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(D.S));
      switch (K) {
        case 1: wgrad_nchw_kernel<1, scalar_t><<<grid, kThreads, 0, stream>>>(gp, xp, pp, D); break;
        case 3: wgrad_nchw_kernel<3, scalar_t><<<grid, kThreads, 0, stream>>>(gp, xp, pp, D); break;
        case 5: wgrad_nchw_kernel<5, scalar_t><<<grid, kThreads, 0, stream>>>(gp, xp, pp, D); break;
        default: wgrad_nchw_kernel<7, scalar_t><<<grid, kThreads, 0, stream>>>(gp, xp, pp, D); break;
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  wgrad_finish_kernel<<<grid_for(g.C * (kh * kw + 1)), kThreads, 0, stream>>>(
      part.data_ptr<float>(), gw.data_ptr<float>(), with_bias ? gb.data_ptr<float>() : nullptr,
      static_cast<int>(g.C), D.S, K, static_cast<int>(kh), static_cast<int>(kw));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gw, gb};
}

}  // namespace pycompress

TORCH_LIBRARY_IMPL(pycompress, CUDA, m) {
  m.impl("_depthwise_fwd", &pycompress::depthwise_fwd_cuda);
  m.impl("_depthwise_bwd_input", &pycompress::depthwise_bwd_input_cuda);
  m.impl("_depthwise_bwd_weight", &pycompress::depthwise_bwd_weight_cuda);
}
