"""POST /v1/chat/completions: the assistant's next message, plainly or as a stream.

The model sees one prompt, not a list of messages. The tokenizer's *chat template* (a Jinja
template shipped with chat models, and written by `make-model`) turns the messages into that
prompt, ending with the opening of the assistant's turn (`add_generation_prompt=True`); the
answer is what the model writes next. A model without a template cannot be chatted with: 400.

A stream opens each choice with its role, then sends the text as it comes:

    data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant",
           "content": ""}, "finish_reason": null}], ...}
    data: {... "choices": [{"index": 0, "delta": {"content": " the"}, "finish_reason": null}]}
    ...
    data: {... "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]}
    data: [DONE]

With `logprobs: true` (and `top_logprobs: k`, 0..20), each choice, and each chunk of a stream,
carries `logprobs.content`: one entry per generated token (entrypoints/logprobs.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from minivllm.entrypoints.async_llm import RequestStream
from minivllm.entrypoints.errors import OpenAIError
from minivllm.entrypoints.logprobs import chat_logprobs
from minivllm.entrypoints.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
)
from minivllm.entrypoints.serving import OpenAIServing, StreamChunks, merged, new_id
from minivllm.sampling_params import SamplingParams


class OpenAIServingChat(OpenAIServing):
    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        self.check_request(request)
        prompt = self.chat_prompt(request.messages)
        max_tokens, field = request.max_tokens, "max_tokens"
        if request.max_completion_tokens is not None:
            max_tokens, field = request.max_completion_tokens, "max_completion_tokens"
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
        params = self.sampling_params(request, max_tokens,
                                      logprobs=(request.top_logprobs or 0) if request.logprobs else None)
        self.check_length(prompt, max_tokens, "messages", field)
        response_id, created = new_id("chatcmpl")
        streams = await self.start([prompt], params, request, response_id)
        if request.stream:
            events = self.events(streams, prompt, params, response_id, created, request)
            return self.sse_response(streams, events)
        choices, completion_tokens = await self.gather(streams, params.n, raw)
        body = ChatCompletionResponse(
            id=response_id, created=created, model=self.model_name,
            choices=[ChatChoice(index=i, message=AssistantMessage(content="".join(c.text)),
                                logprobs=json.loads(self.logprobs(c.token_ids, c.logprobs, request)),
                                finish_reason=c.finish_reason) for i, c in enumerate(choices)],
            usage=self.usage([prompt], params, completion_tokens))
        return JSONResponse(body.model_dump())

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """The messages rendered by the chat template, as token ids."""
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            what = "has no tokenizer" if tokenizer is None else "has a tokenizer without a chat template"
            raise OpenAIError(
                f"the model `{self.model_name}` {what}, so /v1/chat/completions cannot turn messages into "
                "a prompt; use /v1/completions, or add a chat template to the tokenizer "
                "(chat_template.jinja beside tokenizer_config.json)", param="messages")
        conversation = [{"role": m.role, "content": _text_of(m, i)} for i, m in enumerate(messages)]
        try:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # noqa: BLE001 - a template may refuse a conversation (raise_exception)
            raise OpenAIError(f"the chat template could not render these messages: {err}",
                              param="messages") from None
        # The template writes the special tokens it wants (bos...) itself: add none here.
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    async def events(self, streams: list[RequestStream], prompt: list[int], params: SamplingParams,
                     response_id: str, created: int, request: ChatCompletionRequest) -> AsyncIterator[str]:
        """The chunks of a chat stream (without the closing [DONE])."""
        completion_tokens = 0
        chunks = StreamChunks(response_id, "chat.completion.chunk", created, self.model_name)
        for index in range(params.n):  # ChatStreamChoice chunks: first the role, then the text
            yield chunks.choice({"index": index, "delta": {"role": "assistant", "content": ""}}, "null", None)
        async for _, output in merged(streams):
            for c in output.outputs:
                completion_tokens += len(c.token_ids)
                if c.text or c.finish_reason or (c.logprobs and c.token_ids):
                    yield chunks.choice({"index": c.index, "delta": {"role": None, "content": c.text}},
                                        self.logprobs(c.token_ids, c.logprobs, request), c.finish_reason)
        if request.include_usage:
            yield chunks.usage(self.usage([prompt], params, completion_tokens))

    def logprobs(self, token_ids: list[int], positions, request: ChatCompletionRequest) -> str:
        """The chat shape of these tokens' log-probabilities as JSON text ("null" if not asked for)."""
        if positions is None:
            return "null"
        return chat_logprobs(token_ids, positions, request.top_logprobs or 0, self.token_texts)


def _text_of(message: ChatMessage, i: int) -> str:
    """A message's content as text: a string, or a list of text parts joined by newlines."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise OpenAIError(f"messages[{i}].content[{j}] is a {part.type!r} part; only text parts are "
                              "supported", param=f"messages[{i}].content[{j}]")
        texts.append(part.text)
    return "\n".join(texts)
