"""Build script: the package (pyproject.toml) plus the optional compiled extension of csrc/.

The extension ``implicit_torch._C`` holds the kernels of ``implicit_torch::batched_cg`` and the
CPU kernel of ``implicit_torch::qp_ipm`` (the QP solver's interior-point iterations). It
registers kernels only: the operators' schemas are defined in Python
(``implicit_torch/ops/_schemas.py``), so they exist, served by pure-PyTorch kernels, whether or
not the extension is built. It is built as

* a CppExtension (CPU kernel only) by default;
* a CUDAExtension (CPU and CUDA kernels) when torch is a CUDA build and a CUDA toolkit is
  found (``torch.utils.cpp_extension.CUDA_HOME``), or when ``FORCE_CUDA=1``. Whether a GPU is
  present plays no part: a GPU-less build machine builds the same extension. ``FORCE_CUDA=0``
  builds the CPU kernel only. ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (torch's
  default otherwise).
* nothing when ``IMPLICIT_TORCH_NO_EXT=1`` or torch is not importable at build time.

A failed compile is reported as a warning and the build goes on: the package then runs on its
pure-PyTorch kernel and says so in one warning line at import. ``IMPLICIT_TORCH_STRICT_BUILD=1``
makes a failed compile an error instead (CI, scripts/gpu_check.sh).

    pip install --no-build-isolation -e .            # or: python setup.py build_ext --inplace
"""

import os
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    return value not in ("0", "false", "no", "off")


def _extension_setup():
    """``(ext_modules, cmdclass)`` for setup(); empty when the extension is not wanted."""
    if _flag("IMPLICIT_TORCH_NO_EXT"):
        print("implicit_torch: IMPLICIT_TORCH_NO_EXT is set, not building the extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn(
            "implicit_torch: torch is not importable at build time, so the compiled extension "
            "is not built (install torch first and use pip's --no-build-isolation)",
            stacklevel=1,
        )
        return [], {}

    force_cuda = _flag("FORCE_CUDA")
    if force_cuda is None:
        use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    else:
        use_cuda = force_cuda

    sources = [
        os.path.join(CSRC, "implicit_torch.cpp"),
        os.path.join(CSRC, "cpu", "batched_cg_cpu.cpp"),
        os.path.join(CSRC, "cpu", "qp_ipm_cpu.cpp"),
    ]
    # -O3, never -march: the wheel must run on any x86-64 / aarch64 machine. OpenMP so that
    # at::parallel_for runs in parallel (it links the libgomp that torch itself loads).
    cxx = ["-O3", "-fvisibility=hidden"]
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
    extra = {"cxx": cxx}
    kwargs = {}
    if use_cuda:
        sources += [
            os.path.join(CSRC, "cuda", "batched_cg_cuda.cpp"),
            os.path.join(CSRC, "cuda", "batched_cg_kernels.cu"),
        ]
        extra["nvcc"] = ["-O3", "-lineinfo"]
        Extension = cpp_extension.CUDAExtension
    else:
        Extension = cpp_extension.CppExtension
    if sys.platform.startswith("linux"):
        kwargs["extra_link_args"] = ["-fopenmp"]
    ext = Extension(
        "implicit_torch._C",
        sources,
        include_dirs=[os.path.join(HERE, CSRC)],
        extra_compile_args=extra,
        **kwargs,
    )
    print(f"implicit_torch: building the {'CUDA' if use_cuda else 'CPU'} extension")

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """BuildExtension whose failure leaves a working pure-Python package."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, toolkit mismatch, ...
                if _flag("IMPLICIT_TORCH_STRICT_BUILD"):
                    raise
                msg = str(exc).strip().splitlines()
                warnings.warn(
                    "implicit_torch: building the compiled extension failed "
                    f"({type(exc).__name__}: {msg[-1] if msg else ''}); the package will use "
                    "its pure-PyTorch kernels",
                    stacklevel=1,
                )

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_setup()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
