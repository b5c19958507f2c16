"""Structured output through the server, as clients ask for it: the official `openai` client's
`chat.completions.parse` with a pydantic model, OpenAI's `response_format`, and vLLM's
`structured_outputs` extension (regex, choice), plainly and streamed.

The served model has random weights, so its output only ends where the grammar forces it to: every
schema here is finite (enums, booleans, bounded integers, strings and arrays).
"""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.serve.conftest import MODEL_NAME, in_server_group
from tests.serve.test_server import joined_stream

pytestmark = in_server_group
USER = [{"role": "user", "content": "Is the cache warm?"}]


class Verdict(BaseModel):
    answer: Literal["yes", "no", "maybe"]
    confident: bool
    score: int = Field(ge=0, le=9)
    tags: list[Literal["red", "green"]] = Field(max_length=2)
    note: str = Field(max_length=3)


@pytest.mark.parametrize("api", ["beta", "chat"])
def test_openai_parse_returns_a_valid_object_on_every_try(client, api):
    """Sampled at temperature 1, unseeded: whatever the model draws, the object parses. Both
    names of the client's parse: `client.beta.chat.completions.parse`, as older releases and most
    guides call it, and `client.chat.completions.parse`."""
    parse = client.beta.chat.completions.parse if api == "beta" else client.chat.completions.parse
    schema = Verdict.model_json_schema()
    for _ in range(3):
        completion = parse(model=MODEL_NAME, messages=USER, response_format=Verdict, temperature=1.0,
                           max_tokens=150, n=2)
        assert len(completion.choices) == 2
        for choice in completion.choices:
            assert choice.finish_reason == "stop"
            assert isinstance(choice.message.parsed, Verdict)
            jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_streamed_equals_plain(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 99}},
              "required": ["ok", "n"]}
    kwargs = dict(model=MODEL_NAME, messages=USER, max_tokens=60, temperature=1.0, seed=4,
                  response_format={"type": "json_schema", "json_schema": {"name": "point", "schema": schema,
                                                                          "strict": True}})
    plain = client.chat.completions.create(**kwargs)
    texts, reasons, _ = joined_stream(client.chat.completions.create(**kwargs, stream=True))
    assert texts[0] == plain.choices[0].message.content and reasons[0] == "stop"
    jsonschema.validate(json.loads(texts[0]), schema)


def test_json_object_mode_writes_an_object(client):
    # Any JSON object has no bound: a random model may run into max_tokens, but it starts one.
    completion = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=30, temperature=1.0,
                                                response_format={"type": "json_object"})
    text = completion.choices[0].message.content
    assert text.startswith("{")
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_regex_and_choice_extensions(client, stream):
    choices = ["red fox", "blue cache", "green"]
    cases = [({"regex": r"[a-c]{2}-\d{1,3}"}, lambda text: re.fullmatch(r"[a-c]{2}-\d{1,3}", text)),
             ({"choice": choices}, lambda text: text in choices)]
    for spec, check in cases:
        got = client.completions.create(model=MODEL_NAME, prompt=["Once upon a time", "Keys"], max_tokens=40,
                                        temperature=1.0, n=2, stream=stream, extra_body={"structured_outputs": spec})
        texts, reasons, _ = joined_stream(got) if stream else (
            {c.index: c.text for c in got.choices}, {c.index: c.finish_reason for c in got.choices}, None)
        assert sorted(texts) == [0, 1, 2, 3]
        assert all(check(text) and reasons[i] == "stop" for i, text in texts.items()), texts
