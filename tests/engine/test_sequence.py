"""Sequence: the token counters, state changes, fork and the to_dict snapshot."""

import json

import pytest

from minivllm.engine.sequence import Sequence, SequenceStatus
from minivllm.sampling_params import SamplingParams


def test_lifecycle_counters_and_snapshot():
    seq = Sequence("req", [5, 6, 7], SamplingParams(max_tokens=4), arrival_time=1.0)
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens) == (3, 3, 0)
    seq.num_computed_tokens = 3
    seq.append_token(9, now=2.0)
    assert seq.output_token_ids == [9] and seq.last_token_id == 9 and seq.num_uncomputed_tokens == 1
    assert seq.first_token_time == 2.0
    seq.block_table = [4]
    seq.reset_for_recompute()
    assert seq.status is SequenceStatus.WAITING and seq.num_preemptions == 1
    assert seq.block_table == [] and seq.num_computed_tokens == 0 and seq.token_ids == [5, 6, 7, 9]
    seq.finish(SequenceStatus.FINISHED_LENGTH, now=5.0)
    assert seq.finish_reason == "length" and seq.is_finished
    snapshot = seq.to_dict()
    json.dumps(snapshot)  # JSON-friendly
    assert snapshot["status"] == "finished_length" and snapshot["generation_time"] == 4.0
    assert snapshot["tokens_per_s"] == pytest.approx(1 / 4.0)
    with pytest.raises(ValueError, match="FINISHED"):
        seq.finish(SequenceStatus.RUNNING)


def test_fork_copies_tokens_not_blocks():
    parent = Sequence("req", [1, 2, 3], SamplingParams(n=3))
    assert parent.width == 3
    parent.block_table = [0, 1]
    child = parent.fork(2)
    assert child.seq_id != parent.seq_id and child.index == 2 and child.width == 1
    assert child.token_ids == parent.token_ids and child.token_ids is not parent.token_ids
    assert child.block_table == []  # the BlockManager fills it, with references
    child.append_token(4)
    assert parent.num_tokens == 3


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="empty"):
        Sequence("req", [], SamplingParams())
