"""LLM: the offline API, where users start.

    from minivllm import LLM, SamplingParams

    llm = LLM("path/to/model", max_num_seqs=32)              # any EngineConfig field as a keyword
    outputs = llm.generate(["Hello", "The sky is"], max_tokens=20, temperature=0.8)
    for out in outputs:                                       # same order as the prompts
        print(out.prompt, "->", out.text, out.metrics.ttft)

Prompts are text (tokenized with the model directory's tokenizer) or lists of token ids.
Sampling options come either as a `SamplingParams` (one for all prompts, or one per prompt) or
as keyword arguments that build one.

For finer control, `llm.engine` is the `LLMEngine` underneath, and its API is the step-level one:

    request_id = llm.engine.add_request("Hello", SamplingParams(max_tokens=16))
    while llm.engine.has_unfinished_requests():
        for output in llm.engine.step():          # the requests that finished in this step
            print(output.request_id, output.text)
    llm.engine.get_output(request_id)             # also while it runs; llm.engine.abort(...)

`LLM` itself keeps what it adds to the engine: the batch call, statistics printed and drawn, and
the engine's lifetime (`close`, or `with LLM(...) as llm:`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence as SequenceType
from typing import Self

from tqdm.auto import tqdm

from minivllm.config import EngineConfig
from minivllm.engine.llm_engine import LLMEngine, Prompt
from minivllm.observe.stats import format_stats
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **config):
        """Load `model` (a Hugging Face model directory) with EngineConfig options as keywords."""
        self.engine = LLMEngine(EngineConfig.from_dict({"model": model, **config}))

    def close(self) -> None:
        """Stop the engine's worker processes (tensor_parallel_size > 1; nothing to do with one).

        Deleting the LLM, or leaving the interpreter, does the same; `with LLM(...) as llm:`
        does it at the end of the block.
        """
        self.engine.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
        return self.run_until_done(request_ids, use_tqdm)

    def run_until_done(self, request_ids: list[str], use_tqdm: bool = True) -> list[RequestOutput]:
        """Step until every request in `request_ids` (added with `engine.add_requests`) is done;
        their final outputs, in that order. If anything raises (a failed step, Ctrl-C), those
        still running are aborted, their blocks freed, before the exception goes on: the engine
        stays usable, and `engine.get_output` shows each as far as it got."""
        pending = set(request_ids)
        results: dict[str, RequestOutput] = {}
        generated = 0
        start = time.perf_counter()
        try:
            with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
                while pending:
                    for output in self.engine.step():
                        if output.finished and output.request_id in pending:
                            pending.discard(output.request_id)
                            results[output.request_id] = output
                            generated += output.metrics.num_output_tokens
                            bar.update(1)
                            bar.set_postfix(tok_per_s=f"{generated / (time.perf_counter() - start):.1f}")
        except BaseException:
            for request_id in pending:
                self.engine.abort(request_id)
            raise
        return [results[request_id] for request_id in request_ids]

    # ------------------------------------------------------------------------------------------
    # Looking inside
    # ------------------------------------------------------------------------------------------
    def print_stats(self) -> None:
        """`engine.get_stats()` as a table: engine, scheduler, KV cache, request latencies."""
        print(format_stats(self.engine.get_stats()))

    def save_trace(self, path) -> str:
        """Write the recorded steps as JSON lines (for `python -m minivllm visualize`)."""
        if self.engine.trace is None:
            raise ValueError("no trace is being recorded: call engine.enable_trace() before generating")
        return str(self.engine.trace.save(path))

    def visualize(self, out_dir) -> dict:
        """Draw the run so far into `out_dir`: timeline.png, throughput.png, block_map.png/.txt.

        With a trace on, the pictures use its per-step detail and the block map shows the
        fullest step; without one, they use the scheduler's step records and the block map
        shows the pool as it is now. Returns {name: path}.
        """
        from minivllm.observe import events_from_history, snapshot_blocks, visualize

        engine = self.engine
        if engine.trace is not None and len(engine.trace):
            events, snapshot = list(engine.trace), None
        else:
            events = events_from_history(engine.stats.history)
            snapshot = snapshot_blocks(engine.block_manager, engine.scheduler.running)
        if not events:
            raise ValueError("nothing to draw yet: run generate() or engine.step() first")
        if snapshot is None and not any(e.get("blocks") for e in events):
            snapshot = snapshot_blocks(engine.block_manager, engine.scheduler.running)
        paths = visualize(events, out_dir, snapshot=snapshot, num_blocks=engine.block_manager.num_blocks)
        return {name: str(path) for name, path in paths.items()}


def _as_prompt_list(prompts) -> list[Prompt]:
    """A single prompt (text or token ids) becomes a list of one; a list of prompts stays."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)
    raise TypeError(f"prompts must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}")
