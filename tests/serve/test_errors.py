"""Every bad request of the issue gets OpenAI's error JSON with the right status and the field's
name, and none of them disturbs the requests that are running."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.serve.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, in_server_group

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG_PROMPT = list(range(10, 10 + MAX_MODEL_LEN - 20))  # fits, but leaves 20 tokens of room
USER = [{"role": "user", "content": "Hi"}]

# (route, body, status, param, words the message must contain)
BAD_REQUESTS = [
    ("completions", {"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("completions", {"prompt": "Hi", "temperature": -0.5}, 400, "temperature", "temperature"),
    ("completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p", "top_p"),
    ("completions", {"prompt": "Hi", "top_p": 1.5}, 400, "top_p", "top_p"),
    ("completions", {"prompt": "Hi", "n": 0}, 400, "n", "n"),
    ("completions", {"prompt": ""}, 400, "prompt", "prompt must not be empty"),
    ("completions", {"prompt": []}, 400, "prompt", "prompt must not be empty"),
    ("completions", {"prompt": ["Hi", ""]}, 400, "prompt", "prompt must not be empty"),
    ("completions", {"prompt": LONG_PROMPT, "max_tokens": 50}, 400, "max_tokens", "max_model_len"),
    ("completions", {"prompt": list(range(10, 10 + MAX_MODEL_LEN))}, 400, "prompt", "max_model_len"),
    ("completions", {"prompt": [5, 100_000]}, 400, "prompt", "outside the vocabulary"),
    ("completions", {"prompt": "Hi", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens", "max_tokens"),
    ("completions", {"prompt": "Hi", "stop_token_ids": [100_000]}, 400, "stop_token_ids", "vocabulary"),
    ("completions", {"prompt": "Hi", "suffix": "!"}, 400, "suffix", "not supported"),
    ("completions", {"prompt": "Hi", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ("completions", {"prompt": "Hi", "logit_bias": {"100000": 5}}, 400, "logit_bias", "vocabulary"),
    ("completions", {}, 400, "prompt", "Field required"),
    ("completions", {"prompt": "Hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("chat/completions", {}, 400, "messages", "Field required"),
    ("chat/completions", {"messages": []}, 400, "messages", "messages"),
    ("chat/completions", {"messages": [{"content": "Hi"}]}, 400, "messages[0].role", "Field required"),
    ("chat/completions", {"messages": USER, "max_completion_tokens": -3}, 400, "max_completion_tokens",
     "max_completion_tokens"),
    ("chat/completions", {"messages": USER, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "max_model_len"),
    ("chat/completions", {"messages": USER, "temperature": -1}, 400, "temperature", "temperature"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]", "only text parts"),
    ("chat/completions", {"messages": USER, "model": "nope"}, 404, "model", "does not exist"),
    # Structured output: what the engine cannot compile names the field the client used for it.
    ("chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format.json_schema.schema", "Unsupported type"),
    ("chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     400, "response_format.json_schema.schema", "needs json_schema.schema"),
    ("chat/completions", {"messages": USER, "response_format": {"type": "xml"}}, 400, "response_format.type",
     "json_schema"),
    ("completions", {"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": 3}}}}, 400, "response_format.json_schema.schema",
     "properties must be an object"),
    ("completions", {"prompt": "Hi", "structured_outputs": {"regex": "(a"}}, 400, "structured_outputs.regex",
     "parenthesis"),
    ("completions", {"prompt": "Hi", "structured_outputs": {"grammar": "root ::= nothing"}}, 400,
     "structured_outputs.grammar", "not defined"),
    ("completions", {"prompt": "Hi", "structured_outputs": {"choice": []}}, 400, "structured_outputs.choice",
     "non-empty"),
    ("completions", {"prompt": "Hi", "structured_outputs": {}}, 400, "structured_outputs", "exactly one"),
    ("completions", {"prompt": "Hi", "structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     400, "structured_outputs", "not both"),
    ("completions", {"prompt": "Hi", "structured_outputs": {"regex": "a+"}, "min_tokens": 2}, 400, "min_tokens",
     "cannot be combined"),
]

pytestmark = in_server_group


def _post(url: str, route: str, body) -> httpx.Response:
    return httpx.post(f"{url}/v1/{route}", headers=AUTH, json=body, timeout=30)


def _check_error(response: httpx.Response, status: int, param: str | None, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("route, body, status, param, words", BAD_REQUESTS,
                         ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD_REQUESTS)])
def test_bad_request_names_the_field(server, route, body, status, param, words):
    _check_error(_post(server.url, route, {"model": MODEL_NAME, **body} if "model" not in body else body),
                 status, param, words)


def test_malformed_json(server):
    for route in ("completions", "chat/completions"):
        response = httpx.post(f"{server.url}/v1/{route}", headers={**AUTH, "Content-Type": "application/json"},
                              content=b'{"prompt": "Hi", ', timeout=30)
        assert response.status_code == 400
        assert "not valid JSON" in response.json()["error"]["message"]
    response = httpx.post(f"{server.url}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                          content=b'["a JSON list"]', timeout=30)
    assert response.status_code == 400 and "JSON object" in response.json()["error"]["message"]


def test_unknown_route_is_openai_json(server):
    response = httpx.get(f"{server.url}/v1/nothing-here", headers=AUTH, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"


def test_openai_client_raises_the_matching_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=-1)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=5, stream=True, temperature=-1)
    assert bad.value.body["param"] == "temperature"


def test_bad_requests_do_not_disturb_a_running_stream(server, client):
    """A stream runs while every bad request above is sent; it ends exactly as it does alone, and
    the server still answers afterwards."""
    kwargs = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=200, temperature=0,
                  extra_body={"ignore_eos": True})
    alone = client.completions.create(**kwargs).choices[0].text
    stream = client.completions.create(**kwargs, stream=True)
    first = next(iter(stream)).choices[0].text
    errors = []

    def send_bad_requests():
        for route, body, status, param, words in BAD_REQUESTS:
            response = _post(server.url, route, {"model": MODEL_NAME, **body} if "model" not in body else body)
            if response.status_code != status:
                errors.append((route, body, response.status_code))

    sender = threading.Thread(target=send_bad_requests)
    sender.start()
    rest = "".join(c.choices[0].text for c in stream if c.choices)
    sender.join(timeout=120)
    assert not sender.is_alive() and errors == []
    assert first + rest == alone
    assert client.completions.create(**kwargs).choices[0].text == alone
