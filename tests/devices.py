"""Where a test runs, and how `pytest -m gpu` finds every GPU path.

A test is a *GPU test* (marker `gpu`) when it runs GPU code. Two kinds:

* tests that need a GPU (CUDA graphs, the CUDA extension, two GPUs), marked `@pytest.mark.gpu`;
  tests/conftest.py skips them, with the reason, on a machine without CUDA;
* tests that run on `DEVICE`: the GPU where there is one, else the CPU, where Triton runs in its
  interpreter. On a GPU machine they are GPU tests, so their module sets `pytestmark = ON_DEVICE`;
  on the CPU they are ordinary tests.

So on a GPU machine `python -m pytest -m gpu` runs every GPU path, and on the CPU (CI) the same
command reports each of them skipped, with the reason.
"""

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
ON_DEVICE = [pytest.mark.gpu] if ON_GPU else []


def on_device(test):
    """Mark one test that runs on DEVICE (a whole module: `pytestmark = ON_DEVICE`)."""
    for mark in ON_DEVICE:
        test = mark(test)
    return test
