"""Ways in to the engine besides the offline `LLM`: the async engine and the OpenAI server.

    async_llm.py           AsyncLLM: one loop steps the engine for many coroutines
    engine_core.py         the engine in a process of its own (what the server runs), and its client
    api_server.py          the FastAPI app and `python -m minivllm serve`
    frontends.py           `serve --api-server-count N`: N frontend processes, one engine process
    serving*.py            what the completions and chat routes do with a request
    protocol.py, errors.py the OpenAI request/response/error bodies
    metrics.py             Prometheus metrics of GET /metrics

See docs/serving.md. Only AsyncLLM is imported here: the server's modules need the `serve` extra
(fastapi, uvicorn, prometheus_client), which the engine itself does not.
"""

from minivllm.entrypoints.async_llm import AsyncLLM, EngineDeadError, EngineStepError, RequestStream

__all__ = ["AsyncLLM", "EngineDeadError", "EngineStepError", "RequestStream"]
