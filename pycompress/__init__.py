"""pycompress: knowledge distillation, pruning and quantization for CNNs, with fused kernels."""

from . import _ext, backends, ops  # noqa: F401

__version__ = "0.1.0"
