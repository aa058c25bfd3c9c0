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
