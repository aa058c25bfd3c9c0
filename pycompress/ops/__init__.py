"""Public ops. Each op's plain-torch reference (``<op>_ref``) is its specification; the fused
backends (cpu, cuda, triton) match it in tests. Choose a backend with ``backend=``,
``pycompress.backends.use()`` or ``PYCOMPRESS_BACKEND``."""

from .depthwise import depthwise_conv2d, depthwise_conv2d_bn_act
from .depthwise_ref import depthwise_conv2d_bn_act_ref, depthwise_conv2d_ref
from .fake_quantize import QMAX_LIMIT, QMIN_LIMIT, fake_quantize, quant_range, value_checks
from .fake_quantize_ref import fake_quantize_ref
from .sparse_mask import apply_mask, masked_sgd_step, pack_mask, packed_mask_bytes, unpack_mask
from .sparse_mask_ref import apply_mask_ref, masked_sgd_step_ref, pack_mask_ref, unpack_mask_ref

__all__ = [
    "fake_quantize",
    "fake_quantize_ref",
    "quant_range",
    "value_checks",
    "QMIN_LIMIT",
    "QMAX_LIMIT",
    "pack_mask",
    "unpack_mask",
    "apply_mask",
    "masked_sgd_step",
    "packed_mask_bytes",
    "pack_mask_ref",
    "unpack_mask_ref",
    "apply_mask_ref",
    "masked_sgd_step_ref",
    "depthwise_conv2d",
    "depthwise_conv2d_bn_act",
    "depthwise_conv2d_ref",
    "depthwise_conv2d_bn_act_ref",
]
