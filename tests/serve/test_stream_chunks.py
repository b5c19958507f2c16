"""The cheap stream chunks (serving.StreamChunks) are exactly the pydantic schema's chunks: the
same JSON, field by field, for completions, chat (role chunk, text chunk, last chunk) and usage."""

from __future__ import annotations

import json

import pytest

from minivllm.entrypoints.protocol import (
    ChatCompletionStreamResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionStreamResponse,
    DeltaMessage,
    UsageInfo,
)
from minivllm.entrypoints.serving import StreamChunks

HEAD = {"id": "cmpl-1f", "created": 1764100000, "model": "tiny \"quoted\" model"}


def parse(event: str) -> dict:
    assert event.startswith("data: ") and event.endswith("\n\n") and event.count("\n") == 2
    return json.loads(event[len("data: "):])


@pytest.mark.parametrize("text,finish", [(" the", None), ("", "length"), ("é\n\"ü\\", "stop")])
def test_a_completion_chunk_is_the_schemas(text, finish):
    chunks = StreamChunks(HEAD["id"], "text_completion", HEAD["created"], HEAD["model"])
    cheap = chunks.choice({"index": 3, "text": text}, "null", finish)
    schema = CompletionStreamResponse(**HEAD, choices=[CompletionChoice(index=3, text=text, finish_reason=finish)])
    assert parse(cheap) == json.loads(schema.model_dump_json())


@pytest.mark.parametrize("finish", [None, "length"])
def test_a_chunk_with_logprobs_is_the_schemas_and_what_json_dumps_writes(finish):
    """The log-probabilities come as JSON text (entrypoints/logprobs.py), spliced in as they are."""
    logprobs = {"text_offset": [4], "token_logprobs": [-0.5], "tokens": [" é"], "top_logprobs": [{" é": -0.5}]}
    chunks = StreamChunks(HEAD["id"], "text_completion", HEAD["created"], HEAD["model"])
    cheap = chunks.choice({"index": 0, "text": " é"}, json.dumps(logprobs), finish)
    schema = CompletionStreamResponse(**HEAD, choices=[
        CompletionChoice(index=0, text=" é", logprobs=logprobs, finish_reason=finish)])
    assert parse(cheap) == json.loads(schema.model_dump_json())
    choice = {"index": 0, "text": " é", "logprobs": logprobs, "finish_reason": finish}
    assert cheap == f"data: {json.dumps({**parse(cheap), 'choices': [choice]})}\n\n"


@pytest.mark.parametrize("delta,finish", [({"role": "assistant", "content": ""}, None),
                                          ({"role": None, "content": " hi"}, None),
                                          ({"role": None, "content": ""}, "stop")])
def test_a_chat_chunk_is_the_schemas(delta, finish):
    chunks = StreamChunks(HEAD["id"], "chat.completion.chunk", HEAD["created"], HEAD["model"])
    cheap = chunks.choice({"index": 1, "delta": delta}, "null", finish)
    schema = ChatCompletionStreamResponse(
        **HEAD, choices=[ChatStreamChoice(index=1, delta=DeltaMessage(**delta), finish_reason=finish)])
    assert parse(cheap) == json.loads(schema.model_dump_json())


@pytest.mark.parametrize("obj,model", [("text_completion", CompletionStreamResponse),
                                       ("chat.completion.chunk", ChatCompletionStreamResponse)])
def test_the_usage_chunk_is_the_schemas(obj, model):
    usage = UsageInfo(prompt_tokens=5, completion_tokens=7, total_tokens=12)
    cheap = StreamChunks(HEAD["id"], obj, HEAD["created"], HEAD["model"]).usage(usage)
    assert parse(cheap) == json.loads(model(**HEAD, choices=[], usage=usage).model_dump_json())
