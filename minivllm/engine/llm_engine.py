"""The LLMEngine: requests in, tokens out, one `step()` at a time.

    engine = LLMEngine(EngineConfig.from_dict({"model": "path/to/model"}))
    request_id = engine.add_request("Hello, my name is", SamplingParams(max_tokens=16))
    while engine.has_unfinished_requests():
        for output in engine.step():          # the requests that finished in this step
            print(output.request_id, output.text)

Each step is three calls:

    Scheduler.schedule()      which sequences compute how many tokens; KV blocks allocated
    ModelRunner.execute()     one batched forward for all of them, then sampling (launched)
    Scheduler.update()        append the tokens, apply the stop rules, free the finished

**Overlap** (`async_scheduling`, on by default). On a GPU, `execute` only *launches* work; the
tokens arrive when the GPU is done. Waiting for them before planning the next step would leave
the GPU idle while the host schedules and packs. So `step()` plans and launches step n+1 first,
and only then waits for step n's tokens and folds them in, while the GPU already runs n+1:

    host:  | plan n+1 | launch n+1 | wait n | update n | plan n+2 | launch n+2 | wait n+1 | ...
    GPU:   |.......... step n ..........|.............. step n+1 ..............|......

Step n+1's decodes need the tokens step n sampled: the scheduler counts them as *pending*, the
runner copies them on the device. A sequence that step n stops (EOS, a stop string) has computed
one token too many in step n+1, which is dropped. A request with penalties needs its previous
token on the host, so a step that samples one is waited for before the next is planned. So is a
step that speculates (verifies drafts, or may propose for its sequences next): how many drafts a
sequence accepted decides where its next step starts, and the n-gram proposer reads its tokens.
With `async_scheduling=False` every step runs start to finish; the outputs are the same.

**Structured output** needs step n's tokens for step n+1's grammar bitmask, but not for its
forward pass. So such a step is launched in two halves: the forward pass first, then, once step
n is folded in and the bitmask filled (while the GPU computes), the sampling:

    host:  | plan n+1 | launch forward n+1 | wait n | update n | fill bitmask | launch sample n+1 |

The engine owns the tokenizer and the requests; the scheduler owns the queues; the model runner
owns the tensors, and the executor runs it in this process or in one per GPU. None of them
reaches into another's state.
"""

from __future__ import annotations

import importlib.util
import itertools
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence as SequenceType
from concurrent.futures import Future
from dataclasses import dataclass

from minivllm.config import EngineConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.detokenizer import Detokenizer
from minivllm.engine.request import Position, Request, as_record, position_logprobs
from minivllm.engine.scheduler import Scheduler, ScheduledStep
from minivllm.engine.sequence import Sequence, SequenceStatus
from minivllm.engine.speculation import Speculation, check_draft_vocabulary
from minivllm.engine.stopping import StopChecker
from minivllm.engine.structured_output import Grammars, SequenceGrammar
from minivllm.engine.tokenizer import eos_token_ids, load_tokenizer
from minivllm.observe.block_map import kv_cache_stats
from minivllm.observe.records import StepRecord
from minivllm.observe.stats import StatsCollector, summarize_requests
from minivllm.observe.trace import StepTrace, blocks_held
from minivllm.outputs import PositionLogprobs, RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.step import TokenLogprobs
from minivllm.worker.executor import make_executor
from minivllm.worker.model_runner import SampledTokens

Prompt = str | list[int]


def _numbered(i: int, n: int, fn, *args):
    """fn(*args), its ValueError/TypeError prefixed with "prompt i: " when there are several prompts."""
    try:
        return fn(*args)
    except (ValueError, TypeError) as err:
        raise type(err)(f"prompt {i}: {err}" if n > 1 else str(err)) from None


@dataclass
class _InFlight:
    """A launched step whose tokens are still on their way."""

    step: ScheduledStep
    tokens: SampledTokens | None  # None until a step with structured output is sampled
    record: StepRecord | None  # None for an empty step (nothing ran)
    event: dict | None = None  # its trace event, when tracing
    needs_sync: bool = False  # penalties or speculation: the next plan needs its tokens first
    grammar_time: float = 0.0  # host seconds filling its grammar bitmask


@dataclass
class PreparedRequest:
    """A request that was checked and waits for its grammar (compiling on a grammar thread)
    before it may be queued: see `LLMEngine.prepare_request`."""

    request: Request
    grammar: Future[SequenceGrammar] | None  # None: no structured output, nothing to wait for

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def ready(self) -> bool:
        """Whether `add_prepared` takes it without waiting: its grammar is compiled (or failed to),
        or it was aborted meanwhile."""
        return self.grammar is None or self.grammar.done() or self.request.is_finished


class LLMEngine:
    def __init__(self, config: EngineConfig, max_retained_outputs: int = 10_000):
        """Load the model, size the KV cache, and get ready to serve.

        max_retained_outputs: finished requests kept for `get_output` (oldest dropped first). A
            streamed request is kept without its log-probabilities: its deltas delivered them.
        """
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.config = config
        model_dir = config.model_config.model
        sched = config.scheduler_config
        self.tokenizer = load_tokenizer(model_dir)
        check_draft_vocabulary(config, self.tokenizer)  # before any weight loads
        self.executor = make_executor(config)  # one ModelRunner here, or one per rank
        runner = self.executor.runner  # rank 0's: it describes the model for every rank
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        self.eos_token_ids = eos_token_ids(model_dir, runner.hf_config, self.tokenizer)
        self.vocab_size = runner.vocab_size
        self.block_manager = BlockManager(
            runner.num_kv_blocks,
            config.cache_config.block_size,
            enable_prefix_caching=config.cache_config.enable_prefix_caching,
        )
        spec = config.speculative_config
        speculation = Speculation(spec, sched.max_model_len) if spec is not None else None
        self.scheduler = Scheduler(sched, self.block_manager, StopChecker(sched.max_model_len, self.detokenizer),
                                   speculation)
        self.overlap = sched.async_scheduling
        self._unfinished: dict[str, Request] = {}
        self._streaming: set[str] = set()  # the unfinished requests that stream (most steps: none)
        self._finished: OrderedDict[str, Request] = OrderedDict()
        self._max_retained = max_retained_outputs
        self._ids = itertools.count()
        self._inflight: _InFlight | None = None
        # The final outputs of the requests the last step ended if it failed (finish_reason "error"):
        # the step's exception carries no outputs, so a caller that serves them (a server) reads
        # them here, with `take_failed_outputs`, instead of searching its requests.
        self._failed_outputs: list[RequestOutput] = []
        self._num_planned = 0  # steps planned (and launched) so far
        self._busy_time = 0.0  # wall seconds inside step()
        self._num_prompt_tokens = 0
        self.stats = StatsCollector(sched.history_size)
        self._prepared: dict[str, PreparedRequest] = {}  # checked, waiting for their grammar
        self._grammars = self._start_grammars()
        self.trace: StepTrace | None = None  # see enable_trace; None costs nothing per step
        # How outputs show a scored position: as {token id: Logprob}, each token with its text
        # (False, the default), or as the runner's `TokenLogprobs` record itself, ids and numbers
        # (True). A server's engine loop (entrypoints/engine_core.py) sets it: its frontends format
        # positions for the API anyway, naming tokens from a table of their own, so at every
        # streamed token the engine would decode and build (and the pipe carry) up to 21 token
        # texts and as many objects that nobody reads.
        self.logprobs_as_records = False

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> LLMEngine:
        return cls(EngineConfig.from_dict({"model": model, **kwargs}))

    # ------------------------------------------------------------------------------------------
    # Requests in
    # ------------------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, stream: bool = False) -> str:
        """Queue one request; returns its id. Invalid input raises and queues nothing.

        stream: report the request after every step that gives it tokens, as deltas (see
        `Request.delta_output`), instead of once when it is finished.
        """
        return self.add_requests([prompt], sampling_params, [request_id], stream=stream)[0]

    def add_requests(
        self,
        prompts: SequenceType[Prompt],
        sampling_params: SamplingParams | SequenceType[SamplingParams] | None = None,
        request_ids: SequenceType[str | None] | None = None,
        stream: bool = False,
    ) -> list[str]:
        """Queue several requests, all or none: every one is checked, and its grammar compiled
        (on the grammar threads, waited for here), before any is queued."""
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False, got {stream!r}")
        params_list = self._params_per_prompt(prompts, sampling_params)
        request_ids = list(request_ids) if request_ids is not None else [None] * len(prompts)
        if len(request_ids) != len(prompts):
            raise ValueError(f"got {len(request_ids)} request_ids for {len(prompts)} prompts")
        prepared: list[PreparedRequest] = []
        try:
            for i, (prompt, params, request_id) in enumerate(zip(prompts, params_list, request_ids)):
                prepared.append(_numbered(i, len(prompts), self._prepare, prompt, params, request_id, stream))
            for i, p in enumerate(prepared):
                if p.grammar is not None:  # compiling on the grammar threads; nobody else waits here
                    _numbered(i, len(prompts), p.grammar.result)
        except BaseException:
            for p in prepared:
                self._prepared.pop(p.request_id)
                if p.grammar is not None:
                    p.grammar.cancel()  # one still queued does not compile for nothing
            raise
        self._warn_capped([p.request for p in prepared])
        for p in prepared:
            self.add_prepared(p)
        return [p.request_id for p in prepared]

    def prepare_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                        request_id: str | None = None, stream: bool = False) -> PreparedRequest:
        """The first half of `add_request`, for a caller that must keep stepping meanwhile (the
        server's engine loop): check the request and start compiling its grammar, without waiting.

        Invalid input raises here. From now on the request id is taken. Once `prepared.ready()`,
        `add_prepared` queues it, or raises the ValueError of a grammar that cannot compile;
        `abort` drops it before that.
        """
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False, got {stream!r}")
        prepared = self._prepare(prompt, sampling_params or SamplingParams(), request_id, stream)
        self._warn_capped([prepared.request])
        return prepared

    def add_prepared(self, prepared: PreparedRequest) -> None:
        """Queue a prepared request (waiting for its grammar if it is not ready). Raises the
        grammar's ValueError, and forgets the request, if it could not compile; does nothing
        if the request was aborted meanwhile."""
        if self._prepared.pop(prepared.request_id, None) is not prepared:
            return  # aborted while its grammar compiled
        request = prepared.request
        if prepared.grammar is not None:
            request.seqs[0].grammar = prepared.grammar.result()
        self._unfinished[request.request_id] = request
        if request.stream:
            self._streaming.add(request.request_id)
        self.scheduler.add_sequence(request.seqs[0])
        self._num_prompt_tokens += len(request.prompt_token_ids)

    def _warn_capped(self, requests: list[Request]) -> None:
        """Say so when max_tokens cannot be reached: max_model_len ends the output first."""
        max_len = self.config.scheduler_config.max_model_len
        capped = [r for r in requests if r.sampling_params.max_tokens is not None
                  and len(r.prompt_token_ids) + r.sampling_params.max_tokens > max_len]
        if capped:
            r = capped[0]
            warnings.warn(
                f"{len(capped)} request(s) ask for more tokens than max_model_len={max_len} allows, "
                f"e.g. {r.request_id!r}: prompt {len(r.prompt_token_ids)} + max_tokens "
                f"{r.sampling_params.max_tokens}; they stop at max_model_len with finish_reason='length'",
                stacklevel=3)

    @staticmethod
    def _params_per_prompt(prompts, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in prompts]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(prompts)
        if not isinstance(sampling_params, (list, tuple)):
            raise TypeError("sampling_params must be a SamplingParams or a list of them, got "
                            f"{type(sampling_params).__name__}")
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        return params

    def _prepare(self, prompt: Prompt, params: SamplingParams, request_id: str | None,
                 stream: bool) -> PreparedRequest:
        """Check one request, start compiling its grammar, and hold its id (in `_prepared`)."""
        request = self._make_request(prompt, params, request_id, stream)
        spec = params.structured_outputs
        prepared = PreparedRequest(request, self._grammars.grammar(spec) if spec is not None else None)
        self._prepared[request.request_id] = prepared
        return prepared

    @property
    def num_waiting(self) -> int:
        """Requests not running yet: in the scheduler's queue (new or preempted), or waiting for
        their grammar to compile before they may join it."""
        return len(self.scheduler.waiting) + sum(p.grammar is not None for p in self._prepared.values())

    def _taken(self, request_id: str) -> bool:
        return request_id in self._unfinished or request_id in self._finished or request_id in self._prepared

    def _make_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None,
                      stream: bool) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if request_id is None:
            request_id = str(next(self._ids))
            while self._taken(request_id):
                request_id = str(next(self._ids))
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        elif self._taken(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model directory has none")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ())):
            outside = [t for t in ids if t >= self.vocab_size]
            if outside:
                raise ValueError(f"{name} holds {outside[0]}, outside the vocabulary [0, {self.vocab_size})")
        if params.structured_outputs is not None and self._grammars is None:
            raise ValueError(self._why_no_grammars())
        text, token_ids = self._tokenize(prompt)
        self.scheduler.check_request(len(token_ids), params)
        return Request(request_id, text, token_ids, params, self.eos_token_ids, stream)

    def _start_grammars(self) -> Grammars | None:
        """Structured output's side of the engine, which starts reading the vocabulary on a
        grammar thread now, so that the first structured request does not wait for it (see
        structured_output.py). None where structured output cannot work."""
        if self._why_no_grammars() is not None:
            return None
        return Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids,
                        pin_memory=self.executor.runner.device.type == "cuda")

    def _why_no_grammars(self) -> str | None:
        if self.tokenizer is None:
            return "structured_outputs needs a tokenizer, and this model directory has none"
        if not self.eos_token_ids:
            return "structured_outputs needs an end-of-sequence token to end the output, and this model has none"
        if importlib.util.find_spec("xgrammar") is None:
            return "structured_outputs needs xgrammar, which is not installed (pip install xgrammar)"
        return None

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
        """Launch the next step and fold in the finished one; returns the requests that finished
        (and, for streaming requests, what is new). See "Overlap" above for the order.

        If anything raises, the requests of the steps in flight finish with finish_reason
        "error" (their blocks freed), the exception reaches the caller, and the engine stays
        usable for every other request.
        """
        start = time.perf_counter()
        self._failed_outputs = []  # only the last step's
        pending = [] if self._inflight is None else [self._inflight]  # launched, not folded in
        self._inflight = None
        outputs: list[RequestOutput] = []
        try:  # a step leaves `pending` only once folded in: if that raises, _fail still sees it
            if pending and (not self.overlap or pending[0].needs_sync):
                outputs += self._complete(pending[0])
                pending.pop(0)
            launched = self._launch()
            if launched is not None:
                pending.append(launched)
            while len(pending) > 1:  # the older step, folded in while the GPU runs the new one
                outputs += self._complete(pending[0])
                pending.pop(0)
            if launched is not None and launched.tokens is None:  # it waits for its grammar bitmask
                self._sample_structured(launched)
            if pending and not self.overlap:
                outputs += self._complete(pending[0])
                pending.pop(0)
        except BaseException:
            self._fail(pending)
            raise
        self._inflight = pending[0] if pending else None
        self._busy_time += time.perf_counter() - start
        return outputs

    def _launch(self) -> _InFlight | None:
        """Plan the next step and launch it on the runner (no waiting for the GPU)."""
        if not self.scheduler.has_unfinished_sequences():
            return None
        trace = self.trace
        held_before = blocks_held(self.scheduler) if trace is not None else None
        planned = time.perf_counter()
        step = self.scheduler.schedule()
        scheduled = time.perf_counter()
        for child in step.forks:
            self._unfinished[child.request_id].seqs.append(child)
        try:
            tokens = self.executor.execute(step.output)  # None: it samples in _sample_structured
        except BaseException:
            self._fail([_InFlight(step, None, None)])
            raise
        if step.is_empty:  # e.g. every running sequence awaits its last, pending token
            return _InFlight(step, tokens, None)
        record = self._record(step, planned)
        # Kept here until _complete adds it to the runner's StepTimings, which come with the
        # tokens (a step with structured output has none until it is sampled).
        record.timings.schedule = scheduled - planned
        event = trace.start(self.scheduler, step, record, held_before) if trace is not None else None
        needs_sync = step.speculative or step.penalties
        return _InFlight(step, tokens, record, event, needs_sync)

    def _sample_structured(self, inflight: _InFlight) -> None:
        """Fill the grammar bitmask of a launched step (every earlier step is folded in, so each
        matcher has seen its sequence's last token) and launch its sampling."""
        started = time.perf_counter()
        step = inflight.step
        bitmask = self._grammars.bitmask(step.sampled, step.output.structured_rows)
        inflight.grammar_time = time.perf_counter() - started
        inflight.tokens = self.executor.sample(bitmask)

    def _complete(self, inflight: _InFlight) -> list[RequestOutput]:
        """Wait for a launched step's tokens and fold them in; returns the outputs it produced."""
        waited = time.perf_counter()
        token_ids = inflight.tokens.wait()
        arrived = time.perf_counter()
        finished = self.scheduler.update(inflight.step, token_ids, inflight.tokens.logprobs())
        outputs = self._retire(finished) + self._stream_outputs(inflight.step)
        record = inflight.record
        if record is not None:
            record.add_acceptance(inflight.step.acceptance.values())
            record.finish_time = time.perf_counter()
            timings = inflight.tokens.timings  # the runner's phases, to which the engine adds its own
            timings.schedule, timings.grammar = record.timings.schedule, inflight.grammar_time
            timings.wait, timings.update = arrived - waited, record.finish_time - arrived
            record.timings = timings
            self.stats.add_step(record)
            if self.trace is not None and inflight.event is not None:
                self.trace.finish(inflight.event, self.scheduler, finished, record, inflight.step.acceptance)
        return outputs

    def _record(self, step: ScheduledStep, planned: float) -> StepRecord:
        bm, out = self.block_manager, step.output
        self._num_planned += 1
        return StepRecord(
            step=self._num_planned,
            time=planned,
            num_prefill_seqs=step.num_prefill_seqs,
            num_decode_seqs=step.num_decode_seqs,
            num_prefill_tokens=step.num_prefill_tokens,
            num_decode_tokens=step.num_decode_tokens,
            num_sampled=len(out.sample_rows),
            token_budget=self.config.scheduler_config.max_num_batched_tokens,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_used_blocks=bm.num_used_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_cached_free_blocks=bm.num_cached_free_blocks,
            num_block_copies=len(out.block_copies),
            num_prefix_hit_tokens=step.num_prefix_hit_tokens,
            num_partial_prefills=step.num_partial_prefills,
            preemptions=step.preemptions,
            num_draft_tokens=step.num_draft_tokens,
        )

    def _fail(self, inflight: list[_InFlight]) -> None:
        """A step raised: end every request it touched with finish_reason "error", freeing its
        blocks, so nothing is stranded and later steps run as if it had never been there."""
        request_ids = {s.request_id for f in inflight for s in (*f.step.seqs, *f.step.sampled)}
        failed = []
        for request_id in request_ids:
            request = self._unfinished.get(request_id)
            if request is None:
                continue
            request.finish_unforked(SequenceStatus.FINISHED_ERROR)
            for seq in request.seqs:
                self.scheduler.finish_sequence(seq, SequenceStatus.FINISHED_ERROR)
                failed.append(seq)
        self._failed_outputs += self._retire(failed)

    def take_failed_outputs(self) -> list[RequestOutput]:
        """The outputs of the requests the last step ended with finish_reason "error" if it raised
        (once: a second call returns nothing)."""
        outputs, self._failed_outputs = self._failed_outputs, []
        return outputs

    # ------------------------------------------------------------------------------------------
    # Requests out
    # ------------------------------------------------------------------------------------------
    def _retire(self, finished: list[Sequence]) -> list[RequestOutput]:
        """Turn finished sequences into outputs of the requests they complete."""
        outputs = []
        for request_id in dict.fromkeys(s.request_id for s in finished):
            request = self._unfinished.get(request_id)
            if request is None or not request.is_finished:
                continue
            for seq in request.seqs:
                if not isinstance(seq.stop_reason, str):  # a stop string already cut the text
                    seq.output_text = self._decode(seq)
            del self._unfinished[request_id]
            self._streaming.discard(request_id)
            self._finished[request_id] = request
            if len(self._finished) > self._max_retained:
                self._finished.popitem(last=False)
            if request.stream:  # the statistics need no log-probabilities: none are made for them
                self.stats.add_request(request.to_output(self._text_of))
                outputs.append(request.delta_output(self._text_of, self._position))
                request.release_logprobs()  # every record went out in a delta
            else:
                outputs.append(request.to_output(self._text_of, self._position))
                self.stats.add_request(outputs[-1])
        return outputs

    def _stream_outputs(self, step: ScheduledStep) -> list[RequestOutput]:
        """Deltas of the unfinished streaming requests that got tokens in `step`."""
        if not self._streaming:
            return []
        outputs = []
        for request_id in dict.fromkeys(s.request_id for s in step.sampled):
            request = self._unfinished.get(request_id)
            if request is not None and request.stream:
                delta = request.delta_output(self._stream_text, self._position)
                if delta is not None:
                    outputs.append(delta)
        return outputs

    def _decode(self, seq: Sequence) -> str:
        return self.detokenizer.decode(seq) if self.detokenizer is not None else ""

    def _token_text(self, token_id: int) -> str | None:
        """One token alone as text, for log-probability entries (None without a tokenizer)."""
        return self.detokenizer.token_text(token_id) if self.detokenizer is not None else None

    @property
    def _position(self) -> Position:
        """How outputs show a scored position (see `logprobs_as_records`)."""
        return as_record if self.logprobs_as_records else self._position_logprobs

    def _position_logprobs(self, record: TokenLogprobs) -> PositionLogprobs:
        return position_logprobs(record, self._token_text)

    def _text_of(self, seq: Sequence) -> str:
        """Final text of a finished sequence, the current decode of a running one."""
        return seq.output_text if seq.is_finished else self._decode(seq)

    def _stream_text(self, seq: Sequence) -> str:
        """The text of a sequence that is safe to send now. A running sequence with stop strings
        holds back as many characters as a stop string could still take away from the end."""
        if seq.is_finished or self.detokenizer is None:
            return self._text_of(seq)
        self.detokenizer.update(seq)
        stops = seq.sampling_params.stop_strings
        hold = max(map(len, stops)) - 1 if stops else 0
        return seq.output_text[:len(seq.output_text) - hold]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now, wherever it is; returns its final output (None if unknown/done)."""
        prepared = self._prepared.pop(request_id, None)
        if prepared is not None:  # still waiting for its grammar: the scheduler never saw it
            return self._abort_prepared(prepared)
        request = self._unfinished.get(request_id)
        if request is None:
            return None
        request.finish_unforked(SequenceStatus.FINISHED_ABORTED)
        for seq in request.seqs:
            self.scheduler.finish_sequence(seq, SequenceStatus.FINISHED_ABORTED)
        outputs = self._retire(list(request.seqs))
        return outputs[0] if outputs else None

    def _abort_prepared(self, prepared: PreparedRequest) -> RequestOutput:
        """End a request that holds no blocks yet; a grammar still compiling is left to finish
        on its thread and dropped."""
        if prepared.grammar is not None:
            prepared.grammar.cancel()  # only stops one that has not started
        request = prepared.request
        request.finish_unforked(SequenceStatus.FINISHED_ABORTED)
        for seq in request.seqs:
            seq.finish(SequenceStatus.FINISHED_ABORTED)
        self._unfinished[request.request_id] = request
        return self._retire(list(request.seqs))[0]

    def get_output(self, request_id: str) -> RequestOutput:
        """The current output of a request: final once finished, partial before."""
        request = self._unfinished.get(request_id) or self._finished.get(request_id)
        if request is None:
            raise KeyError(f"unknown request id {request_id!r} (never added, or no longer retained)")
        return request.to_output(self._text_of, self._position)

    def has_unfinished_requests(self) -> bool:
        return bool(self._unfinished)

    def close(self) -> None:
        """Stop what the engine started besides itself: the tensor-parallel worker processes
        (nothing with one GPU). The engine cannot step afterwards."""
        self.executor.close()

    def get_num_unfinished_requests(self) -> int:
        return len(self._unfinished)

    # ------------------------------------------------------------------------------------------
    # Looking inside
    # ------------------------------------------------------------------------------------------
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
            "async_scheduling": self.overlap,
            "kv_cache_dtype": self.config.kv_cache_spec.name,
            "speculative_config": self.config.to_dict()["speculative_config"],
        })
        return self.trace

    def disable_trace(self) -> StepTrace | None:
        """Stop recording; returns the trace recorded so far."""
        trace, self.trace = self.trace, None
        return trace

    def get_stats(self) -> dict:
        """Plain-data statistics in four sections: engine, scheduler, kv_cache, requests (and a
        fifth, speculative, with speculative decoding on).

        "scheduler" holds the step totals of the `StatsCollector` (tokens, batch sizes, budget,
        preemptions, graph replays, `step_phases_ms`: mean host milliseconds per step phase).
        "speculative": drafts verified and accepted, the acceptance rate in all and per draft
        position, the mean acceptance length.
        "requests" summarizes TTFT / TPOT / end-to-end latency / tokens/s over the finished
        requests still retained (see max_retained_outputs). Computed here, never per step.
        """
        totals, busy = self.stats.totals, self._busy_time
        steps = self.stats.step_stats()
        runner = self.executor.runner
        kv = kv_cache_stats(self.block_manager, self.scheduler.running)
        kv["prefix_cache_hit_tokens"] = steps["num_prefix_hit_tokens"]
        kv["prefix_cache_hit_rate"] = (steps["num_prefix_hit_tokens"] / self._num_prompt_tokens
                                       if self._num_prompt_tokens else 0.0)
        stats = {
            "engine": {
                "num_steps": steps["num_steps"],
                "num_finished_requests": totals["finished_requests"],
                "num_aborted_requests": totals["aborted_requests"],
                "num_failed_requests": totals["failed_requests"],
                "num_preempted_requests": totals["preempted_requests"],
                "num_unfinished_requests": len(self._unfinished),
                "num_waiting": self.num_waiting,
                "num_running": len(self.scheduler.running),
                "num_prompt_tokens": self._num_prompt_tokens,
                "num_generated_tokens": totals["sampled_tokens"],
                "busy_time_s": busy,
                "generation_tokens_per_s": totals["sampled_tokens"] / busy if busy else 0.0,
                "async_scheduling": self.overlap,
                "device": str(runner.device),
                "dtype": str(runner.dtype).removeprefix("torch."),
                "kv_cache_dtype": self.config.kv_cache_spec.name,
                "num_kv_blocks": runner.num_kv_blocks,
                "kv_cache_bytes": runner.num_kv_blocks * runner.kv_bytes_per_block,
            },
            "scheduler": steps,
            "kv_cache": kv,
            "requests": summarize_requests(
                r.to_output(self._text_of).metrics for r in self._finished.values()
            ),
        }
        spec = self.config.speculative_config
        if spec is not None:
            stats["speculative"] = {"method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens,
                                    "disable_by_batch_size": spec.disable_by_batch_size,
                                    **self.stats.speculative_stats()}
        return stats

    def render_block_map(self) -> str:
        """The KV pool by owner, as text (see observe/block_map.py)."""
        from minivllm.observe.block_map import snapshot_blocks, text_block_map

        text = text_block_map(snapshot_blocks(self.block_manager, self.scheduler.running))
        return f"KV cache dtype {self.config.kv_cache_spec.name}: {text}"
