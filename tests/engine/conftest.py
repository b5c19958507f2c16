"""Fixtures for the end-to-end engine tests: tiny random-weight HF model directories and the
Hugging Face greedy oracle, both built once per test session (per xdist worker).

`engine_device` runs a test twice: on the CPU with the reference attention, and on the GPU
(marked `gpu`: skipped where there is no CUDA) with what "auto" picks there, the Triton kernels,
still in float32 and against transformers on the CPU. So `pytest -m gpu` on a GPU machine runs
the Hugging Face equality on the GPU, and CI runs it on the CPU.
"""

from __future__ import annotations

import random

import pytest
import torch

ARCHS = ("llama", "qwen2", "qwen3", "opt")
BACKEND_ON = {"cpu": "torch", "cuda": "auto"}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def engine_device(request) -> str:
    """The device an engine test runs on: "cpu", then "cuda" where there is a GPU."""
    return request.param


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
    return hf_greedy_oracle(model_dir)


def hf_greedy_oracle(model_dir):
    """hf_greedy for the models `model_dir(name)` makes: each loaded once, each answer memoized;
    `.models` holds the loaded transformers models."""
    from transformers import AutoModelForCausalLM

    models, memo = {}, {}

    def run(name: str, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (name, tuple(prompt), max_new_tokens)
        if key not in memo:
            if name not in models:
                models[name] = AutoModelForCausalLM.from_pretrained(model_dir(name), dtype=torch.float32).eval()
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = models[name].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=max_new_tokens)
            memo[key] = out[0, len(prompt):].tolist()
        return memo[key]

    run.models = models
    return run


def random_prompts(lengths, seed=0, vocab=512):
    """Token-id prompts of the given lengths (ids >= 4 skip the special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]
