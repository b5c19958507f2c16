"""Random-weight models saved as real Hugging Face directories, built locally with no downloads.

    path = make_random_model("/tmp/tiny-llama", arch="llama", size="tiny")

writes what a model downloaded from the hub would contain: config.json and generation_config.json
(from the `transformers` config class of the architecture), model.safetensors (written by the
`transformers` model's own `save_pretrained`, so tensor names are exactly Hugging Face's), and a
tokenizer with a chat template (`toy_tokenizer.py`). Both `transformers` and minivllm load the
directory, which is what makes these models the oracle of the tests: same weights, two
implementations, outputs compared.

Sizes: "tiny" and "small" for every architecture (fast on a CPU), plus named shapes of real models
("qwen3-0.6b", "llama-3.2-1b") with random weights, for benchmarks that need realistic geometry but
no real checkpoint. Speed (tokens/s) depends on the shapes, not on the values of the weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from minivllm.models.model_dir import new_model_dir
from minivllm.models.toy_tokenizer import BOS_ID, EOS_ID, PAD_ID, save_tokenizer

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "opt")

# Llama-family geometry shared by llama, mistral, qwen2 and qwen3 at the generic sizes.
_LLAMA_SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=512, max_position_embeddings=512),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                  vocab_size=1024, max_position_embeddings=2048),
}
_OPT_SIZES = {
    "tiny": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=512, max_position_embeddings=512, word_embed_proj_dim=64),
    "small": dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8,
                  vocab_size=1024, max_position_embeddings=2048, word_embed_proj_dim=256),
}
# What makes each architecture's small models look like its real ones.
_ARCH_TRAITS = {
    "llama": dict(tie_word_embeddings=False),
    "mistral": dict(tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1_000_000.0),
    # Qwen3 states head_dim, and it is not hidden_size / num_heads: test that path.
    "qwen3": dict(tie_word_embeddings=True, rope_theta=1_000_000.0),
    "opt": dict(tie_word_embeddings=True),
}
_QWEN3_HEAD_DIM = {"tiny": 32, "small": 64}

# Real models' geometry (from their published config.json), random weights.
NAMED_SHAPES = {
    "qwen3-0.6b": ("qwen3", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True)),
    "llama-3.2-1b": ("llama", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500_000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192))),
    "llama-3.1-8b": ("llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500_000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192))),
}
SIZES = ("tiny", "small", *NAMED_SHAPES)

# Keys accepted in `overrides` even where a config class has no attribute of that name
# (transformers 5.x folds them into `rope_parameters`).
_ROPE_KEYS = ("rope_theta", "rope_scaling")


def make_random_model(
    out_dir,
    arch: str | None = None,
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    overrides: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight Hugging Face model directory and return its path.

    arch: one of ARCHITECTURES; None means "llama" for tiny/small and the architecture of a named
        shape (naming a different one is an error).
    size: "tiny", "small" or a named shape (NAMED_SHAPES).
    seed: the same seed gives the same weights. dtype: the dtype of the saved weights.
    overrides: config fields to change, e.g. {"do_layer_norm_before": False} for a post-LN OPT.
    overwrite: replace a model already in `out_dir` (otherwise a non-empty `out_dir` is an error).
    """
    config = random_model_config(arch, size, overrides)
    with new_model_dir(out_dir, overwrite) as tmp:
        model = _random_hf_model(config, seed, dtype)
        model.save_pretrained(str(tmp))
        save_tokenizer(tmp, config.vocab_size, config.max_position_embeddings)
    return Path(out_dir)


def random_model_config(arch: str | None = None, size: str = "tiny", overrides: dict | None = None):
    """The `transformers` config `make_random_model` saves (no weights: cheap to inspect)."""
    arch, fields = _config_fields(arch, size)
    config_class = _config_class(arch)
    for key in overrides or {}:
        if key not in _ROPE_KEYS and not hasattr(config_class(), key):
            raise ValueError(f"override {key!r} is not a field of {config_class.__name__}")
    fields.update(overrides or {})
    # The tokenizer's special-token ids (see toy_tokenizer.py), so that generation stops on its eos.
    fields.update(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return config_class(architectures=[_HF_CLASSES[arch][1]], **fields)


def _config_fields(arch: str | None, size: str) -> tuple[str, dict]:
    if size in NAMED_SHAPES:
        shape_arch, fields = NAMED_SHAPES[size]
        if arch is not None and arch != shape_arch:
            raise ValueError(f"size {size!r} is a {shape_arch} shape; it cannot be built as {arch!r}")
        return shape_arch, dict(fields)
    arch = arch or "llama"
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    if size not in ("tiny", "small"):
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
    fields = dict((_OPT_SIZES if arch == "opt" else _LLAMA_SIZES)[size])
    fields.update(_ARCH_TRAITS[arch])
    if arch == "qwen3":
        fields["head_dim"] = _QWEN3_HEAD_DIM[size]
    return arch, fields


# arch -> (transformers config class, model class written to config.json's "architectures")
_HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "opt": ("OPTConfig", "OPTForCausalLM"),
}


def _config_class(arch: str):
    import transformers

    return getattr(transformers, _HF_CLASSES[arch][0])


def _random_hf_model(config, seed: int, dtype: torch.dtype) -> nn.Module:
    """The `transformers` model for `config`, filled with seeded random weights.

    Built on the "meta" device (shapes, no memory, no init), then given real storage and filled
    by `_fill_random`: transformers' own initialisation takes tens of seconds for a 1B model on a
    CPU, ours a few.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype=dtype).to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every parameter its own storage; re-share the tied ones
    model.config.dtype = dtype  # recorded in config.json
    _fill_random(model, seed)
    return model.eval()


@torch.no_grad()
def _fill_random(model: nn.Module, seed: int) -> None:
    """Seeded weights that keep activations around unit scale, with every tensor distinct.

    Matrices: uniform with std 1/sqrt(fan_in), so each projection roughly preserves the scale of
    its input (transformers uses std 0.02, which on a 64-wide model makes attention almost uniform
    and logits almost flat: weak tests). Norm scales: near 1. Biases: small. None is left at a
    constant, so a tensor loaded into the wrong place changes the outputs and a test sees it.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # a tied weight is listed (and filled) once
        if param.dim() >= 2:
            bound = math.sqrt(3.0 / param.shape[-1])  # uniform(-b, b) has std b / sqrt(3)
            param.uniform_(-bound, bound, generator=generator)
        elif name.endswith("weight"):  # the scale of a RMSNorm / LayerNorm
            param.uniform_(0.8, 1.2, generator=generator)
        else:  # a bias
            param.uniform_(-0.1, 0.1, generator=generator)
