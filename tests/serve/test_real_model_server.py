"""The server on a real model: what a client gets is what offline `LLM.generate` gives.

A real `python -m minivllm serve` process on SmolLM2-135M-Instruct (127.0.0.1), asked through the
official openai client, plain and streamed, through the model's chat template; the oracle is
the offline engine given the same chat prompt. Greedy, so both must be the same text.
"""

from __future__ import annotations

import signal

from minivllm import LLM
from tests.real_model import FRANCE, chat_prompt
from tests.serve.conftest import MODEL_NAME, ServerProcess

QUESTIONS = [FRANCE, "Name three colors."]
MAX_TOKENS = 24


def test_chat_completions_equal_offline_generate(smollm2, tmp_path):
    import openai

    server = ServerProcess(smollm2, "--kv-cache-memory-bytes", "32MiB", log_dir=tmp_path)
    try:
        server.wait_healthy()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        answers = []
        for question in QUESTIONS:
            reply = client.chat.completions.create(model=MODEL_NAME, max_tokens=MAX_TOKENS, temperature=0,
                                                   messages=[{"role": "user", "content": question}])
            answers.append(reply.choices[0].message.content)
        stream = client.chat.completions.create(model=MODEL_NAME, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": FRANCE}])
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    finally:
        code = server.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in server.output(), server.output()

    llm = LLM(str(smollm2), attention_backend="torch")
    offline = llm.generate([chat_prompt(llm.engine.tokenizer, q) for q in QUESTIONS], max_tokens=MAX_TOKENS,
                           temperature=0, use_tqdm=False)
    assert answers == [o.text for o in offline]
    assert answers[0] == streamed == "The capital of France is Paris."
