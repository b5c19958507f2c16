"""What a finished (or in-progress) request gives back to the caller.

    out = llm.generate("Hello", max_tokens=8)[0]
    out.text, out.token_ids, out.finish_reason        # the first (often only) completion
    out.outputs[i]                                      # each of the n completions
    out.metrics.ttft, out.metrics.tpot, out.metrics.tokens_per_s
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class CompletionOutput:
    """One generated sample of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class RequestMetrics:
    """Timings (seconds) and counters of a request.

    ttft: time to first token (arrival -> first generated token): queueing + prefill.
    tpot: time per output token after the first (the decode speed one user sees).
    tokens_per_s: generated tokens (all samples) / end-to-end latency.
    """

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_preemptions: int
    ttft: float | None
    tpot: float | None
    e2e_latency: float | None
    tokens_per_s: float | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    # The first completion, for the common n = 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    def to_dict(self) -> dict:
        return asdict(self)
