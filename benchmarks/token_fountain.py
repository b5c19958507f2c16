"""A token fountain: a stand-in for `LLMEngine` in the server's engine process, so that
`serve_bench.py --fountain-step-ms MS` measures the server's frontend alone.

Every running request (up to max_num_seqs) gets one token a step, a word of text, after MS of
sleep (the GPU's time), until its max_tokens: the frontend's work (HTTP, JSON, server-sent
events) is the same as with a model while the engine costs nearly nothing. Everything else is the
real server, behind the real engine loop and pipes:

    MINIVLLM_TOKEN_FOUNTAIN_STEP_MS=8 python benchmarks/token_fountain.py serve --model DIR ...

runs `python -m minivllm serve ...`; the processes it spawns import this file as their main module
and so swap the engine too. The model directory gives the tokenizer and the config; no weight is
loaded.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FOUNTAIN_ENV = "MINIVLLM_TOKEN_FOUNTAIN_STEP_MS"
WORDS = [" the", " cat", " sat", " on", " a", " mat", ",", " and"]


class TokenFountain:
    """What the engine process asks of `LLMEngine`, answered without a model."""

    def __init__(self, config):
        self.config = config
        self.step_s = float(os.environ[FOUNTAIN_ENV]) / 1e3
        self.max_num_seqs = config.scheduler_config.max_num_seqs
        self.requests: dict[str, list] = {}  # id -> [prompt ids, max_tokens, generated, arrival]
        self.scheduler = SimpleNamespace(running=[], waiting=[], speculation=None)
        self.block_manager = SimpleNamespace(num_used_blocks=0, num_blocks=1)
        self.executor = SimpleNamespace(runner=SimpleNamespace(device="cpu", num_kv_blocks=1))

    def add_request(self, prompt, params, request_id, stream=True) -> None:
        self.requests[request_id] = [list(prompt), params.max_tokens, 0, time.perf_counter()]

    def abort(self, request_id):
        request = self.requests.pop(request_id, None)
        return None if request is None else self._output(request_id, request, [], "abort")

    def step(self) -> list:
        time.sleep(self.step_s)
        outputs = []
        for request_id in list(self.requests)[:self.max_num_seqs]:
            request = self.requests[request_id]
            request[2] += 1
            done = request[2] >= request[1]
            outputs.append(self._output(request_id, request, [request[2]], "length" if done else None))
            if done:
                del self.requests[request_id]
        self.scheduler.running = [None] * min(len(self.requests), self.max_num_seqs)
        return outputs

    def _output(self, request_id, request, token_ids, finish_reason):
        from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

        prompt, _, generated, arrival = request
        metrics = RequestMetrics(arrival, arrival, arrival, None, len(prompt), generated, 0, 0, 0.0, None, None, None)
        text = "".join(WORDS[t % len(WORDS)] for t in token_ids)
        return RequestOutput(request_id, None, prompt, [CompletionOutput(0, text, token_ids, finish_reason)],
                             finish_reason is not None, metrics)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def take_failed_outputs(self) -> list:
        return []

    def get_stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


if os.environ.get(FOUNTAIN_ENV):  # the server and every process it spawns
    from minivllm.entrypoints import engine_core

    engine_core.LLMEngine = TokenFountain


if __name__ == "__main__":
    from minivllm.cli import main

    sys.exit(main(sys.argv[1:]))
