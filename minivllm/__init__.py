"""minivllm: a small, readable and real LLM inference engine built around PagedAttention.

    from minivllm import LLM, SamplingParams

The engine classes are imported on first use (a module-level `__getattr__`), so that
`import minivllm.kernels` stays light: it loads no model code, tokenizer or transformers.
"""

__version__ = "0.1.0"

_LAZY = {
    "LLM": "minivllm.llm",
    "AsyncLLM": "minivllm.entrypoints.async_llm",
    "SamplingParams": "minivllm.sampling_params",
    "StructuredOutputsParams": "minivllm.sampling_params",
    "EngineConfig": "minivllm.config",
    "LLMEngine": "minivllm.engine.llm_engine",
    "RequestOutput": "minivllm.outputs",
    "CompletionOutput": "minivllm.outputs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'minivllm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
