"""Tiny random-weight Hugging Face models (variants.py), written once per test session and shared.

Each variant is a real model directory (config.json, model.safetensors, tokenizer) made by
`make_random_model`; tests load it twice, with `transformers` (the oracle) and with our loader.
"""

from __future__ import annotations

import pytest
import torch

from minivllm.models import load_model, make_random_model
from tests.models.variants import VARIANTS


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(variant) -> Path of that variant's directory, created on first use."""
    made = {}

    def get(variant: str):
        if variant not in made:
            made[variant] = make_random_model(
                tmp_path_factory.mktemp(variant), seed=list(VARIANTS).index(variant),
                **VARIANTS[variant])
        return made[variant]

    return get


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """hf_model(variant) -> the transformers model of that directory, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def get(variant: str):
        if variant not in loaded:
            loaded[variant] = AutoModelForCausalLM.from_pretrained(str(model_dir(variant))).float().eval()
        return loaded[variant]

    return get


@pytest.fixture
def our_model(model_dir):
    """our_model(variant) -> a fresh minivllm model (fresh: each test binds its own KV cache)."""
    return lambda variant: load_model(model_dir(variant), dtype=torch.float32, device="cpu")
