"""RoPE vs Hugging Face's own rotary embedding, for each supported scaling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from minivllm.layers.rotary import (
    RotaryEmbedding,
    apply_rotary,
    inverse_frequencies,
    rope_parameters,
)
from minivllm.models.random_model import random_model_config

LLAMA3 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)
SCALINGS = {
    "default": None,
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": LLAMA3,
}
# Early positions, block-sized steps, and the far end of a 128k context.
POSITIONS = torch.tensor([0, 1, 2, 15, 16, 17, 1000, 8191, 8192, 50_000, 131_071])


def llama_config(rope_scaling, head_dim=64):
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=131_072, rope_theta=500_000.0,
                       rope_scaling=rope_scaling)


def hf_cos_sin(config, positions):
    x = torch.zeros(1, dtype=torch.float32)  # only its dtype/device are used
    cos, sin = LlamaRotaryEmbedding(config)(x, positions[None, :])
    return cos[0], sin[0]


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_cos_sin_match_hf(scaling):
    config = llama_config(SCALINGS[scaling])
    rotary = RotaryEmbedding.from_config(config, head_dim=64)
    cos, sin = rotary(POSITIONS, torch.float32)
    hf_cos, hf_sin = hf_cos_sin(config, POSITIONS)
    # Both repeat the D/2 angles over the two halves ("rotate half" layout); our sin carries the
    # rotation's sign in its first half.
    half = 32
    torch.testing.assert_close(cos[:, 0], hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([-sin[:, 0, :half], sin[:, 0, half:]], -1), hf_sin,
                               rtol=0, atol=1e-6)


def test_llama3_scaling_changes_only_the_low_frequencies():
    """Not vacuous: llama3 keeps the fast pairs, slows the slowest by `factor`, blends between."""
    plain = inverse_frequencies(64, rope_parameters(llama_config(None)))
    scaled = inverse_frequencies(64, rope_parameters(llama_config(LLAMA3)))
    ratio = plain / scaled
    assert ratio[0] == 1.0
    assert torch.isclose(ratio[-1], torch.tensor(32.0))
    blended = (ratio > 1.0) & (ratio < 32.0 - 1e-3)
    assert blended.any()
    assert bool((ratio[1:] >= ratio[:-1]).all())  # monotone: slower pairs are scaled more


def test_apply_rotary_matches_hf():
    generator = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, head_dim = 7, 4, 2, 32
    q = torch.randn(tokens, heads, head_dim, generator=generator)
    k = torch.randn(tokens, kv_heads, head_dim, generator=generator)
    positions = torch.tensor([0, 1, 2, 3, 40, 41, 500])
    config = llama_config(LLAMA3, head_dim=head_dim)
    cos, sin = RotaryEmbedding.from_config(config, head_dim)(positions, torch.float32)
    hf_cos, hf_sin = hf_cos_sin(config, positions)
    # HF works on [batch, heads, tokens, D]; ours on packed [tokens, heads, D].
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                      hf_cos[None], hf_sin[None])
    # Not merely close: the same products and sums as Hugging Face's, so the same bits.
    assert torch.equal(apply_rotary(q, cos, sin), hf_q[0].transpose(0, 1))
    assert torch.equal(apply_rotary(k, cos, sin), hf_k[0].transpose(0, 1))


def test_rotation_preserves_norms_and_relative_positions():
    """The property RoPE exists for: <rot(q, m), rot(k, n)> depends on m - n only."""
    config = llama_config(None, head_dim=16)
    rotary = RotaryEmbedding.from_config(config, 16)
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 1, 16, generator=generator).double()

    def rotated(x, position):
        cos, sin = rotary(torch.tensor([position]), torch.float64)
        return apply_rotary(x, cos, sin)

    assert torch.allclose(rotated(q, 37).norm(), q.norm())
    near = (rotated(q, 5) * rotated(k, 3)).sum()
    far = (rotated(q, 105) * rotated(k, 103)).sum()
    assert torch.allclose(near, far, atol=1e-4)


def test_transformers_4_style_config_reads_the_same():
    """transformers 4.x: `rope_theta` attribute and `rope_scaling` dict (type key once "type")."""
    modern = llama_config(dict(rope_type="linear", factor=4.0))
    legacy = SimpleNamespace(rope_theta=500_000.0, rope_scaling={"type": "linear", "factor": 4.0},
                             max_position_embeddings=131_072)
    assert rope_parameters(legacy)["rope_type"] == "linear"
    torch.testing.assert_close(inverse_frequencies(64, rope_parameters(legacy)),
                               inverse_frequencies(64, rope_parameters(modern)), rtol=0, atol=0)
    no_scaling = SimpleNamespace(rope_theta=10_000.0, rope_scaling=None)
    assert rope_parameters(no_scaling) == {"rope_theta": 10_000.0, "rope_type": "default"}


def test_named_shape_rope_settings_reach_the_model_config():
    params = rope_parameters(random_model_config(size="llama-3.2-1b"))
    assert params["rope_type"] == "llama3" and params["factor"] == 32.0
    assert params["rope_theta"] == 500_000.0
    assert rope_parameters(random_model_config(size="qwen3-0.6b"))["rope_theta"] == 1_000_000.0


def test_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        inverse_frequencies(64, {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ValueError, match="even head_dim"):
        inverse_frequencies(63, {"rope_type": "default", "rope_theta": 1e4})
    with pytest.raises(ValueError, match="partial"):
        inverse_frequencies(64, {"rope_type": "default", "rope_theta": 1e4,
                                 "partial_rotary_factor": 0.5})
