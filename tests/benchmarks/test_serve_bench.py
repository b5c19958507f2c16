"""benchmarks/serve_bench.py on the CPU: a tiny run end to end (offline baseline, a real server,
a Poisson rate and all-at-once, each with every request mix), its JSON and table checked; the
frontend alone against a token fountain. On a GPU machine the benchmark itself is the test."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from benchmarks import serve_bench
from minivllm import SamplingParams
from minivllm.entrypoints.logprobs import TokenTexts, completion_logprobs


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run the benchmark")
def test_serve_bench_smoke(tmp_path, model_cache, capsys):
    out = tmp_path / "serve.json"
    record = serve_bench.main(["--device", "cpu", "--client-processes", "2", "--model-cache", str(model_cache),
                               "--extra-body", '{"top_p": 1.0}', "--mixes", "plain,json,logprobs",
                               "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(record, default=str))
    assert saved["bench"] == "serve_bench" and saved["args"]["extra_body"] == {"top_p": 1.0}
    offline, *served = saved["results"]
    assert offline["backend"] == "offline LLM.generate"
    assert offline["all_requests_complete"] and offline["num_requests"] == 4
    # The mixes take turns at each rate.
    assert [(r["rate"], r["mix"]) for r in served] == [(rate, mix) for rate in (16.0, "inf")
                                                       for mix in ("plain", "json", "logprobs")]
    for r in served:
        assert r["failed_requests"] == 0 and r["errors"] == []  # the extra fields were accepted
        # Every request produced exactly its requested length, as offline: the JSON schema's
        # endless string keeps each structured request going to its max_tokens.
        assert r["num_output_tokens"] == offline["num_output_tokens"]
        assert r["num_prompt_tokens"] == offline["num_prompt_tokens"]
        for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
            assert 0 <= r[key]["p50"] <= r[key]["p90"] <= r[key]["p99"] and r[key]["p99"] > 0
        assert r["ttft_s"]["p99"] <= r["e2e_s"]["p99"] and r["output_tokens_per_s"] > 0
        # Every token of the toy tokenizer decodes to text; chunks merge only when a client lags.
        assert 1.0 <= r["tokens_per_text_chunk"] <= r["num_output_tokens"] / r["num_requests"]
        assert r["api_server_count"] == 1 and r["frontend_processes"] == 1 and r["frontend_cpu_s"] >= 0
    summary = saved["summary"]
    ratio = served[3]["output_tokens_per_s"] / offline["output_tokens_per_s"]
    assert math.isclose(summary["ratio_vs_offline"], ratio) and summary["failed_requests"] == 0
    assert summary["ratios_vs_offline"] == [summary["ratio_vs_offline"]]  # one all-at-once wave
    assert summary["ttft_p99_at_16_s"] == served[0]["ttft_s"]["p99"]
    tok_s = {(r["rate"], r["mix"]): r["output_tokens_per_s"] for r in served}
    assert summary["mix_ratios"] == {mix: {str(rate): [pytest.approx(tok_s[rate, mix] / tok_s[rate, "plain"])]
                                           for rate in (16.0, "inf")} for mix in ("json", "logprobs")}
    assert saved["minivllm_server_exit_code"] == 0  # SIGTERM stopped it cleanly
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == saved["note"] and any(line.startswith("offline LLM.generate") for line in lines)
    assert any(line.startswith(f"server at 'inf' / offline LLM.generate: {ratio:.3f}") for line in lines)
    assert any(line.startswith("json / plain at rate inf: ") for line in lines)


def test_the_frontend_alone_against_a_token_fountain(tmp_path, model_cache):
    """The real server with a token fountain for an engine, one frontend and then two, every
    request answered in full. No timing is asserted."""
    out = tmp_path / "fountain.json"
    record = serve_bench.main(["--device", "cpu", "--fountain-step-ms", "0", "--api-server-count", "1,2",
                               "--num-requests", "6", "--input-len", "4", "--output-len", "5", "--rates", "inf",
                               "--client-processes", "1", "--model-cache", str(model_cache), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(record, default=str)) and "token fountain" in saved["note"]
    assert saved["args"]["model_config"] == "qwen3-small"  # the fountain's default: a 2k context
    assert [r["api_server_count"] for r in saved["results"]] == [1, 2]  # no offline baseline
    for row, processes in zip(saved["results"], (1, 2)):
        assert row["frontend_processes"] == processes  # the frontends were found and measured
        assert row["failed_requests"] == 0 and row["num_output_tokens"] == 6 * 5
        # CPU time is read in clock ticks (10 ms): a wave this small may read 0, never less
        assert row["frontend_cpu_s"] >= 0 and 0 <= row["busiest_frontend_core_share"]
        assert 1.0 <= row["tokens_per_text_chunk"] <= 5
    assert saved["minivllm_server_exit_code"] == 0 and saved["summary"]["ratio_vs_offline"] is None


def test_the_fountain_gives_records_to_the_requests_that_ask_for_logprobs(tmp_path, monkeypatch):
    """A greedy engine's records, one per token: the token first in its top k, rank 1, its value
    the top-1's; none for a request that did not ask. The frontend formats them (entrypoints/logprobs.py)."""
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 100}))
    monkeypatch.setenv(serve_bench.FOUNTAIN_ENV, "0")
    fountain = serve_bench.TokenFountain(SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4),
                                                         model_config=SimpleNamespace(model=str(tmp_path))))
    fountain.prepare_request([1, 2], SamplingParams(max_tokens=2, logprobs=3), "asks")
    fountain.prepare_request([1, 2], SamplingParams(max_tokens=2), "plain")
    for _ in range(2):
        asks, plain = (o.outputs[0] for o in fountain.step())
        (token_id,), (record,) = asks.token_ids, asks.logprobs
        assert plain.logprobs is None and 0 <= token_id < 100
        assert record[:3] == (token_id, record[4][0], 1) and record[3][0] == token_id and len(set(record[3])) == 3
        assert all(0 <= t < 100 for t in record[3]) and list(record[4]) == sorted(record[4], reverse=True)
        text, _ = completion_logprobs(asks.token_ids, asks.logprobs, TokenTexts(None))
        assert json.loads(text)["token_logprobs"] == [record[1]]
    assert not fountain.has_unfinished_requests()


def test_poisson_arrivals_have_the_asked_rate():
    delays = serve_bench.arrival_delays(4000, rate=16.0, seed=0)
    assert delays == sorted(delays) and delays[0] > 0
    assert 15.0 < len(delays) / delays[-1] < 17.0  # mean gap 1/16 s
    assert serve_bench.arrival_delays(3, math.inf, 0) == [0.0, 0.0, 0.0]


def test_bad_arguments_are_refused():
    for argv in (["--rates", "0,inf"], ["--rates", "fast"], ["--backends", "vllm"], ["--input-len", "9:3"],
                 ["--extra-body", "[1]"], ["--mixes", "plain,xml"], ["--mixes", "json,json"],
                 ["--api-server-count", "0"], ["--api-server-count", "x"], ["--fountain-step-ms", "-1"],
                 ["--fountain-step-ms", "8", "--backends", "minivllm,transformers"],
                 ["--url", "http://127.0.0.1:1", "--api-server-count", "1,2"]):
        with pytest.raises(SystemExit):
            serve_bench.parse_args(["--device", "cpu", *argv])


def test_an_sse_stream_is_read_as_the_client_sees_it():
    result = serve_bench.Result(sent=0.0)
    events = [b'data: {"choices": [{"index": 0, "text": "He", "finish_reason": null}]}',
              b'data: {"choices": [{"index": 0, "text": "", "finish_reason": null}]}',
              b'data: {"choices": [{"index": 0, "text": "llo", "finish_reason": "length"}]}',
              b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}',
              b"data: [DONE]"]
    ended = [serve_bench._read_event(e, result, now) for e, now in zip(events, (0.5, 0.6, 0.9, 0.9, 0.9))]
    assert ended == [False, False, True, False, True]
    result.end = 1.0
    assert result.chunk_times == [0.5, 0.9] and (result.prompt_tokens, result.output_tokens) == (3, 4)
    metrics = result.metrics()
    assert metrics["ttft"] == 0.5 and metrics["e2e"] == 1.0 and metrics["itl"] == pytest.approx([0.4])
    assert metrics["tpot"] == pytest.approx((1.0 - 0.5) / 3)
    error = serve_bench.Result()
    serve_bench._read_event(b'data: {"error": {"message": "boom"}}', error, 0.1)
    assert "boom" in error.error


def test_text_prompts_encode_back_to_their_drawn_length(tmp_path):
    """The transformers-serve comparison sends text. Random ids of the toy tokenizer include its
    filler tokens, whose text encodes back as several tokens: without the cut, prompts grew past
    the model's context and the servers refused them (a GPU run saw 25 of 32 refused)."""
    from transformers import AutoTokenizer

    from minivllm.models import make_random_model

    model_dir = make_random_model(tmp_path / "m", arch="qwen3", size="tiny", seed=0)
    args = serve_bench.parse_args(["--device", "cpu"])
    args.hf_num_requests, args.input_range = 6, (40, 60)
    texts, out_lens = serve_bench.text_workload(model_dir, args)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    assert len(texts) == len(out_lens) == 6
    # Decoding and encoding again may merge a pair at the cut, never grow the prompt much.
    assert all(30 <= n <= 62 for n in lengths), lengths
