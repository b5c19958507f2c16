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

**Scoring a prompt.** `logprobs=k` returns each generated token's log-probability and the k most
likely tokens (entrypoints/logprobs.py); `echo` puts the prompt in front of the text, and with
`logprobs` the prompt's tokens in front of the log-probabilities (the first prompt token has
None). `max_tokens: 0` with `echo` generates nothing: the engine computes the prompt, scores it,
and finishes ("length"). With `max_tokens: 1` instead, the last entry is the generated token,
which is what lm-eval's `local-completions` sends and reads (it drops that last entry).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from minivllm.entrypoints.async_llm import RequestStream
from minivllm.entrypoints.errors import OpenAIError
from minivllm.entrypoints.logprobs import completion_logprobs
from minivllm.entrypoints.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from minivllm.entrypoints.serving import Choice, OpenAIServing, StreamChunks, merged, new_id
from minivllm.sampling_params import SamplingParams


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest, raw: Request) -> Response:
        self.check_request(request)
        prompts = self.prompts(request.prompt)
        params = self.completion_params(request)
        for prompt in prompts:
            self.check_length(prompt, params.max_tokens, "prompt", "max_tokens")
        response_id, created = new_id("cmpl")
        streams = await self.start(prompts, params, request, response_id)
        echoes = self.echoes(request.prompt, prompts) if request.echo else None
        if request.stream:
            events = self.events(streams, prompts, params, response_id, created, request, echoes)
            return self.sse_response(streams, events)
        choices, completion_tokens = await self.gather(streams, params.n, raw)
        body = CompletionResponse(
            id=response_id, created=created, model=self.model_name,
            choices=[self.choice(i, c, request, echoes and (echoes[i // params.n], prompts[i // params.n]))
                     for i, c in enumerate(choices)],
            usage=self.usage(prompts, params, completion_tokens))
        return JSONResponse(body.model_dump())

    def completion_params(self, request: CompletionRequest) -> SamplingParams:
        """SamplingParams with the log-probabilities asked for; max_tokens 0 (only with echo)
        scores the prompt and generates nothing."""
        scores_only = request.max_tokens == 0
        if scores_only and not request.echo:
            raise OpenAIError("max_tokens is 0, which generates nothing: it is only allowed with echo=true "
                              "(the answer is then the prompt, scored with logprobs)", param="max_tokens")
        prompt_logprobs = request.logprobs if request.echo else None
        if scores_only and prompt_logprobs is None:
            prompt_logprobs = 0  # the engine needs something to compute; nothing of it is sent
        return self.sampling_params(request, request.max_tokens, logprobs=request.logprobs,
                                    prompt_logprobs=prompt_logprobs)

    def prompts(self, prompt) -> list[list[int]]:
        """`prompt` as a list of token-id prompts: one text, one id list, or a list of either."""
        if isinstance(prompt, str):
            return [self.tokenize(prompt, "prompt")] if prompt else [[]]
        if not prompt:
            return [[]]  # refused by check_length, naming the field
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return [self.tokenize(p, "prompt") if isinstance(p, str) and p else list(p) for p in prompt]

    def echoes(self, prompt, prompts: list[list[int]]) -> list[str]:
        """Each prompt's text as echoed: as sent, or decoded when it was sent as token ids."""
        texts = [prompt] if isinstance(prompt, str) else prompt if prompt and isinstance(prompt[0], str) else None
        if texts is not None:
            return list(texts)
        if self.tokenizer is None:
            raise OpenAIError("echo of a token-id prompt needs a tokenizer, and this model has none", param="echo")
        return [self.tokenizer.decode(ids) for ids in prompts]

    def choice(self, index: int, c: Choice, request: CompletionRequest, echo) -> CompletionChoice:
        """One plain choice. echo: (the prompt's text, its token ids), or None."""
        text, token_ids, positions = "".join(c.text), c.token_ids, c.logprobs
        if echo is not None:
            prompt_text, prompt_ids = echo
            text = prompt_text + text
            token_ids, positions = _with_prompt(prompt_ids, c.prompt_logprobs, token_ids, positions)
        logprobs = None
        if request.logprobs is not None:
            logprobs = json.loads(completion_logprobs(token_ids, positions, self.token_texts)[0])
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=c.finish_reason)

    async def events(self, streams: list[RequestStream], prompts: list[list[int]], params: SamplingParams,
                     response_id: str, created: int, request: CompletionRequest,
                     echoes: list[str] | None) -> AsyncIterator[str]:
        """The chunks of a completion stream (without the closing [DONE]). With echo, each choice's
        first chunk starts with its prompt (and the prompt's log-probabilities)."""
        n, completion_tokens = params.n, 0
        chunks = StreamChunks(response_id, "text_completion", created, self.model_name)
        offsets: dict[int, int] = {}  # choice -> text offset of its next token
        prompt_logprobs: dict[int, list] = {}  # prompt -> its entries, until its choices are sent
        async for i, output in merged(streams):
            if output.prompt_logprobs is not None:
                prompt_logprobs[i] = output.prompt_logprobs
            for c in output.outputs:
                completion_tokens += len(c.token_ids)
                index = i * n + c.index
                text, token_ids, positions = c.text, c.token_ids, c.logprobs
                if echoes is not None and index not in offsets:
                    text = echoes[i] + text
                    token_ids, positions = _with_prompt(prompts[i], prompt_logprobs.get(i), token_ids, positions)
                offset = offsets.setdefault(index, 0)
                logprobs = "null"
                if request.logprobs is not None:
                    logprobs, offsets[index] = completion_logprobs(token_ids, positions, self.token_texts, offset)
                if text or c.finish_reason or (request.logprobs is not None and token_ids):  # a CompletionChoice
                    yield chunks.choice({"index": index, "text": text}, logprobs, c.finish_reason)
        if request.include_usage:
            yield chunks.usage(self.usage(prompts, params, completion_tokens))


def _with_prompt(prompt_ids: list[int], prompt_logprobs, token_ids: list[int], positions):
    """The prompt's tokens (and entries) in front of the generated ones. A prompt whose entries
    never came (a request aborted before its prompt was computed) gets None for each."""
    if positions is not None:
        positions = (prompt_logprobs or [None] * len(prompt_ids)) + positions
    return prompt_ids + token_ids, positions
