"""The FastAPI app in-process (httpx's ASGI transport, no socket), for what a healthy server
process cannot show: a model without a chat template, and an engine step that fails."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest

from minivllm.entrypoints.api_server import build_app
from tests.serve.conftest import make_engine


def _ask(app, *requests):
    """Send (method, path, body) requests to the app in order; returns the responses."""

    async def main():
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                return [await http.request(method, path, json=body, timeout=60) for method, path, body in requests]
        finally:
            await app.state.engine.shutdown()

    return asyncio.run(asyncio.wait_for(main(), 120))


@pytest.fixture(scope="module")
def no_template_model(serve_model, tmp_path_factory):
    """The same model with its tokenizer's chat template removed."""
    directory = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(serve_model, directory)
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return directory


def test_chat_without_a_template_is_a_clear_400(no_template_model):
    app = build_app(make_engine(no_template_model), "plain")
    chat, completion = _ask(app, ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                            ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}))
    assert chat.status_code == 400
    error = chat.json()["error"]
    assert error["param"] == "messages" and "chat template" in error["message"]
    assert completion.status_code == 200  # the model itself serves fine


def test_a_failing_step_becomes_a_500_and_an_error_event(engine, monkeypatch):
    app = build_app(engine, "tiny")
    execute = engine.executor.execute
    calls = {"n": 0}

    def flaky_execute(step_output):
        calls["n"] += 1
        if failing["on"]:
            raise RuntimeError("injected failure")
        return execute(step_output)

    failing = {"on": True}
    monkeypatch.setattr(engine.executor, "execute", flaky_execute)

    async def main():
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                body = {"prompt": "Hi", "max_tokens": 4}
                plain = await http.post("/v1/completions", json=body, timeout=60)
                streamed = await http.post("/v1/completions", json={**body, "stream": True}, timeout=60)
                failing["on"] = False
                healthy = await http.post("/v1/completions", json=body, timeout=60)
                metrics = await http.get("/metrics", timeout=60)
                return plain, streamed, healthy, metrics
        finally:
            await app.state.engine.shutdown()

    plain, streamed, healthy, metrics = asyncio.run(asyncio.wait_for(main(), 120))
    assert plain.status_code == 500
    error = plain.json()["error"]
    assert error["type"] == "server_error" and "injected failure" in error["message"]
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "injected failure" in json.loads(events[-2])["error"]["message"]
    assert healthy.status_code == 200 and healthy.json()["usage"]["completion_tokens"] == 4
    assert 'minivllm:request_success_total{finished_reason="error"} 2.0' in metrics.text
    assert calls["n"] >= 3
