"""What a finished (or in-progress) request gives back to the caller.

    out = llm.generate("Hello", max_tokens=8)[0]
    out.text, out.token_ids, out.finish_reason        # the first (often only) completion
    out.outputs[i]                                      # each of the n completions
    out.metrics.ttft, out.metrics.tpot, out.metrics.tokens_per_s
    print(out.metrics)                                  # (ttft 12.1 ms, tpot 3.4 ms, 210.5 tok/s)

With `SamplingParams(logprobs=k)` each completion also has `logprobs`: one entry per token of
`token_ids`, a dict {token id: Logprob} holding the token itself and the k most likely tokens
(k or k + 1 entries). `prompt_logprobs=k` gives `out.prompt_logprobs` the same way, one entry per
prompt token, the first None. (`AsyncLLM`, for servers, gives the runner's `TokenLogprobs`
records instead of the dicts: ids and numbers, see minivllm/step.py.) What the numbers mean:
docs/sampling.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Logprob:
    """One token's log-probability at one position.

    rank: 1 for the most likely token, 2 for the next, ... (1 + the number of tokens strictly
    more likely). decoded_token: the token alone as text (None without a tokenizer).
    """

    logprob: float
    rank: int
    decoded_token: str | None = None


# One position: {token id: Logprob} for the chosen (or prompt) token and the top-k, the chosen
# token first, then by rank.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One generated sample of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[PositionLogprobs] | None = None  # one per token_ids entry, if asked for


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


@dataclass(repr=False)
class RequestMetrics:
    """Timings (seconds) and counters of a request.

    ttft: time to first token (arrival -> first generated token): queueing + prefill.
    tpot: time per output token after the first (the decode speed one user sees).
    tokens_per_s: generated tokens (all samples) / end-to-end latency.

    The *_time fields are `time.perf_counter()` readings: only differences between them mean
    something, so the printed forms show the derived durations and rates instead.
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

    def _rate(self) -> str:
        rate = "n/a" if self.tokens_per_s is None else f"{self.tokens_per_s:.1f}"
        return f"{rate} tok/s"

    def __str__(self) -> str:
        return f"(ttft {_ms(self.ttft)}, tpot {_ms(self.tpot)}, {self._rate()})"

    def __repr__(self) -> str:
        return (
            f"RequestMetrics(ttft={_ms(self.ttft)}, tpot={_ms(self.tpot)}, tokens_per_s={self._rate()}, "
            f"prompt_tokens={self.num_prompt_tokens}, output_tokens={self.num_output_tokens}, "
            f"cached_tokens={self.num_cached_tokens}, preemptions={self.num_preemptions})"
        )


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # One per prompt token (the first None), if asked for; a streaming request gets them in
    # its first delta after the prompt is computed, later deltas have None.
    prompt_logprobs: list[PositionLogprobs | None] | None = None

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
