"""benchmarks/agreement.py on the CPU: the measurements are right where the answer is known
(float32 equals HF; an engine against itself agrees exactly with identical logits; the
teacher-forced pass reproduces greedy tokens), and fp8 shows a real, bounded error."""

import math

import pytest
import torch

from benchmarks import agreement
from benchmarks.common import build_model

SMALL = ["--device", "cpu", "--model-configs", "tiny", "--num-prompts", "2", "--prompt-len", "8:24",
         "--max-tokens", "8"]


def test_float32_agrees_with_hf_generate_exactly(tmp_path, model_cache):
    record = agreement.main(["hf", *SMALL, "--dtypes", "float32", "--model-cache", str(model_cache),
                             "--out", str(tmp_path / "hf.json")])
    (row,) = record["results"]
    assert (row["model"], row["dtype"], row["num_prompts"]) == ("tiny", "float32", 2)
    assert row["exact"] == row["prefix"] == row["first_token"] == 1.0
    assert (tmp_path / "hf.json").is_file() and record["bench"] == "agreement"


def test_an_engine_against_itself_agrees_exactly_with_identical_logits(tmp_path, model_cache):
    record = agreement.main(["engine", *SMALL, "--test", "", "--model-cache", str(model_cache),
                             "--out", str(tmp_path / "same.json")])
    (row,) = record["results"]
    assert row["exact"] == 1.0 and row["common_prefix_lengths"] == [8, 8]
    assert row["mean_abs_diff"] == row["max_abs_diff"] == 0.0 and row["argmax_agreement"] == 1.0
    # Fed the reference's own greedy tokens, its teacher-forced argmax must give them back.
    assert row["reference_matches_greedy"] == 1.0 and row["mean_top2_margin"] > 0


def test_fp8_against_the_model_dtype_differs_but_within_e4m3_rounding(tmp_path, model_cache):
    record = agreement.main(["engine", *SMALL, "--test", "kv_cache_dtype=fp8", "--model-cache", str(model_cache),
                             "--out", str(tmp_path / "fp8.json")])
    (row,) = record["results"]
    assert row["test"] == "kv_cache_dtype=fp8" and row["dtype"] == "float32"
    # fp8 rounds every K and V, so the logits must move; e4m3's 3 mantissa bits cost a few percent,
    # not tens: a cache read wrongly (unwritten slots, missing scales) would be far off.
    assert 0 < row["mean_abs_diff"] <= row["max_position_abs_diff"] <= row["max_abs_diff"]
    assert 1e-4 < row["mean_abs_diff"] / row["mean_abs_logit"] < 0.2
    assert row["reference_matches_greedy"] == 1.0
    assert 0 <= row["exact"] <= row["prefix"] <= row["first_token"] <= 1


def test_the_teacher_forced_pass_reads_the_fp8_cache_as_generation_does(model_cache):
    args = agreement.parse_args(["engine", *SMALL])
    llm = agreement.make_llm(build_model("tiny", model_cache, torch.float32), "float32", args,
                             torch.device("cpu"), kv_cache_dtype="fp8")
    prompts = [[15, 19, 23, 200, 17, 42, 27, 28, 99, 100, 31], [300, 12, 14, 77, 18]]
    tokens = agreement.greedy(llm, prompts, 8)
    logits = agreement.teacher_forced_logits(llm, prompts, tokens)
    assert logits.shape == (2, 8, llm.engine.vocab_size)
    assert logits.argmax(-1).tolist() == tokens


def test_logit_stats_on_known_logits():
    reference = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]]])  # 1 prompt, 2 positions
    test = reference + torch.tensor([[[0.3, 0.0, 0.0], [0.0, 0.0, 0.4]]])
    got = agreement.logit_stats(reference, test, [[0, 2]])
    assert got["mean_abs_diff"] == pytest.approx(0.7 / 6) and got["max_position_abs_diff"] == pytest.approx(0.4 / 3)
    assert got["max_abs_diff"] == pytest.approx(0.4) and got["mean_abs_logit"] == pytest.approx(7.5 / 6)
    assert got["mean_top2_margin"] == pytest.approx((2.0 + 0.5) / 2)
    assert got["argmax_agreement"] == 1.0  # 2.0 still beats 1.9
    assert got["reference_matches_greedy"] == 0.5  # the second greedy token (2) is not the argmax (1)


def test_scale_granularities_on_a_small_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(agreement, "SEQ_LENS", [40, 33])
    monkeypatch.setattr(agreement, "QUERY_LENS", [1, 8])
    monkeypatch.setattr(agreement, "DISTRIBUTIONS", ("sinks",))
    record = agreement.main(["scales", "--seeds", "1", "--out", str(tmp_path / "s.json")])
    rows = {r["storage"]: r for r in record["results"]}
    assert list(rows) == ["bf16", *agreement.SCALE_BYTES]
    assert rows["token_head"]["extra_bytes_over_fp8_kv"] == pytest.approx(4 / 128)  # a float32 per 128 bytes
    assert rows["tensor"]["extra_bytes_over_fp8_kv"] == 0 and rows["bf16"]["extra_bytes_over_fp8_kv"] == 1.0
    for kind in agreement.DISTRIBUTIONS:
        errors = {s: r[f"{kind}_worst_rel_error"] for s, r in rows.items()}
        assert all(math.isfinite(e) and e > 0 for e in errors.values())
        assert errors["bf16"] < errors["token_head"] < 2.0 ** -3  # 3 mantissa bits against 8
    assert record["note"].startswith("accuracy, not speed")


@pytest.mark.parametrize("argv", [["engine", "--test", "MINIVLLM_X=1"], ["hf", "--model-configs", "huge"],
                                  ["hf", "--dtypes", "int8"], ["hf", "--prompt-len", "9:3"]])
def test_bad_arguments_are_refused(argv, model_cache):
    with pytest.raises(SystemExit):
        agreement.main([*argv, "--device", "cpu", "--model-cache", str(model_cache)])
