"""The KV cache tensors: how many blocks fit, and their allocation.

Per layer one K and one V tensor, [num_blocks, block_size, kv_heads, head_dim] (the "NHD" layout
the kernels read), in the format of the config's `kv_cache_spec`: the model's dtype, or e4m3 plus
one float32 scale per token and KV head (minivllm/kernels/kv_cache_spec.py), 2 x D + 8 bytes per
token and head instead of 4 x D, so about twice the blocks fit in the same memory. How many
blocks: an explicit `num_kv_blocks`, else on CPU a byte budget, else
on CUDA what is left of `gpu_memory_utilization` x the GPU's memory after the weights and a
*profiled* forward pass at the largest batch the scheduler can send, so that activations never
find the memory taken by the cache.

Under tensor parallelism each rank's cache holds only its own KV heads (`model.num_kv_heads` is
the rank's), so a block costs each GPU 1/N of its single-GPU bytes. The budgets are per rank, and
the ranks then agree on the smallest count: the block manager hands out one set of block ids,
which must be valid on every rank.
"""

from __future__ import annotations

import itertools
import warnings

import torch

from minivllm.config import EngineConfig
from minivllm.distributed import TensorParallel, min_over_ranks
from minivllm.kernels import KVCacheSpec
from minivllm.layers.attention import AttentionMetadata
from minivllm.layers.sampler import Sampler
from minivllm.sampling_params import SamplingParams
from minivllm.step import SampleRow


def kv_bytes_per_block(model, block_size: int, spec: KVCacheSpec) -> int:
    """K and V, every layer: 2 x layers x block_size x kv_heads x the bytes of one token's head."""
    return 2 * model.num_layers * block_size * model.num_kv_heads * spec.bytes_per_token_head(model.head_dim)


def num_kv_blocks(config: EngineConfig, model, device: torch.device, tp: TensorParallel,
                  block_bytes: int) -> int:
    """The pool size: explicit, or the memory budget divided by the size of a block (the
    smallest over the tensor-parallel ranks). block_bytes: what one block costs: the model's K/V,
    and a draft model's too when there is one (its cache has a block for every block of the target's)."""
    cache = config.cache_config
    if cache.num_kv_blocks is not None:
        num_blocks = cache.num_kv_blocks
    else:
        if device.type == "cuda":
            budget = _gpu_kv_budget_bytes(config, model, device)
            source = f"gpu_memory_utilization={cache.gpu_memory_utilization}"
        else:
            budget = cache.kv_cache_memory_bytes
            source = f"kv_cache_memory_bytes={cache.kv_cache_memory_bytes}"
        num_blocks = min_over_ranks(budget // block_bytes, tp)
        if num_blocks < 1:
            raise ValueError(f"{source} leaves room for no KV block ({block_bytes} bytes each); "
                             "give the KV cache more memory")
    max_len = config.scheduler_config.max_model_len
    if num_blocks * cache.block_size < max_len:
        warnings.warn(
            f"the KV pool ({num_blocks} blocks x {cache.block_size} tokens) cannot hold one "
            f"sequence of max_model_len={max_len} tokens; requests that could grow longer than "
            "the pool will be refused", stacklevel=3)
    if num_blocks * cache.block_size >= 2**31:
        raise ValueError(f"{num_blocks} KV blocks of {cache.block_size} tokens exceed 2^31 slots; "
                         "slots are int32 in the step buffer: use fewer or larger blocks")
    return num_blocks


def allocate_kv_cache(model, num_blocks: int, block_size: int, spec: KVCacheSpec, device: torch.device):
    """One K and one V tensor per layer in the format of `spec`, bound to that layer's attention;
    returns ([(k, v)] per layer, [(k_scale, v_scale)] per layer of a scaled (fp8) cache, else None)."""
    caches, scales = [], [] if spec.scaled else None
    for layer in model.attention_layers():
        cache = spec.allocate(num_blocks, block_size, model.num_kv_heads, model.head_dim, device)
        layer.bind_kv_cache(*cache)
        caches.append((cache.k, cache.v))
        if scales is not None:
            scales.append((cache.k_scale, cache.v_scale))
    return caches, scales


@torch.inference_mode()
def _gpu_kv_budget_bytes(config: EngineConfig, model, device: torch.device) -> int:
    """Bytes left for the KV cache under gpu_memory_utilization, after a profiling pass.

    The weights are already loaded; a forward pass with the largest token batch the scheduler
    may send records the peak of activation memory. Memory used outside PyTorch's allocator
    (the CUDA context, other processes) is counted too.
    """
    sched, spec = config.scheduler_config, config.speculative_config
    num_tokens = sched.max_num_batched_tokens
    # A sequence that verifies k drafts takes logits at 1 + k rows.
    logit_rows = sched.max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    scratch_bytes = _profile_forward(config, model, device, num_tokens, min(logit_rows, num_tokens))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - scratch_bytes
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = (total - free) - torch.cuda.memory_reserved(device)
    return int(total * config.cache_config.gpu_memory_utilization) - peak - max(outside_torch, 0)


def _profile_forward(config, model, device, num_tokens: int, num_logit_rows: int) -> int:
    """One dummy forward of `num_tokens` tokens; returns the bytes of its scratch KV cache."""
    max_len = config.scheduler_config.max_model_len
    block_size = config.cache_config.block_size
    lengths = [min(max_len, num_tokens - start) for start in range(0, num_tokens, max_len)]
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    scratch, _ = allocate_kv_cache(model, sum(blocks_per_seq), block_size, config.kv_cache_spec, device)
    tables, first = [], 0
    for n in blocks_per_seq:
        tables.append(list(range(first, first + n)) + [0] * (max(blocks_per_seq) - n))
        first += n
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device),
        max_seq_len=max(lengths),
        backend=config.model_config.attention_backend,
    )
    positions = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths]).to(device)
    hidden = model(torch.zeros(num_tokens, dtype=torch.int32, device=device), positions, meta)
    # The sampler's sorts and softmaxes over [rows, vocab] count too, with every option on.
    logits = model.compute_logits(hidden[:num_logit_rows])
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                            logit_bias={0: 1.0}, logprobs=20, logprobs_mode="processed")
    Sampler(model.config.vocab_size, device).sample(
        logits, [SampleRow(i, params, prompt_token_ids=[0]) for i in range(num_logit_rows)])
    scratch_bytes = sum(blocks_per_seq) * kv_bytes_per_block(model, block_size, config.kv_cache_spec)
    for layer in model.attention_layers():  # unbind, so the scratch cache can be freed
        layer.bind_kv_cache(None, None)
    return scratch_bytes
