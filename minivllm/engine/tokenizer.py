"""Tokenizer and end-of-sequence ids of a model directory.

The tokenizer is optional: a directory with only config.json and weights still serves requests
given as token ids; text prompts then fail with an error that says so.
"""

from __future__ import annotations

import json
from pathlib import Path

# Files any of which means "this directory ships a tokenizer".
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
)


def load_tokenizer(model_dir: str):
    """`transformers.AutoTokenizer` for the directory, or None if it has no tokenizer files."""
    path = Path(model_dir)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def eos_token_ids(model_dir: str, hf_config, tokenizer) -> frozenset[int]:
    """The token ids that end a sequence, as Hugging Face `generate` would use them.

    generation_config.json comes first (it is what `generate` reads, and may list several ids,
    as Llama 3 does), then config.json, then the tokenizer.
    """
    candidates = []
    generation_config = Path(model_dir) / "generation_config.json"
    if generation_config.is_file():
        candidates.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    candidates.append(getattr(hf_config, "eos_token_id", None))
    if tokenizer is not None:
        candidates.append(tokenizer.eos_token_id)
    for ids in candidates:
        if ids is None:
            continue
        ids = [ids] if isinstance(ids, int) else list(ids)
        if ids:
            return frozenset(int(i) for i in ids)
    return frozenset()
