"""A Request: what the user asked for, and the sequence(s) generating its answer.

With n = 1 a request has one sequence. With n > 1 it starts with one sequence too (the prompt is
computed once) and gains the others when that sequence forks, just before its first token.
"""

from __future__ import annotations

from typing import Callable

from minivllm.engine.sequence import Sequence
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from minivllm.sampling_params import SamplingParams


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, eos_token_ids: frozenset[int]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.seqs: list[Sequence] = [
            Sequence(request_id, self.prompt_token_ids, sampling_params, eos_token_ids=eos_token_ids)
        ]

    @property
    def is_finished(self) -> bool:
        # A parent that has not forked yet still owes its siblings.
        return self.seqs[0].num_pending_forks == 0 and all(s.is_finished for s in self.seqs)

    def to_output(self, detokenize: Callable[[Sequence], str]) -> RequestOutput:
        """The user-facing snapshot; `detokenize(seq)` gives a sequence's text."""
        seqs = sorted(self.seqs, key=lambda s: s.index)
        completions = [
            CompletionOutput(
                index=s.index,
                text=detokenize(s),
                token_ids=s.output_token_ids,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in seqs
        ]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=completions,
            finished=self.is_finished,
            metrics=self._metrics(seqs),
        )

    def _metrics(self, seqs: list[Sequence]) -> RequestMetrics:
        first = seqs[0]
        arrival = first.arrival_time
        first_token = min((s.first_token_time for s in seqs if s.first_token_time is not None), default=None)
        finish = None
        if self.is_finished:
            finish = max(s.finish_time for s in seqs)
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
