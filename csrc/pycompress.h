// Shared helpers for the pycompress C++/CUDA kernels.
#pragma once
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace pycompress {

// Bytes of the packed clamp/keep mask for n elements: whole 32-bit words, so a CUDA warp ballot can
// store a word per 32 elements. Bit (i % 8) of byte (i / 8) belongs to element i (little endian).
inline int64_t packed_mask_bytes(int64_t n) { return ((n + 31) / 32) * 4; }

// Cheap memory-safety checks shared by the fake-quantize kernels of every backend (the Python layer
// has validated the values). Returns C = inv_scale.numel().
inline int64_t check_fake_quantize_args(const at::Tensor& x, const at::Tensor& inv_scale, const at::Tensor& scale,
                                        const at::Tensor& zero_point, int64_t qmin, int64_t qmax, int64_t inner) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fake_quantize: x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.is_contiguous(), "fake_quantize: x must be contiguous");
  const int64_t C = inv_scale.numel();
  TORCH_CHECK(C >= 1, "fake_quantize: inv_scale must have at least one element");
  const at::Tensor* params[3] = {&inv_scale, &scale, &zero_point};
  const char* names[3] = {"inv_scale", "scale", "zero_point"};
  for (int k = 0; k < 3; ++k) {
    const at::Tensor& p = *params[k];
    TORCH_CHECK(p.scalar_type() == at::kFloat, "fake_quantize: ", names[k], " must be float32");
    TORCH_CHECK(p.is_contiguous() && p.numel() == C, "fake_quantize: ", names[k], " must be contiguous with ", C,
                " elements");
    TORCH_CHECK(p.device() == x.device(), "fake_quantize: ", names[k], " must be on ", x.device());
  }
  TORCH_CHECK(inner >= 1, "fake_quantize: inner must be >= 1, got ", inner);
  // The kernels compare in fp32: the bounds must be exact fp32 integers.
  TORCH_CHECK(qmin <= qmax && qmin >= -(int64_t(1) << 24) && qmax <= (int64_t(1) << 24),
              "fake_quantize: need -2^24 <= qmin <= qmax <= 2^24, got ", qmin, ", ", qmax);
  const int64_t n = x.numel();
  TORCH_CHECK(n == 0 || (inner <= n / C && n % (C * inner) == 0), "fake_quantize: ", n,
              " elements cannot be viewed as [outer, ", C, ", ", inner, "]");
  return C;
}


// Cheap memory-safety checks of a packed sparse mask for n elements on `device` (the Python layer
// has validated the user's arguments): uint8, contiguous, packed_mask_bytes(n) bytes.
inline void check_packed_mask(const char* fn, const at::Tensor& packed, int64_t n, const c10::Device& device) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, fn, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.is_contiguous(), fn, ": packed must be contiguous");
  TORCH_CHECK(packed.numel() == packed_mask_bytes(n), fn, ": packed must have ", packed_mask_bytes(n), " bytes for ",
              n, " elements (ceil(n / 32) * 4), got ", packed.numel());
  TORCH_CHECK(packed.device() == device, fn, ": packed is on ", packed.device(), ", expected ", device);
}

// Float tensor arguments of the sparse-mask kernels: fp32 | fp16 | bf16, contiguous.
inline void check_mask_float(const char* fn, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn, ": ", name,
              " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// The checks shared by the CPU and CUDA masked SGD step. Returns whether buf is used (momentum != 0).
inline bool check_masked_sgd_args(const char* fn, const at::Tensor& param, const at::Tensor& grad,
                                  const at::Tensor& buf, const at::Tensor& packed, double momentum) {
  check_mask_float(fn, "param", param);
  check_mask_float(fn, "grad", grad);
  const int64_t n = param.numel();
  TORCH_CHECK(grad.scalar_type() == param.scalar_type() && grad.numel() == n && grad.device() == param.device(), fn,
              ": grad must match param in dtype, size and device");
  check_packed_mask(fn, packed, n, param.device());
  const bool use_buf = momentum != 0.0;
  if (use_buf) {
    check_mask_float(fn, "buf", buf);
    TORCH_CHECK(buf.scalar_type() == param.scalar_type() && buf.numel() == n && buf.device() == param.device(), fn,
                ": buf must match param in dtype, size and device when momentum != 0");
  }
  return use_buf;
}

}  // namespace pycompress

// Runs the lambda with scalar_t bound to the kernel dtypes (fp32, fp16, bf16); anything else is an
// error naming the kernel.
#define PYC_DISPATCH_FLOATS(dtype, NAME, ...)                                       \
  [&] {                                                                             \
    switch (dtype) {                                                                \
      case at::kFloat: {                                                            \
        using scalar_t = float;                                                     \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case at::kHalf: {                                                             \
        using scalar_t = c10::Half;                                                 \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case at::kBFloat16: {                                                         \
        using scalar_t = c10::BFloat16;                                             \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      default:                                                                      \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", dtype);                    \
    }                                                                               \
  }()
