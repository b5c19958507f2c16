"""Tiny random-weight Hugging Face models, loaded by transformers itself, for the attention backend
tests: the same weights run once with `sdpa` (the oracle) and once with minivllm's implementation.
"""

from __future__ import annotations

import pytest
import torch

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(arch, **overrides) -> a tiny model directory, made on first use."""
    from minivllm.models import make_random_model

    made = {}

    def get(arch: str, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = make_random_model(tmp_path_factory.mktemp(f"hf-{arch}"), arch=arch, size="tiny",
                                          seed=0, overrides=overrides or None)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """tiny_model(arch, **overrides) -> a float32 transformers model in eval mode (shared: tests
    switch its attention with `set_attn_implementation`)."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def get(arch: str, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in loaded:
            loaded[key] = AutoModelForCausalLM.from_pretrained(str(tiny_dir(arch, **overrides)),
                                                               dtype=torch.float32).eval()
        return loaded[key]

    return get


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """What `generate` gets for prompts of different lengths: ids and mask padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask
