"""The OpenAI-compatible server, end to end: a real `python -m minivllm serve` process and the
official `openai` client. The oracle is the offline `LLM` on the same model directory."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from transformers import AutoTokenizer

from tests.serve.conftest import API_KEY, MODEL_NAME, in_server_group, metric_values

PROMPTS = ["Once upon a time", "The cache is cut into small blocks", "What is the weather like today?",
           "Keys and values", "A small fox", "Numbers and symbols matter too", "Read the code", "def add(a, b):"]

pytestmark = in_server_group


def joined_stream(stream) -> tuple[dict[int, str], dict[int, str], list]:
    """(text per choice index, finish reason per index, chunks) of a streamed completion."""
    texts, reasons, chunks = {}, {}, list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


def test_models_lists_the_served_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]


def test_greedy_completion_equals_offline_generate(client, offline_llm):
    expected = offline_llm.generate(PROMPTS[:3] + [[5, 6, 7, 8, 9]], max_tokens=12, temperature=0, use_tqdm=False)
    for prompt, want in zip(PROMPTS[:3] + [[5, 6, 7, 8, 9]], expected):
        got = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
        choice = got.choices[0]
        assert choice.text == want.text
        assert choice.finish_reason == want.finish_reason
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_batch_of_prompts_numbers_choices_prompt_by_prompt(client, offline_llm):
    expected = offline_llm.generate(PROMPTS[:2], max_tokens=6, temperature=0, use_tqdm=False)
    got = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [e.text for e in expected]


def test_streamed_completion_equals_plain(client):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=24, temperature=0.9, seed=7, n=2)
    plain = client.completions.create(**kwargs)
    stream = client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    texts, reasons, chunks = joined_stream(stream)
    assert texts == {c.index: c.text for c in plain.choices}
    assert reasons == {c.index: c.finish_reason for c in plain.choices}
    assert texts[0] != texts[1]  # two samples, seeded seed and seed + 1
    usage = chunks[-1].usage  # the last chunk, after every choice has finished, has no choices
    assert chunks[-1].choices == [] and usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=3, temperature=0,
                                            stream=True))
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_same_seed_same_text(client):
    def sample(seed):
        return client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text

    first = sample(3)
    assert sample(3) == first
    assert sample(4) != first


def test_chat_uses_the_template_and_streams_the_same_text(client, offline_llm, serve_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the fox."}]
    tokenizer = AutoTokenizer.from_pretrained(str(serve_model))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s><|system|>\nBe brief.</s>") and text.endswith("<|assistant|>\n")
    prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
    want = offline_llm.generate([prompt_ids], max_tokens=10, temperature=0, use_tqdm=False)[0]

    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=10,
                                           temperature=0)
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == want.text
    assert plain.usage.prompt_tokens == len(prompt_ids) and plain.usage.completion_tokens == len(want.token_ids)

    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    texts, reasons, chunks = joined_stream(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert texts == {0: want.text} and reasons == {0: plain.choices[0].finish_reason}
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_text_parts_are_joined(client):
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "about the fox."}]
    as_parts = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": parts}],
                                              max_tokens=5, temperature=0)
    as_text = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Tell me\nabout the fox."}], max_tokens=5,
        temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


def test_vllm_extra_fields(client, offline_llm):
    """top_k, min_tokens, ignore_eos and stop_token_ids reach SamplingParams (through extra_body)."""
    want = offline_llm.generate([PROMPTS[2]], max_tokens=8, temperature=0, use_tqdm=False)[0]
    stop_at = want.token_ids[3]
    got = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                    extra_body={"stop_token_ids": [stop_at], "top_k": 5})
    first_stop = want.token_ids.index(stop_at)
    assert got.choices[0].finish_reason == "stop" and got.usage.completion_tokens == first_stop + 1
    longer = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                       extra_body={"stop_token_ids": [stop_at], "min_tokens": 8,
                                                   "ignore_eos": True})
    assert longer.choices[0].finish_reason == "length" and longer.usage.completion_tokens == 8


def test_stop_strings(client, offline_llm):
    want = offline_llm.generate([PROMPTS[0]], max_tokens=16, temperature=0, use_tqdm=False)[0].text
    stop = want[5:8]
    got = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].finish_reason == "stop" and got.choices[0].text == want[:want.index(stop)]
    streamed, _, _ = joined_stream(client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=16,
                                                             temperature=0, stop=[stop], stream=True))
    assert streamed[0] == got.choices[0].text


def test_concurrent_streams_each_equal_their_solo_result(client, async_client):
    requests = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 6 + i % 7) for i in range(20)]
    solo = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=m, temperature=0).choices[0].text
            for p, m in requests]

    async def one(prompt: str, max_tokens: int) -> str:
        stream = await async_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                                       temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_at_once() -> list[str]:
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(p, m) for p, m in requests)), timeout=120)
        finally:
            await async_client.close()

    assert asyncio.run(all_at_once()) == solo


def test_metrics_count_tokens_and_latencies(client, server):
    before = metric_values(server.url)
    got = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[3], max_tokens=7, temperature=0)
    after = metric_values(server.url)
    for name in ("minivllm:num_requests_running", "minivllm:num_requests_waiting", "minivllm:kv_cache_usage_perc"):
        assert name in after
    assert 0 <= after["minivllm:kv_cache_usage_perc"] <= 1
    assert after["minivllm:prompt_tokens_total"] - before["minivllm:prompt_tokens_total"] == got.usage.prompt_tokens
    assert (after["minivllm:generation_tokens_total"] - before["minivllm:generation_tokens_total"]
            == got.usage.completion_tokens)
    for histogram in ("minivllm:time_to_first_token_seconds", "minivllm:time_per_output_token_seconds",
                      "minivllm:e2e_request_latency_seconds"):
        assert after[f"{histogram}_count"] - before.get(f"{histogram}_count", 0) == 1
        assert after[f"{histogram}_sum"] > before.get(f"{histogram}_sum", 0)
    success = 'minivllm:request_success_total{finished_reason="length"}'
    assert after[success] - before.get(success, 0) == 1


def test_metrics_is_prometheus_text(server):
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "# TYPE minivllm:time_to_first_token_seconds histogram" in response.text


# ---------------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_v1_routes_need_the_api_key(server, headers):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        response = httpx.request(method, f"{server.url}{path}", headers=headers, json={"prompt": "x"}, timeout=10)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_health_and_metrics_are_open(server):
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200


def test_openai_client_with_a_wrong_key_gets_authentication_error(server):
    import openai

    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
