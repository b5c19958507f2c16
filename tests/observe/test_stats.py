"""Statistics checked against the engine's own state, recomputed independently here."""

from __future__ import annotations

import pytest

from minivllm import LLM, SamplingParams
from minivllm.observe import format_stats, percentile, summarize_requests

BLOCK_SIZE = 4


@pytest.fixture
def llm(tiny_llama):
    return LLM(tiny_llama, device="cpu", attention_backend="torch", block_size=BLOCK_SIZE, num_kv_blocks=64,
               max_num_seqs=4, max_model_len=128)


def _independent_kv_stats(engine) -> dict:
    """Utilization, fragmentation and sharing from the block tables and ref counts alone."""
    bm = engine.block_manager
    held = [b for b in range(bm.num_blocks) if bm.ref_count(b) > 0]
    filled = {}
    for seq in engine.scheduler.running:  # between steps, a sequence's slots = its computed tokens
        for i, block in enumerate(seq.block_table):
            used = min(BLOCK_SIZE, max(0, seq.num_computed_tokens - i * BLOCK_SIZE))
            filled[block] = max(filled.get(block, 0), used)
    allocated = len(held) * BLOCK_SIZE
    return {
        "num_used_blocks": len(held),
        "utilization": len(held) / bm.num_blocks,
        "fragmentation": (allocated - sum(filled.values())) / allocated if allocated else 0.0,
        "num_shared_blocks": sum(1 for b in held if bm.ref_count(b) > 1),
    }


def test_kv_stats_match_the_block_tables_at_every_step(llm):
    prompts = [list(range(5, 5 + n)) for n in (3, 9, 14, 22)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, n=k) for m, k in
              ((6, 1), (11, 2), (5, 1), (9, 1))]
    for prompt, p in zip(prompts, params):
        llm.engine.add_request(prompt, p)
    checked = 0
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        kv = llm.engine.get_stats()["kv_cache"]
        expected = _independent_kv_stats(llm.engine)
        assert kv["num_used_blocks"] == expected["num_used_blocks"]
        assert kv["utilization"] == pytest.approx(expected["utilization"])
        assert kv["fragmentation"] == pytest.approx(expected["fragmentation"])
        assert kv["num_shared_blocks"] == expected["num_shared_blocks"]
        assert kv["num_used_blocks"] + kv["num_free_blocks"] == kv["num_blocks"]
        checked += expected["num_used_blocks"] > 0
    assert checked >= 5  # the invariants were checked while blocks were held, not only when empty


def test_engine_and_request_stats_add_up(llm):
    prompts = [list(range(5, 5 + n)) for n in (4, 12, 30)]
    outputs = llm.generate(prompts, max_tokens=7, temperature=0, ignore_eos=True, use_tqdm=False)
    stats = llm.engine.get_stats()
    engine, sched, requests = stats["engine"], stats["scheduler"], stats["requests"]
    assert engine["num_prompt_tokens"] == sum(len(p) for p in prompts)
    assert engine["num_generated_tokens"] == sum(len(o.token_ids) for o in outputs) == 21
    assert engine["num_finished_requests"] == requests["num_requests"] == 3
    assert sched["num_prefill_chunks"] >= 3 and engine["num_aborted_requests"] == 0
    assert sched["num_prefill_tokens"] == engine["num_prompt_tokens"]  # no cache hits, no preemption
    records = list(llm.engine.stats.history)
    assert sched["avg_batch_size"] == pytest.approx(sum(r.num_scheduled_seqs for r in records) / len(records))
    ttfts = sorted(o.metrics.ttft for o in outputs)
    assert requests["ttft_p50"] == pytest.approx(ttfts[1])
    assert requests["ttft_max"] == pytest.approx(ttfts[-1])
    assert requests["tpot_mean"] == pytest.approx(sum(o.metrics.tpot for o in outputs) / 3)
    text = format_stats(stats)
    assert "[requests]" in text and "ms" in text and "%" in text


def test_aborted_requests_are_counted(llm):
    request_id = llm.engine.add_request(list(range(5, 15)), SamplingParams(max_tokens=50, ignore_eos=True))
    llm.engine.step()
    llm.engine.abort(request_id)
    assert llm.engine.get_stats()["engine"]["num_aborted_requests"] == 1


def test_percentile_and_summary():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    assert summarize_requests([]) == {"num_requests": 0, "num_preempted_requests": 0, "num_cached_prompt_tokens": 0}
    with pytest.raises(TypeError):
        format_stats([("engine", {})])
