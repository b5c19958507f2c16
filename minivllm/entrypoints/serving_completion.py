"""POST /v1/completions: continue a prompt (text or token ids), plainly or as a stream.

`prompt` may be one prompt or a batch (a list of texts or of token-id lists); each runs as its own
engine request, and with `n` samples each the choices are numbered prompt by prompt:
choice `i * n + j` is sample j of prompt i, as in OpenAI's API.

A stream is one chunk per delta of the engine:

    data: {"id": "cmpl-..", "object": "text_completion", "choices": [{"index": 0, "text": " the",
           "finish_reason": null}], ...}
    ...
    data: {... "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
    data: {... "choices": [], "usage": {"prompt_tokens": 5, ...}}     (stream_options.include_usage)
    data: [DONE]
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from minivllm.entrypoints.async_llm import RequestStream
from minivllm.entrypoints.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from minivllm.entrypoints.serving import OpenAIServing, StreamChunks, merged, new_id
from minivllm.sampling_params import SamplingParams


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest, raw: Request) -> Response:
        self.check_request(request)
        prompts = self.prompts(request.prompt)
        params = self.sampling_params(request, request.max_tokens)
        for prompt in prompts:
            self.check_length(prompt, params.max_tokens, "prompt", "max_tokens")
        response_id, created = new_id("cmpl")
        streams = await self.start(prompts, params, CompletionRequest.model_fields, response_id)
        if request.stream:
            events = self.events(streams, prompts, params, response_id, created, request.include_usage)
            return self.sse_response(streams, events)
        choices, completion_tokens = await self.gather(streams, params.n, raw)
        body = CompletionResponse(
            id=response_id, created=created, model=self.model_name,
            choices=[CompletionChoice(index=i, text="".join(c.text), finish_reason=c.finish_reason)
                     for i, c in enumerate(choices)],
            usage=self.usage(prompts, params, completion_tokens))
        return JSONResponse(body.model_dump())

    def prompts(self, prompt) -> list[list[int]]:
        """`prompt` as a list of token-id prompts: one text, one id list, or a list of either."""
        if isinstance(prompt, str):
            return [self.tokenize(prompt, "prompt")] if prompt else [[]]
        if not prompt:
            return [[]]  # refused by check_length, naming the field
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return [self.tokenize(p, "prompt") if isinstance(p, str) and p else list(p) for p in prompt]

    async def events(self, streams: list[RequestStream], prompts: list[list[int]], params: SamplingParams,
                     response_id: str, created: int, include_usage: bool) -> AsyncIterator[str]:
        """The chunks of a completion stream (without the closing [DONE])."""
        n, completion_tokens = params.n, 0
        chunks = StreamChunks(response_id, "text_completion", created, self.model_name)
        async for i, output in merged(streams):
            for c in output.outputs:
                completion_tokens += len(c.token_ids)
                if c.text or c.finish_reason:  # a CompletionChoice, as a dict
                    yield chunks.choice({"index": i * n + c.index, "text": c.text, "logprobs": None,
                                         "finish_reason": c.finish_reason})
        if include_usage:
            yield chunks.usage(self.usage(prompts, params, completion_tokens))
