// Helpers shared by the CUDA kernels (csrc/cuda/*.cu): the device check, launch geometry, element
// traits and 16-byte vector loads / stores. c10's CUDA headers only: ATen/cuda/CUDAContext.h would
// pull in cuBLAS/cuSPARSE headers that a bare CUDA toolkit may lack.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

namespace pycompress {
namespace cuda {

// SM count of the current device, cached per device.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < kMaxDevices) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// Blocks of `block` threads for `threads` threads of a grid-stride kernel: as many as can be
// resident at once (from the kernel's occupancy, cached per kernel and device, so there is no
// partial second wave), fewer for small work.
template <typename Kernel>
int64_t resident_grid(Kernel kernel, int64_t threads, int block) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> per_sm_cache;  // (kernel, device) -> blocks per SM
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  int per_sm = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = per_sm_cache.find(key);
    if (it != per_sm_cache.end()) per_sm = it->second;
  }
  if (per_sm <= 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, 0));
    per_sm = std::max(per_sm, 1);
    std::lock_guard<std::mutex> lock(mu);
    per_sm_cache[key] = per_sm;
  }
  const int64_t cap = int64_t(sm_count()) * per_sm;
  return std::max<int64_t>(1, std::min<int64_t>((threads + block - 1) / block, cap));
}

// Whether p is a multiple of a (a power of two) bytes.
inline bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

inline void check_cuda(const char* fn, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), fn, ": tensors must be CUDA tensors, got ", t.device());
}

// ------------------------------------------------------------------------------------------------
// Element traits: raw storage type, elements per 16-byte vector, raw <-> fp32.

__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) {
  // Same as c10::BFloat16(float): NaN -> 0x7FC0, else round to nearest even.
  if (f != f) return 0x7FC0;
  uint32_t u = __float_as_uint(f);
  u += ((u >> 16) & 1u) + 0x7FFFu;
  return static_cast<uint16_t>(u >> 16);
}

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using raw = uint32_t;
  static constexpr int V = 4;
  __device__ __forceinline__ static float to_f(raw r) { return __uint_as_float(r); }
  __device__ __forceinline__ static raw from_f(float v) { return __float_as_uint(v); }
};
template <>
struct Elem<at::Half> {
  using raw = uint16_t;
  static constexpr int V = 8;
  __device__ __forceinline__ static float to_f(raw r) { return __half2float(__ushort_as_half(r)); }
  __device__ __forceinline__ static raw from_f(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <>
struct Elem<at::BFloat16> {
  using raw = uint16_t;
  static constexpr int V = 8;
  __device__ __forceinline__ static float to_f(raw r) { return __uint_as_float(static_cast<uint32_t>(r) << 16); }
  __device__ __forceinline__ static raw from_f(float v) { return float_to_bf16_bits(v); }
};

template <typename R, int V>
union Pack16 {
  uint4 v;
  R e[V];
};

template <typename R, int V>
__device__ __forceinline__ void load16(const R* p, R (&r)[V]) {
  Pack16<R, V> u;
  u.v = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int j = 0; j < V; ++j) r[j] = u.e[j];
}
template <typename R, int V>
__device__ __forceinline__ void store16(R* p, const R (&r)[V]) {
  Pack16<R, V> u;
#pragma unroll
  for (int j = 0; j < V; ++j) u.e[j] = r[j];
  *reinterpret_cast<uint4*>(p) = u.v;
}

}  // namespace cuda
}  // namespace pycompress
