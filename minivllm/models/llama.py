"""The Llama family: Llama, Mistral, Qwen2 and Qwen3, one implementation.

These architectures are the same decoder-only transformer:

    embed -> N x [ h += Attention(RMSNorm(h)) ; h += MLP(RMSNorm(h)) ] -> RMSNorm -> lm_head

with grouped-query attention, rotary positions and a SwiGLU MLP. They differ in a few switches,
gathered in `AttentionFlavor`: Qwen2 adds a bias to the q/k/v projections, Qwen3 normalises each
query and key head (RMSNorm over head_dim) before RoPE and sets head_dim explicitly. Mistral is
Llama plus a sliding window, which we do not implement (see `_warn_about_sliding_window`).

Each sublayer takes the residual stream and its norm, and returns its output and the stream: the
pre-norm seam "add the last output to the stream, normalise, project" is one call
(`_norm_then_project`), which for a batch of 1 to 4 rows on CUDA is one kernel together with
the projection (layers/fused_linear.py). A layer is then six kernels at batch 1: add + norm +
q|k|v, q/k norm + RoPE + KV-cache write, attention, o_proj, add + norm + gate|up + SwiGLU, down
(and the split-KV merge after attention where the keys are split).

A forward pass sees the *packed* tokens of one engine step: prompts being prefilled and sequences
being decoded side by side, `input_ids` and `positions` both [T]. Every layer here works per token,
except attention, which goes through `PagedAttention` with the step's `AttentionMetadata` and
reads earlier tokens from the paged KV cache.

Parameter names follow Hugging Face's (`model.layers.3.self_attn.o_proj.weight`) except where we
fuse projections: `qkv_proj` holds q_proj | k_proj | v_proj and `gate_up_proj` holds
gate_proj | up_proj. `packed_modules_mapping` tells the loader where each checkpoint tensor goes.

Tensor parallelism (`tp`, one rank of N; see layers/linear.py and docs/tensor_parallel.md): q|k|v
and gate|up are column-parallel (each rank has whole heads and whole MLP channels), o_proj and
down_proj row-parallel, the embedding and the LM head split by vocabulary rows. Norms and RoPE are
per token and replicated. A row-parallel layer's output is this rank's partial sum: the next seam
adds the ranks' together with the residual add and the norm, one kernel through peer memory
(layernorm.reduce_add_rms_norm). With `tp` left out, one rank.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from minivllm.distributed import SINGLE, TensorParallel, all_reduce
from minivllm.layers import use_fused_kv_write, use_fused_linear, use_fused_ops
from minivllm.layers.activation import SiluAndMul
from minivllm.layers.attention import AttentionMetadata, PagedAttention
from minivllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from minivllm.layers.layernorm import RMSNorm, reduce_add_rms_norm
from minivllm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from minivllm.layers.rotary import RotaryEmbedding, apply_rotary
from minivllm.models.inputs import check_token_inputs


@dataclass(frozen=True)
class AttentionFlavor:
    """What sets the members of the family apart; everything else is shared."""

    qkv_bias: bool = False  # bias on the q, k and v projections (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama's attention_bias)
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3)


def head_dim_of(config) -> int:
    """Qwen3 (and newer Llama/Mistral configs) state head_dim; older ones imply hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    """Grouped-query attention: fewer KV heads than query heads; absent means plain multi-head."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


@dataclass
class RopeInputs:
    """What every layer needs to rotate q and k for this step's tokens.

    Unfused, the cos/sin rows of the step's positions are gathered once ([T, 1, D], model dtype,
    as `apply_rotary` takes them) and every layer applies them with PyTorch ops. Fused (CUDA), the kernel reads the float32
    tables at each token's position itself, so nothing is gathered and cos/sin stay None.
    """

    positions: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    @classmethod
    def build(cls, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> RopeInputs:
        tables = (rotary.cos_cached, rotary.sin_cached)
        if use_fused_ops(positions.device):
            return cls(positions, *tables)
        return cls(positions, *tables, *rotary(positions, dtype))


def _norm_then_project(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                       proj: ColumnParallelLinear, swiglu: SiluAndMul | None = None):
    """(proj(norm(h)), h) with h = x + residual, the residual stream (h = x, the embedding, before
    the first layer); with `swiglu`, its activation applied to the gate|up projection. Under
    tensor parallelism x is this rank's partial sum (after the first layer), added up here over
    `proj`'s ranks.

    For 1 to 4 rows on CUDA this is one kernel (fused_linear.norm_linear), after the sum;
    otherwise the sum, add and RMSNorm (`reduce_add_rms_norm`, which updates the residual in
    place), the GEMM and the activation.
    """
    if use_fused_linear(x):
        from minivllm.layers.fused_linear import norm_linear

        x = x if residual is None else all_reduce(x, proj.tp)
        return norm_linear(x, residual, norm.weight, norm.eps, proj.weight, proj.bias,
                           swiglu=swiglu is not None)
    if residual is None:
        residual, normed = x, norm(x)
    else:
        normed, residual = reduce_add_rms_norm(x, residual, norm, proj.tp)
    out = proj(normed)
    return (out if swiglu is None else swiglu(out)), residual


class LlamaAttention(nn.Module):
    """Project to q, k, v; (Qwen3: normalise q, k); rotate q, k; attend over the paged cache.

    Under tensor parallelism each rank runs this for its own heads (`num_heads`, `num_kv_heads`
    are this rank's); o_proj's output is this rank's partial sum, which the next seam adds up.
    """

    def __init__(self, config, flavor: AttentionFlavor, tp: TensorParallel = SINGLE):
        super().__init__()
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          kv_heads_of(config), bias=flavor.qkv_bias, tp=tp)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=flavor.o_bias, tp=tp, what="attention output features", reduce=False)
        self.qk_norm = flavor.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim**-0.5
        )

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                rope: RopeInputs, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of norm(hidden + residual); returns (its output, the residual stream)."""
        num_tokens = hidden.shape[0]
        qkv, residual = _norm_then_project(hidden, residual, norm, self.qkv_proj)
        q, k, v = self.qkv_proj.split_output(qkv)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        cache = None
        if rope.cos is None:
            # Fused (CUDA): Qwen3's per-head norm, the rotation of q and k and (unless switched
            # off) the write of k and v into the paged cache, one kernel.
            from minivllm.layers.fused_ops import qk_norm_rope

            if use_fused_kv_write(q.device):
                cache = self.attn.fused_write_target(meta)
            qk_norm_rope(q, k, rope.positions, rope.cos_table, rope.sin_table,
                         self.q_norm.weight if self.qk_norm else None,
                         self.k_norm.weight if self.qk_norm else None,
                         self.q_norm.eps if self.qk_norm else 0.0, v=v, cache=cache)
        else:
            if self.qk_norm:
                q = self.q_norm(q)
                k = self.k_norm(k)
            q = apply_rotary(q, rope.cos, rope.sin)
            k = apply_rotary(k, rope.cos, rope.sin)
        out = self.attn(q, k, v, meta, kv_written=cache is not None)
        return self.o_proj(out), residual


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up computed by one GEMM."""

    def __init__(self, config, tp: TensorParallel = SINGLE):
        super().__init__()
        hidden_act = getattr(config, "hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"Llama-family MLPs use silu; this config asks for {hidden_act!r}")
        bias = getattr(config, "mlp_bias", False)
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear.split_evenly(
            config.hidden_size, {"gate": size, "up": size}, bias=bias, tp=tp)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias, tp=tp,
                                           what="intermediate_size", reduce=False)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor,
                norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP of norm(hidden + residual); returns (its output, the residual stream)."""
        act, residual = _norm_then_project(hidden, residual, norm, self.gate_up_proj, self.act)
        return self.down_proj(act), residual


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP, each reading a normalised copy of h."""

    def __init__(self, config, flavor: AttentionFlavor, tp: TensorParallel = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, flavor, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config, tp)

    def forward(self, hidden, residual, rope: RopeInputs, meta: AttentionMetadata):
        """hidden: the previous layer's MLP output (this rank's partial sum of it under tensor
        parallelism); residual: the stream it is added to (None before the first layer).
        Returns this layer's (MLP output, residual stream).

        Each sublayer adds its input to the stream and normalises it for itself, one fused step
        (`_norm_then_project`).
        """
        hidden, residual = self.self_attn(hidden, residual, self.input_layernorm, rope, meta)
        return self.mlp(hidden, residual, self.post_attention_layernorm)


class LlamaModel(nn.Module):
    """Token ids -> final normalised hidden states (everything but the lm_head)."""

    def __init__(self, config, flavor: AttentionFlavor, tp: TensorParallel = SINGLE):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, flavor, tp) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.tp = tp
        # One table for all layers: every layer rotates by the same angles.
        self.rotary_emb = RotaryEmbedding.from_config(config, head_dim_of(config))

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = RopeInputs.build(self.rotary_emb, positions, hidden.dtype)  # once, for every layer
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope, meta)
        return reduce_add_rms_norm(hidden, residual, self.norm, self.tp)[0]


class LlamaForCausalLM(nn.Module):
    """Llama (and, through `flavor`, its relatives) with the model interface the engine uses."""

    # checkpoint module name -> (our fused module, shard inside it)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    @classmethod
    def flavor(cls, config) -> AttentionFlavor:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionFlavor(qkv_bias=bias, o_bias=bias)

    def __init__(self, config, tp: TensorParallel = SINGLE):
        super().__init__()
        _warn_about_sliding_window(config)
        self.config = config
        self.model = LlamaModel(config, self.flavor(config), tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if getattr(config, "tie_word_embeddings", False):
            # Small models reuse the input embedding matrix as the output projection.
            self.lm_head.weight = self.model.embed_tokens.weight
        attention = self.model.layers[0].self_attn
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = attention.num_kv_heads  # this rank's: the KV cache holds only these
        self.head_dim = attention.head_dim

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions [T] (packed over the batch) -> hidden states [T, hidden_size]."""
        check_token_inputs(input_ids, positions)
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] -> float32 logits [N, vocab] (all of it, on every rank); the runner
        passes only the rows it samples."""
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama plus a sliding window (not implemented, see the module docstring)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: q, k and v projections carry a bias; the output projection does not."""

    @classmethod
    def flavor(cls, config) -> AttentionFlavor:
        return AttentionFlavor(qkv_bias=True, o_bias=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: per-head RMSNorm of q and k before RoPE keeps attention logits in range."""

    @classmethod
    def flavor(cls, config) -> AttentionFlavor:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionFlavor(qkv_bias=bias, o_bias=bias, qk_norm=True)


def _warn_about_sliding_window(config) -> None:
    """Sliding-window attention (Mistral v0.1, some Qwen2 configs) attends to the last W tokens
    only; our kernels attend to the whole context. Both agree while the context fits in the window,
    so we accept the model and say where the outputs start to differ."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    uses_window = window is not None and (
        config.model_type == "mistral"
        or getattr(config, "use_sliding_window", False)
        or "sliding_attention" in layer_types
    )
    if uses_window and window < config.max_position_embeddings:
        warnings.warn(
            f"{config.model_type} config uses sliding-window attention (window {window}); minivllm "
            f"attends to the full context, so outputs differ from the reference beyond {window} "
            "tokens. Keep max_model_len <= the window for exact results.",
            stacklevel=3,
        )
