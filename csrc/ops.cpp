// Every op schema of pycompress, defined once. Kernels register themselves per dispatch key
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA); Python registers the fake (meta) kernels.
//
// These are the low-level kernel entry points. The public ops (pycompress.ops.*) validate and
// normalise arguments, choose a backend and call them; nothing here re-validates user input
// beyond cheap TORCH_CHECKs that guard memory safety.
#include <torch/extension.h>
#include <torch/library.h>

#include "pycompress.h"

TORCH_LIBRARY(pycompress, m) {
  // Fake quantization over a contiguous tensor viewed as [outer, C, inner]; element i belongs to
  // channel (i / inner) % C. Per-tensor quantization is C == 1.
  //   x          fp32 | fp16 | bf16, contiguous
  //   inv_scale  fp32 [C], equal to 1 / scale (computed by torch, so all backends share it)
  //   scale      fp32 [C]
  //   zero_point fp32 [C], integer-valued, inside [qmin, qmax]
  // Returns (out, mask): out has x's dtype and shape; mask is uint8 [ceil(n / 32) * 4] where bit
  // (i % 8) of byte (i / 8) is 1 when element i was not clamped (NaN counts as not clamped), or an
  // empty uint8 tensor when with_mask is false.
  m.def(
      "_fake_quantize_fwd(Tensor x, Tensor inv_scale, Tensor scale, Tensor zero_point, int qmin, "
      "int qmax, int inner, bool with_mask) -> (Tensor, Tensor)");
  // Straight-through backward from the packed mask: grad_x[i] = grad[i] if bit i else 0.
  m.def("_fake_quantize_bwd(Tensor grad, Tensor mask) -> Tensor");
  // Backward with learnable scale and zero point (LSQ), recomputing the clamp from x:
  // returns (grad_x [x's shape and dtype], grad_scale fp32 [C], grad_zero_point fp32 [C]); the two
  // [C] sums are multiplied by grad_factor.
  m.def(
      "_fake_quantize_bwd_learnable(Tensor grad, Tensor x, Tensor inv_scale, Tensor scale, "
      "Tensor zero_point, int qmin, int qmax, int inner, float grad_factor) -> (Tensor, Tensor, Tensor)");

  // Bit-packed sparse masks (pycompress/ops/sparse_mask_ref.py is the specification). A packed mask
  // of n elements is uint8 [ceil(n / 32) * 4], contiguous, on the data's device: bit (i % 8) of byte
  // (i / 8) is 1 where element i (row-major) is kept; padding bits past n are 0. Float tensors
  // below are fp32 | fp16 | bf16 and contiguous.
  //
  // Packs a contiguous bool mask (any shape; nonzero = keep) into a new packed mask.
  m.def("_pack_mask(Tensor mask) -> Tensor");
  // The first n bits of a packed mask as a new contiguous bool [n].
  m.def("_unpack_mask(Tensor packed, int n) -> Tensor");
  // A new contiguous tensor like w: w[i] where bit i is set, else exactly +0.0 (a select on the raw
  // bits: -0.0, inf and NaN are pruned to +0.0 and kept bit for bit).
  m.def("_apply_mask(Tensor w, Tensor packed) -> Tensor");
  // The same in place on w.
  m.def("_apply_mask_(Tensor(a!) w, Tensor packed) -> ()");
  // One masked SGD step in place on param and buf (grad read only), per element in fp32:
  //   g = m ? grad : 0;  g += weight_decay * p (when weight_decay != 0)
  //   b = first ? g : momentum * b + (1 - dampening) * g;  b = m ? b : 0   (when momentum != 0)
  //   d = nesterov ? g + momentum * b : b  (d = g when momentum == 0);  p = m ? p - lr * d : 0
  // buf has param's dtype and size when momentum != 0 (not read when first), else it is ignored
  // (an empty tensor). grad has param's dtype and size.
  m.def(
      "_masked_sgd_step(Tensor(a!) param, Tensor grad, Tensor(b!) buf, Tensor packed, float lr, float momentum, "
      "float weight_decay, float dampening, bool nesterov, bool first) -> ()");

  // Depthwise 2-D convolution (pycompress/ops/depthwise_ref.py is the specification). Tensors are
  // fp32 | fp16 | bf16, [N, C, H, W], contiguous in NCHW or in channels_last (anything else is made
  // contiguous); outputs keep the memory format of the first tensor argument (channels_last when it
  // is channels_last and not also plainly contiguous). weight is [C, 1, kh, kw] of that dtype, kh
  // and kw odd in 1..7; strides 1 or 2, paddings >= 0, dilations >= 1; accumulation in fp32.
  //
  // Forward with the fused epilogue: y = act(conv(x, weight) * scale[c] + shift[c]) (one fp32
  // multiply, then one add), cast once to x's dtype. scale and shift are fp32 [C] or empty (1 and 0);
  // act: 0 none, 1 relu, 2 relu6. Returns y [N, C, Ho, Wo].
  m.def(
      "_depthwise_fwd(Tensor x, Tensor weight, Tensor scale, Tensor shift, int sh, int sw, int ph, int pw, "
      "int dh, int dw, int act) -> Tensor");
  // Gradient of the convolution with respect to its input of size H x W (the transposed
  // convolution of grad_out [N, C, Ho, Wo] with weight): grad_out's dtype and memory format.
  m.def(
      "_depthwise_bwd_input(Tensor grad_out, Tensor weight, int H, int W, int sh, int sw, int ph, int pw, "
      "int dh, int dw) -> Tensor");
  // Gradients of the weight and of a bias: (grad_w fp32 [C, 1, kh, kw], grad_b fp32 [C], or an empty
  // fp32 tensor when with_bias is false), per-channel sums over (n, i, j) of grad_out times the
  // input tap (grad_out alone for the bias). Deterministic: the summation order depends only on the
  // shapes, never on the thread count or the GPU.
  m.def(
      "_depthwise_bwd_weight(Tensor grad_out, Tensor x, int kh, int kw, int sh, int sw, int ph, int pw, "
      "int dh, int dw, bool with_bias) -> (Tensor, Tensor)");
}

namespace {
bool cuda_built() {
#ifdef PYCOMPRESS_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pycompress compiled kernels (CPU always, CUDA when built with nvcc)";
  m.def("cuda_built", &cuda_built, "whether the CUDA kernels were compiled into this extension");
}
