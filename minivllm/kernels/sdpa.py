"""Paged attention through PyTorch's fused `scaled_dot_product_attention`: the CPU path.

The reference (`reference.py`) computes attention the way it is explained: one sequence at a
time, its lengths read back, its K/V gathered block by block, K/V repeated for each query head of
a GQA group, the softmax spelled out. Called by every layer of every step, that costs a CPU more
in small operations than the model's matrix products. This backend computes the same thing in
a few large operations:

* **Plan once per step.** Which cache rows hold each sequence's context, and which padding to
  hide, depends only on the step's block tables and lengths, the same in every layer.
  `make_plan` works it out once (`minivllm.kernels.plan_attention`), and a layer's call is left
  with one gather of K, one of V and one SDPA call.
* **Decodes in one call.** The sequences with a single query (decodes) are padded to the
  longest context among them: their keys are gathered as [B, L] rows of the cache, and an
  additive mask (0 or -inf) hides the padding. The price is reading B x L keys instead of
  sum(seq_len); decodes of similar lengths, the usual case, waste little.
* **Prefills one by one.** A prompt or a chunk of one is a sizeable matrix product on its own:
  SDPA with `is_causal` when the queries are the whole context, else with a mask that puts them
  at its end (chunked prefill), as the reference's `causal_mask` does.
* **GQA inside the kernel** (`enable_gqa=True`): each KV head is read for its group of query
  heads; nothing is repeated in memory.

The numbers are the reference's up to float rounding (tests/kernels/test_sdpa.py). An fp8 cache
is dequantized right after the gather, and attended in float32, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fp8, reference


@dataclass(frozen=True)
class DecodeGroup:
    """The sequences with one query each, attended together, padded to `num_keys` keys."""

    rows: torch.Tensor | None  # [n] int64: their query rows; None when every row is a decode
    slots: torch.Tensor  # [n * num_keys] int64: cache row of key j of decode i at i * num_keys + j
    mask: torch.Tensor | None  # [n, 1, 1, num_keys] float32, -inf on padding; None: no padding
    num_keys: int


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence with several queries: a prompt, or a chunk of one over an earlier context."""

    start: int  # its query rows are start:end
    end: int
    slots: torch.Tensor  # [seq_len] int64: the cache rows of its context, in order
    mask: torch.Tensor | None  # [q_len, seq_len] float32, -inf above the shifted diagonal
    is_causal: bool  # the queries are the whole context: SDPA's own causal mask is exact


@dataclass(frozen=True)
class AttentionPlan:
    """What every layer of one step shares: made by `make_plan`, read by `paged_attention`.

    It keeps the metadata tensors it was made from; a call checks that it gets the same ones.
    """

    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    num_tokens: int
    block_size: int
    causal: bool
    decodes: DecodeGroup | None
    prefills: tuple[PrefillChunk, ...]
    backend: str = "sdpa"


def make_plan(block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
              block_size: int, causal: bool = True, cache_dtype: torch.dtype = torch.float32) -> AttentionPlan:
    """Turn one step's metadata into gather indices and masks (reads the lengths once). The masks
    are made in the dtype attention runs in over a cache of `cache_dtype`, which SDPA adds as
    they are: no layer converts them again."""
    dtype = _attention_dtype(cache_dtype)
    lens = seq_lens.tolist()
    cu = cu_seqlens_q.tolist()
    decode_ids = [b for b in range(len(lens)) if cu[b + 1] - cu[b] == 1]
    prefills = tuple(_prefill_chunk(block_tables[b], cu[b], cu[b + 1], lens[b], block_size, causal, dtype)
                     for b in range(len(lens)) if cu[b + 1] - cu[b] > 1)
    decodes = None
    if decode_ids:
        all_rows = len(decode_ids) == cu[-1]  # a decode-only step: row b is sequence b
        decodes = _decode_group(block_tables, decode_ids, [lens[b] for b in decode_ids],
                                None if all_rows else [cu[b] for b in decode_ids], block_size, dtype)
    return AttentionPlan(block_tables, seq_lens, cu_seqlens_q, cu[-1], block_size, causal,
                         decodes, prefills)


def _context_slots(tables: torch.Tensor, lens: torch.Tensor, num_keys: int, block_size: int):
    """[n, num_keys] cache rows of keys 0..num_keys-1 of n sequences, and the [n, num_keys] mask
    of the real keys. Past a sequence's end its table may hold anything, and a slot nobody wrote
    may hold NaN, which a zero attention weight does not cancel (0 * NaN = NaN): padding reads
    the sequence's own first key again, which was written."""
    pos = torch.arange(num_keys, device=tables.device)
    slots = tables[:, pos // block_size].long() * block_size + pos % block_size
    real = pos[None, :] < lens[:, None]
    return torch.where(real, slots, slots[:, :1]), real


def _attention_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    """The query's dtype (validation makes it the cache's), or float32 over a dequantized fp8 cache."""
    return torch.float32 if cache_dtype == fp8.FP8_DTYPE else cache_dtype


def _decode_group(block_tables, ids: list[int], lens: list[int], rows: list[int] | None,
                  block_size: int, dtype: torch.dtype) -> DecodeGroup:
    device = block_tables.device
    num_keys = max(lens)
    tables = block_tables[torch.tensor(ids, device=device)]
    slots, real = _context_slots(tables, torch.tensor(lens, device=device), num_keys, block_size)
    mask = None
    if min(lens) < num_keys:
        mask = torch.zeros(real.shape, dtype=dtype, device=device).masked_fill_(~real, float("-inf"))
        mask = mask[:, None, None, :]  # broadcast over heads and the one query
    return DecodeGroup(None if rows is None else torch.tensor(rows, device=device),
                       slots.flatten(), mask, num_keys)


def _prefill_chunk(table: torch.Tensor, start: int, end: int, seq_len: int, block_size: int,
                   causal: bool, dtype: torch.dtype) -> PrefillChunk:
    lens = torch.tensor([seq_len], device=table.device)
    slots = _context_slots(table[None], lens, seq_len, block_size)[0][0]
    q_len = end - start
    mask = None
    if causal and q_len < seq_len:
        # Query j sits at position seq_len - q_len + j and sees the keys up to it.
        hidden = torch.ones(q_len, seq_len, dtype=torch.bool, device=table.device).triu(seq_len - q_len + 1)
        mask = torch.zeros(q_len, seq_len, dtype=dtype, device=table.device).masked_fill_(hidden, float("-inf"))
    return PrefillChunk(start, end, slots, mask, is_causal=causal and q_len == seq_len)


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """The reference's scatter, as one `index_copy_` per cache when every slot is real. Slots to
    skip (padding) and fp8 caches, which the CPU engine rarely sees, take the reference's path."""
    if fp8.is_fp8(k_cache) or int(slot_mapping.min()) < 0:
        reference.write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    slots = slot_mapping.long()
    for new, cache in ((key, k_cache), (value, v_cache)):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, new)


def _gather(cache: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor) -> torch.Tensor:
    """Cache rows `slots` ([N] int64) -> [N, Hkv, D]; an fp8 cache comes back as float32."""
    rows = cache.view(-1, *cache.shape[2:]).index_select(0, slots)
    if fp8.is_fp8(cache):  # scales may have any strides: index them by block and offset
        block_size = cache.shape[1]
        rows = rows.float() * scales[slots // block_size, slots % block_size][..., None]
    return rows


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, causal=True,
                    out=None, max_seq_len=None, num_splits=None, k_scale=None, v_scale=None,
                    plan: AttentionPlan | None = None, max_query_len=None) -> torch.Tensor:
    """Same contract as `minivllm.kernels.paged_attention` (inputs already validated). `plan`:
    the step's plan (made here when None); `max_seq_len`, `max_query_len` and `num_splits` plan
    the GPU kernels' work and are not needed here."""
    if plan is None:
        plan = make_plan(block_tables, seq_lens, cu_seqlens_q, k_cache.shape[1], causal, k_cache.dtype)
    if out is None:
        out = torch.empty_like(query)
    dtype = _attention_dtype(k_cache.dtype)
    group = plan.decodes
    if group is not None:
        q = query if group.rows is None else query.index_select(0, group.rows)
        n = q.shape[0]
        k = _gather(k_cache, k_scale, group.slots).view(n, group.num_keys, *k_cache.shape[2:])
        v = _gather(v_cache, v_scale, group.slots).view(n, group.num_keys, *v_cache.shape[2:])
        o = F.scaled_dot_product_attention(  # [n, Hq, 1, D]; heads before keys for SDPA
            q.to(dtype).unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=group.mask, scale=scale, enable_gqa=True).squeeze(2)
        if group.rows is None:
            out.copy_(o)
        else:
            out.index_copy_(0, group.rows, o.to(out.dtype))
    for chunk in plan.prefills:
        # [1, heads, tokens, D]: with a batch dimension, SDPA takes its fused CPU kernel.
        q = query[chunk.start:chunk.end].to(dtype).transpose(0, 1)[None]
        k = _gather(k_cache, k_scale, chunk.slots).transpose(0, 1)[None]
        v = _gather(v_cache, v_scale, chunk.slots).transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=chunk.mask,
                                           is_causal=chunk.is_causal, scale=scale, enable_gqa=True)
        out[chunk.start:chunk.end] = o[0].transpose(0, 1)
    return out

