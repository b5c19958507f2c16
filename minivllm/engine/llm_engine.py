"""The LLMEngine: requests in, tokens out, one `step()` at a time.

    engine = LLMEngine(EngineConfig.from_dict({"model": "path/to/model"}))
    request_id = engine.add_request("Hello, my name is", SamplingParams(max_tokens=16))
    while engine.has_unfinished_requests():
        for output in engine.step():          # the requests that finished in this step
            print(output.request_id, output.text)

Each step is the loop of DESIGN §4:

    Scheduler.schedule()      which sequences compute how many tokens; KV blocks allocated
    ModelRunner.execute()     one batched forward for all of them, then sampling
    Scheduler.update()        append the tokens, stop the finished, free their blocks
    (engine)                  stop strings (they need the tokenizer), outputs

The engine owns the tokenizer and the requests; the scheduler owns the queues; the model runner
owns the tensors. None of them reaches into another's state.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Sequence as SequenceType

from minivllm.config import EngineConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.request import Request
from minivllm.engine.scheduler import STEP_PHASES, Scheduler, SchedulerOutput
from minivllm.engine.sequence import Sequence, SequenceStatus
from minivllm.engine.tokenizer import eos_token_ids, load_tokenizer
from minivllm.observe.stats import summarize_requests
from minivllm.observe.trace import StepTrace, blocks_held
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.worker.model_runner import ModelRunner

Prompt = str | list[int]


class LLMEngine:
    def __init__(self, config: EngineConfig, max_retained_outputs: int = 10_000):
        """Load the model, size the KV cache, and get ready to serve.

        max_retained_outputs: finished requests kept for `get_output` (oldest dropped first).
        """
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.config = config
        model_dir = config.model_config.model
        self.model_runner = ModelRunner(config)
        self.tokenizer = load_tokenizer(model_dir)
        self.eos_token_ids = eos_token_ids(model_dir, self.model_runner.hf_config, self.tokenizer)
        self.vocab_size = self.model_runner.vocab_size
        self.block_manager = BlockManager(
            self.model_runner.num_kv_blocks,
            config.cache_config.block_size,
            enable_prefix_caching=config.cache_config.enable_prefix_caching,
        )
        self.scheduler = Scheduler(config.scheduler_config, self.block_manager)
        self._unfinished: dict[str, Request] = {}
        self._finished: OrderedDict[str, Request] = OrderedDict()
        self._max_retained = max_retained_outputs
        self._ids = itertools.count()
        self._counters = {"steps": 0, "busy_time": 0.0, "prompt_tokens": 0, "generated_tokens": 0,
                          "finished_requests": 0, "aborted_requests": 0, "preempted_requests": 0,
                          "prefill_chunks": 0, "graph_steps": 0, "eager_steps": 0}
        self._phase_time = dict.fromkeys(STEP_PHASES, 0.0)  # host seconds per step phase, summed
        self.trace: StepTrace | None = None  # see enable_trace; None costs nothing per step

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> LLMEngine:
        return cls(EngineConfig.from_dict({"model": model, **kwargs}))

    # ------------------------------------------------------------------------------------------
    # Requests in
    # ------------------------------------------------------------------------------------------
    def add_request(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue one request; returns its id. Invalid input raises and queues nothing."""
        return self.add_requests([prompt], sampling_params, [request_id])[0]

    def add_requests(
        self,
        prompts: SequenceType[Prompt],
        sampling_params: SamplingParams | SequenceType[SamplingParams] | None = None,
        request_ids: SequenceType[str | None] | None = None,
    ) -> list[str]:
        """Queue several requests, all or none: every one is checked before any is queued."""
        params_list = self._params_per_prompt(prompts, sampling_params)
        request_ids = list(request_ids) if request_ids is not None else [None] * len(prompts)
        if len(request_ids) != len(prompts):
            raise ValueError(f"got {len(request_ids)} request_ids for {len(prompts)} prompts")
        requests = []
        for i, (prompt, params, request_id) in enumerate(zip(prompts, params_list, request_ids)):
            try:
                requests.append(self._make_request(prompt, params, request_id))
            except (ValueError, TypeError) as err:
                where = f"prompt {i}: " if len(prompts) > 1 else ""
                raise type(err)(f"{where}{err}") from None
        taken = [r.request_id for r in requests]
        if len(set(taken)) != len(taken):
            raise ValueError(f"duplicate request ids in {taken}")
        for request in requests:
            self._unfinished[request.request_id] = request
            self.scheduler.add_sequence(request.seqs[0])
            self._counters["prompt_tokens"] += len(request.prompt_token_ids)
        return taken

    @staticmethod
    def _params_per_prompt(prompts, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in prompts]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(prompts)
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        return params

    def _make_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if request_id is None:
            request_id = str(next(self._ids))
            while request_id in self._unfinished or request_id in self._finished:
                request_id = str(next(self._ids))
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        elif request_id in self._unfinished or request_id in self._finished:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model directory has none")
        text, token_ids = self._tokenize(prompt)
        self.scheduler.check_request(len(token_ids), params)
        return Request(request_id, text, token_ids, params, self.eos_token_ids)

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt given as text or as token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError(
                    f"{self.config.model_config.model} has no tokenizer, so prompts must be lists of "
                    "token ids, not text"
                )
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise TypeError("a token-id prompt must be a list of ints")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            return None, list(prompt)
        raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling + forward + sampling step; returns the requests it finished.

        The step's host time per phase goes into `output.record.timings` (the runner fills
        prepare / forward / sample, the engine schedule / update): clock reads only, no GPU sync.
        """
        if not self.scheduler.has_unfinished_sequences():
            return []
        start = time.perf_counter()
        trace = self.trace
        held_before = blocks_held(self.scheduler) if trace is not None else None
        schedule_start = time.perf_counter()
        output = self.scheduler.schedule()
        timings = output.record.timings
        timings.schedule = time.perf_counter() - schedule_start
        event = trace.start(self.scheduler, output, held_before) if trace is not None else None
        for entry in output.scheduled:
            for child in entry.forks:
                self._unfinished[child.request_id].seqs.append(child)
        execute_start = time.perf_counter()
        tokens = self.model_runner.execute(output)
        update_start = time.perf_counter()
        output.record.execute_time = update_start - execute_start
        finished = self.scheduler.update(output, tokens)
        finished += self._apply_stop_strings(output)
        outputs = self._retire(finished)
        end = time.perf_counter()
        timings.update = end - update_start
        timings.step = end - start
        self._count_step(output, len(tokens))
        if trace is not None:
            trace.finish(event, self.scheduler, finished, len(tokens), timings.step, output.record)
        return outputs

    def _count_step(self, output: SchedulerOutput, num_tokens: int) -> None:
        """Fold one step into the counters behind `get_stats()["engine"]`."""
        c, timings = self._counters, output.record.timings
        c["steps"] += 1
        c["generated_tokens"] += num_tokens
        c["prefill_chunks"] += output.record.num_prefill_seqs
        c["busy_time"] += timings.step
        if not output.is_empty:  # a forward ran: as one graph replay, or kernel by kernel
            c["graph_steps" if timings.cuda_graph else "eager_steps"] += 1
        for phase, seconds in timings.phases().items():
            self._phase_time[phase] += seconds

    def enable_trace(self, max_steps: int = 10_000, block_snapshots: bool = True) -> StepTrace:
        """Record every following step in a bounded `StepTrace` (replacing any earlier one)."""
        sched = self.config.scheduler_config
        self.trace = StepTrace(max_steps, block_snapshots, header={
            "model": self.config.model_config.model,
            "num_blocks": self.block_manager.num_blocks,
            "block_size": self.block_manager.block_size,
            "max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "enable_chunked_prefill": sched.enable_chunked_prefill,
            "enable_prefix_caching": self.block_manager.enable_prefix_caching,
        })
        return self.trace

    def disable_trace(self) -> StepTrace | None:
        """Stop recording; returns the trace recorded so far."""
        trace, self.trace = self.trace, None
        return trace

    def _apply_stop_strings(self, output: SchedulerOutput) -> list[Sequence]:
        """Finish sequences whose text now contains one of their stop strings."""
        stopped = []
        for seq, _ in output.sampled_sequences:
            params = seq.sampling_params
            if seq.is_finished or not params.stop_strings or seq.num_output_tokens < params.min_tokens:
                continue
            text = self._decode(seq)
            hits = [(text.find(s), s) for s in params.stop_strings if s in text]
            if hits:
                index, stop = min(hits)
                end = index + len(stop) if params.include_stop_str_in_output else index
                self.scheduler.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED, stop_reason=stop)
                seq.output_text = text[:end]
                stopped.append(seq)
        return stopped

    def _retire(self, finished: list[Sequence]) -> list[RequestOutput]:
        """Turn finished sequences into outputs of the requests they complete."""
        self.model_runner.release(finished)
        outputs = []
        for request_id in dict.fromkeys(s.request_id for s in finished):
            request = self._unfinished.get(request_id)
            if request is None or not request.is_finished:
                continue
            for seq in request.seqs:
                if not isinstance(seq.stop_reason, str):  # a stop string already cut the text
                    seq.output_text = self._decode(seq)
            del self._unfinished[request_id]
            self._finished[request_id] = request
            if len(self._finished) > self._max_retained:
                self._finished.popitem(last=False)
            self._counters["finished_requests"] += 1
            output = request.to_output(self._text_of)
            self._counters["aborted_requests"] += any(s.finish_reason == "abort" for s in request.seqs)
            self._counters["preempted_requests"] += output.metrics.num_preemptions > 0
            outputs.append(output)
        return outputs

    def _decode(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(seq.output_token_ids,
                                     skip_special_tokens=seq.sampling_params.skip_special_tokens)

    def _text_of(self, seq: Sequence) -> str:
        """Final text of a finished sequence, the current decode of a running one."""
        return seq.output_text if seq.is_finished else self._decode(seq)

    # ------------------------------------------------------------------------------------------
    # Requests out
    # ------------------------------------------------------------------------------------------
    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now, wherever it is; returns its final output (None if unknown/done)."""
        request = self._unfinished.get(request_id)
        if request is None:
            return None
        self.scheduler.abort(request_id)
        outputs = self._retire(list(request.seqs))
        return outputs[0] if outputs else None

    def get_output(self, request_id: str) -> RequestOutput:
        """The current output of a request: final once finished, partial before."""
        request = self._unfinished.get(request_id) or self._finished.get(request_id)
        if request is None:
            raise KeyError(f"unknown request id {request_id!r} (never added, or no longer retained)")
        return request.to_output(self._text_of)

    def has_unfinished_requests(self) -> bool:
        return bool(self._unfinished)

    def get_num_unfinished_requests(self) -> int:
        return len(self._unfinished)

    # ------------------------------------------------------------------------------------------
    # Statistics
    # ------------------------------------------------------------------------------------------
    def get_stats(self) -> dict:
        """Plain-data statistics in four sections: engine, scheduler, kv_cache, requests.

        "engine" counts the steps whose forward replayed a CUDA graph (`num_graph_steps`) or ran
        eagerly (`num_eager_steps`), and `step_phases_ms`, the mean host milliseconds per step in
        each phase of `StepTimings` (schedule, prepare, forward, sample, update).

        "requests" summarizes TTFT / TPOT / end-to-end latency / tokens/s over the finished
        requests still retained (see max_retained_outputs).
        """
        c = self._counters
        busy = c["busy_time"]
        runner = self.model_runner
        sched = self.scheduler.stats()
        return {
            "engine": {
                "num_steps": c["steps"],
                "num_finished_requests": c["finished_requests"],
                "num_aborted_requests": c["aborted_requests"],
                "num_preempted_requests": c["preempted_requests"],
                "num_unfinished_requests": len(self._unfinished),
                "num_waiting": sched["num_waiting"],
                "num_running": sched["num_running"],
                "num_prompt_tokens": c["prompt_tokens"],
                "num_generated_tokens": c["generated_tokens"],
                "num_prefill_chunks": c["prefill_chunks"],
                "busy_time_s": busy,
                "generation_tokens_per_s": c["generated_tokens"] / busy if busy else 0.0,
                "tokens_per_s": (sched["num_prefill_tokens"] + sched["num_decode_tokens"]) / busy if busy else 0.0,
                "avg_batch_size": sched["avg_batch_size"],
                "num_graph_steps": c["graph_steps"],
                "num_eager_steps": c["eager_steps"],
                "step_phases_ms": {phase: 1e3 * total / c["steps"] if c["steps"] else 0.0
                                   for phase, total in self._phase_time.items()},
                "budget_utilization": sched["budget_utilization"],
                "device": str(runner.device),
                "dtype": str(runner.dtype).removeprefix("torch."),
                "num_kv_blocks": runner.num_kv_blocks,
                "kv_cache_bytes": runner.num_kv_blocks * runner.kv_bytes_per_block,
            },
            "scheduler": sched,
            "kv_cache": self.block_manager.stats().to_dict(),
            "requests": summarize_requests(
                r.to_output(self._text_of).metrics for r in self._finished.values()
            ),
        }

    def render_block_map(self) -> str:
        return self.block_manager.render_block_map()
