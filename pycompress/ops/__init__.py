"""Public ops. Each op's plain-torch reference (``<op>_ref``) is its specification; the fused
backends (cpu, cuda, triton) match it in tests. Choose a backend with ``backend=``,
``pycompress.backends.use()`` or ``PYCOMPRESS_BACKEND``."""
from .fake_quantize import QMAX_LIMIT, QMIN_LIMIT, fake_quantize, quant_range, value_checks
from .fake_quantize_ref import fake_quantize_ref

__all__ = ["fake_quantize", "fake_quantize_ref", "quant_range", "value_checks", "QMIN_LIMIT", "QMAX_LIMIT"]
