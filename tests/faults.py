"""Deliberate bugs, to show that the suite catches them (tests/test_faults.py).

Each fault is a small, plausible bug put into the production code the engine really runs (the
kernel dispatch table, the reference kernel's gather, the rotary table, the stop rules, the
scheduler), and names the tests that must catch it. As a pytest plugin this module puts one of
them in place for a whole run:

    python -m pytest -p tests.faults --fault NAME --fault-report report.json TESTS...

patches the code when pytest starts, undoes it when pytest ends, and writes how each test ended
(and, for a failure, the exception's type) to report.json. Only tests that run in the pytest
process see the bug: server and tensor-parallel tests, whose engine runs in a process of its own,
are not used here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from minivllm.engine.scheduler import Scheduler
from minivllm.engine.sequence import SequenceStatus
from minivllm.engine.stopping import StopChecker
from minivllm.kernels import backends, reference
from minivllm.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class Fault:
    what: str
    apply: Callable[[pytest.MonkeyPatch], None]
    caught_by: tuple[str, ...]  # test node ids, each of which must fail on an assertion


def fp8_v_scale_20_percent_too_large(mp: pytest.MonkeyPatch) -> None:
    write = backends.KERNELS["write_kv_cache"]["torch"]

    def write_kv_cache(**args):
        write(**args)
        if args["v_scale"] is not None:
            slots, block_size = args["slot_mapping"], args["v_cache"].shape[1]
            slots = slots[slots >= 0].long()
            args["v_scale"][slots // block_size, slots % block_size] *= 1.2

    mp.setitem(backends.KERNELS["write_kv_cache"], "torch", write_kv_cache)


def block_table_entry_off_by_one(mp: pytest.MonkeyPatch) -> None:
    gather = reference.gather_kv

    def gather_kv(cache, block_table, seq_len):
        table = block_table.clone()
        last = (seq_len - 1) // cache.shape[1]  # the sequence's last block is read from its neighbour
        table[last] = (table[last] + 1) % cache.shape[0]
        return gather(cache, table, seq_len)

    mp.setattr(reference, "gather_kv", gather_kv)


def rope_at_position_plus_one(mp: pytest.MonkeyPatch) -> None:
    angles_at = RotaryEmbedding.forward

    def forward(self, positions, dtype):
        return angles_at(self, (positions + 1).clamp(max=self.max_position - 1), dtype)

    mp.setattr(RotaryEmbedding, "forward", forward)


def last_kv_token_dropped(mp: pytest.MonkeyPatch) -> None:
    write = backends.KERNELS["write_kv_cache"]["torch"]

    def write_kv_cache(**args):
        slots = args["slot_mapping"].clone()
        slots[-1] = -1  # the last token of every write is skipped, as padding would be
        write(**{**args, "slot_mapping": slots})

    mp.setitem(backends.KERNELS["write_kv_cache"], "torch", write_kv_cache)


def stop_string_ignored_at_max_tokens(mp: pytest.MonkeyPatch) -> None:
    check = StopChecker.check

    def length_first(self, seq):
        params = seq.sampling_params
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            if params.stop_strings and self.detokenizer is not None:
                self.detokenizer.update(seq)  # the text still comes out, uncut
            return SequenceStatus.FINISHED_LENGTH, None
        return check(self, seq)

    mp.setattr(StopChecker, "check", length_first)


def block_leaked_on_abort(mp: pytest.MonkeyPatch) -> None:
    finish = Scheduler.finish_sequence

    def finish_sequence(self, seq, status, stop_reason=None):
        if status is SequenceStatus.FINISHED_ABORTED and seq.block_table:
            seq.block_table = seq.block_table[:-1]  # the last block is forgotten, never freed
        finish(self, seq, status, stop_reason)

    mp.setattr(Scheduler, "finish_sequence", finish_sequence)


FAULTS = {
    "fp8-v-scale-20-percent-too-large": Fault(
        "the fp8 cache's V scales are stored 20 % too large", fp8_v_scale_20_percent_too_large,
        ("tests/engine/test_fp8_cache.py::test_what_the_kv_cache_dtype_costs_the_logits_and_the_tokens[cpu-fp8]",)),
    "block-table-entry-off-by-one": Fault(
        "attention reads a sequence's last block from the block after it", block_table_entry_off_by_one,
        ("tests/kernels/test_reference.py::test_reference_matches_dense_sdpa[True-5-8-2]",
         "tests/engine/test_engine_vs_hf.py::test_single_prompt_and_batch[cpu-llama]")),
    "rope-at-position-plus-one": Fault(
        "the rotary table is read at position p + 1", rope_at_position_plus_one,
        ("tests/models/test_rotary.py::test_cos_sin_match_hf[default]",)),
    "last-kv-token-dropped": Fault(
        "the last token of each K/V write is not stored", last_kv_token_dropped,
        ("tests/kernels/test_reference.py::test_reference_matches_dense_sdpa[True-5-8-2]",
         "tests/engine/test_engine_vs_hf.py::test_single_prompt_and_batch[cpu-llama]")),
    "stop-string-ignored-at-max-tokens": Fault(
        "a stop string completed by the last allowed token ends the output as 'length', uncut",
        stop_string_ignored_at_max_tokens,
        ("tests/engine/test_robustness.py::test_a_stop_string_completed_by_the_last_allowed_token_wins",)),
    "block-leaked-on-abort": Fault(
        "an aborted sequence's last KV block is never freed", block_leaked_on_abort,
        ("tests/engine/test_scheduler.py::test_abort_waiting_and_running_requests",
         "tests/serve/test_async_llm.py::test_abort_ends_the_stream_and_frees_the_blocks")),
}


# ----------------------------------------------------------------------------------------------
# The plugin
# ----------------------------------------------------------------------------------------------
_patch = pytest.MonkeyPatch()
_outcomes: dict[str, dict] = {}


def pytest_addoption(parser) -> None:
    parser.addoption("--fault", choices=sorted(FAULTS), required=True, help="the bug to put in place")
    parser.addoption("--fault-report", required=True, help="where to write how each test ended (JSON)")


def pytest_configure(config) -> None:
    FAULTS[config.getoption("--fault")].apply(_patch)


def pytest_unconfigure(config) -> None:
    _patch.undo()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed or call.when == "call":
        entry = _outcomes.setdefault(item.nodeid, {})
        entry[call.when] = {"outcome": report.outcome,
                            "error": call.excinfo.typename if call.excinfo is not None else None}


def pytest_sessionfinish(session) -> None:
    with open(session.config.getoption("--fault-report"), "w") as out:
        json.dump(_outcomes, out, indent=1)
