"""The benchmarks' tests: CPU runs of tiny shapes that check each mode runs, writes the JSON it
documents and computes its ratios right. No timing is asserted: speed lives in the benchmarks'
GPU runs (benchmarks/RESULTS.md)."""

import pytest
import torch

from benchmarks.common import build_model


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A folder holding the tiny random model in float32, built once: pass as --model-cache."""
    root = tmp_path_factory.mktemp("bench-models")
    build_model("tiny", root, torch.float32)
    return root
