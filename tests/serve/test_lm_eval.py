"""lm-evaluation-harness, unmodified, scores the server like lm-eval's own Hugging Face model.

Its `local-completions` model sends each (context, continuation) as token ids with `echo=true,
max_tokens=1, logprobs=1` and sums the continuation's `token_logprobs`; its `hf` model runs
transformers on the same directory. On the project's small multiple-choice task
(tests/data/lm_eval/, local files: no hub), both give the same accuracy, and every choice's
log-likelihood agrees within 1e-3 (float32, CPU), with the same "is greedy" answer.
"""

from __future__ import annotations

import pytest

from tests.serve.conftest import API_KEY, MODEL_NAME, ROOT, in_server_group

pytestmark = in_server_group

TASK = "minivllm_tiny_mc"
TASK_DIR = ROOT / "tests" / "data" / "lm_eval"


def evaluate(model: str, model_args: dict) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=[TASK], batch_size=8,
                           task_manager=TaskManager(include_path=str(TASK_DIR)), log_samples=True)


def per_choice(results: dict) -> dict[int, list[tuple[float, bool]]]:
    """doc id -> (log-likelihood, is greedy) of each of its choices."""
    return {s["doc_id"]: [tuple(r[0]) for r in s["resps"]] for s in results["samples"][TASK]}


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """lm-eval reads the task's data file relative to the working directory; nothing may go to
    the network; its caches go to a temporary directory."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # local-completions sends it as the bearer token
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_lm_eval_scores_the_server_like_its_hf_model(server, serve_model, offline_env):
    # The two lm-eval models differ in one default: `hf` lets the tokenizer add its BOS token,
    # `local-completions` does not. add_bos_token=True makes both send the same token ids.
    ours = evaluate("local-completions", {
        "model": MODEL_NAME, "base_url": f"{server.url}/v1/completions", "add_bos_token": True,
        "tokenizer_backend": "huggingface", "tokenizer": str(serve_model), "max_retries": 1})
    reference = evaluate("hf", {"pretrained": str(serve_model), "dtype": "float32", "device": "cpu",
                                "add_bos_token": True})

    ours_scores, reference_scores = per_choice(ours), per_choice(reference)
    assert len(ours_scores) == 16 and ours_scores.keys() == reference_scores.keys()
    for doc_id, choices in reference_scores.items():
        assert len(ours_scores[doc_id]) == len(choices) == 4
        for (ll, greedy), (ref_ll, ref_greedy) in zip(ours_scores[doc_id], choices):
            assert ll == pytest.approx(ref_ll, abs=1e-3), doc_id
            assert greedy == ref_greedy, doc_id
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][TASK][metric] == reference["results"][TASK][metric]
