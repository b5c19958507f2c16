"""The server's path for log-probabilities: the runner's records, through the engine's pipe, into
the API's shapes. The oracle is the `LLM` form of the same record ({token id: Logprob}, built by
the engine), which the end-to-end tests check against transformers."""

from __future__ import annotations

import gc
import json
import math
import pickle

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivllm.engine.request import position_logprobs
from minivllm.entrypoints.engine_core import OutputDecoder, OutputEncoder
from minivllm.entrypoints.logprobs import LOGPROB_FLOOR, TokenTexts, chat_logprobs, completion_logprobs
from minivllm.layers.logprobs import decode_rows, logprobs_payload
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

VOCAB = 12
# Texts JSON must escape, one that is not ASCII, and two tokens that show as the same text.
NAMES = ["<0>", " \"q\"", "a\\b", "\n", " é", "\ufffd", "\ufffd", "<7>", "\t<8>", "<9>", "</s>", "€"]


class Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return NAMES[ids[0]]


def token_text(token_id: int) -> str:
    return NAMES[token_id]


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

    texts = TokenTexts(Tokenizer())
    chat_text = chat_logprobs(tokens, records, k, texts)
    assert json.dumps(json.loads(chat_text)) == chat_text  # what json.dumps writes, byte for byte
    chat = json.loads(chat_text)["content"]
    for entry, token, position, best in zip(chat, tokens, positions, ranked):
        assert (entry["token"], entry["logprob"]) == (token_text(token), position[token].logprob)
        assert entry["bytes"] == list(token_text(token).encode("utf-8"))
        assert [(e["token"], e["logprob"], e["bytes"]) for e in entry["top_logprobs"]] == [
            (token_text(t), lp.logprob, list(token_text(t).encode("utf-8"))) for t, lp in best[:k]]

    completion_text, next_offset = completion_logprobs(tokens, [None, *records[1:]], texts, 3)
    assert json.dumps(json.loads(completion_text)) == completion_text
    completion = json.loads(completion_text)
    lengths = [len(token_text(t)) for t in tokens]
    assert completion["text_offset"] == [3 + sum(lengths[:i]) for i in range(len(tokens))]
    assert next_offset == 3 + sum(lengths)
    assert completion["tokens"] == [token_text(t) for t in tokens]
    assert completion["token_logprobs"] == [None] + [p[t].logprob for p, t in zip(positions[1:], tokens[1:])]
    # A text two tokens share keeps the likelier value (the first, best first).
    expected = [{} for _ in ranked[1:]]
    for top, best in zip(expected, ranked[1:]):
        for t, lp in best:
            top.setdefault(token_text(t), lp.logprob)
    assert completion["top_logprobs"] == [None, *expected]
    assert [list(top) for top in completion["top_logprobs"][1:]] == [list(top) for top in expected]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(rows, st.integers(0, VOCAB - 1), st.integers(0, 4)), min_size=1, max_size=6))
def test_rows_that_keep_fewer_pairs_are_the_full_records_cut(rows_and_tokens):
    """decode_rows zips whole rows at once when every row keeps them all; a row that asked for
    fewer keeps the same numbers, cut to its k."""
    logits, tokens, ks = (list(x) for x in zip(*rows_and_tokens))
    payload = logprobs_payload(torch.tensor(logits, dtype=torch.float32), torch.tensor(tokens), 4)
    full = decode_rows(payload, tokens, [4] * len(tokens))
    assert decode_rows(payload, tokens, ks) == [(*r[:3], r[3][:k], r[4][:k]) for r, k in zip(full, ks)]
    assert all(type(r[2]) is int and all(type(t) is int for t in r[3]) for r in full)


def test_values_below_the_floor_and_not_numbers_are_written_as_json_dumps_writes_them():
    texts = TokenTexts(Tokenizer())
    record = (1, -math.inf, 3, (2, 0), (-0.25, -math.inf))
    text, _ = completion_logprobs([1, 1], [record, (1, math.nan, 1, (1,), (math.nan,))], texts)
    assert text == json.dumps({"text_offset": [0, 4], "token_logprobs": [LOGPROB_FLOOR, math.nan],
                               "tokens": [NAMES[1]] * 2,
                               "top_logprobs": [{NAMES[2]: -0.25, NAMES[0]: LOGPROB_FLOOR, NAMES[1]: LOGPROB_FLOOR},
                                                {NAMES[1]: math.nan}]})


def test_token_texts_are_the_tokens_decoded_alone():
    texts = TokenTexts(Tokenizer())
    assert [texts[t] for t in (4, 1)] == [(json.dumps(" é"), 2, "[32, 195, 169]"), (json.dumps(' "q"'), 4, "[32, 34, 113, 34]")]
    assert TokenTexts(None)[7][0] == '"token_id:7"'


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
