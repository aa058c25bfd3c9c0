// Bit-packed sparse masks, CPU kernels: pack, unpack, apply (out of place and in place) and the
// fused masked SGD step. AVX2 (+F16C) hot loops chosen at run time, a portable scalar path for other
// CPUs (and the one the AVX2 path must equal bit for bit), parallel over whole 32-bit mask words
// with at::parallel_for (OpenMP).
//
// Layout (pycompress/ops/sparse_mask_ref.py): n elements, row-major; packed = uint8
// [ceil(n / 32) * 4], bit (i % 8) of byte (i / 8) = element i kept; padding bits are 0. A task owns
// whole words (kChunk elements, a multiple of 32), so no two threads write one mask byte.
//
// apply: a select on the raw bits (out = bit ? w : +0), so it is exact for every dtype and value.
// SGD step: fp32 arithmetic whatever the parameter dtype, one rounding per operation (the build
// passes -ffp-contract=off and the AVX2 target has no "fma"), stored once in the parameter dtype
// (RNE): bit for bit the reference, which rounds each torch op the same way.
//
// Set PYCOMPRESS_CPU_SCALAR=1 (read once per process) to force the portable path, for testing it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu_common.h"
#include "pycompress.h"

#if PYC_X86
#define PYC_AVX2 PYC_AVX2_F16C  // cpu_common.h: AVX2 + F16C, no FMA
#endif

namespace pycompress {
namespace {

// Elements per parallel task: a multiple of 32 (whole mask words), big enough to amortise the
// scheduling, small enough that 2-16 threads all get work on ~1M-element tensors.
constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int64_t kWordsPerTask = kChunk / 32;
// Outputs at least this large are written with non-temporal stores (out-of-place apply): they do
// not fit the caches anyway, and streaming stores skip the read-for-ownership of every line.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

using cpu::check_cpu;
using cpu::empty_output;
using cpu::to_f;
using cpu::use_avx2;

inline bool bit_at(const uint8_t* mask, int64_t i) { return (mask[i >> 3] >> (i & 7)) & 1; }

// Word w of the packed mask (bit j = element 32 w + j), from bytes: any alignment, any endianness.
inline uint32_t word_at(const uint8_t* mask, int64_t w) {
  const uint8_t* b = mask + 4 * w;
  return uint32_t(b[0]) | (uint32_t(b[1]) << 8) | (uint32_t(b[2]) << 16) | (uint32_t(b[3]) << 24);
}

// ------------------------------------------------------------------------------------------------
// Scalar path.

// Words [w0, w1) of the packed mask from a bool mask of n bytes (nonzero = keep).
void pack_scalar(const uint8_t* m, uint8_t* out, int64_t w0, int64_t w1, int64_t n) {
  for (int64_t byte = w0 * 4; byte < w1 * 4; ++byte) {
    uint8_t v = 0;
    const int64_t e0 = byte * 8;
    for (int j = 0; j < 8 && e0 + j < n; ++j) v |= static_cast<uint8_t>(m[e0 + j] != 0) << j;
    out[byte] = v;
  }
}

void unpack_scalar(const uint8_t* mask, uint8_t* out, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) out[i] = bit_at(mask, i);
}

// out[i] = bit i ? w[i] : 0 on raw bits R (uint32_t for fp32, uint16_t for fp16 / bf16); out may be w.
template <typename R>
void apply_scalar(const R* w, R* out, const uint8_t* mask, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) out[i] = bit_at(mask, i) ? w[i] : R(0);
}

// Scalars of one SGD step, as fp32 (torch converts a Python float to the op's fp32 the same way).
struct SgdArgs {
  float lr, momentum, weight_decay, damp1;  // damp1 = 1 - dampening, rounded once from double
};

// MODE: 0 no momentum (buf untouched), 1 first step (buf written, not read), 2 buf read and written.
template <typename T, bool WD, int MODE, bool NEST>
void sgd_scalar(T* p, const T* g, T* buf, const uint8_t* mask, int64_t b, int64_t e, const SgdArgs& a) {
  for (int64_t i = b; i < e; ++i) {
    const bool keep = bit_at(mask, i);
    const float pf = to_f(p[i]);
    float gf = keep ? to_f(g[i]) : 0.0f;
    if (WD) gf = gf + a.weight_decay * pf;
    float d = gf;
    if (MODE != 0) {
      float bf = MODE == 1 ? gf : a.momentum * to_f(buf[i]) + a.damp1 * gf;
      bf = keep ? bf : 0.0f;
      buf[i] = static_cast<T>(bf);
      d = NEST ? gf + a.momentum * bf : bf;
    }
    p[i] = keep ? static_cast<T>(pf - a.lr * d) : static_cast<T>(0.0f);
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2 path. Every loop runs whole 32-element words; the caller does the partial last word with
// the scalar code (bit-identical by construction).
#if PYC_X86

using cpu::load8;
using cpu::store8;

// Lane masks (all ones = keep) of the 8 elements 8k..8k+7 of a word: bit 8k + j moved to the sign
// bit by a variable shift, then smeared with an arithmetic shift.
struct Lanes32 {
  __m256i sh[4];
  PYC_AVX2 Lanes32() {
    for (int k = 0; k < 4; ++k)
      sh[k] = _mm256_setr_epi32(31 - 8 * k, 30 - 8 * k, 29 - 8 * k, 28 - 8 * k, 27 - 8 * k, 26 - 8 * k, 25 - 8 * k,
                                24 - 8 * k);
  }
  PYC_AVX2 inline __m256i keep(__m256i word, int k) const {
    return _mm256_srai_epi32(_mm256_sllv_epi32(word, sh[k]), 31);
  }
};

// 16-bit lanes: the 16 elements 16k..16k+15 of a word (k = 0, 1).
PYC_AVX2 inline __m256i keep16(uint32_t word, int k, __m256i sel) {
  const __m256i bits = _mm256_set1_epi16(static_cast<short>(word >> (16 * k)));
  return _mm256_cmpeq_epi16(_mm256_and_si256(bits, sel), sel);
}
PYC_AVX2 inline __m256i sel16() {
  return _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                           static_cast<short>(0x8000));
}

// Words [w0, w1) (all full): 32 bool bytes -> one word with cmpeq + movemask.
PYC_AVX2 void pack_avx2(const uint8_t* m, uint8_t* out, int64_t w0, int64_t w1) {
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t w = w0; w < w1; ++w) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 32 * w));
    const uint32_t word = ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, zero)));
    std::memcpy(out + 4 * w, &word, 4);
  }
}

// Words [w0, w1) (all full): one word -> 32 bytes of 0 / 1. Byte j of the result takes mask byte
// j / 8 (a per-128-bit-lane shuffle of the broadcast word), then tests its bit j % 8.
PYC_AVX2 void unpack_avx2(const uint8_t* mask, uint8_t* out, int64_t w0, int64_t w1) {
  const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                       3, 3, 3, 3, 3, 3);
  const __m256i sel = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i one = _mm256_set1_epi8(1);
  for (int64_t w = w0; w < w1; ++w) {
    uint32_t word;
    std::memcpy(&word, mask + 4 * w, 4);
    const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(word)), idx);
    const __m256i r = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(b, sel), sel), one);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * w), r);
  }
}

template <bool STREAM>
PYC_AVX2 inline void put(void* p, __m256i v) {
  if (STREAM)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}

// Apply on raw 32-bit lanes, words [w0, w1) (all full). INPLACE: out == w; a word of all ones is
// skipped (nothing to change, no store: pruned models often have dense runs) and a word of zeros is
// stored without reading w. STREAM (out of place, 32-byte aligned out): non-temporal stores.
template <bool INPLACE, bool STREAM>
PYC_AVX2 void apply_avx2_32(const uint32_t* w, uint32_t* out, const uint8_t* mask, int64_t w0, int64_t w1) {
  const Lanes32 L;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t k = w0; k < w1; ++k) {
    uint32_t word;
    std::memcpy(&word, mask + 4 * k, 4);
    const uint32_t* src = w + 32 * k;
    uint32_t* dst = out + 32 * k;
    if (INPLACE && word == 0xFFFFFFFFu) continue;
    if (INPLACE && word == 0) {
      for (int j = 0; j < 4; ++j) put<false>(dst + 8 * j, zero);
      continue;
    }
    const __m256i wv = _mm256_set1_epi32(static_cast<int>(word));
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 8 * j));
      put<STREAM>(dst + 8 * j, _mm256_and_si256(L.keep(wv, j), v));
    }
  }
}

template <bool INPLACE, bool STREAM>
PYC_AVX2 void apply_avx2_16(const uint16_t* w, uint16_t* out, const uint8_t* mask, int64_t w0, int64_t w1) {
  const __m256i sel = sel16();
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t k = w0; k < w1; ++k) {
    uint32_t word;
    std::memcpy(&word, mask + 4 * k, 4);
    const uint16_t* src = w + 32 * k;
    uint16_t* dst = out + 32 * k;
    if (INPLACE && word == 0xFFFFFFFFu) continue;
    if (INPLACE && word == 0) {
      put<false>(dst, zero);
      put<false>(dst + 16, zero);
      continue;
    }
    for (int j = 0; j < 2; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * j));
      put<STREAM>(dst + 16 * j, _mm256_and_si256(keep16(word, j, sel), v));
    }
  }
}

// The SGD step of the header comment on words [w0, w1) (all full), 8 lanes at a time; selects are
// ANDs with the lane mask (exactly +0.0 where pruned, whatever the input held).
template <typename T, bool WD, int MODE, bool NEST>
PYC_AVX2 void sgd_avx2(T* p, const T* g, T* buf, const uint8_t* mask, int64_t w0, int64_t w1, const SgdArgs& a) {
  const Lanes32 L;
  const __m256 lr = _mm256_set1_ps(a.lr), mom = _mm256_set1_ps(a.momentum), wd = _mm256_set1_ps(a.weight_decay),
               damp1 = _mm256_set1_ps(a.damp1);
  for (int64_t k = w0; k < w1; ++k) {
    uint32_t word;
    std::memcpy(&word, mask + 4 * k, 4);
    const __m256i wv = _mm256_set1_epi32(static_cast<int>(word));
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 32 * k + 8 * j;
      const __m256 keep = _mm256_castsi256_ps(L.keep(wv, j));
      const __m256 pv = load8(p + i);
      __m256 gv = _mm256_and_ps(keep, load8(g + i));
      if (WD) gv = _mm256_add_ps(gv, _mm256_mul_ps(wd, pv));
      __m256 d = gv;
      if (MODE != 0) {
        __m256 bv = MODE == 1 ? gv : _mm256_add_ps(_mm256_mul_ps(mom, load8(buf + i)), _mm256_mul_ps(damp1, gv));
        bv = _mm256_and_ps(keep, bv);
        store8(buf + i, bv);
        d = NEST ? _mm256_add_ps(gv, _mm256_mul_ps(mom, bv)) : bv;
      }
      store8(p + i, _mm256_and_ps(keep, _mm256_sub_ps(pv, _mm256_mul_ps(lr, d))));
    }
  }
}

#endif  // PYC_X86

// ------------------------------------------------------------------------------------------------
// Drivers: the words [w0, w1) of one task; the partial last word (if any) goes to the scalar code.

template <typename R>
void apply_words(const R* w, R* out, const uint8_t* mask, int64_t w0, int64_t w1, int64_t n, bool inplace,
                 bool stream) {
  const int64_t full = std::min(w1, n / 32);  // words [w0, full) are whole
#if PYC_X86
  if (use_avx2() && full > w0) {
    if (sizeof(R) == 4) {
      auto* wi = reinterpret_cast<const uint32_t*>(w);
      auto* oi = reinterpret_cast<uint32_t*>(out);
      if (inplace)
        apply_avx2_32<true, false>(wi, oi, mask, w0, full);
      else if (stream)
        apply_avx2_32<false, true>(wi, oi, mask, w0, full);
      else
        apply_avx2_32<false, false>(wi, oi, mask, w0, full);
    } else {
      auto* wi = reinterpret_cast<const uint16_t*>(w);
      auto* oi = reinterpret_cast<uint16_t*>(out);
      if (inplace)
        apply_avx2_16<true, false>(wi, oi, mask, w0, full);
      else if (stream)
        apply_avx2_16<false, true>(wi, oi, mask, w0, full);
      else
        apply_avx2_16<false, false>(wi, oi, mask, w0, full);
    }
    if (stream) _mm_sfence();
    if (full < w1) apply_scalar<R>(w, out, mask, full * 32, n);
    return;
  }
#endif
  apply_scalar<R>(w, out, mask, w0 * 32, std::min(n, w1 * 32));
}

template <typename T, bool WD, int MODE, bool NEST>
void sgd_words(T* p, const T* g, T* buf, const uint8_t* mask, int64_t w0, int64_t w1, int64_t n, const SgdArgs& a) {
  int64_t b = w0 * 32;
#if PYC_X86
  const int64_t full = std::min(w1, n / 32);
  if (use_avx2() && full > w0) {
    sgd_avx2<T, WD, MODE, NEST>(p, g, buf, mask, w0, full, a);
    b = full * 32;
  }
#endif
  sgd_scalar<T, WD, MODE, NEST>(p, g, buf, mask, b, std::min(n, w1 * 32), a);
}

template <typename T, bool WD, int MODE, bool NEST>
void sgd_run(T* p, const T* g, T* buf, const uint8_t* mask, int64_t n, const SgdArgs& a) {
  at::parallel_for(0, (n + 31) / 32, kWordsPerTask,
                   [&](int64_t w0, int64_t w1) { sgd_words<T, WD, MODE, NEST>(p, g, buf, mask, w0, w1, n, a); });
}

template <typename T, bool WD>
void sgd_mode(T* p, const T* g, T* buf, const uint8_t* mask, int64_t n, const SgdArgs& a, int mode, bool nesterov) {
  if (mode == 0) return sgd_run<T, WD, 0, false>(p, g, buf, mask, n, a);
  if (mode == 1) {
    if (nesterov) return sgd_run<T, WD, 1, true>(p, g, buf, mask, n, a);
    return sgd_run<T, WD, 1, false>(p, g, buf, mask, n, a);
  }
  if (nesterov) return sgd_run<T, WD, 2, true>(p, g, buf, mask, n, a);
  sgd_run<T, WD, 2, false>(p, g, buf, mask, n, a);
}

void apply_impl(const at::Tensor& w, at::Tensor& out, const at::Tensor& packed, bool inplace) {
  const int64_t n = w.numel();
  if (n == 0) return;
  const uint8_t* mp = packed.data_ptr<uint8_t>();
  const bool wide = w.element_size() == 4;
  // Non-temporal stores need 32-byte aligned lines; every task starts on a word (>= 64 bytes).
  const bool stream = !inplace && out.nbytes() >= static_cast<size_t>(kStreamBytes) &&
                      (reinterpret_cast<uintptr_t>(out.data_ptr()) & 31u) == 0;
  const void* wp = w.data_ptr();
  void* op = out.data_ptr();
  at::parallel_for(0, (n + 31) / 32, kWordsPerTask, [&](int64_t w0, int64_t w1) {
    if (wide)
      apply_words(static_cast<const uint32_t*>(wp), static_cast<uint32_t*>(op), mp, w0, w1, n, inplace, stream);
    else
      apply_words(static_cast<const uint16_t*>(wp), static_cast<uint16_t*>(op), mp, w0, w1, n, inplace, stream);
  });
}

}  // namespace

// Packs a contiguous bool mask: per 32-element word, AVX2 compares 32 bytes with zero and takes
// the movemask (nonzero = keep); the partial last word and the scalar path go byte by byte, so the
// padding bits are 0. Parallel over words.
at::Tensor pack_mask_cpu(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pack_mask_cpu: mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.is_contiguous(), "pack_mask_cpu: mask must be contiguous");
  check_cpu("pack_mask_cpu", mask);
  const int64_t n = mask.numel();
  at::Tensor out = at::empty({packed_mask_bytes(n)}, mask.options().dtype(at::kByte));
  if (n == 0) return out;
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, (n + 31) / 32, kWordsPerTask, [&](int64_t w0, int64_t w1) {
    int64_t w = w0;
#if PYC_X86
    const int64_t full = std::min(w1, n / 32);
    if (use_avx2() && full > w0) {
      pack_avx2(m, op, w0, full);
      w = full;
    }
#endif
    pack_scalar(m, op, w, w1, n);
  });
  return out;
}

// Unpacks the first n bits into a new bool [n]: per word, AVX2 shuffles the word's bytes across 32
// lanes and tests one bit per lane; the partial last word is scalar.
at::Tensor unpack_mask_cpu(const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(n >= 0, "unpack_mask_cpu: n must be >= 0, got ", n);
  check_cpu("unpack_mask_cpu", packed);
  check_packed_mask("unpack_mask_cpu", packed, n, packed.device());
  at::Tensor out = empty_output({n}, packed.options().dtype(at::kBool));
  if (n == 0) return out;
  const uint8_t* mp = packed.data_ptr<uint8_t>();
  uint8_t* op = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  at::parallel_for(0, (n + 31) / 32, kWordsPerTask, [&](int64_t w0, int64_t w1) {
    int64_t w = w0;
#if PYC_X86
    const int64_t full = std::min(w1, n / 32);
    if (use_avx2() && full > w0) {
      unpack_avx2(mp, op, w0, full);
      w = full;
    }
#endif
    unpack_scalar(mp, op, w * 32, std::min(n, w1 * 32));
  });
  return out;
}

// out = bit ? w : +0 on the raw bits (fp32 as 32-bit lanes, fp16 / bf16 as 16-bit lanes): per word,
// lane masks from a variable shift (32-bit) or and + cmpeq (16-bit), one AND per vector; large
// outputs are written with non-temporal stores.
at::Tensor apply_mask_cpu(const at::Tensor& w, const at::Tensor& packed) {
  check_mask_float("apply_mask_cpu", "w", w);
  check_cpu("apply_mask_cpu", w);
  check_packed_mask("apply_mask_cpu", packed, w.numel(), w.device());
  at::Tensor out = empty_output(w.sizes(), w.options());
  apply_impl(w, out, packed, false);
  return out;
}

// In place: words of all ones are skipped, words of zeros stored without reading w.
void apply_mask_inplace_cpu(at::Tensor& w, const at::Tensor& packed) {
  check_mask_float("apply_mask_inplace_cpu", "w", w);
  check_cpu("apply_mask_inplace_cpu", w);
  check_packed_mask("apply_mask_inplace_cpu", packed, w.numel(), w.device());
  apply_impl(w, w, packed, true);
}

// The fused masked SGD step (math in ops.cpp / the header comment): one pass reading param, grad,
// buf (unless first) and the mask and writing param and buf, 8 fp32 lanes per AVX2 step,
// specialised on weight decay, momentum mode and nesterov so the loop has no branches.
void masked_sgd_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& buf, const at::Tensor& packed,
                         double lr, double momentum, double weight_decay, double dampening, bool nesterov, bool first) {
  const char* fn = "masked_sgd_step_cpu";
  const bool use_buf = check_masked_sgd_args(fn, param, grad, buf, packed, momentum);
  check_cpu(fn, param);
  const int64_t n = param.numel();
  if (n == 0) return;
  const SgdArgs a{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(weight_decay),
                  static_cast<float>(1.0 - dampening)};
  const int mode = !use_buf ? 0 : (first ? 1 : 2);
  const uint8_t* mp = packed.data_ptr<uint8_t>();
  PYC_DISPATCH_FLOATS(param.scalar_type(), fn, [&] {
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* b = use_buf ? buf.data_ptr<scalar_t>() : nullptr;
    if (weight_decay != 0.0)
      sgd_mode<scalar_t, true>(p, g, b, mp, n, a, mode, use_buf && nesterov);
    else
      sgd_mode<scalar_t, false>(p, g, b, mp, n, a, mode, use_buf && nesterov);
  });
}

}  // namespace pycompress

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("_pack_mask", &pycompress::pack_mask_cpu);
  m.impl("_unpack_mask", &pycompress::unpack_mask_cpu);
  m.impl("_apply_mask", &pycompress::apply_mask_cpu);
  m.impl("_apply_mask_", &pycompress::apply_mask_inplace_cpu);
  m.impl("_masked_sgd_step", &pycompress::masked_sgd_step_cpu);
}
