"""Structured output on the engine: every output is what was asked for, whatever the scheduling.

A random-weight model only ends its output where the grammar forces it to, so the grammars here
are finite (enums, booleans, bounded integers, strings and arrays). The oracles: `jsonschema` for
JSON, `re.fullmatch` for regexes, the list for choices, and, for greedy decoding, transformers'
logits restricted by hand to the tokens that keep the text a prefix of a choice. Preemption,
prefix caching, overlap on and off, n > 1 and aborts change nothing. The engine fuzz test
(test_engine_fuzz.py) mixes structured requests into random workloads as well.
"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.engine.structured_output import Grammars
from minivllm.sampling_params import StructuredOutputsParams
from tests.engine.conftest import random_prompts
from tests.engine.test_robustness import assert_clean, fail_on_call

# Short names, short values: every step of these tests is a forward pass of the reference
# attention on the CPU.
SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"enum": ["yes", "no"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "t": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
        "s": {"type": "string", "maxLength": 2},
    },
    "required": ["a", "n", "t", "s"],
}
ENGINE = dict(dtype="float32", attention_backend="torch", block_size=4, max_model_len=128)


def hold_compiles(monkeypatch) -> threading.Event:
    """Make every grammar compile wait (on its grammar thread) until the returned event is set:
    a compile as slow as the test needs, with no timing in it."""
    compile_, release = Grammars._compile, threading.Event()

    def held(compiler, spec):
        assert release.wait(120), "the test never released the grammar compile"
        return compile_(compiler, spec)

    monkeypatch.setattr(Grammars, "_compile", staticmethod(held))
    return release


def structured(max_tokens=80, **kwargs) -> dict:
    """SamplingParams keywords: the spec's fields go to StructuredOutputsParams."""
    spec = {k: kwargs.pop(k) for k in ("json", "regex", "choice", "grammar", "json_object") if k in kwargs}
    return dict(max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(**spec), **kwargs)


@pytest.fixture(scope="module")
def model(model_dir):
    return str(model_dir("qwen3"))


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model, **ENGINE)


def completions(outputs):
    return [c for o in outputs for c in o.outputs]


def test_sampled_json_validates_for_every_sample(llm):
    prompts = random_prompts([3, 17], seed=2)
    outputs = llm.generate(prompts, use_tqdm=False, **structured(json=SCHEMA, n=3, temperature=1.0, seed=1))
    eos = llm.engine.eos_token_ids
    for c in completions(outputs):
        assert c.finish_reason == "stop" and c.token_ids[-1] in eos, c
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len({c.text for c in completions(outputs)}) > 1  # sampled, not one answer repeated


def test_regex_choice_and_grammar(llm):
    prompts = random_prompts([4, 11], seed=3)
    cases = [
        (dict(regex=r"[a-f]{2}-\d{2,3}"), lambda text: re.fullmatch(r"[a-f]{2}-\d{2,3}", text)),
        (dict(choice=["the fox", "a cache", "blocks", "block"]), lambda text: text in {"the fox", "a cache", "blocks", "block"}),
        (dict(grammar='root ::= ("on" | "off") " " [0-9] [0-9]?'), lambda text: re.fullmatch(r"(on|off) \d\d?", text)),
    ]
    for spec, check in cases:
        for c in completions(llm.generate(prompts, use_tqdm=False, **structured(**spec, n=4, temperature=1.5, seed=0))):
            assert c.finish_reason == "stop" and check(c.text), (spec, c.text)


def test_json_object_starts_an_object_and_parses_where_it_ends(llm):
    # "any JSON object" has no bound, so a random model may well run into max_tokens.
    for c in completions(llm.generate(random_prompts([5], seed=4), use_tqdm=False,
                                      **structured(json_object=True, max_tokens=40, n=4, temperature=1.0, seed=3))):
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)


def test_greedy_choice_equals_the_hf_argmax_over_the_allowed_tokens(model, llm):
    """The oracle knows nothing of xgrammar: at each step the allowed tokens are those whose text
    keeps the output a prefix of a choice (EOS once it is a choice), special tokens never."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokenizer = llm.engine.tokenizer
    eos = min(llm.engine.eos_token_ids)
    choices = ["the fox", "a cache", "blocks", "block", "x"]
    pieces = [tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in range(hf.config.vocab_size)]
    special = set(tokenizer.all_special_ids)
    for prompt in random_prompts([3, 8, 13, 21], seed=5):
        ids, text = list(prompt), ""
        while True:
            with torch.no_grad():
                logits = hf(torch.tensor([ids])).logits[0, -1]
            allowed = [t for t, piece in enumerate(pieces) if t not in special and piece
                       and any(c.startswith(text + piece) for c in choices)]
            allowed += [eos] if text in choices else []
            token = allowed[int(logits[allowed].argmax())]
            ids.append(token)
            if token == eos:
                break
            text += pieces[token]
        (out,) = llm.generate([prompt], use_tqdm=False, **structured(choice=choices, temperature=0))
        assert out.outputs[0].token_ids == ids[len(prompt):] and out.outputs[0].text == text


def test_overlap_on_and_off_give_the_same_tokens(model):
    prompts = random_prompts([6, 14, 2], seed=6)
    params = [SamplingParams(**structured(json=SCHEMA, n=2, temperature=1.0, seed=9)),
              SamplingParams(**structured(regex=r"[xyz]{3,6}", temperature=0)),
              SamplingParams(max_tokens=12, temperature=0.8, seed=4)]  # an unstructured one beside
    runs = [[c.token_ids for c in completions(LLM(model, async_scheduling=overlap, **ENGINE)
                                              .generate(prompts, params, use_tqdm=False))]
            for overlap in (True, False)]
    assert runs[0] == runs[1]


@pytest.mark.filterwarnings("ignore:the KV pool")  # tiny on purpose
def test_preemption_and_prefix_caching_keep_each_sample_on_its_grammar(model):
    """A pool too small for the batch: sequences are preempted and recomputed with their grammar
    state kept, prompts share cached blocks, and the n samples of a request draw apart. Seeded
    sampling gives the tokens of an engine with room for everything."""
    shared = random_prompts([9], seed=7)[0]
    prompts = [shared + tail for tail in random_prompts([2, 5], seed=8)]
    params = SamplingParams(**structured(json=SCHEMA, n=2, temperature=1.0, seed=5))
    roomy = LLM(model, **ENGINE).generate(prompts, params, use_tqdm=False)
    tight = LLM(model, num_kv_blocks=24, max_num_batched_tokens=32, max_num_seqs=6, enable_prefix_caching=True,
                **ENGINE)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    stats = tight.engine.get_stats()
    assert stats["scheduler"]["num_preemptions"] > 0, "the pool was meant to force preemptions"
    assert stats["kv_cache"]["prefix_cache_hit_tokens"] > 0, "the shared prefix was meant to hit"
    assert [c.token_ids for c in completions(outputs)] == [c.token_ids for c in completions(roomy)]
    for c in completions(outputs):
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert tight.engine.block_manager.num_free_blocks == tight.engine.block_manager.num_blocks


def test_abort_releases_the_matchers_and_the_blocks(llm):
    engine = llm.engine
    request_id = engine.add_request(random_prompts([7], seed=9)[0],
                                    SamplingParams(**structured(json=SCHEMA, n=3, temperature=1.0)))
    for _ in range(3):
        engine.step()
    seqs = engine._unfinished[request_id].seqs
    assert len(seqs) == 3 and all(s.grammar is not None for s in seqs)
    assert len({id(s.grammar.matcher) for s in seqs}) == 3  # one matcher per sample
    engine.abort(request_id)
    assert all(s.grammar is None for s in seqs)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_request_waits_for_its_grammar_outside_the_scheduler(llm, monkeypatch):
    """`prepare_request` starts the compile and returns: the engine steps the other requests to
    their end meanwhile, and an abort ends the waiting request (both samples) with nothing held.
    Then, released, a compile's result is what the synchronous path gives."""
    engine = llm.engine
    release = hold_compiles(monkeypatch)
    prompt, other = random_prompts([7, 5], seed=16)
    params = SamplingParams(**structured(json=SCHEMA, n=2, temperature=1.0, seed=5))
    prepared = engine.prepare_request(prompt, params)
    plain = engine.add_request(other, SamplingParams(max_tokens=6, temperature=0))
    assert engine.num_waiting == 2 and engine.get_stats()["engine"]["num_waiting"] == 2
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.get_output(plain).finished and not prepared.ready()
    assert engine.num_waiting == 1  # the structured request, still compiling, is counted as waiting
    aborted = engine.abort(prepared.request_id)
    assert [(c.finish_reason, c.token_ids) for c in aborted.outputs] == [("abort", [])] * 2
    assert prepared.ready() and engine.abort(prepared.request_id) is None
    engine.add_prepared(prepared)  # aborted meanwhile: nothing is queued
    assert not engine.has_unfinished_requests() and not engine._prepared and engine.num_waiting == 0

    release.set()
    again = engine.prepare_request(prompt, params)
    engine.add_prepared(again)  # waits for the compile
    while engine.has_unfinished_requests():
        engine.step()
    monkeypatch.undo()
    want = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.token_ids for c in engine.get_output(again.request_id).outputs] == [c.token_ids for c in want.outputs]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_processed_logprobs_are_of_the_masked_distribution(llm):
    """logprobs_mode="processed" reports the distribution sampled from, the grammar's mask
    included: at every position each reported token is allowed there or -inf, and the chosen
    token is at least as likely as in the model's own ("raw") distribution, more where the mask
    took probability away. The mode changes no token."""
    spec = StructuredOutputsParams(choice=["the fox", "a cache", "blocks", "block"])
    prompts = random_prompts([6, 13], seed=15)
    runs = {mode: completions(llm.generate(prompts, use_tqdm=False, **structured(
        choice=spec.choice, temperature=1.0, seed=3, n=2, logprobs=5, logprobs_mode=mode)))
        for mode in ("raw", "processed")}
    assert [c.token_ids for c in runs["raw"]] == [c.token_ids for c in runs["processed"]]
    gained = 0.0
    for raw, processed in zip(runs["raw"], runs["processed"]):
        for i, token in enumerate(processed.token_ids):
            allowed = allowed_after_tokens(llm.engine, spec, processed.token_ids[:i])
            assert allowed[token]
            for t, entry in processed.logprobs[i].items():
                assert allowed[t] or entry.logprob == float("-inf"), (i, t, entry)
            assert processed.logprobs[i][token].logprob >= raw.logprobs[i][token].logprob - 1e-5
            gained += processed.logprobs[i][token].logprob - raw.logprobs[i][token].logprob
    assert gained > 1.0  # the mask moved real probability onto the allowed tokens


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_a_failure_between_forward_and_sampling_strands_nothing(model, monkeypatch, overlap):
    """The second half of a structured step (the bitmask, the sampling) raising fails that step's
    requests like any failed step: blocks freed, matchers dropped, the engine usable after."""
    llm = LLM(model, async_scheduling=overlap, **ENGINE)
    prompts = random_prompts([5, 9], seed=14)
    params = SamplingParams(**structured(json=SCHEMA, n=2, temperature=0))
    expected = llm.generate(prompts, params, use_tqdm=False)
    fail_on_call(monkeypatch, llm.engine.executor.runner, "sample", call=4)
    with pytest.raises(RuntimeError, match="injected failure"):
        llm.generate(prompts, params, use_tqdm=False)
    assert_clean(llm)
    assert all(s.grammar is None for r in llm.engine._finished.values() for s in r.seqs)
    monkeypatch.undo()
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [c.token_ids for c in completions(again)] == [c.token_ids for c in completions(expected)]


@pytest.mark.parametrize("spec, field", [
    (dict(json={"type": "nonsense"}), "structured_outputs.json"),
    (dict(json={"type": "object", "properties": 5}), "structured_outputs.json"),
    (dict(regex="(a"), "structured_outputs.regex"),
    (dict(grammar="root ::= undefined_rule"), "structured_outputs.grammar"),
])
def test_what_cannot_compile_is_refused_at_the_door(llm, spec, field):
    good = SamplingParams(**structured(choice=["a"]))
    bad = SamplingParams(**structured(**spec))
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.engine.add_requests([[5, 6], [7, 8]], [good, bad])
    assert not llm.engine.has_unfinished_requests()  # all or none: the good one is not queued either


def test_steps_without_structured_rows_do_no_grammar_work(model, monkeypatch):
    """Only the steps that sample a structured row fill a bitmask, and they alone spend host time
    on it: none before the first structured request, none after its last."""
    llm = LLM(model, **ENGINE)
    filled = []
    monkeypatch.setattr(Grammars, "bitmask", lambda self, sampled, rows, fill=Grammars.bitmask:
                        filled.append(list(rows)) or fill(self, sampled, rows))
    llm.generate(random_prompts([5, 9], seed=10), max_tokens=8, use_tqdm=False)
    assert not filled and all(r.timings.grammar == 0 for r in llm.engine.stats.history)
    params = [SamplingParams(**structured(choice=["x", "y"], temperature=0)),  # done in a few steps
              SamplingParams(max_tokens=30, temperature=0)]
    llm.generate(random_prompts([4, 4], seed=11), params, use_tqdm=False)
    records = list(llm.engine.stats.history)[-30:]
    assert filled and all(rows for rows in filled)
    assert len(filled) == sum(1 for r in records if r.timings.grammar > 0)
    assert sum(1 for r in records if r.timings.grammar == 0) > 20  # the unstructured tail


@pytest.fixture(scope="module")
def padded_model(tmp_path_factory):
    """A model with 600 embedding rows and a tokenizer of 512 tokens (padded vocabulary)."""
    from minivllm.models import make_random_model
    from minivllm.models.toy_tokenizer import save_tokenizer

    path = make_random_model(tmp_path_factory.mktemp("padded"), arch="qwen3", size="tiny", seed=1,
                             overrides={"vocab_size": 600})
    save_tokenizer(path, 512, 512)
    return str(path)


def allowed_after(engine, spec: StructuredOutputsParams, text: str) -> list[int]:
    """0/1 per token id: may it come next, once the output is `text` (as the tokenizer splits it)?"""
    return allowed_after_tokens(engine, spec, engine.tokenizer(text, add_special_tokens=False).input_ids)


def allowed_after_tokens(engine, spec: StructuredOutputsParams, tokens: list[int]) -> list[int]:
    """0/1 per token id: may it come next, once the output is `tokens`?"""
    grammar = engine._grammars.grammar(spec).result()
    for token in tokens:
        grammar.accept(token)

    class Seq:  # what `bitmask` reads of a sequence
        pass

    seq = Seq()
    seq.grammar = grammar
    words = engine._grammars.bitmask([seq], [0])[0]
    return [(int(words[t // 32]) >> (t % 32)) & 1 for t in range(engine.vocab_size)]


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes of every token of a byte-level BPE vocabulary, where each byte is written as one
    printable character: the printable ones as themselves, the other 68 as chr(256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    return [bytes(to_byte[c] for c in token) for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]


def test_json_strings_take_neither_control_characters_nor_broken_utf8(llm):
    """Inside a JSON string, bounded or not, no token may bring a raw control character (JSON
    wants it escaped) or a byte that can never start a UTF-8 character (0x80-0xC1, 0xF5-0xFF)."""
    raw = token_bytes(llm.engine.tokenizer)
    for schema in ({"type": "string", "maxLength": 3}, {"type": "string"}):
        allowed = allowed_after(llm.engine, StructuredOutputsParams(json=schema), '"')
        inside = [raw[t] for t in range(len(raw)) if allowed[t]]
        assert len(inside) > 300, schema  # most of the vocabulary is fine in a string
        assert not [b for b in inside if min(b) < 0x20 or 0x80 <= b[0] <= 0xC1 or b[0] >= 0xF5], schema


def test_padding_rows_and_special_tokens_are_never_allowed(padded_model):
    llm = LLM(padded_model, **ENGINE)
    assert llm.engine.vocab_size == 600 and len(llm.engine.tokenizer) == 512
    # Inside a string almost anything goes.
    allowed = allowed_after(llm.engine, StructuredOutputsParams(json={"type": "string"}), '"')
    assert sum(allowed[4:512]) > 300
    assert not any(allowed[512:]) and not any(allowed[t] for t in llm.engine.tokenizer.all_special_ids)
    eos = llm.engine.eos_token_ids
    outputs = llm.generate(random_prompts([5], seed=12), use_tqdm=False,
                           **structured(json=SCHEMA, n=2, temperature=1.0, seed=2))
    for c in completions(outputs):
        assert all(4 <= t < 512 for t in c.token_ids[:-1]) and c.token_ids[-1] in eos
        jsonschema.validate(json.loads(c.text), SCHEMA)


@pytest.mark.gpu
def test_on_cuda_graphs_and_overlap_give_the_cpu_tokens(model):
    """On a GPU: the forward replays CUDA graphs, the bitmask goes up from pinned memory and the
    sampling is launched after the forward; greedy structured tokens equal the CPU engine's."""
    prompts = random_prompts([5, 12, 3, 20], seed=13)
    params = [SamplingParams(**structured(json=SCHEMA, temperature=0)),
              SamplingParams(**structured(regex=r"[a-f]{3}\d{1,2}", temperature=0)),
              SamplingParams(**structured(choice=["the fox", "a cache", "blocks"], temperature=0, n=2)),
              SamplingParams(max_tokens=16, temperature=0)]
    cpu = LLM(model, **ENGINE).generate(prompts, params, use_tqdm=False)
    gpu_llm = LLM(model, dtype="float32", device="cuda", block_size=16, max_model_len=128)
    gpu = gpu_llm.generate(prompts, params, use_tqdm=False)
    assert [c.token_ids for c in completions(gpu)] == [c.token_ids for c in completions(cpu)]
    assert gpu_llm.engine.get_stats()["scheduler"]["num_graph_steps"] > 0


def test_structured_requests_decode_one_token_a_step_beside_speculating_ones(model, llm):
    """With n-gram speculation on, a structured request takes no drafts (they would need the
    grammar's bitmask at every verified position) while its neighbour in the batch speculates:
    the structured output validates and is greedy's without speculation, the neighbour's too."""
    from tests.engine.test_speculative_decoding import repetitive_prompts

    prompts = repetitive_prompts(2, seed=1)  # prompt lookup finds drafts for both
    params = [SamplingParams(**structured(json=SCHEMA, temperature=0)),
              SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)]
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    speculating = LLM(model, speculative_config=ngram, **ENGINE)
    got = speculating.generate(prompts, params, use_tqdm=False)
    assert speculating.engine.get_stats()["speculative"]["num_accepted_tokens"] > 0
    jsonschema.validate(json.loads(got[0].outputs[0].text), SCHEMA)
    expected = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
