"""Drop-in backends for other frameworks, built on `minivllm.kernels` alone (never the engine).

    hf.py   minivllm's paged attention as a Hugging Face `transformers` attention implementation:
            `AutoModelForCausalLM.from_pretrained(path, attn_implementation=hf.register())`.
            How it works and where it falls back: docs/hf_backend.md.

Nothing is imported here, so that `import minivllm.integrations` does not pull in transformers.
"""
