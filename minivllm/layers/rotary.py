"""Rotary position embedding (RoPE), configured from a Hugging Face config.

RoPE tells attention where a token sits by *rotating* its query and key vectors. The head
dimension D is cut into D/2 channel pairs; pair i of a token at position p is rotated by the angle
`p * inv_freq[i]`. A dot product of two rotated vectors only depends on the *difference* of their
angles, so attention scores see relative positions, and nothing else changes: no position table
is added to the hidden state, and every token carries its own position. That last point is what
makes packed batches easy: the tokens of several sequences sit side by side in one tensor and each
one is rotated by its own position, whatever its neighbours are.

Which channels form a pair is a convention the checkpoint was trained with. Hugging Face Llama
(and Qwen, Mistral) use the GPT-NeoX layout, "rotate half": channel j pairs with channel j + D/2.

Since the angles only depend on the position, we compute cos and sin of every angle for positions
[0, max_position) once, at construction; a forward pass gathers the rows of its positions.

Long-context checkpoints stretch the frequencies ("RoPE scaling"); `inverse_frequencies` supports
the original RoPE ("default"), position interpolation ("linear") and Llama 3.1's "llama3" scheme.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config) -> dict:
    """The RoPE settings of a Hugging Face config as one flat dict with `rope_type` and `rope_theta`.

    transformers 5.x keeps them together in `config.rope_parameters` (theta included); 4.x has
    `config.rope_theta` plus an optional `config.rope_scaling` dict whose type key was once `type`.
    """
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers 4.x
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    if "rope_theta" not in params:
        raise ValueError(
            f"the config's RoPE settings {params} have no 'rope_theta'; per-layer-type RoPE settings "
            "are not supported"
        )
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def inverse_frequencies(head_dim: int, params: dict) -> torch.Tensor:
    """The D/2 rotation speeds (radians per position) of RoPE, after any scaling. float32."""
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE type {rope_type!r} is not supported; supported types: {SUPPORTED_ROPE_TYPES}"
        )
    # Pair i turns at theta^(-2i/D): the first pairs spin fast (fine, local position), the last
    # ones slowly (coarse, long-range position).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (float(params["rope_theta"]) ** exponents)
    if rope_type == "linear":
        # Position interpolation: positions p and p/factor look alike, so a model trained on
        # N positions covers N * factor.
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, params)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling.

    A pair's wavelength (positions per full turn) decides its fate. Pairs that turn many times
    within the original training context (short wavelength) encode local order and stay as they
    are; pairs that never completed a turn in training (long wavelength) are slowed down by
    `factor`, like linear interpolation; the ones in between blend the two smoothly.
    """
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    original_context = float(params["original_max_position_embeddings"])
    longest_kept = original_context / high_freq_factor  # shorter wavelengths: unchanged
    shortest_scaled = original_context / low_freq_factor  # longer wavelengths: divided by factor

    wavelength = 2 * math.pi / inv_freq
    # 0 at the long-wavelength edge of the blend region, 1 at the short one.
    blend = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    scaled = torch.where(wavelength > shortest_scaled, inv_freq / factor, blended)
    return torch.where(wavelength < longest_kept, inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin of every (position, pair) angle; `forward(positions)` looks them up."""

    def __init__(self, head_dim: int, max_position: int, inv_freq: torch.Tensor):
        super().__init__()
        if max_position < 1:
            raise ValueError(f"max_position must be positive, got {max_position}")
        self.head_dim = head_dim
        self.max_position = max_position
        positions = torch.arange(max_position, dtype=torch.float32)
        angles = positions[:, None] * inv_freq.float()[None, :]  # [max_position, D/2]
        # float32 tables whatever the model dtype: they are cast per call, exactly where
        # Hugging Face casts its own, so both round the same numbers the same way.
        self.register_buffer("cos_cached", angles.cos(), persistent=False)
        self.register_buffer("sin_cached", angles.sin(), persistent=False)

    @classmethod
    def from_config(cls, config, head_dim: int) -> RotaryEmbedding:
        inv_freq = inverse_frequencies(head_dim, rope_parameters(config))
        return cls(head_dim, config.max_position_embeddings, inv_freq)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int -> (cos, sin), each [T, 1, D] in `dtype`, as `apply_rotary` takes
        them: cos over both halves of the head, sin with the rotation's signs, (-sin | sin)."""
        cos = self.cos_cached[positions].to(dtype)
        sin = self.sin_cached[positions].to(dtype)
        return torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by the angles of `RotaryEmbedding.forward` ("rotate half" pairing).

    Pair (x1, x2) = (x[j], x[j + D/2]) becomes (x1 cos - x2 sin, x2 cos + x1 sin): a 2-D rotation.
    With the halves of x swapped, (x2 | x1), both halves are x * cos + swapped * (-sin | sin):
    four operations per call, the tables being built once per step for every layer.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
