"""Shared test set-up.

On a machine without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1, numpy on
the CPU). The variable must be set before triton is imported, hence here, at the top of the root
conftest. On a GPU machine the same tests run the real kernels, and the C++/CUDA extension is
compiled from csrc/ on first use (MINIVLLM_CUDA_JIT=1, cached under TORCH_EXTENSIONS_DIR), so a
GPU run tests it too; MINIVLLM_CUDA_JIT=0 opts out. tests/devices.py says which tests are GPU
tests (`pytest -m gpu`).
"""

import os

import torch

pytest_plugins = ("tests.real_model",)  # the real model's fixtures, for every test folder

if torch.cuda.is_available():
    os.environ.setdefault("MINIVLLM_CUDA_JIT", "1")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    from tests._triton_interpreter import patch_bf16_dot, patch_fp8_rounding

    patch_bf16_dot()
    patch_fp8_rounding()


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need a CUDA device: skipped, with the reason, where there is none."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
