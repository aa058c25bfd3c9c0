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

// ------------------------------------------------------------------------------------------------
// Depthwise convolution (pycompress/ops/depthwise_ref.py is the specification), shared by the CPU
// and CUDA kernels.

// Python's floor division for b > 0 (C++ truncates towards zero).
inline int64_t dw_floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Output size of one spatial dimension: (n + 2p - d(k - 1) - 1) // s + 1.
inline int64_t dw_out_size(int64_t n, int64_t k, int64_t s, int64_t p, int64_t d) {
  return dw_floor_div(n + 2 * p - d * (k - 1) - 1, s) + 1;
}

// The geometry of one depthwise convolution: input [N, C, H, W], kernel kh x kw, output Ho x Wo.
struct DwGeom {
  int64_t N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
};

// Whether t is laid out channels_last and is not also plainly contiguous: the kernels then run
// the NHWC path and write their output channels_last (the Python fakes use the same rule).
inline bool dw_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// t as the kernels read it: kept when contiguous in NCHW or channels_last, else made contiguous.
inline at::Tensor dw_layout(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

inline void dw_check_tensor(const char* fn, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn, ": ", name,
              " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(t.dim() == 4, fn, ": ", name, " must be 4-D [N, C, H, W], got ", t.dim(), " dimensions");
}

inline void dw_check_params(const char* fn, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  TORCH_CHECK(sh >= 1 && sw >= 1 && sh <= 2 && sw <= 2, fn, ": strides must be 1 or 2, got ", sh, ", ", sw);
  TORCH_CHECK(ph >= 0 && pw >= 0, fn, ": paddings must be >= 0, got ", ph, ", ", pw);
  TORCH_CHECK(dh >= 1 && dw >= 1, fn, ": dilations must be >= 1, got ", dh, ", ", dw);
}

// Kernel sizes the kernels handle: odd, 1..7 (their per-tap arrays hold 7 x 7 taps).
inline void dw_check_kernel(const char* fn, int64_t kh, int64_t kw) {
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh <= 7 && kw <= 7 && kh % 2 == 1 && kw % 2 == 1, fn,
              ": the kernel must be kh x kw with odd sizes in 1..7, got ", kh, "x", kw);
}

// The geometry of a forward (x [N, C, H, W], weight [C, 1, kh, kw] of x's dtype and device) after
// the memory-safety checks.
inline DwGeom dw_check_fwd(const char* fn, const at::Tensor& x, const at::Tensor& weight, int64_t sh, int64_t sw,
                           int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  dw_check_tensor(fn, "x", x);
  dw_check_params(fn, sh, sw, ph, pw, dh, dw);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), fn,
              ": weight must have x's dtype and device");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1, fn,
              ": weight must be [C, 1, kh, kw] with C = ", x.size(1), ", got ", weight.sizes());
  DwGeom g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, weight.size(2), weight.size(3), sh, sw, ph, pw, dh, dw};
  dw_check_kernel(fn, g.kh, g.kw);
  g.Ho = dw_out_size(g.H, g.kh, sh, ph, dh);
  g.Wo = dw_out_size(g.W, g.kw, sw, pw, dw);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, fn, ": the output would be empty (", g.Ho, "x", g.Wo, ")");
  return g;
}

// scale / shift of the fused epilogue: float32 with C elements, or empty; on `device`.
inline void dw_check_channel_vector(const char* fn, const char* name, const at::Tensor& v, int64_t C,
                                    const c10::Device& device) {
  TORCH_CHECK(v.scalar_type() == at::kFloat, fn, ": ", name, " must be float32, got ", v.scalar_type());
  TORCH_CHECK(v.numel() == 0 || v.numel() == C, fn, ": ", name, " must have 0 or C = ", C, " elements, got ",
              v.numel());
  TORCH_CHECK(v.numel() == 0 || v.device() == device, fn, ": ", name, " must be on ", device);
}

// grad_out [N, C, Ho, Wo] must be the output of the convolution described by g (same dtype and
// device as `like`).
inline void dw_check_grad_out(const char* fn, const at::Tensor& grad_out, const DwGeom& g, const at::Tensor& like) {
  dw_check_tensor(fn, "grad_out", grad_out);
  TORCH_CHECK(grad_out.scalar_type() == like.scalar_type() && grad_out.device() == like.device(), fn,
              ": grad_out must have the dtype and device of the other tensors");
  TORCH_CHECK(grad_out.size(0) == g.N && grad_out.size(1) == g.C && grad_out.size(2) == g.Ho &&
                  grad_out.size(3) == g.Wo,
              fn, ": grad_out must be [", g.N, ", ", g.C, ", ", g.Ho, ", ", g.Wo, "] for this convolution, got ",
              grad_out.sizes());
}

// bwd_input: grad_out [N, C, Ho, Wo], weight [C, 1, kh, kw], input size H x W.
inline DwGeom dw_check_bwd_input(const char* fn, const at::Tensor& grad_out, const at::Tensor& weight, int64_t H,
                                 int64_t W, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  dw_check_tensor(fn, "grad_out", grad_out);
  dw_check_params(fn, sh, sw, ph, pw, dh, dw);
  TORCH_CHECK(H >= 1 && W >= 1, fn, ": H and W must be >= 1, got ", H, ", ", W);
  TORCH_CHECK(weight.scalar_type() == grad_out.scalar_type() && weight.device() == grad_out.device(), fn,
              ": weight must have grad_out's dtype and device");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == grad_out.size(1) && weight.size(1) == 1, fn,
              ": weight must be [C, 1, kh, kw] with C = ", grad_out.size(1), ", got ", weight.sizes());
  DwGeom g{grad_out.size(0), grad_out.size(1), H, W, 0, 0, weight.size(2), weight.size(3), sh, sw, ph, pw, dh, dw};
  dw_check_kernel(fn, g.kh, g.kw);
  g.Ho = dw_out_size(H, g.kh, sh, ph, dh);
  g.Wo = dw_out_size(W, g.kw, sw, pw, dw);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, fn, ": the output would be empty (", g.Ho, "x", g.Wo, ")");
  dw_check_grad_out(fn, grad_out, g, grad_out);
  return g;
}

// bwd_weight: grad_out [N, C, Ho, Wo] and x [N, C, H, W] of one dtype and device.
inline DwGeom dw_check_bwd_weight(const char* fn, const at::Tensor& grad_out, const at::Tensor& x, int64_t kh,
                                  int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                                  int64_t dw) {
  dw_check_tensor(fn, "x", x);
  dw_check_params(fn, sh, sw, ph, pw, dh, dw);
  dw_check_kernel(fn, kh, kw);
  DwGeom g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, kh, kw, sh, sw, ph, pw, dh, dw};
  g.Ho = dw_out_size(g.H, kh, sh, ph, dh);
  g.Wo = dw_out_size(g.W, kw, sw, pw, dw);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, fn, ": the output would be empty (", g.Ho, "x", g.Wo, ")");
  dw_check_grad_out(fn, grad_out, g, x);
  return g;
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
