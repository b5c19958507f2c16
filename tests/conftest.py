"""Shared test set-up.

On a machine without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1, numpy on
the CPU). The variable must be set before triton is imported, hence here, at the top of the root
conftest. On a GPU machine nothing is set and the same tests run the real kernels.
"""

import os

import torch

if not torch.cuda.is_available():
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
