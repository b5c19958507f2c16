"""OPT (Meta, 2022): the GPT-style decoder the original vLLM examples ran on.

Where the Llama family differs, OPT is the older design:

- positions are a *learned* table added to the token embeddings, not a rotation of q and k.
  The table has 2 extra rows at the front (an artefact of fairseq, where positions started after
  the padding index), so position p reads row p + 2;
- LayerNorm (with bias) instead of RMSNorm, and ReLU MLPs without a gate;
- every linear layer has a bias; plain multi-head attention (as many KV heads as query heads);
- most sizes normalise *before* each block (`do_layer_norm_before`, "pre-LN") and once more after
  the last layer; OPT-350m normalises *after* each block and has no final norm;
- OPT-350m also embeds tokens in a smaller space (`word_embed_proj_dim`) and projects in and out
  of the hidden size around the decoder.

The input and output embeddings are tied in every released OPT checkpoint.

Tensor parallelism splits OPT like the Llama family (layers/linear.py): q|k|v and fc1
column-parallel, out_proj and fc2 row-parallel, the embedding and LM head by vocabulary rows.
The learned positions, the layer norms and OPT-350m's projections in and out are replicated.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from minivllm.distributed import SINGLE, TensorParallel
from minivllm.layers.activation import get_activation
from minivllm.layers.attention import AttentionMetadata, PagedAttention
from minivllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from minivllm.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from minivllm.models.inputs import check_token_inputs


class OPTAttention(nn.Module):
    def __init__(self, config, tp: TensorParallel = SINGLE):
        super().__init__()
        hidden = config.hidden_size
        heads = config.num_attention_heads
        if hidden % heads != 0:
            raise ValueError(f"hidden_size ({hidden}) must be divisible by num_attention_heads ({heads})")
        self.head_dim = hidden // heads
        self.scale = self.head_dim**-0.5
        bias = getattr(config, "enable_bias", True)
        # Plain multi-head attention: as many KV heads as query heads, split alike.
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, heads, bias=bias, tp=tp)
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.out_proj = RowParallelLinear(hidden, hidden, bias=bias, tp=tp, what="attention output features")
        # OPT scales q right after its projection (see forward), so the kernel's scale is 1.
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale=1.0)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.forward_split(hidden)
        # Scaling q before q.k (rather than the scores after) is what the original implementation
        # does; mathematically the same, and doing it in the same place rounds the same way.
        q = q * self.scale
        return self.out_proj(self.attn(q, k, v, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, tp: TensorParallel = SINGLE):
        super().__init__()
        hidden = config.hidden_size
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        bias = getattr(config, "enable_bias", True)
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, tp)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(hidden, config.ffn_dim, bias=bias, tp=tp, what="ffn_dim")
        self.activation = get_activation(config.activation_function)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias=bias, tp=tp, what="ffn_dim")
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self._residual(hidden, self.self_attn_layer_norm, lambda h: self.self_attn(h, meta))
        return self._residual(hidden, self.final_layer_norm, self._mlp)

    def _mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden)))

    def _residual(self, hidden, norm, block) -> torch.Tensor:
        """h + block(norm(h)) for pre-LN models, norm(h + block(h)) for post-LN ones."""
        if self.pre_norm:
            return hidden + block(norm(hidden))
        return norm(hidden + block(hidden))


class OPTLearnedPositionalEmbedding(nn.Embedding):
    """Learned position table; position p is row p + OFFSET (see the module docstring)."""

    OFFSET = 2

    def __init__(self, max_positions: int, dim: int):
        super().__init__(max_positions + self.OFFSET, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(positions + self.OFFSET)


class OPTDecoder(nn.Module):
    def __init__(self, config, tp: TensorParallel = SINGLE):
        super().__init__()
        hidden, embed_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, embed_dim, tp)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, hidden)
        # OPT-350m: tokens live in a narrower space than the decoder; project in and back out.
        self.project_in = nn.Linear(embed_dim, hidden, bias=False) if embed_dim != hidden else None
        self.project_out = nn.Linear(hidden, embed_dim, bias=False) if embed_dim != hidden else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, tp) for _ in range(config.num_hidden_layers))
        has_final_norm = config.do_layer_norm_before and not getattr(
            config, "_remove_final_layer_norm", False
        )
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine) if has_final_norm else None

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions)
        for layer in self.layers:
            hidden = layer(hidden, meta)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return hidden


class OPTModel(nn.Module):
    """Hugging Face nests the decoder one level down (`model.decoder.*`); we keep its names."""

    def __init__(self, config, tp: TensorParallel = SINGLE):
        super().__init__()
        self.decoder = OPTDecoder(config, tp)


class OPTForCausalLM(nn.Module):
    """OPT with the model interface the engine uses (see `llama.LlamaForCausalLM`)."""

    packed_modules_mapping: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, config, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config = config
        self.model = OPTModel(config, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.word_embed_proj_dim, tp)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.model.decoder.embed_tokens.weight
        attention = self.model.decoder.layers[0].self_attn
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = attention.num_heads  # this rank's
        self.head_dim = attention.head_dim

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions [T] (packed over the batch) -> hidden states [T, hidden_size]."""
        check_token_inputs(input_ids, positions)
        return self.model.decoder(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] -> float32 logits [N, vocab].

        OPT-350m's project_out belongs to the decoder in Hugging Face; applying it here, to the
        rows being sampled only, gives the same logits for less work.
        """
        decoder = self.model.decoder
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.decoder.layers]
