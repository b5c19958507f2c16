"""setup.py builds the optional CUDA extension in csrc/; everything else is in pyproject.toml.

A plain `pip install -e .` builds nothing here and needs no nvcc. With MINIVLLM_BUILD_CUDA=1 the
extension `minivllm._C` is compiled with torch.utils.cpp_extension against the installed torch:

    MINIVLLM_BUILD_CUDA=1 pip install --no-build-isolation -e .

(`--no-build-isolation`, because the build must see the torch it will run with, not a fresh copy
pip would download into an isolated build environment.) The other way to get it, a just-in-time
build on first use, is described in minivllm/kernels/cuda.py.
"""
import glob
import os

from setuptools import setup

SOURCES = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))  # minivllm/kernels/cuda.py JIT-builds the same


def cuda_extension_kwargs() -> dict:
    if os.environ.get("MINIVLLM_BUILD_CUDA") != "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            "MINIVLLM_BUILD_CUDA=1 needs torch importable at build time: install torch first and "
            "use `pip install --no-build-isolation -e .`"
        ) from exc
    extension = CUDAExtension(
        "minivllm._C",
        SOURCES,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension_kwargs())
