"""Statistics: the numbers that say how well the engine used its time and its KV memory.

The engine's hot path keeps no counters. Each step ends as one `StepRecord` (records.py) that
the engine hands to a `StatsCollector`; the collector folds it into totals and keeps a bounded
history, and turns the totals into numbers on request:

* `StatsCollector`: steps, tokens, batch sizes, budget use, preemptions, graph replays, host time
  per step phase, and wall time per kind of step (prefill-only, decode-only, mixed);
* `summarize_requests(metrics)`: TTFT, TPOT and tokens/s over finished requests (mean, p50, p90,
  max), the latency numbers a user of a server feels;
* `format_stats(stats)`: the readable table behind `LLM.print_stats()`.

Everything stays plain data (dicts of numbers and strings), so it can be logged, compared in a
test or dumped to JSON as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from collections import Counter, deque
from typing import NamedTuple

from minivllm.observe.records import STEP_PHASES, StepRecord, add_per_position
from minivllm.outputs import RequestMetrics, RequestOutput

STEP_KINDS = ("prefill", "decode", "mixed")


class SpecDecodeCounts(NamedTuple):
    """Speculative decoding's running totals, as counters (what a server's /metrics shows)."""

    num_verifications: int  # sequence-steps that verified drafts
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_position: tuple[int, ...]  # accepted drafts at the 1st, 2nd, ... position


class StatsCollector:
    """Totals over every step and request seen, plus the most recent `history_size` records."""

    def __init__(self, history_size: int = 10_000):
        self.history: deque[StepRecord] = deque(maxlen=history_size)
        self.totals: Counter = Counter()
        self.phase_time = dict.fromkeys(STEP_PHASES, 0.0)  # host seconds per step phase
        self.kind_time = dict.fromkeys(STEP_KINDS, 0.0)  # wall seconds per kind of step
        self.kind_steps = dict.fromkeys(STEP_KINDS, 0)
        self.drafts_per_position: list[int] = []  # speculative decoding, summed over steps
        self.accepted_per_position: list[int] = []
        self._last_finish: float | None = None

    def add_step(self, record: StepRecord) -> None:
        """Fold one finished step in. Its wall time is the gap since the previous step finished
        (with overlap the GPU runs steps back to back, so the gaps add up to the run)."""
        self.history.append(record)
        t = self.totals
        t["steps"] += 1
        t["prefill_tokens"] += record.num_prefill_tokens
        t["decode_tokens"] += record.num_decode_tokens
        t["sampled_tokens"] += record.num_generated_tokens
        t["scheduled_seqs"] += record.num_scheduled_seqs
        t["prefill_chunks"] += record.num_prefill_seqs
        t["preemptions"] += len(record.preemptions)
        t["partial_prefills"] += record.num_partial_prefills
        t["block_copies"] += record.num_block_copies
        t["budget_tokens"] += record.token_budget
        t["prefix_hit_tokens"] += record.num_prefix_hit_tokens
        t["graph_steps" if record.timings.cuda_graph else "eager_steps"] += 1
        if record.num_verifications:
            t["draft_tokens"] += record.num_draft_tokens
            t["accepted_tokens"] += record.num_accepted_tokens
            t["verifications"] += record.num_verifications
            add_per_position(self.drafts_per_position, record.drafts_per_position)
            add_per_position(self.accepted_per_position, record.accepted_per_position)
        for phase, seconds in record.timings.phases().items():
            self.phase_time[phase] += seconds
        start = record.time if self._last_finish is None else max(record.time, self._last_finish)
        self.kind_time[record.kind] += record.finish_time - start
        self.kind_steps[record.kind] += 1
        self._last_finish = record.finish_time

    def add_request(self, output: RequestOutput) -> None:
        """Count a finished request once."""
        t = self.totals
        t["finished_requests"] += 1
        reasons = {o.finish_reason for o in output.outputs}
        t["aborted_requests"] += "abort" in reasons
        t["failed_requests"] += "error" in reasons
        t["preempted_requests"] += output.metrics.num_preemptions > 0
        t["generated_tokens"] += output.metrics.num_output_tokens

    def step_stats(self) -> dict:
        """Totals since start: token counts, average batch, budget use, preemptions, phases."""
        t = self.totals
        steps = t["steps"]
        batched = t["prefill_tokens"] + t["decode_tokens"]
        return {
            "num_steps": steps,
            "num_prefill_tokens": t["prefill_tokens"],
            "num_decode_tokens": t["decode_tokens"],
            "num_preemptions": t["preemptions"],
            "num_prefill_chunks": t["prefill_chunks"],
            "num_partial_prefills": t["partial_prefills"],
            "num_block_copies": t["block_copies"],
            "num_prefix_hit_tokens": t["prefix_hit_tokens"],
            "avg_batch_size": t["scheduled_seqs"] / steps if steps else 0.0,
            "avg_batched_tokens": batched / steps if steps else 0.0,
            "budget_utilization": batched / t["budget_tokens"] if t["budget_tokens"] else 0.0,
            "num_graph_steps": t["graph_steps"],
            "num_eager_steps": t["eager_steps"],
            "step_phases_ms": {phase: 1e3 * total / steps if steps else 0.0
                               for phase, total in self.phase_time.items()},
            "step_kind_time_s": dict(self.kind_time),
            "step_kind_steps": dict(self.kind_steps),
        }

    def spec_decode_counts(self) -> SpecDecodeCounts:
        t = self.totals
        return SpecDecodeCounts(t["verifications"], t["draft_tokens"], t["accepted_tokens"],
                                tuple(self.accepted_per_position))

    def speculative_stats(self) -> dict:
        """Speculative decoding since start: drafts verified and accepted; the acceptance rate
        (accepted / drafts); the mean acceptance length (tokens a verifying sequence gained per
        step: its accepted drafts plus the model's own token); and per draft position i, the
        fraction of verifications that accepted a draft there (non-increasing in i; 1 plus their
        sum is the mean acceptance length)."""
        t = self.totals
        drafts, accepted, verifications = t["draft_tokens"], t["accepted_tokens"], t["verifications"]
        return {
            "num_verifications": verifications,
            "num_draft_tokens": drafts,
            "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else 0.0,
            "mean_acceptance_length": 1 + accepted / verifications if verifications else 0.0,
            "acceptance_rate_per_position": {
                str(i + 1): a / verifications for i, a in enumerate(self.accepted_per_position)},
            "drafts_per_position": {str(i + 1): d for i, d in enumerate(self.drafts_per_position)},
        }


# Metrics summarized per request, with the RequestMetrics field each one reads.
_REQUEST_METRICS = ("ttft", "tpot", "e2e_latency", "tokens_per_s")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks.

    Written out (instead of numpy) to show what "p90 latency" means: 90% of requests were faster.
    """
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize_requests(metrics: Iterable[RequestMetrics]) -> dict:
    """Latency and speed over finished requests: `{"num_requests", "ttft_mean", "ttft_p50", ...}`.

    A metric a request does not have (TPOT of a one-token answer) is left out of that metric's
    summary rather than counted as zero, which would make the engine look faster than it is.
    """
    metrics = list(metrics)
    summary: dict = {"num_requests": len(metrics)}
    for name in _REQUEST_METRICS:
        values = [getattr(m, name) for m in metrics if getattr(m, name) is not None]
        if not values:
            continue
        summary[f"{name}_mean"] = sum(values) / len(values)
        summary[f"{name}_p50"] = percentile(values, 50)
        summary[f"{name}_p90"] = percentile(values, 90)
        summary[f"{name}_max"] = max(values)
    summary["num_preempted_requests"] = sum(1 for m in metrics if m.num_preemptions)
    summary["num_cached_prompt_tokens"] = sum(m.num_cached_tokens for m in metrics)
    return summary


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
_RATIO_WORDS = ("utilization", "fragmentation", "hit_rate", "acceptance_rate")


def _format_value(key: str, value) -> str:
    """Ratios as percentages, times in ms or s, counts as integers: units a reader expects."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if any(word in key for word in _RATIO_WORDS):
        return f"{value:.1%}"
    if key.startswith(("ttft", "tpot", "e2e_latency")):
        return f"{value * 1e3:.2f} ms"
    if key.endswith("_ms"):
        return f"{value:.3f} ms"
    if key.endswith("_s") and not key.endswith("per_s"):
        return f"{value:.3f} s"
    return f"{value:,.2f}"


def _rows(values: dict, indent: str = "  "):
    """(label, formatted value) rows; a nested dict (e.g. `step_phases_ms`) becomes indented
    rows under its name, each in the unit its parent's name gives."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield f"{indent}{key}", ""
            for sub, sub_value in value.items():
                yield f"{indent}  {sub}", _format_value(key, sub_value)
        else:
            yield f"{indent}{key}", _format_value(key, value)


def format_stats(stats: dict) -> str:
    """`LLMEngine.get_stats()` as a two-column table, one block per section."""
    if not isinstance(stats, dict):
        raise TypeError(f"stats must be the dict get_stats() returns, got {type(stats).__name__}")
    width = max((len(label) for values in stats.values() for label, _ in _rows(values)), default=0) + 2
    lines = []
    for section, values in stats.items():
        lines.append(f"[{section}]")
        lines.append("-" * (width + 14))
        for label, text in _rows(values):
            lines.append(f"{label:<{width}}{text:>14}")
        lines.append("")
    return "\n".join(lines).rstrip()
