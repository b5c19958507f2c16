"""Statistics: the numbers that say how well the engine used its time and its KV memory.

Most counters already live where the work happens (the scheduler counts tokens and preemptions,
the block manager counts blocks and prefix-cache hits, every request carries its timings). This
module only *summarizes* them:

* `summarize_requests(metrics)`: TTFT, TPOT and tokens/s over finished requests (mean, p50, p90,
  max), the latency numbers a user of a server feels;
* `format_stats(stats)`: the readable table behind `LLM.print_stats()`.

`LLMEngine.get_stats()` assembles the sections; everything stays plain data (dicts of numbers
and strings), so it can be logged, compared in a test or dumped to JSON as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from minivllm.outputs import RequestMetrics

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
_RATIO_WORDS = ("utilization", "fragmentation", "hit_rate")


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
    """`LLM.get_stats()` as a two-column table, one block per section."""
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
