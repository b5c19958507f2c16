"""Shared test set-up.

On a machine without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1, numpy on
the CPU). The variable must be set before triton is imported, hence here, at the top of the root
conftest. On a GPU machine the same tests run the real kernels, and the C++/CUDA extension is
compiled from csrc/ on first use (MINIVLLM_CUDA_JIT=1, cached under TORCH_EXTENSIONS_DIR), so a
GPU run tests it too; MINIVLLM_CUDA_JIT=0 opts out. tests/devices.py says which tests are GPU
tests (`pytest -m gpu`).
"""

import os


def _share_the_cores() -> None:
    """Under pytest-xdist each worker is a process of its own, and torch would give each one a
    compute thread per core. OpenMP's threads wait by spinning, so two workers' pools on a 2-core
    machine ran CPU forward passes ~9x slower (the real-model greedy test: 3.6 s alone, 32 s beside
    a busy worker, 4.4 s with a thread each). Each worker takes its share of the cores. Set before
    torch is imported; the processes a test starts (a server, its engine) inherit it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))


_share_the_cores()

import torch  # noqa: E402  (after the thread count is set)

if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch first

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
