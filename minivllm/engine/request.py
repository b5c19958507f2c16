"""A Request: what the user asked for, and the sequence(s) generating its answer.

With n = 1 a request has one sequence. With n > 1 it starts with one sequence too (the prompt is
computed once) and gains the others when that sequence forks, just before its first token.

A *streaming* request is reported after every step that gave it tokens, as a delta: only the
tokens and text added since its last report (`delta_output`); the others once, when finished.

Log-probabilities arrive from the runner as ids and numbers (`TokenLogprobs`); an output shows
each scored position through the engine's `position` function: the user's {token id: Logprob}
entry, with each token's text, or (for a server's frontend, which adds the text itself) the
record as it is.
"""

from __future__ import annotations

from typing import Callable

from minivllm.engine.sequence import Sequence
from minivllm.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.step import TokenLogprobs

TokenText = Callable[[int], "str | None"]
Position = Callable[[TokenLogprobs], object]  # how an output shows a scored position


def position_logprobs(entry: TokenLogprobs, token_text: TokenText) -> PositionLogprobs:
    """{token id: Logprob}: the position's own token first, then the top-k by rank."""
    token, token_logprob, token_rank, top_ids, top_logprobs = entry
    out = {token: Logprob(token_logprob, token_rank, token_text(token))}
    for rank, (token_id, logprob) in enumerate(zip(top_ids, top_logprobs), start=1):
        if token_id not in out:
            out[token_id] = Logprob(logprob, rank, token_text(token_id))
    return out


def as_record(entry: TokenLogprobs) -> TokenLogprobs:
    """The `position` of a server's engine: the record as it is (its frontend names the tokens)."""
    return entry


def logprobs_list(entries, position: Position) -> list:
    if position is as_record:  # a copy of the list, not a call per entry: a stream's every delta
        return list(entries)
    return [None if e is None else position(e) for e in entries]


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, eos_token_ids: frozenset[int], stream: bool = False):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.stream = stream
        self.seqs: list[Sequence] = [
            Sequence(request_id, self.prompt_token_ids, sampling_params, eos_token_ids=eos_token_ids)
        ]
        # seq id -> (tokens, characters) reported so far; None once its finish was reported.
        self._sent: dict[int, tuple[int, int] | None] = {}
        self._sent_prompt_logprobs = False

    @property
    def is_finished(self) -> bool:
        # A parent that has not forked yet still owes its siblings.
        return self.seqs[0].num_pending_forks == 0 and all(s.is_finished for s in self.seqs)

    def finish_unforked(self, status) -> None:
        """End the samples that were never forked (an abort or a failure before the first token):
        they are finished with `status` and no tokens, so the output still has its n completions."""
        parent = self.seqs[0]
        for index in range(1, parent.num_pending_forks + 1):
            child = parent.fork(index)
            child.finish(status)
            self.seqs.append(child)
        parent.num_pending_forks = 0

    def release_logprobs(self) -> None:
        """Drop the log-probability records of a finished streamed request, whose deltas carried
        every one. The engine keeps finished requests for `get_output` (up to
        max_retained_outputs): with their records, a server's engine would hold a tuple per
        token it ever scored, hundreds of MB after a few thousand requests with logprobs, and
        the host memory and garbage collector's work would grow with every token served.
        `get_output` then shows the request as one that asked for none (None)."""
        for seq in self.seqs:
            seq.output_logprobs = seq.prompt_logprobs = None

    def to_output(self, text_of: Callable[[Sequence], str], position: Position | None = None) -> RequestOutput:
        """The user-facing snapshot; `text_of(seq)` gives a sequence's text, `position(record)` a
        scored position as the output shows it (None: leave them out, e.g. for statistics)."""
        seqs = sorted(self.seqs, key=lambda s: s.index)
        completions = [CompletionOutput(s.index, text_of(s), s.output_token_ids, s.finish_reason, s.stop_reason,
                                        _logprobs(s, 0, position)) for s in seqs]
        return self._output(completions, self._prompt_logprobs(position))

    def _prompt_logprobs(self, position: Position | None):
        """The prompt's entries once every prompt token is scored (None before, or if not asked)."""
        seq = self.seqs[0]
        if position is None or seq.prompt_logprobs is None or seq.num_prompt_logprobs_owed:
            return None
        return logprobs_list(seq.prompt_logprobs, position)

    def delta_output(self, text_of: Callable[[Sequence], str], position: Position | None = None
                     ) -> RequestOutput | None:
        """What is new since the last delta: per sequence, its new tokens and text, and its finish
        reason once it has one. None when nothing is new."""
        completions = []
        for s in sorted(self.seqs, key=lambda s: s.index):
            sent = self._sent.get(s.seq_id, (0, 0))
            if sent is None:
                continue
            num_tokens, num_chars = sent
            text = text_of(s)
            if num_tokens == s.num_output_tokens and num_chars == len(text) and not s.is_finished:
                continue
            completions.append(CompletionOutput(s.index, text[num_chars:], s.output_token_ids[num_tokens:],
                                                s.finish_reason, s.stop_reason, _logprobs(s, num_tokens, position)))
            # A finished sequence is reported once more, with its finish reason, then never again.
            self._sent[s.seq_id] = None if s.is_finished else (s.num_output_tokens, len(text))
        prompt_logprobs = None
        if completions and not self._sent_prompt_logprobs:
            prompt_logprobs = self._prompt_logprobs(position)
            self._sent_prompt_logprobs = prompt_logprobs is not None
        return self._output(completions, prompt_logprobs) if completions else None

    def _output(self, completions: list[CompletionOutput], prompt_logprobs=None) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=completions,
            finished=self.is_finished,
            metrics=self._metrics(self.seqs),
            prompt_logprobs=prompt_logprobs,
        )

    def _metrics(self, seqs: list[Sequence]) -> RequestMetrics:
        first = min(seqs, key=lambda s: s.index)
        arrival = first.arrival_time
        first_token = min((s.first_token_time for s in seqs if s.first_token_time is not None), default=None)
        finish = max(s.finish_time for s in seqs) if self.is_finished else None
        num_output = sum(s.num_output_tokens for s in seqs)
        longest = max(s.num_output_tokens for s in seqs)
        e2e = None if finish is None else finish - arrival
        tpot = None
        if finish is not None and first_token is not None and longest > 1:
            tpot = (finish - first_token) / (longest - 1)
        return RequestMetrics(
            arrival_time=arrival,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=first_token,
            finish_time=finish,
            num_prompt_tokens=len(self.prompt_token_ids),
            num_output_tokens=num_output,
            num_cached_tokens=first.num_cached_tokens,
            num_preemptions=sum(s.num_preemptions for s in seqs),
            ttft=None if first_token is None else first_token - arrival,
            tpot=tpot,
            e2e_latency=e2e,
            tokens_per_s=num_output / e2e if e2e else None,
        )


def _logprobs(seq: Sequence, start: int, position: Position | None):
    """A sequence's output entries from token `start` on (None if it did not ask)."""
    if position is None or seq.output_logprobs is None:
        return None
    return logprobs_list(seq.output_logprobs[start:], position)
