// Depthwise 2-D convolution, CPU: the op entry points (checks, memory layout, outputs, dispatch to
// the AVX2 kernels by layout or to the portable scalar path) and their registration. The kernels and
// the overview: depthwise_common.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu_common.h"
#include "depthwise_common.h"
#include "pycompress.h"

namespace pycompress {
namespace {

using cpu::check_cpu;
using cpu::dw::Affine;
using cpu::dw::strides_of;

// The weight as fp32 [C][kh * kw].
std::vector<float> weight_f32(const at::Tensor& weight) {
  at::Tensor w = weight.contiguous().to(at::kFloat);
  const float* p = w.data_ptr<float>();
  return std::vector<float>(p, p + w.numel());
}

at::Tensor empty_like_format(at::IntArrayRef sizes, const at::Tensor& like, bool channels_last) {
  at::Tensor t = at::empty(sizes, like.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous));
  cpu::advise_huge_pages(t);  // large outputs: fewer page faults on first touch
  return t;
}

}  // namespace

// y = act(conv(x, w) * scale + shift). NCHW: planes through an L1 buffer, 8 output columns per
// vector, kernels 3x3 and 5x5 unrolled at compile time. NHWC: per-pixel tap lists, 16 channels per
// step. Scalar: direct loops.
at::Tensor depthwise_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale,
                             const at::Tensor& shift, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                             int64_t dw, int64_t act) {
  const char* fn = "depthwise_fwd_cpu";
  const DwGeom g = dw_check_fwd(fn, x_in, weight, sh, sw, ph, pw, dh, dw);
  check_cpu(fn, x_in);
  dw_check_channel_vector(fn, "scale", scale, g.C, x_in.device());
  dw_check_channel_vector(fn, "shift", shift, g.C, x_in.device());
  TORCH_CHECK(act >= 0 && act <= 2, fn, ": act must be 0 (none), 1 (relu) or 2 (relu6), got ", act);
  const at::Tensor x = dw_layout(x_in);
  const bool cl = dw_channels_last(x);
  at::Tensor y = empty_like_format({g.N, g.C, g.Ho, g.Wo}, x, cl);
  if (y.numel() == 0) return y;
  const std::vector<float> w = weight_f32(weight);
  const Affine af(scale, shift, g.C);
  const int a = static_cast<int>(act);
  PYC_DISPATCH_FLOATS(x.scalar_type(), fn, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
#if PYC_X86
    if (cpu::use_avx2</*need_fma=*/true>()) {
      if (cl)
        cpu::dw::fwd_nhwc_avx2<scalar_t>(xp, yp, w, af, a, g);
      else
        cpu::dw::fwd_nchw_avx2<scalar_t>(xp, yp, w, af, a, g);
      return;
    }
#endif
    cpu::dw::fwd_scalar<scalar_t>(xp, strides_of(x), yp, strides_of(y), w.data(), af, a, g);
  });
  return y;
}

// grad_x = conv_transpose(grad_out, w). NCHW: the forward's plane kernel over grad_out upsampled by
// the stride (zeros inserted while filling the buffer) with the flipped kernel, stride 1. NHWC:
// per-pixel lists of the taps whose (h + p - k d) / s is exact and inside.
at::Tensor depthwise_bwd_input_cpu(const at::Tensor& go_in, const at::Tensor& weight, int64_t H, int64_t W, int64_t sh,
                                   int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  const char* fn = "depthwise_bwd_input_cpu";
  const DwGeom g = dw_check_bwd_input(fn, go_in, weight, H, W, sh, sw, ph, pw, dh, dw);
  check_cpu(fn, go_in);
  const at::Tensor go = dw_layout(go_in);
  const bool cl = dw_channels_last(go);
  at::Tensor gx = empty_like_format({g.N, g.C, H, W}, go, cl);
  if (gx.numel() == 0) return gx;
  const std::vector<float> w = weight_f32(weight);
  PYC_DISPATCH_FLOATS(go.scalar_type(), fn, [&] {
    const scalar_t* gp = go.data_ptr<scalar_t>();
    scalar_t* xp = gx.data_ptr<scalar_t>();
#if PYC_X86
    if (cpu::use_avx2</*need_fma=*/true>()) {
      if (cl)
        cpu::dw::bwd_input_nhwc_avx2<scalar_t>(gp, xp, w, g);
      else
        cpu::dw::bwd_input_nchw_avx2<scalar_t>(gp, xp, w, g);
      return;
    }
#endif
    cpu::dw::bwd_input_scalar<scalar_t>(gp, strides_of(go), xp, strides_of(gx), w.data(), g);
  });
  return gx;
}

// (grad_w fp32 [C, 1, kh, kw], grad_b fp32 [C] or empty). One task per channel (NCHW: planes through
// the forward's buffer, kw-wide fp32 vector accumulators per tap row) or per block of 8 channels
// (NHWC), fp64 across planes: the order depends only on the shapes.
std::tuple<at::Tensor, at::Tensor> depthwise_bwd_weight_cpu(const at::Tensor& go_in, const at::Tensor& x_in,
                                                            int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                                                            int64_t pw, int64_t dh, int64_t dw, bool with_bias) {
  const char* fn = "depthwise_bwd_weight_cpu";
  const DwGeom g = dw_check_bwd_weight(fn, go_in, x_in, kh, kw, sh, sw, ph, pw, dh, dw);
  check_cpu(fn, x_in);
  const at::Tensor x = dw_layout(x_in);
  const bool cl = dw_channels_last(x);
  // grad_out in x's layout (the kernels index both the same way)
  const at::Tensor go = cl ? go_in.contiguous(at::MemoryFormat::ChannelsLast) : go_in.contiguous();
  const auto fopts = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gw = at::zeros({g.C, 1, kh, kw}, fopts);
  at::Tensor gb = with_bias ? at::zeros({g.C}, fopts) : at::empty({0}, fopts);
  if (g.N == 0 || g.C == 0) return {gw, gb};
  float* gwp = gw.data_ptr<float>();
  float* gbp = with_bias ? gb.data_ptr<float>() : nullptr;
  PYC_DISPATCH_FLOATS(x.scalar_type(), fn, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = go.data_ptr<scalar_t>();
#if PYC_X86
    if (cpu::use_avx2</*need_fma=*/true>()) {
      if (cl)
        cpu::dw::bwd_weight_nhwc_avx2<scalar_t>(gp, xp, gwp, gbp, g);
      else
        cpu::dw::bwd_weight_nchw_avx2<scalar_t>(gp, xp, gwp, gbp, g);
      return;
    }
#endif
    cpu::dw::bwd_weight_scalar<scalar_t>(gp, strides_of(go), xp, strides_of(x), gwp, gbp, g);
  });
  return {gw, gb};
}

}  // namespace pycompress

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("_depthwise_fwd", &pycompress::depthwise_fwd_cpu);
  m.impl("_depthwise_bwd_input", &pycompress::depthwise_bwd_input_cpu);
  m.impl("_depthwise_bwd_weight", &pycompress::depthwise_bwd_weight_cpu);
}
