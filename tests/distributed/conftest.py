"""Fixtures of the tensor-parallel tests: tiny random-weight model directories and the Hugging
Face greedy oracle, both made once per test session (per xdist worker).

Besides the four architectures of the engine tests there is "llama-mqa": one KV head (so at
tensor_parallel_size=2 both ranks hold a replica of it) and a vocabulary of 509 tokens, a prime,
so the vocabulary-parallel embedding and LM head run with a padded last block.
"""

from __future__ import annotations

import pytest

from tests.engine.conftest import hf_greedy_oracle

VARIANTS = {
    "llama": {"arch": "llama"},
    "qwen2": {"arch": "qwen2"},
    "qwen3": {"arch": "qwen3"},
    "opt": {"arch": "opt"},
    "llama-mqa": {"arch": "llama", "overrides": {"num_key_value_heads": 1, "vocab_size": 509}},
}
# What every tensor-parallel test engine shares: CPU, float32, the reference attention.
CPU_ENGINE = {"dtype": "float32", "device": "cpu", "attention_backend": "torch", "block_size": 4}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(variant) -> Path of a tiny random-weight model directory (made on first use)."""
    from minivllm.models import make_random_model

    made = {}

    def get(variant: str):
        if variant not in made:
            made[variant] = make_random_model(tmp_path_factory.mktemp(f"tp-{variant}"), size="tiny", seed=0,
                                              **VARIANTS[variant])
        return made[variant]

    return get


@pytest.fixture(scope="session")
def hf_greedy(model_dir):
    """hf_greedy(variant, prompt_ids, max_new_tokens) -> the token ids transformers' generate picks."""
    return hf_greedy_oracle(model_dir)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` is still running. A zombie (exited, not yet reaped, e.g. an orphan in
    a container whose PID 1 does not reap) has stopped running and counts as gone."""
    import os
    from pathlib import Path

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # "pid (name) S ...": the state follows the closing parenthesis
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:  # it just exited, or this system has no /proc: trust os.kill
        return not Path("/proc/self").exists()
    return state != "Z"
