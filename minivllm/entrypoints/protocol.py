"""The request and response bodies of the OpenAI API, as pydantic models.

Requests are validated here, at the door: a field of the wrong type or out of its range becomes a
400 answer naming the field (see errors.py), before the engine sees anything. The ranges are the
ones `SamplingParams` checks again (the engine's own contract); checking them here too gives the
error the field name the client used (`max_completion_tokens`, not `max_tokens`).

Besides OpenAI's fields, requests take vLLM's extra sampling fields (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`), which the `openai` client
sends through `extra_body`. Fields of the OpenAI API that this server does not implement are
refused by name (`UNSUPPORTED_FIELDS`) rather than silently ignored.

Responses are the shapes the `openai` client parses: a whole `CompletionResponse` /
`ChatCompletionResponse`, or, when streaming, one `...StreamResponse` chunk per server-sent event.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI fields with a meaning this server does not implement: a request that sets one gets a 400
# naming it, instead of an answer that quietly ignores what was asked.
UNSUPPORTED_FIELDS = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias", "tools",
                      "tool_choice", "functions", "function_call", "response_format", "audio",
                      "modalities", "prediction")


class OpenAIBaseModel(BaseModel):
    # Unknown fields are kept (not refused) so that clients adding harmless fields (user,
    # metadata, ...) still work; the server refuses the UNSUPPORTED_FIELDS among them.
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False  # one last chunk with the token counts, after the text


class SamplingRequest(OpenAIBaseModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None  # None = the one model this server serves
    temperature: float | None = Field(None, ge=0)  # None = 1.0
    top_p: float | None = Field(None, gt=0, le=1)  # None = 1.0
    n: int | None = Field(None, ge=1)  # None = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # vLLM's extra sampling fields.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: text in, text out."""

    # One prompt (text or token ids) or several (a list of texts or of token-id lists).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class TextPart(OpenAIBaseModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions: messages in, the assistant's next message out."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None = up to the model's length
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name; wins over max_tokens


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------
class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class AssistantMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(OpenAIBaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "minivllm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo
