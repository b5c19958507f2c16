"""The command line: make-model through a real `python -m minivllm` process, generate in-process."""

from __future__ import annotations

import json
import subprocess
import sys

from minivllm import LLM
from minivllm.cli import main


def test_make_model_then_generate(tmp_path, capsys):
    model = tmp_path / "tiny-qwen2"
    done = subprocess.run(
        [sys.executable, "-m", "minivllm", "make-model", str(model), "--arch", "qwen2", "--size", "tiny"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()

    args = ["generate", "--model", str(model), "--prompt", "Once upon a time", "--prompt-token-ids", "5,6,7,8",
            "--max-tokens", "6", "--attention-backend", "torch", "--json", "--no-progress"]
    assert main(args) == 0
    outputs = json.loads(capsys.readouterr().out)
    assert [o["prompt"] for o in outputs] == ["Once upon a time", None]
    assert outputs[1]["prompt_token_ids"] == [5, 6, 7, 8]
    # Same engine, same greedy decoding through the Python API: the CLI adds nothing of its own.
    expected = LLM(str(model), attention_backend="torch").generate(
        ["Once upon a time", [5, 6, 7, 8]], max_tokens=6, temperature=0, use_tqdm=False)
    assert [o["outputs"][0]["token_ids"] for o in outputs] == [e.token_ids for e in expected]

    assert main(["generate", "--model", str(model), "--prompt", "Hi", "--max-tokens", "3", "--n", "2",
                 "--temperature", "0.8", "--seed", "1", "--no-progress", "--stats"]) == 0
    text = capsys.readouterr().out
    assert "=== prompt: 'Hi'" in text and "[1]" in text and "[engine]" in text


def test_cli_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    assert main(["make-model", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
