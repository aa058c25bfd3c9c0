"""Triton kernels of pycompress, installed as the package ``pycompress.kernels``.

Importing this package imports nothing else (in particular not triton), so that pycompress works
where triton is missing. The kernel modules (``pycompress.kernels.fake_quantize``, ...) import
triton and are loaded only by the triton backend of an op, when that backend is asked to run.

Each module holds ``@triton.jit`` kernels and thin launchers that take the already validated and
normalised arguments of the op layer (see ``pycompress/ops/*_ref.py`` for each contract), allocate
the outputs, pick block sizes and a grid, and launch; they check, in O(1), what keeps their kernels
in bounds (TypeError / ValueError otherwise). ``_common`` holds what the modules share: the
jit helpers (fp32 <-> bf16 conversions, packed-mask bits) and those launcher checks. Everything runs
under the Triton interpreter too (``TRITON_INTERPRET=1``, CPU tensors), which is how the kernels
are tested without a GPU.
"""
