// Bit-packed sparse masks, CUDA kernels: pack, unpack, apply (out of place and in place) and the
// fused masked SGD step.
//
// Layout (pycompress/ops/sparse_mask_ref.py): n elements, row-major; packed = uint8
// [ceil(n / 32) * 4] read and written here as 32-bit words (bit j of word w = element 32 w + j,
// little endian); padding bits are 0.
//
// All five ops are memory bound, so the design is about bytes and transactions:
//   - data moves in 16-byte vectors (4 fp32 / 8 fp16|bf16 per thread per load) when the pointers
//     are 16-byte aligned; consecutive lanes take consecutive vectors, so a warp instruction moves
//     512 contiguous bytes. The ragged tail (n % V elements) and misaligned tensors (a contiguous
//     view with an odd storage offset) use a scalar path with one element per thread.
//   - a thread reads the whole 32-bit mask word that holds its vector's bits (__ldg; the V / 32 of
//     a warp's lanes that share a word hit one transaction), never single bits or bytes.
//   - grid-stride loops with a grid of exactly the resident blocks (from the kernel's occupancy)
//     and U vectors per thread per iteration, all loads issued before any store, so each SM keeps
//     tens of KB in flight: what HBM needs to approach its peak.
// apply is a select on the raw bits (no float conversion): exact for every value, pruned -> +0.
// The SGD step computes in fp32 with __fmul_rn / __fadd_rn (never contracted; the build also
// passes --fmad=false), one rounding per operation as the reference, and rounds once (RNE) to the
// parameter dtype on store.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "cuda_common.cuh"
#include "pycompress.h"

namespace pycompress {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xffffffffu;
// Vectors per thread per loop iteration: apply moves 2 x 16 B per vector, the SGD step up to 5.
constexpr int kApplyUnroll = 4;
constexpr int kSgdUnroll = 2;

// ------------------------------------------------------------------------------------------------
// Launch geometry: grids of resident blocks (cuda_common.cuh).

template <typename Kernel>
int64_t grid_for(Kernel kernel, int64_t threads) {
  return cuda::resident_grid(kernel, threads, kThreads);
}

using cuda::aligned;

// ------------------------------------------------------------------------------------------------
// Raw 16-byte vectors and element conversions.

// Element traits, Pack16, load16 / store16: cuda_common.cuh.
using cuda::Elem;
using cuda::load16;
using cuda::Pack16;
using cuda::store16;

// A plain (coherent) load, for data this kernel also writes.
template <typename R, int V>
__device__ __forceinline__ void load16_rw(const R* p, R (&r)[V]) {
  Pack16<R, V> u;
  u.v = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) r[j] = u.e[j];
}

__device__ __forceinline__ bool bit_of(const uint32_t* __restrict__ mask, int64_t e) {
  return (__ldg(mask + (e >> 5)) >> (e & 31)) & 1u;
}

// ------------------------------------------------------------------------------------------------
// pack

// 16 bool bytes (one uint4) -> 16 bits, byte k -> bit k. __vcmpne4 turns each nonzero byte into
// 0xff; the multiply gathers the low bits of four 0/1 bytes into the top byte (byte k lands on bit
// 24 + k; no lower byte sum exceeds 15, so nothing carries into it).
__device__ __forceinline__ uint32_t bits4(uint32_t x) { return ((__vcmpne4(x, 0u) & 0x01010101u) * 0x01020408u) >> 24; }
__device__ __forceinline__ uint32_t bits16(uint4 v) {
  return bits4(v.x) | (bits4(v.y) << 4) | (bits4(v.z) << 8) | (bits4(v.w) << 12);
}

// Word w by one warp: lane l contributes element 32 w + l (0 past n), __ballot_sync builds the word.
__device__ __forceinline__ void pack_word_ballot(const uint8_t* __restrict__ m, uint32_t* __restrict__ out, int64_t n,
                                                 int64_t w, int lane) {
  const int64_t e = w * 32 + lane;
  const uint32_t word = __ballot_sync(kFull, e < n && __ldg(m + e) != 0);
  if (lane == 0) out[w] = word;
}

// Vector path (m 16-byte aligned). A warp packs 16 whole words (512 bytes) per step: lane l loads
// the 16 bytes at 16 l, makes their 16 bits, and the pair (2k, 2k + 1) joins its halves with one
// shuffle into word k; even lanes store. The partial last word (n % 32 != 0) is a ballot by warp 0
// of block 0.
__global__ void __launch_bounds__(kThreads) pack_vec_kernel(const uint8_t* __restrict__ m, uint32_t* __restrict__ out,
                                                            int64_t n) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t full = n / 32;
  for (int64_t tile = warp; tile * 16 < full; tile += nwarps) {
    const int64_t word = tile * 16 + lane / 2;
    uint32_t h = 0;
    if (word < full) h = bits16(__ldg(reinterpret_cast<const uint4*>(m + tile * 512 + lane * 16)));
    const uint32_t hi = __shfl_down_sync(kFull, h, 1);
    if (word < full && (lane & 1) == 0) out[word] = h | (hi << 16);
  }
  if (n % 32 != 0 && blockIdx.x == 0 && threadIdx.x < 32) pack_word_ballot(m, out, n, full, lane);
}

// Scalar path (m not 16-byte aligned): one word per warp per step, by ballot.
__global__ void __launch_bounds__(kThreads) pack_ballot_kernel(const uint8_t* __restrict__ m,
                                                               uint32_t* __restrict__ out, int64_t n) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t w = warp; w < (n + 31) / 32; w += nwarps) pack_word_ballot(m, out, n, w, lane);
}

// ------------------------------------------------------------------------------------------------
// unpack

// 4 bits -> 4 bytes of 0 / 1 (bit k -> byte k): the multiply places bit k at 8 k and every other
// partial product on a bit outside 0x01010101 (the 16 positions k + 7 j are distinct).
__device__ __forceinline__ uint32_t bytes4(uint32_t nib) { return ((nib & 0xfu) * 0x00204081u) & 0x01010101u; }

// Thread t writes the 16 bytes [16 t, 16 t + 16) from half t & 1 of word t / 2 (out 16-byte
// aligned: a fresh allocation); the last n % 16 bytes are written one per thread.
__global__ void __launch_bounds__(kThreads) unpack_kernel(const uint32_t* __restrict__ mask, uint8_t* __restrict__ out,
                                                          int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nv = n / 16;
  for (int64_t v = tid; v < nv; v += stride) {
    const uint32_t h = (__ldg(mask + (v >> 1)) >> ((v & 1) * 16)) & 0xffffu;
    uint4 r;
    r.x = bytes4(h);
    r.y = bytes4(h >> 4);
    r.z = bytes4(h >> 8);
    r.w = bytes4(h >> 12);
    *reinterpret_cast<uint4*>(out + v * 16) = r;
  }
  for (int64_t e = nv * 16 + tid; e < n; e += stride) out[e] = bit_of(mask, e);
}

// ------------------------------------------------------------------------------------------------
// apply: out = bit ? w : 0 on raw bits R (uint32_t: fp32, uint16_t: fp16 / bf16).

// The V = 16 / sizeof(R) elements of one 16-byte vector kept or zeroed by their V mask bits (bits
// 0..V-1 of `bits`), as ANDs of its four 32-bit words with all-ones / all-zero lane masks: no
// unpacking of 16-bit elements.
template <int ES>
__device__ __forceinline__ uint4 select16(uint4 v, uint32_t bits);
template <>
__device__ __forceinline__ uint4 select16<4>(uint4 v, uint32_t bits) {
  v.x &= 0u - (bits & 1u);
  v.y &= 0u - ((bits >> 1) & 1u);
  v.z &= 0u - ((bits >> 2) & 1u);
  v.w &= 0u - ((bits >> 3) & 1u);
  return v;
}
template <>
__device__ __forceinline__ uint4 select16<2>(uint4 v, uint32_t bits) {
  // two elements per 32-bit word: low half <- bit 2k, high half <- bit 2k + 1
  auto m = [](uint32_t b) { return ((0u - (b & 1u)) & 0x0000ffffu) | ((0u - ((b >> 1) & 1u)) & 0xffff0000u); };
  v.x &= m(bits);
  v.y &= m(bits >> 2);
  v.z &= m(bits >> 4);
  v.w &= m(bits >> 6);
  return v;
}

// Vector path (w and out 16-byte aligned). Thread t handles vectors t, t + T, ..., (T threads in
// the grid) kApplyUnroll at a time: the loads of all of them (and their mask words) are issued
// before the first store. INPLACE: out == w (read with coherent loads). Then the n % V tail.
template <typename R, bool INPLACE>
__global__ void __launch_bounds__(kThreads) apply_vec_kernel(const R* __restrict__ w, R* out,
                                                             const uint32_t* __restrict__ mask, int64_t n) {
  constexpr int V = 16 / sizeof(R);
  constexpr int U = kApplyUnroll;
  const uint4* wv = reinterpret_cast<const uint4*>(INPLACE ? out : w);
  uint4* ov = reinterpret_cast<uint4*>(out);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nv = n / V;
  for (int64_t v0 = tid; v0 < nv; v0 += U * stride) {
    uint4 r[U];
    uint32_t bits[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + u * stride;
      bits[u] = 0;
      if (v < nv) {
        r[u] = INPLACE ? wv[v] : __ldg(wv + v);
        const int64_t e0 = v * V;
        bits[u] = __ldg(mask + (e0 >> 5)) >> (e0 & 31);  // V divides 32: the V bits share a word
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + u * stride;
      if (v < nv) ov[v] = select16<sizeof(R)>(r[u], bits[u]);
    }
  }
  for (int64_t e = nv * V + tid; e < n; e += stride) {
    const R x = INPLACE ? out[e] : w[e];
    out[e] = bit_of(mask, e) ? x : R(0);
  }
}

// Scalar path (misaligned): one element per thread per step; w may equal out.
template <typename R>
__global__ void __launch_bounds__(kThreads) apply_scalar_kernel(const R* w, R* out, const uint32_t* __restrict__ mask,
                                                                int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const R x = w[e];
    out[e] = bit_of(mask, e) ? x : R(0);
  }
}

// ------------------------------------------------------------------------------------------------
// masked SGD step

struct SgdArgs {
  float lr, momentum, weight_decay, damp1;  // damp1 = 1 - dampening, rounded once from double
};

// One element (fp32 math of ops.cpp); b is read only when MODE == 2 and written when MODE != 0.
template <bool WD, int MODE, bool NEST>
__device__ __forceinline__ void sgd1(bool keep, float& p, float g, float& b, const SgdArgs& a) {
  g = keep ? g : 0.0f;
  if (WD) g = __fadd_rn(g, __fmul_rn(a.weight_decay, p));
  float d = g;
  if (MODE != 0) {
    b = MODE == 1 ? g : __fadd_rn(__fmul_rn(a.momentum, b), __fmul_rn(a.damp1, g));
    b = keep ? b : 0.0f;
    d = NEST ? __fadd_rn(g, __fmul_rn(a.momentum, b)) : b;
  }
  p = keep ? __fsub_rn(p, __fmul_rn(a.lr, d)) : 0.0f;
}

// MODE: 0 no momentum (buf unused), 1 first step (buf written only), 2 buf read and written.
// Vector path (param, grad, buf 16-byte aligned): as apply_vec_kernel, kSgdUnroll vectors per
// thread per iteration, then the n % V tail one element per thread.
template <typename T, bool WD, int MODE, bool NEST>
__global__ void __launch_bounds__(kThreads) sgd_vec_kernel(T* param, const T* __restrict__ grad, T* buf,
                                                           const uint32_t* __restrict__ mask, int64_t n, SgdArgs a) {
  using E = Elem<T>;
  using R = typename E::raw;
  constexpr int V = 16 / sizeof(R);
  constexpr int U = kSgdUnroll;
  R* p = reinterpret_cast<R*>(param);
  const R* g = reinterpret_cast<const R*>(grad);
  R* b = reinterpret_cast<R*>(buf);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nv = n / V;
  for (int64_t v0 = tid; v0 < nv; v0 += U * stride) {
    R pr[U][V], gr[U][V], br[U][V];
    uint32_t bits[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + u * stride;
      bits[u] = 0;
      if (v < nv) {
        const int64_t e0 = v * V;
        load16_rw<R, V>(p + e0, pr[u]);
        load16<R, V>(g + e0, gr[u]);
        if (MODE == 2) load16_rw<R, V>(b + e0, br[u]);
        bits[u] = __ldg(mask + (e0 >> 5)) >> (e0 & 31);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + u * stride;
      if (v < nv) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float pf = E::to_f(pr[u][j]);
          float bf = MODE == 2 ? E::to_f(br[u][j]) : 0.0f;
          sgd1<WD, MODE, NEST>((bits[u] >> j) & 1u, pf, E::to_f(gr[u][j]), bf, a);
          pr[u][j] = E::from_f(pf);
          if (MODE != 0) br[u][j] = E::from_f(bf);
        }
        store16<R, V>(p + v * V, pr[u]);
        if (MODE != 0) store16<R, V>(b + v * V, br[u]);
      }
    }
  }
  for (int64_t e = nv * V + tid; e < n; e += stride) {
    float pf = E::to_f(p[e]);
    float bf = MODE == 2 ? E::to_f(b[e]) : 0.0f;
    sgd1<WD, MODE, NEST>(bit_of(mask, e), pf, E::to_f(g[e]), bf, a);
    p[e] = E::from_f(pf);
    if (MODE != 0) b[e] = E::from_f(bf);
  }
}

template <typename T, bool WD, int MODE, bool NEST>
__global__ void __launch_bounds__(kThreads) sgd_scalar_kernel(T* param, const T* __restrict__ grad, T* buf,
                                                              const uint32_t* __restrict__ mask, int64_t n, SgdArgs a) {
  using E = Elem<T>;
  using R = typename E::raw;
  R* p = reinterpret_cast<R*>(param);
  const R* g = reinterpret_cast<const R*>(grad);
  R* b = reinterpret_cast<R*>(buf);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    float pf = E::to_f(p[e]);
    float bf = MODE == 2 ? E::to_f(b[e]) : 0.0f;
    sgd1<WD, MODE, NEST>(bit_of(mask, e), pf, E::to_f(g[e]), bf, a);
    p[e] = E::from_f(pf);
    if (MODE != 0) b[e] = E::from_f(bf);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

using cuda::check_cuda;

// The kernels read the mask as 32-bit words: a packed view with an odd storage offset is copied.
at::Tensor word_aligned(const at::Tensor& packed) { return aligned(packed.data_ptr(), 4) ? packed : packed.clone(); }

const uint32_t* words_of(const at::Tensor& packed) {
  return reinterpret_cast<const uint32_t*>(packed.data_ptr<uint8_t>());
}

template <typename R>
void launch_apply(const R* w, R* out, const uint32_t* mask, int64_t n, bool inplace, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(R);
  if (aligned(w, 16) && aligned(out, 16)) {
    const int64_t threads = std::max<int64_t>((n / V + kApplyUnroll - 1) / kApplyUnroll, n % V);
    if (inplace) {
      auto k = apply_vec_kernel<R, true>;
      k<<<grid_for(k, threads), kThreads, 0, stream>>>(w, out, mask, n);
    } else {
      auto k = apply_vec_kernel<R, false>;
      k<<<grid_for(k, threads), kThreads, 0, stream>>>(w, out, mask, n);
    }
  } else {
    auto k = apply_scalar_kernel<R>;
    k<<<grid_for(k, n), kThreads, 0, stream>>>(w, out, mask, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void apply_impl(const at::Tensor& w, const at::Tensor& out, const at::Tensor& packed, bool inplace) {
  const int64_t n = w.numel();
  if (n == 0) return;
  const at::Tensor pk = word_aligned(packed);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (w.element_size() == 4)
    launch_apply(static_cast<const uint32_t*>(w.data_ptr()), static_cast<uint32_t*>(out.data_ptr()), words_of(pk), n,
                 inplace, stream);
  else
    launch_apply(static_cast<const uint16_t*>(w.data_ptr()), static_cast<uint16_t*>(out.data_ptr()), words_of(pk), n,
                 inplace, stream);
}

template <typename T, bool WD, int MODE, bool NEST>
void launch_sgd(T* p, const T* g, T* b, const uint32_t* mask, int64_t n, const SgdArgs& a, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (aligned(p, 16) && aligned(g, 16) && (MODE == 0 || aligned(b, 16))) {
    auto k = sgd_vec_kernel<T, WD, MODE, NEST>;
    const int64_t threads = std::max<int64_t>((n / V + kSgdUnroll - 1) / kSgdUnroll, n % V);
    k<<<grid_for(k, threads), kThreads, 0, stream>>>(p, g, b, mask, n, a);
  } else {
    auto k = sgd_scalar_kernel<T, WD, MODE, NEST>;
    k<<<grid_for(k, n), kThreads, 0, stream>>>(p, g, b, mask, n, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool WD>
void sgd_mode(T* p, const T* g, T* b, const uint32_t* mask, int64_t n, const SgdArgs& a, int mode, bool nesterov,
              cudaStream_t s) {
  if (mode == 0) return launch_sgd<T, WD, 0, false>(p, g, b, mask, n, a, s);
  if (mode == 1) {
    if (nesterov) return launch_sgd<T, WD, 1, true>(p, g, b, mask, n, a, s);
    return launch_sgd<T, WD, 1, false>(p, g, b, mask, n, a, s);
  }
  if (nesterov) return launch_sgd<T, WD, 2, true>(p, g, b, mask, n, a, s);
  launch_sgd<T, WD, 2, false>(p, g, b, mask, n, a, s);
}

}  // namespace

// Packs a contiguous bool mask (nonzero = keep): 16 bytes per lane and a shuffle per word when the
// mask is 16-byte aligned, else (and for the partial last word) one __ballot_sync per word.
at::Tensor pack_mask_cuda(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pack_mask_cuda: mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.is_contiguous(), "pack_mask_cuda: mask must be contiguous");
  check_cuda("pack_mask_cuda", mask);
  const c10::cuda::CUDAGuard guard(mask.device());
  const int64_t n = mask.numel();
  at::Tensor out = at::empty({packed_mask_bytes(n)}, mask.options().dtype(at::kByte));
  if (n == 0) return out;
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  uint32_t* op = reinterpret_cast<uint32_t*>(out.data_ptr<uint8_t>());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (aligned(m, 16)) {
    // threads: a warp per 16 words, and at least one warp for the partial word
    const int64_t threads = std::max<int64_t>(((n / 32 + 15) / 16) * 32, 32);
    pack_vec_kernel<<<grid_for(pack_vec_kernel, threads), kThreads, 0, stream>>>(m, op, n);
  } else {
    pack_ballot_kernel<<<grid_for(pack_ballot_kernel, ((n + 31) / 32) * 32), kThreads, 0, stream>>>(m, op, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_mask_cuda(const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(n >= 0, "unpack_mask_cuda: n must be >= 0, got ", n);
  check_cuda("unpack_mask_cuda", packed);
  check_packed_mask("unpack_mask_cuda", packed, n, packed.device());
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({n}, packed.options().dtype(at::kBool));
  if (n == 0) return out;
  TORCH_CHECK(aligned(out.data_ptr(), 16), "unpack_mask_cuda: unaligned output allocation");
  const at::Tensor pk = word_aligned(packed);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  unpack_kernel<<<grid_for(unpack_kernel, std::max<int64_t>(n / 16, n % 16)), kThreads, 0, stream>>>(
      words_of(pk), reinterpret_cast<uint8_t*>(out.data_ptr<bool>()), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor apply_mask_cuda(const at::Tensor& w, const at::Tensor& packed) {
  check_mask_float("apply_mask_cuda", "w", w);
  check_cuda("apply_mask_cuda", w);
  check_packed_mask("apply_mask_cuda", packed, w.numel(), w.device());
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor out = at::empty(w.sizes(), w.options());
  apply_impl(w, out, packed, false);
  return out;
}

void apply_mask_inplace_cuda(at::Tensor& w, const at::Tensor& packed) {
  check_mask_float("apply_mask_inplace_cuda", "w", w);
  check_cuda("apply_mask_inplace_cuda", w);
  check_packed_mask("apply_mask_inplace_cuda", packed, w.numel(), w.device());
  const c10::cuda::CUDAGuard guard(w.device());
  apply_impl(w, w, packed, true);
}

void masked_sgd_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& buf, const at::Tensor& packed,
                          double lr, double momentum, double weight_decay, double dampening, bool nesterov,
                          bool first) {
  const char* fn = "masked_sgd_step_cuda";
  const bool use_buf = check_masked_sgd_args(fn, param, grad, buf, packed, momentum);
  check_cuda(fn, param);
  const c10::cuda::CUDAGuard guard(param.device());
  const int64_t n = param.numel();
  if (n == 0) return;
  const SgdArgs a{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(weight_decay),
                  static_cast<float>(1.0 - dampening)};
  const int mode = !use_buf ? 0 : (first ? 1 : 2);
  const at::Tensor pk = word_aligned(packed);
  const uint32_t* mp = words_of(pk);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PYC_DISPATCH_FLOATS(param.scalar_type(), fn, [&] {
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* b = use_buf ? buf.data_ptr<scalar_t>() : nullptr;
    if (weight_decay != 0.0)
      sgd_mode<scalar_t, true>(p, g, b, mp, n, a, mode, use_buf && nesterov, stream);
    else
      sgd_mode<scalar_t, false>(p, g, b, mp, n, a, mode, use_buf && nesterov, stream);
  });
}

}  // namespace pycompress

TORCH_LIBRARY_IMPL(pycompress, CUDA, m) {
  m.impl("_pack_mask", &pycompress::pack_mask_cuda);
  m.impl("_unpack_mask", &pycompress::unpack_mask_cuda);
  m.impl("_apply_mask", &pycompress::apply_mask_cuda);
  m.impl("_apply_mask_", &pycompress::apply_mask_inplace_cuda);
  m.impl("_masked_sgd_step", &pycompress::masked_sgd_step_cuda);
}
