"""Model implementations and how to load them.

    from minivllm.models import load_model, make_random_model, SUPPORTED_ARCHITECTURES

    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    hidden = model(input_ids, positions, meta)   # [T] packed tokens -> [T, hidden_size]
    logits = model.compute_logits(hidden[rows])  # -> [N, vocab] float32
    model.attention_layers()                     # one PagedAttention per layer: bind the KV cache
    model.num_layers, model.num_kv_heads, model.head_dim   # KV cache geometry
    load_model(model_dir, tp=TensorParallel(rank, size, group))   # one rank's shard (distributed/)

Llama, Mistral, Qwen2 and Qwen3 share `llama.py`; OPT has `opt.py`. `registry.py` maps a
config.json architecture to its class, `loader.py` reads safetensors into it, and
`random_model.py` writes random-weight Hugging Face directories for tests and benchmarks;
`real_models.py` fetches a real model as a GGUF file and `gguf_import.py` makes it a Hugging Face
directory (`model_dir.py`: either one appears only once complete).
"""

from minivllm.models.loader import load_model
from minivllm.models.random_model import (
    ARCHITECTURES,
    NAMED_SHAPES,
    SIZES,
    make_random_model,
)
from minivllm.models.real_models import REAL_MODELS, cached_real_model, make_real_model
from minivllm.models.registry import SUPPORTED_ARCHITECTURES, model_class_for

__all__ = [
    "ARCHITECTURES",
    "NAMED_SHAPES",
    "REAL_MODELS",
    "SIZES",
    "SUPPORTED_ARCHITECTURES",
    "cached_real_model",
    "load_model",
    "make_random_model",
    "make_real_model",
    "model_class_for",
]
