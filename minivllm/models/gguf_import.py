"""A GGUF file (llama.cpp's format) becomes an ordinary Hugging Face model directory.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "/tmp/smollm2", dtype=torch.bfloat16)

GGUF is one file holding everything a model needs: metadata (the architecture's shape, the
tokenizer's vocabulary and merges, the chat template) and the tensors, usually quantized in
blocks (Q4_1: 32 weights share a float16 scale and minimum, each weight is 4 bits). The `gguf`
library, llama.cpp's own reader, parses it; this module writes what a model downloaded from the
hub would contain:

- config.json: the Llama shape, read from the `llama.*` metadata keys (`_CONFIG_KEYS`);
- model.safetensors: every tensor dequantized to float (`gguf.dequantize`), renamed from
  llama.cpp's names to Hugging Face's (`gguf.get_tensor_name_map`), and the query/key rows put
  back in Hugging Face's order (`_unpermute_rotary_rows`);
- tokenizer.json, tokenizer_config.json, chat_template.jinja: built by transformers' own GGUF
  tokenizer reader from the vocabulary, merges and template in the metadata;
- generation_config.json: the special-token ids, so generation stops where the model says.

From then on nothing in the engine knows where the weights came from. Dequantizing is exact:
every Q4_1 weight is `scale * q + minimum`, a float32 number, so a float32 directory holds
exactly the weights llama.cpp computes with (bfloat16 rounds them, as any bf16 checkpoint is).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from minivllm.models.model_dir import new_model_dir

# GGUF metadata key (under the architecture's prefix) -> Hugging Face LlamaConfig field.
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}
# Special tokens: GGUF's name (tokenizer.ggml.<name>_token_id) -> Hugging Face's (<name>_token[_id]).
_SPECIAL_TOKENS = {"bos": "bos", "eos": "eos", "padding": "pad", "unknown": "unk"}
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


def convert_gguf(gguf_path, out_dir, dtype: torch.dtype = torch.float32, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Write the model in the GGUF file `gguf_path` as a Hugging Face directory `out_dir`.

    dtype: of the saved weights (float32 keeps the dequantized weights exactly).
    overwrite: replace a model already in `out_dir`. The directory appears only once complete.
    """
    from gguf import GGUFReader

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError) as err:  # not GGUF, truncated, a version it cannot read
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {err}") from None
    config = gguf_config(reader, dtype)
    with new_model_dir(out_dir, overwrite) as tmp:
        model = _hf_model(config, dtype)
        _load_gguf_tensors(model, reader, config, progress)
        model.save_pretrained(str(tmp))
        if progress:
            print("tokenizer: built from the GGUF vocabulary, merges and chat template", file=sys.stderr)
        _save_tokenizer(gguf_path, reader, tmp, config.max_position_embeddings)
    return Path(out_dir)


def gguf_config(reader, dtype: torch.dtype = torch.float32):
    """The transformers LlamaConfig described by the GGUF metadata."""
    from transformers import LlamaConfig

    fields = reader.fields
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_GGUF_ARCHITECTURES}")
    if f"{arch}.rope.scaling.type" in fields and _field(reader, f"{arch}.rope.scaling.type") != "none":
        raise ValueError("GGUF models with rope scaling are not supported")
    values = {hf: _field(reader, f"{arch}.{key}") for key, hf in _CONFIG_KEYS.items()}
    # The epsilon is stored as float32 (1e-5 reads back as 9.99999974e-06): keep the value written.
    values["rms_norm_eps"] = float(str(np.float32(values["rms_norm_eps"])))
    values["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    values["head_dim"] = (_field(reader, f"{arch}.attention.key_length") if f"{arch}.attention.key_length" in fields
                          else values["hidden_size"] // values["num_attention_heads"])
    for gguf_name, hf_name in _SPECIAL_TOKENS.items():
        if f"tokenizer.ggml.{gguf_name}_token_id" in fields and hf_name != "unk":  # no unk in a Llama config
            values[f"{hf_name}_token_id"] = _field(reader, f"tokenizer.ggml.{gguf_name}_token_id")
    # No separate output matrix in the file: the output projection is the embedding (tied).
    tied = all(t.name != "output.weight" for t in reader.tensors)
    return LlamaConfig(architectures=["LlamaForCausalLM"], tie_word_embeddings=tied, dtype=dtype, **values)


def _field(reader, key: str):
    if key not in reader.fields:
        raise ValueError(f"the GGUF file has no {key!r} metadata")
    return reader.fields[key].contents()


def _hf_model(config, dtype: torch.dtype) -> nn.Module:
    """The transformers model of `config`, with storage but no initialisation (filled next)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype=dtype).to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every parameter its own storage; re-share the tied ones
    return model.eval()


@torch.no_grad()
def _load_gguf_tensors(model: nn.Module, reader, config, progress: bool) -> None:
    """Fill every parameter of `model` from its GGUF tensor; a tensor left over is an error."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    unused = set(tensors)
    params = dict(model.named_parameters())  # a tied weight is listed once
    for hf_name, param in tqdm(params.items(), desc="dequantize", unit="tensor", disable=not progress):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name not in tensors:
            raise ValueError(f"the GGUF file has no tensor for {hf_name} (looked for {gguf_name!r})")
        tensor = tensors[gguf_name]
        values = gguf.dequantize(tensor.data, tensor.tensor_type)  # a read-only view of the file for F32
        weight = torch.from_numpy(np.require(values, requirements=("C", "W")))
        if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in gguf_name else config.num_key_value_heads
            weight = _unpermute_rotary_rows(weight, heads)
        if weight.shape != param.shape:
            raise ValueError(f"GGUF tensor {gguf_name} has shape {tuple(weight.shape)}, "
                             f"{hf_name} needs {tuple(param.shape)}")
        param.copy_(weight)
        unused.discard(gguf_name)
    if unused:
        raise ValueError(f"the GGUF file has tensors this Llama model has no place for: {sorted(unused)}")


def _unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of the query/key projection rows.

    Rotary embedding turns pairs of a head's features. Hugging Face pairs feature i with
    i + head_dim/2 (the two halves); llama.cpp pairs neighbours (2i, 2i+1). Its converter
    therefore interleaves each head's two halves, row by row, so that its rotation computes the
    same thing; here the rows go back: [h, d/2, 2] -> [h, 2, d/2].
    """
    rows, cols = weight.shape
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def _save_tokenizer(gguf_path: Path, reader, out_dir: Path, max_length: int) -> None:
    """The tokenizer and chat template, by transformers' GGUF reader; the special tokens as the
    file names them (some transformers releases guess them wrong, e.g. <|im_start|> as eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                              local_files_only=True)
    vocabulary = reader.fields["tokenizer.ggml.tokens"]
    for gguf_name, hf_name in _SPECIAL_TOKENS.items():
        if f"tokenizer.ggml.{gguf_name}_token_id" in reader.fields:
            token_id = _field(reader, f"tokenizer.ggml.{gguf_name}_token_id")
            setattr(tokenizer, f"{hf_name}_token", vocabulary.contents(token_id))
    tokenizer.model_max_length = max_length
    tokenizer.clean_up_tokenization_spaces = False  # a byte-level BPE decodes exactly as it is
    tokenizer.save_pretrained(str(out_dir))
