"""The server's path for log-probabilities: the runner's records, through the engine's pipe, into
the API's shapes. The oracle is the `LLM` form of the same record ({token id: Logprob}, built by
the engine), which the end-to-end tests check against transformers."""

from __future__ import annotations

import gc
import pickle

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivllm.engine.request import position_logprobs
from minivllm.entrypoints.engine_core import OutputDecoder, OutputEncoder
from minivllm.entrypoints.logprobs import chat_logprobs, completion_logprobs
from minivllm.layers.logprobs import decode_rows, logprobs_payload
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

VOCAB = 12


def token_text(token_id: int) -> str:
    return f"<{token_id}>"


def records_of(logits: list[list[int]], tokens: list[int], k: int) -> list[tuple]:
    payload = logprobs_payload(torch.tensor(logits, dtype=torch.float32), torch.tensor(tokens), max(k, 1))
    return decode_rows(payload, tokens, [k] * len(tokens))


# Small integer logits: many ties, where the token's rank and the top-k order can disagree.
rows = st.lists(st.integers(-3, 3), min_size=VOCAB, max_size=VOCAB)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(rows, st.integers(0, VOCAB - 1)), min_size=1, max_size=4), st.integers(0, 6))
def test_api_shapes_from_records_equal_those_of_the_llm_form(rows_and_tokens, k):
    logits, tokens = (list(x) for x in zip(*rows_and_tokens))
    records = records_of(logits, tokens, k)
    positions = [position_logprobs(r, token_text) for r in records]
    # What the entries were when the API was formatted from the LLM form: best rank first.
    ranked = [sorted(p.items(), key=lambda item: item[1].rank) for p in positions]

    chat = chat_logprobs(tokens, records, k, token_text)["content"]
    for entry, token, position, best in zip(chat, tokens, positions, ranked):
        assert (entry["token"], entry["logprob"]) == (token_text(token), position[token].logprob)
        assert [(e["token"], e["logprob"]) for e in entry["top_logprobs"]] == [
            (token_text(t), lp.logprob) for t, lp in best[:k]]

    completion = completion_logprobs(tokens, [None, *records[1:]], token_text)
    assert completion["tokens"] == [token_text(t) for t in tokens]
    assert completion["token_logprobs"] == [None] + [p[t].logprob for p, t in zip(positions[1:], tokens[1:])]
    assert completion["top_logprobs"] == [None] + [
        {token_text(t): lp.logprob for t, lp in best} for best in ranked[1:]]
    assert [list(top) for top in completion["top_logprobs"][1:]] == [
        [token_text(t) for t, _ in best] for best in ranked[1:]]


def test_records_cross_the_pipe_unchanged():
    records = records_of([[0, 2, 1, 5, 5, 0, 0, 0, 1, 2, 3, 4]] * 3, [3, 4, 0], 3)
    metrics = RequestMetrics(*[None] * len(RequestMetrics.__dataclass_fields__))
    output = RequestOutput("r", "prompt", [1, 2], [CompletionOutput(0, "ab", [3, 4], None, None, records[:2])],
                           False, metrics, prompt_logprobs=[None, records[2]])
    wire = pickle.loads(pickle.dumps(OutputEncoder().encode(output)))
    got = OutputDecoder().decode(wire)
    assert got.outputs[0].logprobs == records[:2] and got.prompt_logprobs == [None, records[2]]


def test_records_are_not_tracked_by_the_garbage_collector():
    """A request keeps one per token: the collector must not have to look at them (step.py)."""
    records = records_of([[0, 2, 1, 5, 5, 0, 0, 0, 1, 2, 3, 4]] * 2, [3, 4], 3)
    gc.collect()
    gc.collect()  # a tuple is let go once a pass has seen its items let go (the inner tuples)
    assert not any(gc.is_tracked(r) for r in records)
