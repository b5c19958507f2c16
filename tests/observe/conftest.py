"""A tiny random-weight Llama shared by the observe tests (one per xdist worker)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from minivllm.models import make_random_model

    return str(make_random_model(tmp_path_factory.mktemp("observe-model") / "llama", arch="llama", size="tiny"))
