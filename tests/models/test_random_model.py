"""make_random_model writes directories that transformers itself loads, with a working tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from minivllm.models import NAMED_SHAPES, make_random_model, model_class_for
from minivllm.models.random_model import random_model_config

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnew lines  ",
    "Unicode: naïve café, 東京, emoji 🙂, math ∑x²",
    "",
]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_tokenizer_round_trips_and_agrees_with_the_config(model_dir, arch):
    directory = model_dir(arch)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    config = json.loads((directory / "config.json").read_text())
    generation = json.loads((directory / "generation_config.json").read_text())
    for key, token_id in (("bos_token_id", tokenizer.bos_token_id),
                          ("eos_token_id", tokenizer.eos_token_id),
                          ("pad_token_id", tokenizer.pad_token_id)):
        assert config[key] == generation[key] == token_id, key
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert len(tokenizer) <= config["vocab_size"]
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert max(ids) < len(tokenizer)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # BPE learned merges: common words are shorter than their bytes.
    assert len(tokenizer("the engine and the model")["input_ids"]) < len("the engine and the model") / 2


def test_transformers_generates_from_it(model_dir):
    directory = model_dir("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory))
    inputs = tokenizer("Once upon a time", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(output[0]), str)


def test_seed_decides_the_weights(tmp_path):
    def weights(name, seed):
        directory = make_random_model(tmp_path / name, arch="qwen3", seed=seed)
        return load_file(str(directory / "model.safetensors"))

    first, again, other = weights("a", 0), weights("b", 0), weights("c", 1)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def test_no_tensor_is_constant(model_dir):
    """Distinct values everywhere, so a tensor loaded into the wrong place cannot go unnoticed."""
    tensors = load_file(str(model_dir("qwen2") / "model.safetensors"))
    for name, tensor in tensors.items():
        assert tensor.unique().numel() > 1, name


def test_dtype_is_saved(tmp_path):
    directory = make_random_model(tmp_path / "bf16", arch="opt", dtype=torch.bfloat16)
    tensors = load_file(str(directory / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"


# Published parameter counts of the real models (tied embeddings counted once).
PUBLISHED_PARAMETERS = {"llama-3.2-1b": 1_235_814_400, "qwen3-0.6b": 596_049_920, "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("shape", list(NAMED_SHAPES))
def test_named_shapes_have_the_real_geometry(shape):
    """Built on the meta device (no memory, no weights): ours and HF's have the real model's size."""
    config = random_model_config(size=shape)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
        ours = model_class_for(config)(config)
    hf_count = sum(p.numel() for p in hf.parameters())
    assert hf_count == PUBLISHED_PARAMETERS[shape]
    assert sum(p.numel() for p in ours.parameters()) == hf_count


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'gpt2'"):
        make_random_model(tmp_path / "a", arch="gpt2")
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        make_random_model(tmp_path / "b", size="huge")
    with pytest.raises(ValueError, match="qwen3 shape"):
        make_random_model(tmp_path / "c", arch="llama", size="qwen3-0.6b")
    with pytest.raises(ValueError, match="'num_layers' is not a field of LlamaConfig"):
        make_random_model(tmp_path / "d", overrides={"num_layers": 3})


def test_existing_directory_needs_overwrite(tmp_path):
    directory = make_random_model(tmp_path / "m", arch="llama", seed=0)
    before = load_file(str(directory / "model.safetensors"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_random_model(directory, arch="llama", seed=1)
    make_random_model(directory, arch="llama", seed=1, overwrite=True)
    after = load_file(str(directory / "model.safetensors"))
    assert not torch.equal(before["model.norm.weight"], after["model.norm.weight"])


def test_every_model_id_decodes_to_text_and_encoding_ignores_the_filler(monkeypatch):
    # A random model samples ids from its whole embedding; each must decode to some text, or a
    # streaming server sends nothing for it. The filler tokens must not change what text encodes to.
    from tokenizers.decoders import DecodeStream

    from minivllm.models import toy_tokenizer

    full = toy_tokenizer.build_tokenizer(2048, 512)
    monkeypatch.setattr(toy_tokenizer, "_fill_vocabulary", lambda tokenizer, vocab_size: tokenizer)
    trained = toy_tokenizer.build_tokenizer(2048, 512)
    assert len(trained) < 2048 == len(full)  # the text runs out of merges first: there is filler
    for text in TEXTS + ["w1234 w1999 and w300", " w2047"]:
        assert full(text)["input_ids"] == trained(text)["input_ids"]
    # Stepping through every id: only byte tokens that are part of a UTF-8 sequence may hold
    # their text back (until the next token completes or breaks it), as in any byte-level BPE.
    stream = DecodeStream(skip_special_tokens=True)
    backend = full.backend_tokenizer
    first = len(toy_tokenizer.SPECIAL_TOKENS)
    silent = [i for i in range(first, 2048) if not stream.step(backend, i)]
    assert all(i < first + 256 for i in silent) and len(silent) <= 128
    assert all(full.decode([i]).strip() for i in range(len(trained), 2048))
