"""Fixtures for the end-to-end engine tests: tiny random-weight HF model directories and the
Hugging Face greedy oracle, both built once per test session (per xdist worker).

The engine runs on the CPU with the reference attention by default; on a GPU machine
`MINIVLLM_TEST_DEVICE=cuda` (and optionally `MINIVLLM_TEST_BACKEND=triton|cuda`) runs the
HF-equality tests there, still in float32, against transformers on the CPU.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

ARCHS = ("llama", "qwen2", "qwen3", "opt")
ENGINE_DEVICE = os.environ.get("MINIVLLM_TEST_DEVICE", "cpu")
ENGINE_BACKEND = os.environ.get("MINIVLLM_TEST_BACKEND", "torch" if ENGINE_DEVICE == "cpu" else "auto")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(arch) -> Path of a tiny random-weight model directory (made on first use)."""
    from minivllm.models import make_random_model

    made = {}

    def get(arch: str):
        if arch not in made:
            made[arch] = make_random_model(tmp_path_factory.mktemp(f"model-{arch}"), arch=arch, size="tiny", seed=0)
        return made[arch]

    return get


@pytest.fixture(scope="session")
def hf_greedy(model_dir):
    """hf_greedy(arch, prompt_ids, max_new_tokens) -> the token ids transformers' generate picks."""
    from transformers import AutoModelForCausalLM

    models, memo = {}, {}

    def run(arch: str, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (arch, tuple(prompt), max_new_tokens)
        if key not in memo:
            if arch not in models:
                models[arch] = AutoModelForCausalLM.from_pretrained(model_dir(arch), dtype=torch.float32).eval()
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = models[arch].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=max_new_tokens)
            memo[key] = out[0, len(prompt):].tolist()
        return memo[key]

    run.models = models
    return run


def random_prompts(lengths, seed=0, vocab=512):
    """Token-id prompts of the given lengths (ids >= 4 skip the special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]
