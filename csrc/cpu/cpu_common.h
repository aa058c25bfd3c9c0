// Helpers shared by the CPU kernels (csrc/cpu/*.cpp): run-time AVX2 selection, the device check,
// fp32 conversions, 8-lane fp32 loads and stores of fp32 / fp16 / bf16 data, and output allocation
// with transparent huge pages.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PYC_X86 1
// The shared helpers need only AVX2 + F16C (no FMA: kernels that must not contract multiply-adds
// include them too); a kernel file may compile its own hot loops for more.
#define PYC_AVX2_F16C __attribute__((target("avx2,f16c")))
#else
#define PYC_X86 0
#endif

namespace pycompress {
namespace cpu {

// Whether the AVX2 paths may run: the CPU has AVX2 and F16C (and FMA when need_fma), and
// PYCOMPRESS_CPU_SCALAR=1 does not force the portable paths. Callers cache the answer.
inline bool avx2_available(bool need_fma) {
#if PYC_X86
  const char* env = std::getenv("PYCOMPRESS_CPU_SCALAR");
  if (env != nullptr && env[0] == '1') return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
         (!need_fma || __builtin_cpu_supports("fma"));
#else
  (void)need_fma;
  return false;
#endif
}

// avx2_available(NeedFma), asked once per process (the kernels that use FMA ask use_avx2<true>()).
template <bool NeedFma = false>
inline bool use_avx2() {
  static const bool ok = avx2_available(NeedFma);
  return ok;
}

inline void check_cpu(const char* fn, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": tensors must be on the CPU, got ", t.device());
}

// One element as fp32 (exact for every dtype).
inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }

// at::empty for an output the kernel will stream over. A fresh large allocation is an untouched
// mmap, and faulting it in 4 KiB pages costs more than the kernel itself (~50 ms for 64 MiB on a VM);
// asking for transparent huge pages first (a no-op where THP is off or the pages are already
// there) makes the first touch ~2 MiB at a time.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes >= 4 * kHuge) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (b + kHuge - 1) & ~(kHuge - 1), hi = (b + bytes) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  advise_huge_pages(t);
  return t;
}

#if PYC_X86
// 8 consecutive values as fp32 lanes (fp16 via F16C, bf16 by a 16-bit shift: both exact).
PYC_AVX2_F16C inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PYC_AVX2_F16C inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
PYC_AVX2_F16C inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// 8 fp32 lanes stored in the tensor's dtype, rounding as c10 does (nearest even).
PYC_AVX2_F16C inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
PYC_AVX2_F16C inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// c10::BFloat16(float): NaN -> 0x7FC0, else round to nearest even on the top 16 bits.
PYC_AVX2_F16C inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
// store8 with a non-temporal (streaming) store when p is aligned for it: for outputs much larger
// than the caches, it skips reading each destination line before writing it. Callers end the
// parallel region with stream_fence().
PYC_AVX2_F16C inline void store8_stream(float* p, __m256 v) {
  if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) _mm256_stream_ps(p, v);
  else _mm256_storeu_ps(p, v);
}
template <typename T>
PYC_AVX2_F16C inline void store8_stream(T* p, __m256 v) {
  if ((reinterpret_cast<uintptr_t>(p) & 15) == 0) {
    alignas(16) T tmp[8];
    store8(tmp, v);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
  } else {
    store8(p, v);
  }
}
inline void stream_fence() { _mm_sfence(); }
#endif  // PYC_X86

// at::parallel_for's contract (f(b, e) over pieces of [begin, end), pieces of at least `grain`),
// but the pieces (about 8 per thread) are handed out one at a time from a shared counter: a thread
// slowed by other load on its core takes fewer of them. at::parallel_for gives every thread one
// fixed share, so on a shared machine the slowest thread sets the time. f must not depend on how
// the range is cut (the kernels' results do not).
template <typename F>
void parallel_chunks(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t nt = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(std::max<int64_t>(grain, 1), (n + 8 * nt - 1) / (8 * nt));
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (nchunks <= 1 || nt <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(nt, nchunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < nchunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      f(begin + c * chunk, begin + std::min(n, (c + 1) * chunk));
  });
}

}  // namespace cpu
}  // namespace pycompress
