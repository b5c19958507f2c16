"""The request and response bodies of the OpenAI API, as pydantic models.

Requests are validated here, at the door: a field of the wrong type or out of its range becomes a
400 answer naming the field (see errors.py), before the engine sees anything. The ranges are the
ones `SamplingParams` checks again (the engine's own contract); checking them here too gives the
error the field name the client used (`max_completion_tokens`, not `max_tokens`).

Besides OpenAI's fields, requests take vLLM's extra sampling fields (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `structured_outputs`), which
the `openai` client sends through `extra_body`. Fields of the OpenAI API that this server does not implement are
refused by name (`UNSUPPORTED_FIELDS`) rather than silently ignored.

Log-probabilities (`logprobs`, `echo` and `top_logprobs`) are the model's own distribution:
log_softmax of its logits, before temperature, penalties, `logit_bias` and top-k/top-p; the
extra field `logprobs_mode: "processed"` asks for the distribution each token was drawn from
instead (docs/sampling.md). Their response shapes are built in logprobs.py.

Responses are the shapes the `openai` client parses: a whole `CompletionResponse` /
`ChatCompletionResponse`, or, when streaming, one `...StreamResponse` chunk per server-sent event.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI fields with a meaning this server does not implement: a request that sets one gets a 400
# naming it, instead of an answer that quietly ignores what was asked.
UNSUPPORTED_FIELDS = ("best_of", "suffix", "tools", "tool_choice", "functions", "function_call", "audio",
                      "modalities", "prediction")


class OpenAIBaseModel(BaseModel):
    # Unknown fields are kept (not refused) so that clients adding harmless fields (user,
    # metadata, ...) still work; the server refuses the UNSUPPORTED_FIELDS among them.
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False  # one last chunk with the token counts, after the text


class JsonSchemaFormat(OpenAIBaseModel):
    name: str
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # (`schema` would shadow a BaseModel method)
    strict: bool | None = None  # accepted; the schema is always enforced


class ResponseFormat(OpenAIBaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(OpenAIBaseModel):
    """vLLM's `structured_outputs` extension: exactly one of these (see StructuredOutputsParams)."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingRequest(OpenAIBaseModel):
    """Fields shared by completions and chat completions.

    How a choice ends (finish_reason), the first rule that fires deciding, after each token:

    1. min_tokens: before that many tokens, EOS and stop_token_ids cannot even be drawn, and
       stop strings do not end the choice;
    2. the model's EOS token (unless ignore_eos), then a stop_token_ids token: "stop"; the token
       is counted in completion_tokens, and its text is left out if it is a special token;
    3. a stop string completed by the new text: "stop"; the text is cut before it (the stop
       string is not included), even if it ends inside a token;
    4. max_tokens (max_completion_tokens for chat), then the model's context: "length".

    logit_bias: {token id: bias in [-100, 100]}, added to those logits before sampling (so a
    bias changes what is drawn, not the raw logprobs reported); ids must be in the vocabulary.
    """

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
    logit_bias: dict[int, float] | None = None
    # minivllm's extra: "processed" reports the distribution each token was drawn from instead.
    logprobs_mode: Literal["raw", "processed"] | None = None
    # What the output must look like: OpenAI's form, or vLLM's (regex, choice, grammar too).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: text in, text out."""

    # One prompt (text or token ids) or several (a list of texts or of token-id lists).
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's default for completions; 0 only with echo: the answer is the prompt, scored.
    max_tokens: int | None = Field(16, ge=0)
    # The log-probability of each token and of the `logprobs` most likely ones (0..20).
    logprobs: int | None = Field(None, ge=0, le=20)
    # Put the prompt before the completion, in the text and (with logprobs) in the logprobs.
    echo: bool | None = False


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
    logprobs: bool | None = False  # each generated token's log-probability ...
    top_logprobs: int | None = Field(None, ge=0, le=20)  # ... and its top alternatives (needs logprobs)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------
class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(OpenAIBaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(OpenAIBaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
