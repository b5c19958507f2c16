"""/metrics without a server: speculative decoding's counters come from the engine's state, with
one frontend or several (PROMETHEUS_MULTIPROC_DIR set: each frontend renders the engine's own
numbers beside the summed events)."""

from __future__ import annotations

import pytest

from minivllm.entrypoints.engine_core import EngineState
from minivllm.entrypoints.metrics import SHARED_DIR_ENV, ServerMetrics
from minivllm.observe.stats import SpecDecodeCounts


@pytest.mark.parametrize("frontends", ["one", "several"])
def test_speculative_counters_are_read_from_the_engine_state_at_scrape_time(frontends, tmp_path, monkeypatch):
    if frontends == "several":
        monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path))
    state = EngineState(1, 0, 0.5, SpecDecodeCounts(4, 12, 7, (4, 2, 1)))
    metrics = ServerMetrics(lambda: state)
    body = metrics.render()[0].decode()
    assert "minivllm:spec_decode_num_drafts_total 4.0" in body
    assert "minivllm:spec_decode_num_draft_tokens_total 12.0" in body
    assert "minivllm:spec_decode_num_accepted_tokens_total 7.0" in body
    for position, value in enumerate((4, 2, 1)):
        assert f'minivllm:spec_decode_num_accepted_tokens_per_pos_total{{position="{position}"}} {value}.0' in body
    state = EngineState(1, 0, 0.5, SpecDecodeCounts(5, 15, 9, (5, 3, 1)))  # a later scrape
    assert "minivllm:spec_decode_num_accepted_tokens_total 9.0" in metrics.render()[0].decode()


def test_no_speculative_counters_without_speculation():
    body = ServerMetrics(lambda: EngineState(0, 0, 0.0)).render()[0].decode()
    assert "spec_decode" not in body and "minivllm:num_requests_running 0.0" in body
