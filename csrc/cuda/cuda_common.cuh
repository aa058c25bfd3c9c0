// Launch helpers shared by the CUDA kernels (csrc/cuda/*.cu). c10's CUDA headers only:
// ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers that a bare CUDA toolkit may lack.
#pragma once
#include <c10/cuda/CUDAException.h>
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

}  // namespace cuda
}  // namespace pycompress
