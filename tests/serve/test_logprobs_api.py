"""Log-probabilities, echo and logit_bias through the official `openai` client, against
transformers' log_softmax on the same tiny model (float32, CPU) to 1e-4."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.serve.conftest import MODEL_NAME, in_server_group

pytestmark = in_server_group
TOL = 1e-4
MESSAGES = [{"role": "user", "content": "Tell me about the engine."}]


@pytest.fixture(scope="module")
def hf(serve_model):
    """(tokenizer, logits(ids) -> [len, V] float32) of transformers on the served directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(serve_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(serve_model)

    def logits(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()

    return tokenizer, logits


def greedy_continuation(logits_of, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(logits_of(ids)[-1].argmax()))
    return ids[len(prompt):]


def assert_top(top: dict[str, float], lp: torch.Tensor, tokenizer, k: int):
    """Every alternative names a token whose log-probability it gives, and the best k are there."""
    for text, value in top.items():
        candidates = [t for t in range(lp.shape[0]) if tokenizer.decode([t]) == text]
        assert any(abs(float(lp[t]) - value) < TOL for t in candidates), text
    best = lp.topk(k).values.tolist()
    assert sorted(top.values(), reverse=True)[0] == pytest.approx(best[0], abs=TOL)


def test_chat_logprobs_and_top_logprobs_equal_hf(client, hf):
    tokenizer, logits_of = hf
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    expected = greedy_continuation(logits_of, prompt, 6)
    lp = logits_of(prompt + expected).log_softmax(-1)
    answer = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=5)
    content = answer.choices[0].logprobs.content
    assert len(content) == 6
    for j, (entry, token) in enumerate(zip(content, expected)):
        row = lp[len(prompt) - 1 + j]
        assert entry.token == tokenizer.decode([token]) and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(float(row[token]), abs=TOL)
        assert len(entry.top_logprobs) == 5
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(5).values.tolist(), abs=TOL)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in row.topk(5).indices]


def test_chat_stream_carries_each_tokens_logprobs(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(**kwargs, stream=True)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert len(streamed) == len(plain) == 8
    for got, expected in zip(streamed, plain):
        assert got.token == expected.token and got.logprob == pytest.approx(expected.logprob, abs=1e-5)
        assert [t.token for t in got.top_logprobs] == [t.token for t in expected.top_logprobs]


def test_completions_logprobs_with_echo_equal_hf(client, hf):
    tokenizer, logits_of = hf
    prompt = tokenizer("The engine reads a prompt").input_ids
    expected = greedy_continuation(logits_of, prompt, 4)
    lp = logits_of(prompt + expected).log_softmax(-1)
    choice = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0,
                                       logprobs=5, echo=True).choices[0]
    ids = prompt + expected
    logprobs = choice.logprobs
    assert choice.text == tokenizer.decode(prompt) + tokenizer.decode(expected)
    assert logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert logprobs.token_logprobs[i] == pytest.approx(float(lp[i - 1, ids[i]]), abs=TOL)
        assert_top(logprobs.top_logprobs[i], lp[i - 1], tokenizer, 5)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids))]


def test_max_tokens_zero_with_echo_scores_the_prompt(client, hf):
    tokenizer, logits_of = hf
    prompt = "Once upon a time the engine"
    ids = tokenizer(prompt).input_ids
    lp = logits_of(ids).log_softmax(-1)
    answer = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = answer.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert answer.usage.completion_tokens == 0 and answer.usage.prompt_tokens == len(ids)
    assert len(choice.logprobs.token_logprobs) == len(ids)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([float(lp[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                               abs=TOL)


def test_completion_stream_with_echo_adds_up_to_the_plain_answer(client):
    kwargs = dict(model=MODEL_NAME, prompt=["The engine", "A block"], max_tokens=5, temperature=0, logprobs=2,
                  echo=True)
    plain = client.completions.create(**kwargs)
    merged = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            text, tokens, lps, offsets = merged.setdefault(choice.index, ("", [], [], []))
            if choice.logprobs is not None:
                tokens, lps = tokens + choice.logprobs.tokens, lps + choice.logprobs.token_logprobs
                offsets = offsets + choice.logprobs.text_offset
            merged[choice.index] = (text + choice.text, tokens, lps, offsets)
    for choice in plain.choices:
        text, tokens, lps, offsets = merged[choice.index]
        assert text == choice.text and tokens == choice.logprobs.tokens and offsets == choice.logprobs.text_offset
        assert lps == pytest.approx(choice.logprobs.token_logprobs)


def test_logit_bias_forces_and_bans_tokens(client, hf):
    tokenizer, logits_of = hf
    prompt = tokenizer("The engine").input_ids
    forced = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, temperature=0, logprobs=0,
                                       logit_bias={"77": 100})
    assert forced.choices[0].logprobs.tokens == [tokenizer.decode([77])] * 3
    greedy = int(logits_of(prompt)[-1].argmax())
    banned = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(greedy): -100})
    choice = banned.choices[0].logprobs
    assert choice.tokens != [tokenizer.decode([greedy])]
    # The reported logprobs are the model's own (raw): the bias is not in them.
    second = logits_of(prompt)[-1].log_softmax(-1).topk(2)
    assert choice.token_logprobs[0] == pytest.approx(float(second.values[1]), abs=TOL)


def test_processed_logprobs_through_extra_body(client, hf):
    tokenizer, logits_of = hf
    prompt = tokenizer("The engine").input_ids
    answer = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0.5, seed=1,
                                       logprobs=1, extra_body={"top_k": 3, "logprobs_mode": "processed"})
    token_text, value = answer.choices[0].logprobs.tokens[0], answer.choices[0].logprobs.token_logprobs[0]
    scaled = logits_of(prompt)[-1] / 0.5
    kept = scaled.topk(3).indices
    expected = scaled[kept].log_softmax(-1)
    assert any(tokenizer.decode([int(t)]) == token_text and abs(float(e) - value) < TOL
               for t, e in zip(kept, expected))


@pytest.mark.parametrize("endpoint, kwargs, param", [
    ("completions", dict(logprobs=21), "logprobs"),
    ("completions", dict(max_tokens=0), "max_tokens"),
    ("completions", dict(logit_bias={"100000": 1}), "logit_bias"),
    ("completions", dict(logit_bias={"5": 101}), "logit_bias"),
    ("completions", dict(extra_body={"logprobs_mode": "softmax"}), "logprobs_mode"),
    ("chat", dict(top_logprobs=2), "top_logprobs"),
    ("chat", dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("completions", dict(extra_body={"suffix": "!"}), "suffix"),  # still not supported: named
])
def test_bad_logprobs_fields_are_a_400_naming_the_field(client, endpoint, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, **kwargs)
        else:
            client.completions.create(model=MODEL_NAME, prompt="The engine", **kwargs)
    assert info.value.body["param"] == param
