"""What the completions and chat endpoints share: request -> engine requests -> response.

A handler does four things, in this order, and only the last one touches the engine's time:

1. **check** the request against this server: the model name (404), fields it does not implement;
2. **prepare** it: the prompt(s) as token ids (tokenized here, with the server's own copy of the
   tokenizer, exactly as `LLMEngine` would), the `SamplingParams`, and the length check (prompt +
   max_tokens must fit the model's context, or the answer is a 400 naming the field);
3. **start** one engine request per prompt through `AsyncLLM.add_request`, all or none: the
   engine's own checks raise here, so a bad request is still a 400 and nothing streams;
4. **answer**: stream the engine's deltas as server-sent events (`sse_response`), or gather them
   into one JSON body (`gather`).

The deltas already are what a streaming client is sent next (new text since the last report,
per completion; see minivllm/engine/request.py), so streaming adds no bookkeeping: one read of a
stream, one chunk. A reader that fell behind reads every delta it missed merged into one
(`RequestStream` coalesces them), so a slow client costs fewer chunks, not more. A plain answer
is the same deltas concatenated, so streamed text equals plain text.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from minivllm.entrypoints.async_llm import AsyncLLM, EngineDeadError, EngineStepError, RequestStream
from minivllm.entrypoints.errors import OpenAIError, from_value_error
from minivllm.entrypoints.logprobs import TokenTexts
from minivllm.entrypoints.protocol import UNSUPPORTED_FIELDS, SamplingRequest, UsageInfo
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams, StructuredOutputsParams

# Request fields -> SamplingParams fields of the same meaning (max_tokens is handled apart).
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "seed", "stop", "stop_token_ids", "min_tokens", "ignore_eos",
                    "logit_bias", "logprobs_mode")


class ClientGone(Exception):
    """The client disconnected before its answer was ready (its requests are aborted)."""


class Choice:
    """What a plain (non-streaming) answer gathers of one completion."""

    def __init__(self):
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list | None = None  # one entry per token, if asked for
        self.prompt_logprobs: list | None = None  # its prompt's, if asked for
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class OpenAIServing:
    """The shared half of an endpoint; `serving_completion.py` and `serving_chat.py` add theirs."""

    def __init__(self, engine: AsyncLLM, model_name: str, tokenizer):
        """tokenizer: the server's own copy (`load_tokenizer(model_dir)`, or None), used on the
        event loop only; the engine keeps its own (in its thread or its process), so the two
        never share the mutable state of a fast tokenizer across threads."""
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.config.scheduler_config.max_model_len
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)  # log-probabilities name tokens, each id decoded once

    # ------------------------------------------------------------------------------------------
    # 1-2. check and prepare
    # ------------------------------------------------------------------------------------------
    def check_request(self, request: SamplingRequest) -> None:
        if request.model is not None and request.model != self.model_name:
            raise OpenAIError(f"The model `{request.model}` does not exist: this server serves "
                              f"`{self.model_name}`.", status=404, param="model", code="model_not_found")
        extra = request.model_extra or {}
        for name in UNSUPPORTED_FIELDS:
            value = extra.get(name)
            harmless = value is None or value is False or (name == "best_of" and value == 1)
            if not harmless:
                raise OpenAIError(f"{name} is not supported by this server", param=name)

    def tokenize(self, text: str, param: str) -> list[int]:
        """A text prompt as the engine would tokenize it (so outputs equal LLM.generate's)."""
        if self.tokenizer is None:
            raise OpenAIError(f"this model directory has no tokenizer, so {param} must be given as "
                              "token ids, not text", param=param)
        return list(self.tokenizer(text).input_ids)

    def sampling_params(self, request: SamplingRequest, max_tokens: int | None, **endpoint) -> SamplingParams:
        """The request's SamplingParams; `endpoint`: what the endpoint adds (logprobs, ...)."""
        kwargs = {name: getattr(request, name) for name in _SAMPLING_FIELDS if getattr(request, name) is not None}
        try:
            return SamplingParams(max_tokens=max_tokens, structured_outputs=structured_outputs(request), **kwargs,
                                  **endpoint)
        except (ValueError, TypeError) as err:
            raise refused(err, request) from None

    def check_length(self, prompt: list[int], max_tokens: int | None, prompt_param: str,
                     max_tokens_param: str) -> None:
        """Prompt + max_tokens must fit in max_model_len (the engine would cut the output short)."""
        limit, n = self.max_model_len, len(prompt)
        if not prompt:
            raise OpenAIError(f"{prompt_param} must not be empty", param=prompt_param)
        if n >= limit:
            raise OpenAIError(f"{prompt_param} has {n} tokens, but this model's context is {limit} tokens "
                              "(max_model_len), which leaves no room for an answer", param=prompt_param)
        if max_tokens is not None and n + max_tokens > limit:
            raise OpenAIError(f"{max_tokens_param} is {max_tokens}, but the prompt has {n} tokens and this "
                              f"model's context is {limit} tokens (max_model_len): {max_tokens_param} can "
                              f"be at most {limit - n}", param=max_tokens_param)

    # ------------------------------------------------------------------------------------------
    # 3. start
    # ------------------------------------------------------------------------------------------
    async def start(self, prompts: list[list[int]], params: SamplingParams, request: SamplingRequest,
                    response_id: str) -> list[RequestStream]:
        """One engine request per prompt, all or none (a refused one aborts those already added).
        The engine checks what only it can, e.g. that a JSON schema compiles."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                streams.append(await self.engine.add_request(prompt, params, f"{response_id}-{i}"))
        except (ValueError, TypeError) as err:
            close_all(streams)
            raise refused(err, request) from None
        except EngineDeadError as err:  # draining, shut down, or the engine process is gone
            close_all(streams)
            raise OpenAIError(f"the server cannot take requests: {err}", status=503) from None
        return streams

    # ------------------------------------------------------------------------------------------
    # 4. answer
    # ------------------------------------------------------------------------------------------
    async def gather(self, streams: list[RequestStream], n: int, raw: Request) -> tuple[list[Choice], int]:
        """Run the requests to the end; returns each choice's text, tokens, log-probabilities and
        finish reason, and the number of completion tokens. A client that disconnects meanwhile aborts them."""
        choices = [Choice() for _ in range(len(streams) * n)]

        async def collect() -> None:
            async for i, output in merged(streams):
                if output.prompt_logprobs is not None:
                    for choice in choices[i * n:(i + 1) * n]:
                        choice.prompt_logprobs = output.prompt_logprobs
                for c in output.outputs:
                    choice = choices[i * n + c.index]
                    choice.text.append(c.text)
                    choice.token_ids += c.token_ids
                    if c.logprobs is not None:
                        choice.logprobs = choice.logprobs or []
                        choice.logprobs += c.logprobs
                    choice.finish_reason = c.finish_reason or choice.finish_reason

        try:
            await until_disconnected(raw, collect())
        except (EngineStepError, EngineDeadError) as err:
            raise OpenAIError(str(err), status=500) from None
        finally:
            close_all(streams)
        return choices, sum(c.num_tokens for c in choices)

    def sse_response(self, streams: list[RequestStream], events: AsyncIterator[str]) -> StreamingResponse:
        """Server-sent events from `events`, closed with `data: [DONE]`. However the response ends
        (finished, client gone, server shutting down), the requests are closed: the unfinished
        ones aborted, their KV blocks freed."""

        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            except (EngineStepError, EngineDeadError) as err:
                error = OpenAIError(str(err), status=500).body()
                yield f"data: {error.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return ClosingStreamingResponse(body(), on_close=lambda: close_all(streams),
                                        media_type="text/event-stream")

    @staticmethod
    def usage(prompts: list[list[int]], params: SamplingParams, completion_tokens: int) -> UsageInfo:
        # Each of the n samples of a prompt shares its prompt: OpenAI counts the prompt once.
        prompt_tokens = sum(len(p) for p in prompts)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)


def structured_outputs(request: SamplingRequest) -> StructuredOutputsParams | None:
    """The request's `response_format` or `structured_outputs` as the engine's spec (None: free
    text). Its own errors name the request's field (see `structured_param`)."""
    fmt, ext = request.response_format, request.structured_outputs
    if fmt is not None and fmt.type != "text" and ext is not None:
        raise OpenAIError("give either response_format or structured_outputs, not both", param="structured_outputs")
    if ext is not None:
        return StructuredOutputsParams(json=ext.json_, regex=ext.regex, choice=ext.choice, grammar=ext.grammar,
                                       json_object=bool(ext.json_object))
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise OpenAIError("response_format of type json_schema needs json_schema.schema",
                          param="response_format.json_schema.schema")
    return StructuredOutputsParams(json=fmt.json_schema.schema_)


def structured_param(request: SamplingRequest) -> str | None:
    """The request field that an error about `structured_outputs.<field>` is about."""
    fmt = request.response_format
    if request.structured_outputs is not None or fmt is None or fmt.type == "text":
        return None  # vLLM's form: the engine's field names are the request's own
    return "response_format.json_schema.schema" if fmt.type == "json_schema" else "response_format"


def refused(err: Exception, request: SamplingRequest) -> OpenAIError:
    """A ValueError/TypeError of SamplingParams or of the engine as a 400 naming the request's
    field; one about the structured output names the field the client used for it."""
    message = str(err)
    about = re.match(r"(structured_outputs(?:\.\w+)?)", message)
    if about is None:
        return from_value_error(err, type(request).model_fields)
    field, param = about.group(1), structured_param(request)
    if param is None:
        return OpenAIError(message, param=field)
    return OpenAIError(message.replace(field, param, 1), param=param)


def new_id(prefix: str) -> tuple[str, int]:
    """A response id and its creation time."""
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


class StreamChunks:
    """The server-sent events of one stream, serialised the cheap way.

    A stream sends one chunk per engine delta, thousands per second per server, and the chunks of
    a response differ only in their choice. Building and validating two pydantic models per chunk
    (`CompletionStreamResponse(...).model_dump_json()`) took about 13 us; here the constant head
    (id, object, created, model) is encoded once per response and each chunk adds only its
    choice, as plain `json.dumps`: about 6 us (both timed with timeit on a 2-core CPU), with its
    log-probabilities spliced in as the JSON text that entrypoints/logprobs.py writes. The shape
    is exactly the pydantic schema's (`CompletionStreamResponse` / `ChatCompletionStreamResponse`
    in protocol.py), which a test checks field by field.
    """

    def __init__(self, response_id: str, obj: str, created: int, model: str):
        head = json.dumps({"id": response_id, "object": obj, "created": created, "model": model})
        self._head = "data: " + head[:-1] + ', "choices": ['  # the object left open

    def choice(self, fields: dict, logprobs: str, finish_reason: str | None) -> str:
        """The chunk of one choice: its leading `fields` (index, then text or delta) in the schema's
        order, its log-probabilities as JSON text already ("null": none, entrypoints/logprobs.py),
        its finish reason."""
        finish = "null" if finish_reason is None else json.dumps(finish_reason)
        return (f"{self._head}{json.dumps(fields)[:-1]}, \"logprobs\": {logprobs}, \"finish_reason\": {finish}}}], "
                "\"usage\": null}\n\n")

    def usage(self, usage) -> str:
        """The last chunk, stream_options.include_usage: no choice, the token counts."""
        return f"{self._head}], \"usage\": {usage.model_dump_json()}}}\n\n"


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(which stream, output) as outputs arrive from any of the streams, until all are done."""
    if len(streams) == 1:  # the common case needs no helper tasks
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((i, output))
            queue.put_nowait((i, None))
        except Exception as err:  # noqa: BLE001 - handed to the consumer, raised there
            queue.put_nowait((i, err))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnected(raw: Request, work: Awaitable) -> None:
    """Await `work`, cancelling it if the client disconnects first (a plain, non-streaming answer
    has nothing to send until the end, so only listening tells that the client is gone)."""
    work_task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(raw))
    try:
        done, _ = await asyncio.wait({work_task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work_task.done():
            work_task.cancel()
    if work_task not in done:
        raise ClientGone()
    work_task.result()


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls `on_close` however it ends, even if its body never started
    (a client gone before the first byte), so no engine request outlives its response."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
