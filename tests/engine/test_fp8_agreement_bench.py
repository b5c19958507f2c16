"""benchmarks/fp8_agreement.py on CPU: the measurement is right (auto vs auto is exact, the
teacher-forced pass reproduces each engine's own greedy tokens) and fp8 shows a real, bounded error."""

import math

import pytest
import torch

from benchmarks.fp8_agreement import main, make_llm, parse_args, teacher_forced_logits
from benchmarks.hf_agreement import greedy_tokens

SMOKE = ["--model-configs", "tiny", "--num-prompts", "2", "--prompt-len", "8:24", "--max-tokens", "8"]


def test_the_same_cache_dtype_twice_agrees_exactly_and_its_logits_are_identical(tmp_path):
    payload = main([*SMOKE, "--compare", "auto,auto", "--out", str(tmp_path / "same.json")])
    (row,) = payload["rows"]
    assert row["exact"] == 1.0 and row["prefix"] == 1.0 and row["common_prefix_lengths"] == [8, 8]
    assert row["mean_abs_diff"] == 0.0 and row["max_abs_diff"] == 0.0 and row["argmax_agreement"] == 1.0
    # The teacher-forced pass feeds the reference its own greedy tokens: its argmax must give them back.
    assert row["reference_matches_greedy"] == 1.0 and row["num_positions"] == 2 * 8
    assert row["mean_abs_logit"] > 0 and row["mean_top2_margin"] > 0


def test_fp8_against_the_model_dtype_differs_but_within_e4m3_rounding(tmp_path):
    out = tmp_path / "fp8.json"
    payload = main([*SMOKE, "--out", str(out)])
    assert out.is_file() and payload["device_type"] == "cpu" and payload["torch"] == torch.__version__
    (row,) = payload["rows"]
    assert row["kv_cache_dtypes"] == {"reference": "auto", "test": "fp8"} and row["dtype"] == "float32"
    assert len(row["prompt_lens"]) == 2 and all(8 <= n <= 24 for n in row["prompt_lens"])
    stats = [row[k] for k in ("mean_abs_diff", "max_token_abs_diff", "max_abs_diff", "relative_abs_diff")]
    assert all(math.isfinite(x) for x in stats)
    # fp8 rounds every K and V, so the logits must move; e4m3's 3 mantissa bits cost a few percent
    # of attention's output (docs/fp8_kv_cache.md), not tens: a cache read wrongly (unwritten
    # slots, missing scales) would be far off.
    assert 0 < row["mean_abs_diff"] <= row["max_token_abs_diff"] <= row["max_abs_diff"]
    assert 1e-4 < row["relative_abs_diff"] < 0.2
    assert row["reference_matches_greedy"] == 1.0
    assert 0 <= row["argmax_agreement"] <= 1 and 0 <= row["exact"] <= row["prefix"] <= row["first_token"] <= 1


def test_the_teacher_forced_pass_reads_the_fp8_cache_as_generation_does(model_dir):
    # Fed its own greedy continuation, an fp8 engine's teacher-forced argmax must be that
    # continuation: the pass goes through the same fp8 cache as generation, not around it.
    args = parse_args([*SMOKE, "--compare", "fp8,fp8"])
    llm = make_llm(model_dir("llama"), "fp8", torch.float32, args)
    prompts = [[5, 9, 13, 200, 17, 42, 7, 8, 99, 100, 31], [300, 12, 4, 77, 18]]
    tokens = greedy_tokens(llm, prompts, 8)
    logits = teacher_forced_logits(llm, prompts, tokens)
    assert logits.shape == (2, 8, llm.engine.model_runner.vocab_size)
    assert logits.argmax(-1).tolist() == tokens


@pytest.mark.parametrize("flags, name", [(["--compare", "auto,int8"], "--compare"),
                                         (["--compare", "fp8"], "--compare"),
                                         (["--model-configs", "huge"], "--model-configs"),
                                         (["--max-tokens", "0"], "--max-tokens"),
                                         (["--prompt-len", "9:3"], "--prompt-len")])
def test_bad_arguments_are_refused_naming_them(flags, name):
    with pytest.raises(ValueError, match=name):
        parse_args(flags)
