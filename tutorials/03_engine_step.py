"""Tutorial 3: one engine step, from the scheduler's plan to kernel inputs to sampled tokens.

    python tutorials/03_engine_step.py [--out DIR] [--smoke]

`LLMEngine.step()` is three calls: `Scheduler.schedule()` -> `ModelRunner.execute()` ->
`Scheduler.update()`. Here we take one step apart by hand on the real engine, printing every
tensor the attention kernel receives, then check that it gives exactly what the engine gives.
(The engine overlaps steps by default, planning step n+1 before step n's tokens are back; here
it runs with `async_scheduling=False`, one step start to finish, so each part is complete.)

The batch mixes both kinds of work on purpose: one sequence is *decoding* (1 new token) while
another is *prefilling* its prompt (many new tokens) — one forward pass does both.
"""

from __future__ import annotations

import torch
from common import heading, parse_args, tiny_model

from minivllm import LLM, SamplingParams
from minivllm.observe import plot_block_map, snapshot_blocks
from minivllm.worker.input_batch import build_input_batch

BLOCK_SIZE = 4


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], "03_engine_step")
    llm = LLM(tiny_model(args.model), device="cpu", block_size=BLOCK_SIZE, num_kv_blocks=16,
              max_num_seqs=4, max_model_len=64, enable_prefix_caching=False, async_scheduling=False)
    engine = llm.engine
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    # Sequence A: prompt of 6 tokens, run one step so it is decoding when B arrives.
    engine.add_request([11, 12, 13, 14, 15, 16], greedy)
    engine.step()
    engine.add_request([21, 22, 23, 24, 25], greedy)

    heading("1. Scheduler.schedule(): the plan (pure Python, no tensors)")
    plan = engine.scheduler.schedule()
    for s in plan.output.seqs:  # the plain records the model runner receives (minivllm/step.py)
        kind = "decode " if s.is_decode else "prefill"
        print(f"seq {s.seq_id}: {kind} {s.num_new_tokens} new tokens {s.token_ids} from position {s.start}; "
              f"block table {s.block_table}; samples: {s.num_samples}")
    print(f"block copies (copy-on-write): {plan.output.block_copies}; preempted: {plan.preemptions}")
    plot_block_map(snapshot_blocks(engine.block_manager, engine.scheduler.running),
                   args.out / "block_map.png", title="Tutorial 3: the pool during the step")

    heading("2. build_input_batch(): the plan as tensors (what the kernels get)")
    batch = build_input_batch(plan.output, BLOCK_SIZE, torch.device("cpu"), backend="torch")
    meta = batch.attn_metadata
    rows = {
        "input_ids": (batch.input_ids, "the new tokens of every sequence, packed into one row"),
        "positions": (batch.positions, "each token's position in its own sequence (for RoPE)"),
        "slot_mapping": (meta.slot_mapping, "where each token's K/V is written: block * 4 + offset"),
        "cu_seqlens_q": (meta.cu_seqlens_q, "where each sequence's queries start in the packed row"),
        "seq_lens": (meta.seq_lens, "context length per sequence, including the new tokens"),
        "block_tables": (meta.block_tables, "each sequence's row of the block tables"),
        "logits_indices": (batch.logits_indices, "the rows whose output gives the next token"),
    }
    for name, (tensor, meaning) in rows.items():
        print(f"{name:<15} {tensor.tolist()!s:<38} {meaning}")

    heading("3. model forward + LM head + sampler")
    runner = engine.executor.runner  # the one ModelRunner of a single-process engine
    with torch.inference_mode():
        hidden = runner.model(batch.input_ids, batch.positions, meta)  # writes K/V, attends
        logits = runner.model.compute_logits(hidden[batch.logits_indices])
        seqs = plan.sampled
        tokens = runner.sampler.sample(logits, plan.output.sample_rows).tokens.tolist()
    print(f"hidden states {tuple(hidden.shape)}: one row per new token ({batch.num_tokens})")
    print(f"logits {tuple(logits.shape)}: only {len(seqs)} rows go through the LM head, not {batch.num_tokens}")
    print(f"greedy sampling = argmax per row: {logits.argmax(-1).tolist()} -> sampled {tokens}")
    k_cache, _ = runner.kv_caches[0]
    slot = int(meta.slot_mapping[-1])
    print(f"the last new token's key is now in layer 0's cache at block {slot // BLOCK_SIZE}, "
          f"offset {slot % BLOCK_SIZE}: {[round(x, 4) for x in k_cache[slot // BLOCK_SIZE, slot % BLOCK_SIZE, 0, :4].tolist()]}")

    heading("4. Scheduler.update(): fold the tokens back in")
    finished = engine.scheduler.update(plan, tokens)
    for seq in seqs:
        print(f"seq {seq.seq_id}: now {seq.num_tokens} tokens, {seq.num_computed_tokens} computed, "
              f"last token {seq.last_token_id}")
    print(f"finished this step: {[s.seq_id for s in finished]}")

    heading("Check: the engine's own steps compute the same tokens")
    while engine.has_unfinished_requests():  # the rest of both requests, by the engine itself
        engine.step()
    by_hand = engine.get_output("1").token_ids
    again = llm.generate([[21, 22, 23, 24, 25]], greedy, use_tqdm=False)[0].token_ids
    print(f"prompt B, first token by hand then engine steps: {by_hand}")
    print(f"prompt B, run again entirely by llm.generate:    {again}")
    assert by_hand == again, "the hand-made step must compute what the engine computes"
    print(f"Identical. Figures in {args.out}")


if __name__ == "__main__":
    main()
