"""minivllm's paged attention as an attention implementation of Hugging Face `transformers`.

    from minivllm.integrations.hf import register

    name = register()                                            # "minivllm"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
    model.generate(input_ids, attention_mask=mask, max_new_tokens=32)   # attention: paged_attention

transformers looks an attention function up by name (`AttentionInterface`) and, separately, the
function that turns the 2D padding mask into whatever that attention wants (`AttentionMaskInterface`).
`register()` fills both. The ideas, in the order the code meets them:

* **HF's cache viewed as pages.** `generate` keeps each layer's keys in one contiguous tensor
  [B, Hkv, S, D]. The kernel reads a paged cache [num_blocks, block_size, Hkv, D] through a block
  table. With one-token blocks the two are the same memory: block `b * Hkv * S + s` is token s of
  row b, and its heads sit `S * D` elements apart. `as_pages` builds that strided view, so nothing
  is copied, and the block table of row b is `b * Hkv * S + [0, 1, ..., S - 1]`. One-token blocks
  cost almost nothing: the kernel looks every key up in the table anyway.
* **Left padding as a start offset.** A batch of prompts of different lengths is padded on the
  left. Row b's real tokens are keys [start_b, S): its block table starts `start_b` blocks later
  and its context length is `S - start_b`, so the padding is never read. The kernel's own rule (the
  queries are the last tokens of the context) does the causal part.
* **A mask object instead of a mask tensor.** `left_padded_causal_mask`, the registered mask
  function, checks once per forward pass that the mask is causal with left padding and returns a
  `LeftPaddedCausal` (the start of every row). Every layer of that forward reuses it and the kernel
  metadata built from it.
* **Fallback, loudly.** A mask that is something else (sliding window, chunked or bidirectional
  attention, padding that is not on the left, a static cache, a ready-made 4D mask) goes to
  transformers' SDPA attention with a warning, once per reason, that says why. Never silently wrong.

On a CPU the kernel runs the reference backend (plain PyTorch), on a GPU the Triton kernel
(`backend="auto"`). This module imports `minivllm.kernels` and `transformers` only.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import dataclass, field

import torch

from minivllm import kernels

__all__ = ["NAME", "register", "is_registered", "supports_continuous_batching",
           "continuous_batching_name", "LeftPaddedCausal",
           "as_pages", "left_padded_causal_mask", "paged_attention_forward",
           "paged_cache_attention_forward"]

NAME = "minivllm"

# transformers' own names: registering over them would replace its implementations for everyone.
_RESERVED = ("eager", "sdpa", "flex_attention")

_warned: set[str] = set()


def warn_fallback(reason: str) -> None:
    """Warn once per reason that attention runs on transformers' SDPA instead of minivllm's kernel."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"minivllm attention falls back to SDPA: {reason}", stacklevel=3)


# --------------------------------------------------------------------------------------------
# HF's contiguous K/V seen as a paged cache
# --------------------------------------------------------------------------------------------
def as_pages(kv: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """View HF's K or V [B, Hkv, S, D] as a paged cache of one-token blocks [N, 1, Hkv, D].

    Token s of row b is block `b * blocks_per_row + s`. The view is exact whenever the batch stride
    is a whole number of token strides, which holds for the contiguous [B, Hkv, S, D] that
    `DynamicCache` builds (blocks_per_row = Hkv * S) and for the [B, S, Hkv, D] memory that the
    projections produce (blocks_per_row = S). Neighbouring blocks overlap in memory (the heads of
    one token are strided far apart), which is harmless: the kernel only reads the cache.
    Returns (pages, blocks_per_row), or None when the strides cannot be expressed.
    """
    batch, heads, seq, dim = kv.shape
    stride_b, stride_h, stride_s, stride_d = kv.stride()
    if stride_d != 1 or stride_s <= 0 or (batch > 1 and stride_b % stride_s != 0):
        return None
    blocks_per_row = stride_b // stride_s if batch > 1 else seq
    num_blocks = (batch - 1) * blocks_per_row + seq
    pages = kv.as_strided((num_blocks, 1, heads, dim), (stride_s, stride_s, stride_h, 1),
                          kv.storage_offset())
    return pages, blocks_per_row


def _paged_kv(key: torch.Tensor, value: torch.Tensor):
    """(k_pages, v_pages, blocks_per_row): both views share one block table, so their layouts
    must agree. Otherwise (never the case for HF's caches) both are copied to contiguous first."""
    k, v = as_pages(key), as_pages(value)
    if k is None or v is None or k[1] != v[1] or k[0].stride() != v[0].stride():
        k, v = as_pages(key.contiguous()), as_pages(value.contiguous())
    return k[0], v[0], k[1]


# --------------------------------------------------------------------------------------------
# The mask: causal attention whose row b starts at key starts[b]
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class LeftPaddedCausal:
    """What the mask function hands every layer instead of a [B, 1, q, kv] tensor.

    Row b's real keys are [starts[b], kv_length); its queries are the last `q_length` positions.
    """

    starts: list[int]  # on the host: the plan below is built from them without a device read
    q_length: int
    kv_length: int
    device: torch.device
    _plans: dict = field(default_factory=dict, repr=False)

    def segments(self):
        """(row, first key, context length, number of queries) of each sequence the kernel sees.

        A row is one sequence, from its first real key. Where padding positions are among the
        queries (a left-padded prompt), they form a sequence of their own over the padding: the
        kernel needs every query row to belong to a sequence, and their outputs are never used.
        """
        first_query = self.kv_length - self.q_length  # absolute position of the first query
        for row, start in enumerate(self.starts):
            pad_queries = max(0, start - first_query)
            if pad_queries:
                yield row, 0, start, pad_queries
            yield row, start, self.kv_length - start, self.q_length - pad_queries

    def plan(self, blocks_per_row: int, device: torch.device):
        """(block_tables, seq_lens, cu_seqlens_q, max_seq_len) for the kernel, built once per
        forward pass (every layer has the same shapes; per device, for a model split over GPUs)
        on the device, from a few small uploads."""
        key = (blocks_per_row, device)
        if key not in self._plans:
            rows, firsts, lens, queries = zip(*self.segments())
            to_device = functools.partial(torch.tensor, dtype=torch.int32, device=device)
            first_block = to_device([r * blocks_per_row + f for r, f in zip(rows, firsts)])
            seq_lens = to_device(lens)
            # Token j of a sequence is block first_block + j; entries past its length are padding
            # (clamped so that they stay valid ids), which the kernel never reads.
            cols = torch.arange(max(lens), dtype=torch.int32, device=device)
            block_tables = first_block[:, None] + torch.minimum(cols[None, :], seq_lens[:, None] - 1)
            cu_seqlens_q = to_device([0, *itertools.accumulate(queries)])
            self._plans[key] = (block_tables, seq_lens, cu_seqlens_q, max(lens))
        return self._plans[key]

    def dense(self, device: torch.device | None = None) -> torch.Tensor:
        """The same mask as transformers' SDPA wants it: [B, 1, q, kv] bool, True = attend."""
        device = device or self.device
        keys = torch.arange(self.kv_length, device=device)
        queries = torch.arange(self.kv_length - self.q_length, self.kv_length, device=device)
        starts = torch.tensor(self.starts, device=device)
        causal = keys[None, :] <= queries[:, None]  # [q, kv]
        real = keys[None, :] >= starts[:, None]  # [B, kv]
        return (causal[None] & real[:, None])[:, None]


def _left_padding_starts(padding_mask: torch.Tensor, kv_length: int) -> list[int] | None:
    """First real key of each row if the 2D mask is zeros then ones (left padding), else None.

    One small device-to-host read per forward pass: `generate` itself reads the device every step.
    """
    mask = padding_mask[:, :kv_length].bool()
    if mask.shape[-1] < kv_length:  # shorter than the keys: the missing tail is padding
        mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[-1]))
    starts = kv_length - mask.sum(-1)
    expected = torch.arange(kv_length, device=mask.device)[None, :] >= starts[:, None]
    left_padded = (mask == expected).all() & (starts < kv_length).all()
    first, *rest = torch.cat([left_padded.view(1).long(), starts.long()]).tolist()
    return rest if first else None


def _why_not_left_padded_causal(mask_function, q_length, kv_length, q_offset, kv_offset,
                                local_size) -> str | None:
    from transformers.masking_utils import causal_mask_function

    if mask_function is not causal_mask_function:
        if local_size is not None:
            return (f"a sliding-window or chunked layer (window {local_size}); the kernel has no "
                    "window")
        return ("a mask that is not plain causal attention (bidirectional, packed sequences or a "
                "custom pattern), which the kernel cannot express")
    if isinstance(q_offset, torch.Tensor) or (kv_offset == 0 and q_offset + q_length < kv_length):
        return "a static cache (its keys are a fixed-size buffer with unwritten slots at the end)"
    if kv_offset != 0 or q_offset + q_length != kv_length:
        return (f"the queries are not the last keys (q_offset={q_offset}, q_length={q_length}, "
                f"kv_offset={kv_offset}, kv_length={kv_length})")
    return None


def left_padded_causal_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                            kv_offset: int = 0, mask_function=None, attention_mask=None,
                            device="cpu", **kwargs):
    """The mask function registered for minivllm (transformers calls it once per forward pass).

    Returns a `LeftPaddedCausal` when the kernel can express the mask. Otherwise it warns and
    returns the dense boolean mask of transformers' `sdpa_mask`, which makes the attention below
    fall back to SDPA with that tensor.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    reason = _why_not_left_padded_causal(mask_function, q_length, kv_length, q_offset, kv_offset,
                                         kwargs.get("local_size"))
    starts = [0] * batch_size
    if reason is None and attention_mask is not None:
        starts = _left_padding_starts(attention_mask, kv_length)
        if starts is None:
            reason = ("the padding mask is not left padding (zeros, then ones, at least one real "
                      "token per row)")
    if reason is None:
        return LeftPaddedCausal(starts, q_length, kv_length, torch.device(device))
    # Always a tensor (no is_causal / bidirectional shortcut to None), so that attention knows
    # that this is the SDPA fallback and never mistakes it for "no mask".
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    dense = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                      q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                      attention_mask=attention_mask, device=device, **kwargs).contiguous()
    dense.minivllm_fallback_reason = reason  # read by the attention below, for its warning
    return dense


# --------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------
def _why_not_kernel(module, query, value, dropout, kwargs) -> str | None:
    """Per-layer features the kernel does not have."""
    if dropout:
        return f"attention dropout ({dropout}) in training mode"
    if kwargs.get("sliding_window") is not None:
        return f"a sliding-window layer (window {kwargs['sliding_window']})"
    for feature in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(feature) is not None:
            return f"the layer passes `{feature}`, which the kernel does not implement"
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        return "a non-causal layer"
    if value.shape[-1] != query.shape[-1]:
        return f"values of head_dim {value.shape[-1]} but queries of {query.shape[-1]}"
    return None


def _sdpa(module, query, key, value, mask, dropout, scaling, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def paged_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, backend: str = "auto", **kwargs):
    """transformers' attention-function contract: query [B, Hq, q, D], key/value [B, Hkv, S, D]
    (the whole cache of this layer, new tokens last) -> ([B, q, Hq, D], None)."""
    if not isinstance(attention_mask, LeftPaddedCausal):
        if isinstance(attention_mask, torch.Tensor):
            warn_fallback(getattr(attention_mask, "minivllm_fallback_reason",
                                  "the caller passed a ready-made 4D attention mask"))
            return _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        if attention_mask is not None:
            raise TypeError(f"attention_mask must be a LeftPaddedCausal, a tensor or None, got "
                            f"{type(attention_mask).__name__}")
        # No mask at all: causal attention over every key, the queries being the last ones.
        attention_mask = LeftPaddedCausal([0] * query.shape[0], query.shape[2], key.shape[2],
                                          query.device)
    reason = _why_not_kernel(module, query, value, dropout, kwargs)
    if reason is not None:
        warn_fallback(reason)
        return _sdpa(module, query, key, value, attention_mask.dense(query.device), dropout, scaling,
                     kwargs)

    batch, num_q_heads, q_length, head_dim = query.shape
    k_pages, v_pages, blocks_per_row = _paged_kv(key, value)
    block_tables, seq_lens, cu_seqlens_q, max_seq_len = attention_mask.plan(blocks_per_row, query.device)
    # [B, Hq, q, D] -> packed rows [B * q, Hq, D]; a view when the projections left Q in
    # [B, q, Hq, D] memory, as they do.
    packed = query.transpose(1, 2).reshape(batch * q_length, num_q_heads, head_dim)
    out = torch.empty(batch, q_length, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    kernels.paged_attention(packed, k_pages, v_pages, block_tables, seq_lens, cu_seqlens_q,
                            scale=scaling, causal=True, backend=backend,
                            out=out.view(batch * q_length, num_q_heads, head_dim),
                            max_seq_len=max_seq_len)
    return out, None


# --------------------------------------------------------------------------------------------
# Continuous batching (transformers' generate_batch), where its version allows it
# --------------------------------------------------------------------------------------------
def _for_full_attention(value):
    """cu_seq_lens_k / max_seqlen_k come per layer type when a model mixes attention types."""
    return value["full_attention"] if isinstance(value, dict) else value


def paged_cache_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                  scaling: float | None = None, backend: str = "auto", cache=None,
                                  cu_seq_lens_q=None, cu_seq_lens_k=None, max_seqlen_k=None,
                                  read_index=None, write_index=None, block_table=None, **kwargs):
    """Attention for transformers' continuous batching, reading its paged cache in place.

    The batch is packed: query [1, Hq, T, D] holds the new tokens of every request, key/value
    [1, Hkv, T, D] their K/V. transformers' `PagedAttentionCache` keeps a layer's K/V as rows
    [slots, Hkv, D], and for each request `read_index` lists the slots of its whole context
    (cached tokens, then new ones) and `write_index` the slots of its new tokens. Seen as a paged
    cache of one-token blocks, a slot is a block id and a request's slots are its block table:
    `write_kv_cache` writes the new K/V into their slots, `paged_attention` reads every request's
    context where it lies, with no gather into a contiguous copy.
    """
    if cache is None or write_index is None or cu_seq_lens_k is None:
        raise ValueError("this attention needs the paged cache of transformers' continuous batching "
                         "(generate_batch); a plain forward uses the registered name without 'paged|'")
    if getattr(module, "sliding_window", None) or kwargs.get("sliding_window"):
        raise NotImplementedError("minivllm's continuous-batching attention covers full-attention "
                                  "layers only, and this layer has a sliding window")
    if block_table is not None:
        raise NotImplementedError("the decode fast path of continuous batching (block_table) is made "
                                  "for flash_attn_with_kvcache; minivllm uses the read/write indices")
    if dropout:
        raise NotImplementedError(f"attention dropout ({dropout}) in training mode")
    group, index_in_group = cache.layer_index_to_group_indices[module.layer_idx]
    # [slots, Hkv, D] -> [slots, 1, Hkv, D]: one-token blocks, block id = slot (a free view).
    k_pages = cache.key_cache[index_in_group].unsqueeze(1)
    v_pages = cache.value_cache[index_in_group].unsqueeze(1)
    kernels.write_kv_cache(key[0].transpose(0, 1), value[0].transpose(0, 1), k_pages, v_pages,
                           write_index[group], backend=backend)

    # Each request's slots, as rows of a block table. A batch of fresh prompts reads nothing back
    # (empty read index): its context is exactly the slots just written.
    cu_seqlens_k = _for_full_attention(cu_seq_lens_k)
    max_seq_len = int(_for_full_attention(max_seqlen_k))
    reads = read_index[group] if read_index is not None and read_index[group].numel() else write_index[group]
    seq_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    cols = torch.arange(max_seq_len, device=seq_lens.device)
    positions = cu_seqlens_k[:-1, None] + torch.minimum(cols[None, :], seq_lens[:, None] - 1)
    block_tables = reads[positions.long()].to(torch.int32)

    packed = query[0].transpose(0, 1)  # [T, Hq, D]
    out = torch.empty(packed.shape, dtype=query.dtype, device=query.device)
    kernels.paged_attention(packed, k_pages, v_pages, block_tables, seq_lens,
                            cu_seq_lens_q.to(torch.int32), scale=scaling, causal=True,
                            backend=backend, out=out, max_seq_len=max_seq_len)
    return out.unsqueeze(0), None


def continuous_batching_name(name: str = NAME) -> str | None:
    """The name under which continuous batching runs `name`, or None where it cannot.

    In transformers 5.17, `generate_batch` switches a model to `"paged|" + its implementation`
    (to a flash implementation instead, if a flash package is installed) and runs whatever
    function is registered under that name; `register()` registers ours there. Setting a model
    to this name before `generate_batch` skips the switch to flash. Later versions dropped the
    prefix and accept only `sdpa`, `paged|eager` and flash names (docs/hf_backend.md quotes the
    code): there no registered name can run under continuous batching, and this returns None.
    """
    from transformers import AttentionInterface

    return f"paged|{name}" if "paged|sdpa" in AttentionInterface._global_mapping else None


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
def register(name: str = NAME, backend: str = "auto") -> str:
    """Make minivllm's attention selectable in transformers as `attn_implementation=name`.

    Registers the attention function and its mask function under `name` (and, where
    transformers' continuous batching asks for it, `continuous_batching_name(name)`) and returns
    `name`. Calling it again is harmless: the same entries are written again. `backend` picks the
    kernel backend ("auto": Triton on a GPU, the PyTorch reference on a CPU; see minivllm.kernels).
    """
    if not isinstance(name, str) or not name or name in _RESERVED or "|" in name:
        raise ValueError(f"name must be a new non-empty name without '|', not one of {_RESERVED}; "
                         f"got {name!r}")
    if "flash" in name:
        raise ValueError(f"name must not contain 'flash' (transformers would load a flash-attention "
                         f"package for it); got {name!r}")
    if backend not in kernels.BACKENDS:
        raise ValueError(f"backend must be one of {kernels.BACKENDS}, got {backend!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, functools.partial(paged_attention_forward, backend=backend))
    AttentionMaskInterface.register(name, left_padded_causal_mask)
    cb_name = continuous_batching_name(name)
    if cb_name is not None:  # no mask function: continuous batching packs requests, needs none
        AttentionInterface.register(cb_name, functools.partial(paged_cache_attention_forward,
                                                               backend=backend))
    return name


def supports_continuous_batching() -> bool:
    """Whether the installed transformers can run a registered minivllm name in `generate_batch`."""
    return continuous_batching_name() is not None


def is_registered(name: str = NAME) -> bool:
    """Whether transformers can select `name` (both its attention and its mask function)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping
