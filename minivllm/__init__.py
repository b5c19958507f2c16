"""minivllm: a small, readable and real LLM inference engine built around PagedAttention."""

__version__ = "0.1.0"
