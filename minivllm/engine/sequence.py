"""A Sequence: one stream of tokens being generated, and where its K/V lives.

A request with `n = 1` is one sequence; with `n > 1` it becomes n sequences that share the
prompt's KV blocks (see `BlockManager.fork`). The life of a sequence:

    WAITING ──schedule──▶ RUNNING ──stop / length / abort──▶ FINISHED_*
       ▲                     │
       └────preempted────────┘   (its blocks are freed; prompt + outputs are recomputed later)

The two counters that drive everything:

* `num_tokens`: tokens known so far (prompt + generated).
* `num_computed_tokens`: tokens whose K/V is already in the cache.

Each step computes some of the tokens in between; once all known tokens are computed, the model's
output at the last one gives the next token. A decoding sequence therefore always has exactly one
uncomputed token: the one it sampled last.

With overlap on (see docs/architecture.md), that token may not be known yet: the step that samples
it is still running on the GPU while the scheduler plans the next one. It then counts as
*pending* (`num_pending_tokens` = 1): it exists, its position is known, its value arrives later.
`num_computed_tokens` counts tokens whose K/V is cached *or scheduled*: it advances when a step is
scheduled, because the GPU runs the steps in order.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any

from minivllm.sampling_params import SamplingParams
from minivllm.step import TokenLogprobs


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "finished_aborted"  # the caller gave up on it
    FINISHED_ERROR = "finished_error"  # a step it was in failed (the error went to the caller)

    @property
    def is_finished(self) -> bool:
        # Two identity tests, not a set lookup (an Enum hashes in Python): read for every
        # sequence, at every step.
        return self is not _RUNNING and self is not _WAITING

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI-style reason: "stop", "length", "abort", "error", or None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_ERROR: "error",
}

_RUNNING, _WAITING = SequenceStatus.RUNNING, SequenceStatus.WAITING
_seq_ids = itertools.count()


class Sequence:
    """The token ids, cache bookkeeping and timings of one generated sequence.

    request_id: the request it belongs to; index: which of the request's n samples it is.
    eos_token_ids: the end-of-sequence ids of the model (empty if it has none).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        index: int = 0,
        arrival_time: float | None = None,
    ):
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token id or string that ended it

        # --- KV cache bookkeeping (owned by BlockManager and Scheduler) ---
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hash of each *full* block of token_ids
        self.num_computed_tokens = 0  # cached, or computed by a step already scheduled
        self.num_pending_tokens = 0  # sampled by a step still in flight: value not known yet
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.num_preemptions = 0
        # Samples of this request not yet forked off this one (n - 1 until its prompt is done).
        self.num_pending_forks = sampling_params.n - 1 if index == 0 else 0

        # --- log-probabilities, for requests that asked (else None) ---
        # One per output token; one per prompt token scored so far, the first (unscored) None.
        self.output_logprobs: list[TokenLogprobs] | None = [] if sampling_params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] if sampling_params.prompt_logprobs is not None else None)
        # --- structured output: the matcher of the request's grammar (engine/structured_output.py),
        #     which accepts every appended token; None for a request without one ---
        self.grammar = None
        # --- the row it samples with, once it stays the same every step (the scheduler's) ---
        self.sample_row = None

        # --- detokenized output (the engine's Detokenizer; None until it is needed) ---
        self.output_text = ""
        self.detokenizer = None

        # --- timings, seconds on the time.perf_counter() clock ---
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    # ------------------------------------------------------------------------------------------
    # Token views
    # ------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V is not in the cache yet (1 while decoding, more in (re)prefill),
        counting a pending token."""
        return self.num_tokens + self.num_pending_tokens - self.num_computed_tokens

    @property
    def num_generated_tokens(self) -> int:
        """Output tokens including a pending one: what max_tokens and min_tokens count."""
        return self.num_output_tokens + self.num_pending_tokens

    @property
    def num_prompt_logprobs_owed(self) -> int:
        """Prompt tokens whose log-probability was asked for and has not arrived yet."""
        if self.prompt_logprobs is None:
            return 0
        return self.num_prompt_tokens - len(self.prompt_logprobs)

    @property
    def width(self) -> int:
        """How many sequences this one stands for in the `max_num_seqs` budget (itself + forks)."""
        return 1 + self.num_pending_forks

    # ------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def append_token(self, token_id: int, now: float | None = None) -> None:
        """Add a sampled token (its K/V gets computed in the next step); it was pending until now."""
        self.token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)
        if self.num_pending_tokens:
            self.num_pending_tokens -= 1
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter() if now is None else now

    def reset_for_recompute(self) -> None:
        """Preemption: forget the cache state, keep the tokens; they will be computed again."""
        self.status = SequenceStatus.WAITING
        self.block_table = []
        self.num_computed_tokens = 0
        self.num_preemptions += 1

    def finish(self, status: SequenceStatus, now: float | None = None) -> None:
        if not status.is_finished:
            raise ValueError(f"finish() needs a FINISHED_* status, got {status}")
        self.status = status
        self.finish_time = time.perf_counter() if now is None else now
        self.grammar = None  # a finished sequence samples nothing more

    def fork(self, index: int) -> Sequence:
        """A copy that continues independently as sample `index` of the same request.

        The child starts with an empty block table: `BlockManager.fork` fills it with the parent's
        blocks and adds the references that make it share (not duplicate) them.
        """
        child = Sequence.__new__(Sequence)
        child.__dict__.update(self.__dict__)
        child.seq_id = next(_seq_ids)
        child.index = index
        child.token_ids = list(self.token_ids)
        child.block_table = []
        child.block_hashes = list(self.block_hashes)
        if self.output_logprobs is not None:
            child.output_logprobs = list(self.output_logprobs)
        # prompt_logprobs stays shared: one list for the request, still filling in if the
        # prompt's last chunk is in flight.
        child.num_pending_forks = 0
        child.detokenizer = None
        child.sample_row = None  # its own seq id and seed offset
        child.grammar = self.grammar.fork() if self.grammar is not None else None
        return child

    # ------------------------------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly snapshot, for traces, debugging and teaching."""
        end = self.finish_time
        duration = None if end is None else end - self.arrival_time
        return {
            "seq_id": self.seq_id,
            "request_id": self.request_id,
            "index": self.index,
            "status": self.status.value,
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "prompt_token_ids": self.prompt_token_ids,
            "output_token_ids": self.output_token_ids,
            "output_text": self.output_text,
            "num_tokens": self.num_tokens,
            "num_computed_tokens": self.num_computed_tokens,
            "num_cached_tokens": self.num_cached_tokens,
            "num_preemptions": self.num_preemptions,
            "block_table": list(self.block_table),
            "arrival_time": self.arrival_time,
            "first_scheduled_time": self.first_scheduled_time,
            "first_token_time": self.first_token_time,
            "finish_time": self.finish_time,
            "generation_time": duration,
            "tokens_per_s": (
                self.num_output_tokens / duration if duration else None
            ),
        }

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, {self.status.name}, "
            f"tokens={self.num_tokens} (prompt {self.num_prompt_tokens}), "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
