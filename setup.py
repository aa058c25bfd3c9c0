"""Builds pycompress._C from csrc/ with torch.utils.cpp_extension and ninja.

CPU kernels always build. CUDA kernels build when torch is a CUDA build and nvcc is found
(CUDA_HOME or PATH): on a machine without a GPU that is a compile-and-link check of the CUDA code.
PYCOMPRESS_CUDA=0|1|auto overrides (1 makes a missing nvcc an error). Build in place with
`pip install --no-build-isolation -e .` after torch is installed: the extension must be built
against the torch it runs with.
"""

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("PYCOMPRESS_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"PYCOMPRESS_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return False
    have_nvcc = cpp_extension.CUDA_HOME is not None and (
        os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc")
    )
    if torch.version.cuda is None or not have_nvcc:
        if mode == "1":
            raise SystemExit(
                "PYCOMPRESS_CUDA=1 but "
                + ("torch is a CPU-only build" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)")
            )
        return False
    return True


def _extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: the kernels must round exactly like torch; a fused multiply-add would
    # change x * inv_scale before rounding.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    extra = {"cxx": cxx}
    libs = ["gomp"]
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to detect: compile for Hopper (the GPU machine) so the check is real.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["cxx"] = cxx + ["-DPYCOMPRESS_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-DPYCOMPRESS_WITH_CUDA", "--fmad=false", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "pycompress._C",
            sources,
            extra_compile_args=extra,
            libraries=libs,
            include_dirs=[os.path.join(ROOT, "csrc")],
        )
    return cpp_extension.CppExtension(
        "pycompress._C", sources, extra_compile_args=extra, libraries=libs, include_dirs=[os.path.join(ROOT, "csrc")]
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
