"""Drive a minivllm model over a paged KV cache by hand, as the model runner does, for tests.

`PagedRunner` owns one KV cache per layer and a block table per sequence. Each `step` takes, for
some sequences, the next tokens to feed (a whole prompt, a chunk of one, or a single decode token),
packs them into one forward pass and returns each sequence's logits.

To make cache bugs loud: blocks are handed out from a *shuffled* pool (a sequence's blocks are
neither contiguous nor in order), block-table padding is -1 (never a valid block), and the caches
start as NaN, so reading a slot that was never written poisons the logits.
"""

from __future__ import annotations

import torch

from minivllm.layers.attention import AttentionMetadata


class PagedRunner:
    def __init__(self, model, num_blocks: int = 64, block_size: int = 8, seed: int = 0):
        self.model = model
        self.block_size = block_size
        param = next(model.parameters())
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        for layer in model.attention_layers():
            layer.bind_kv_cache(
                torch.full(shape, float("nan"), dtype=param.dtype, device=param.device),
                torch.full(shape, float("nan"), dtype=param.dtype, device=param.device),
            )
        generator = torch.Generator().manual_seed(seed)
        self.free_blocks = torch.randperm(num_blocks, generator=generator).tolist()
        self.block_tables: dict[str, list[int]] = {}
        self.num_cached: dict[str, int] = {}

    def _reserve(self, seq: str, total_tokens: int) -> list[int]:
        table = self.block_tables.setdefault(seq, [])
        while len(table) * self.block_size < total_tokens:
            table.append(self.free_blocks.pop())
        return table

    def step(self, chunks: list[tuple[str, list[int]]], backend: str = "torch") -> list[torch.Tensor]:
        """Feed `chunks` = [(sequence id, new token ids), ...] in one forward pass.

        Returns, per chunk, float32 logits [len(new tokens), vocab].
        """
        device = next(self.model.parameters()).device
        input_ids, positions, slots, seq_lens, cu_seqlens = [], [], [], [], [0]
        for seq, tokens in chunks:
            start = self.num_cached.get(seq, 0)
            end = start + len(tokens)
            table = self._reserve(seq, end)
            input_ids += tokens
            positions += range(start, end)
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, end)]
            seq_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + len(tokens))
            self.num_cached[seq] = end
        width = max(len(self.block_tables[seq]) for seq, _ in chunks)
        tables = [self.block_tables[seq] + [-1] * (width - len(self.block_tables[seq]))
                  for seq, _ in chunks]

        def int_tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        meta = AttentionMetadata(
            slot_mapping=int_tensor(slots, torch.int64),
            block_tables=int_tensor(tables, torch.int32),
            seq_lens=int_tensor(seq_lens, torch.int32),
            cu_seqlens_q=int_tensor(cu_seqlens, torch.int32),
            max_seq_len=max(seq_lens),
            backend=backend,
        )
        with torch.inference_mode():
            hidden = self.model(int_tensor(input_ids, torch.int64), int_tensor(positions, torch.int64), meta)
            logits = self.model.compute_logits(hidden)
        return list(logits.split([len(tokens) for _, tokens in chunks]))


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """Hugging Face's float32 logits for one sequence run alone, [len, vocab]."""
    with torch.inference_mode():
        return hf_model(input_ids=torch.tensor([token_ids])).logits[0].float()


def assert_logits_close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """Max abs difference within 1e-4 of the logit scale.

    Both sides compute the same float32 math in a different order (fused q|k|v and gate|up GEMMs,
    attention as an explicit softmax over gathered blocks vs SDPA), so they differ by rounding:
    float32 carries ~7 significant digits and the tiny models accumulate a few hundred products
    per output, which gives differences around 1e-6 of the logit scale. 1e-4 leaves two orders of
    magnitude of headroom, while real bugs (a wrong position, a leaked future token, a misplaced
    weight shard) move logits by 1e-2 of their scale or more.
    """
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(reference.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite logits (a cache slot read before written?)"
    scale = max(1.0, reference.abs().max().item())
    diff = (ours - reference).abs().max().item()
    assert diff <= 1e-4 * scale, f"{what}: max |diff| {diff:.3g} > 1e-4 x logit scale {scale:.3g}"
