"""benchmarks/hf_agreement.py on CPU: float32 agreement with HF generate must be exact."""

from benchmarks.hf_agreement import agreement, main


def test_agreement_metrics():
    got = agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [4, 5, 6]], max_tokens=3)
    assert got["exact"] == 0.5 and got["first_token"] == 1.0
    assert got["common_prefix_lengths"] == [2, 3] and abs(got["prefix"] - 5 / 6) < 1e-12


def test_float32_agrees_exactly(tmp_path):
    payload = main(["--archs", "qwen3", "--dtypes", "float32", "--size", "tiny", "--num-prompts", "2",
                    "--max-tokens", "6", "--max-prompt-len", "20", "--out", str(tmp_path / "a.json")])
    (row,) = payload["rows"]
    assert row["exact"] == 1.0 and row["prefix"] == 1.0
    assert (tmp_path / "a.json").is_file()
