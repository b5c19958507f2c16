"""lm-evaluation-harness, unmodified, scores the server like lm-eval's own Hugging Face model.

Its `local-completions` model sends each (context, continuation) as token ids with `echo=true,
max_tokens=1, logprobs=1` and sums the continuation's `token_logprobs`; its `hf` model runs
transformers on the same directory. On the project's small multiple-choice task
(tests/data/lm_eval/, local files: no hub), both give the same accuracy, and every choice's
log-likelihood agrees within 1e-3 (float32, CPU), with the same "is greedy" answer: on the tiny
random model, and on the real one (SmolLM2-135M-Instruct), whose answers mean something.
"""

from __future__ import annotations

import pytest

from tests.serve.conftest import API_KEY, MODEL_NAME, ROOT, healthy_server, in_server_group

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


def assert_scores_like_hf(url: str, model_dir, add_bos_token: bool) -> dict:
    """lm-eval's `local-completions` on the server at `url` against its `hf` model on `model_dir`:
    the same per-choice log-likelihoods (1e-3), greedy answers and accuracies. Returns ours.

    add_bos_token: given to both lm-eval models, chosen per tokenizer so that both score the
    same token ids (lm-eval's two models treat a missing BOS differently; see the tests)."""
    ours = evaluate("local-completions", {
        "model": MODEL_NAME, "base_url": f"{url}/v1/completions", "add_bos_token": add_bos_token,
        "tokenizer_backend": "huggingface", "tokenizer": str(model_dir), "max_retries": 1})
    reference = evaluate("hf", {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu",
                                "add_bos_token": add_bos_token})

    ours_scores, reference_scores = per_choice(ours), per_choice(reference)
    assert len(ours_scores) == 16 and ours_scores.keys() == reference_scores.keys()
    for doc_id, choices in reference_scores.items():
        assert len(ours_scores[doc_id]) == len(choices) == 4
        for (ll, greedy), (ref_ll, ref_greedy) in zip(ours_scores[doc_id], choices):
            assert ll == pytest.approx(ref_ll, abs=1e-3), doc_id
            assert greedy == ref_greedy, doc_id
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][TASK][metric] == reference["results"][TASK][metric]
    return ours


def test_lm_eval_scores_the_server_like_its_hf_model(server, serve_model, offline_env):
    # By default `hf` lets the tokenizer add its BOS token, `local-completions` does not:
    # add_bos_token=True makes both send it.
    assert_scores_like_hf(server.url, serve_model, add_bos_token=True)


def test_lm_eval_scores_the_real_model_like_its_hf_model(smollm2, offline_env, tmp_path):
    with healthy_server(smollm2, "--api-key", API_KEY, "--kv-cache-memory-bytes", "32MiB", log_dir=tmp_path) as server:
        # SmolLM2's tokenizer adds no BOS token. Asked for one, lm-eval's `hf` model prepends
        # <|im_start|> itself and `local-completions` sends none (scores of -9.63 against -8.08
        # for the first choice), so both go without.
        ours = assert_scores_like_hf(server.url, smollm2, add_bos_token=False)
    # A trained model knows most of these answers; random weights would be near chance (0.25).
    # (11 of 16, acc_norm 12 of 16, on 2026-12-06: both lm-eval models agree.)
    assert ours["results"][TASK]["acc,none"] >= 0.5
