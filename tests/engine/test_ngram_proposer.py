"""The n-gram proposer's index, kept up to date as tokens arrive, proposes exactly what a search
of the whole history from scratch proposes, at every step of a growing sequence."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from minivllm.engine.sequence import Sequence
from minivllm.engine.speculation import NgramProposer
from minivllm.sampling_params import SamplingParams


def search_from_scratch(tokens: list[int], min_n: int, max_n: int, max_drafts: int) -> list[int]:
    """The proposer's rule, read off the whole history: for the longest n in [min_n, max_n]
    whose last n tokens occur earlier, the tokens after the latest occurrence followed by
    max_drafts tokens, else after the earliest."""
    num = len(tokens)
    for n in range(min(max_n, num - 1), min_n - 1, -1):
        found = [s for s in range(num - n) if tokens[s:s + n] == tokens[num - n:]]
        if found:
            full = [s for s in found if s + n + max_drafts <= num]
            follow = (full[-1] if full else found[0]) + n
            return tokens[follow:follow + max_drafts]
    return []


@settings(max_examples=200, deadline=None)
@given(vocab=st.integers(1, 6), prompt_len=st.integers(1, 12), sizes=st.sampled_from([(1, 1), (2, 4), (1, 3), (3, 3)]),
       steps=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 5)), min_size=1, max_size=25), data=st.data())
def test_the_index_proposes_what_a_search_from_scratch_proposes(vocab, prompt_len, sizes, steps, data):
    """Small vocabularies repeat n-grams often (loops, overlapping occurrences); each step appends
    1..5 tokens, as a verification does, and asks for 0..5 drafts."""
    token = st.integers(0, vocab - 1)
    min_n, max_n = sizes
    seq = Sequence("r", data.draw(st.lists(token, min_size=prompt_len, max_size=prompt_len)), SamplingParams())
    proposer = NgramProposer(min_n, max_n)
    for num_appended, max_drafts in steps:
        assert proposer.propose(seq, max_drafts) == search_from_scratch(seq.token_ids, min_n, max_n, max_drafts)
        for t in data.draw(st.lists(token, min_size=num_appended, max_size=num_appended)):
            seq.append_token(t)
    proposer.release(seq.seq_id)
    assert not proposer._index
