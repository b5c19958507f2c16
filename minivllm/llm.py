"""LLM: the offline API, where users start.

    from minivllm import LLM, SamplingParams

    llm = LLM("path/to/model", max_num_seqs=32)              # any EngineConfig field as a keyword
    outputs = llm.generate(["Hello", "The sky is"], max_tokens=20, temperature=0.8)
    for out in outputs:                                       # same order as the prompts
        print(out.prompt, "->", out.text, out.metrics.ttft)

Prompts are text (tokenized with the model directory's tokenizer) or lists of token ids.
Sampling options come either as a `SamplingParams` (one for all prompts, or one per prompt) or
as keyword arguments that build one. For finer control there is the step-level API:
`add_request` / `step` / `get_output` / `abort`.
"""

from __future__ import annotations

import time
from typing import Sequence as SequenceType

from tqdm.auto import tqdm

from minivllm.config import EngineConfig
from minivllm.engine.llm_engine import LLMEngine, Prompt
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **config):
        """Load `model` (a Hugging Face model directory) with EngineConfig options as keywords."""
        self.engine = LLMEngine(EngineConfig.from_dict({"model": model, **config}))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ------------------------------------------------------------------------------------------
    # Batch API
    # ------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | SequenceType[Prompt],
        sampling_params: SamplingParams | SequenceType[SamplingParams] | None = None,
        use_tqdm: bool = True,
        **kwargs,
    ) -> list[RequestOutput]:
        """Generate completions for `prompts`; returns one RequestOutput per prompt, in order.

        prompts: a string, a list of token ids, or a list of either.
        sampling_params: one SamplingParams for all prompts or a list with one per prompt;
            or leave it out and pass SamplingParams fields as keywords (max_tokens=20, ...).
        """
        prompts = _as_prompt_list(prompts)
        if kwargs:
            if sampling_params is not None:
                raise TypeError("pass either sampling_params or sampling keywords, not both")
            sampling_params = SamplingParams.from_kwargs(**kwargs)
        request_ids = self.engine.add_requests(prompts, sampling_params)
        return self._run_until_done(request_ids, use_tqdm)

    def _run_until_done(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        results: dict[str, RequestOutput] = {}
        generated = 0
        start = time.perf_counter()
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while pending:
                for output in self.engine.step():
                    if output.request_id in pending:
                        pending.discard(output.request_id)
                        results[output.request_id] = output
                        generated += output.metrics.num_output_tokens
                        bar.update(1)
                        bar.set_postfix(tok_per_s=f"{generated / (time.perf_counter() - start):.1f}")
        return [results[request_id] for request_id in request_ids]

    # ------------------------------------------------------------------------------------------
    # Step-level API
    # ------------------------------------------------------------------------------------------
    def add_request(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
        **kwargs,
    ) -> str:
        """Queue one request without running it; returns its id (see `step`, `get_output`)."""
        if kwargs:
            if sampling_params is not None:
                raise TypeError("pass either sampling_params or sampling keywords, not both")
            sampling_params = SamplingParams.from_kwargs(**kwargs)
        return self.engine.add_request(prompt, sampling_params, request_id)

    generate_async = add_request  # the seed design's name for it

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that finished in it."""
        return self.engine.step()

    def get_output(self, request_id: str) -> RequestOutput:
        return self.engine.get_output(request_id)

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.engine.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests()

    # ------------------------------------------------------------------------------------------
    # Looking inside
    # ------------------------------------------------------------------------------------------
    def get_stats(self) -> dict:
        return self.engine.get_stats()

    def print_stats(self) -> None:
        print(format_stats(self.get_stats()))

    def render_block_map(self) -> str:
        return self.engine.render_block_map()


def _as_prompt_list(prompts) -> list[Prompt]:
    """A single prompt (text or token ids) becomes a list of one; a list of prompts stays."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)
    raise TypeError(f"prompts must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}")


def format_stats(stats: dict) -> str:
    """A readable multi-line rendering of `LLM.get_stats()`."""
    lines = []
    for section, values in stats.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            lines.append(f"  {key:<30} {shown}")
    return "\n".join(lines)
