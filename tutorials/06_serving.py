"""Tutorial 6: serving many clients at once: the async engine in its own process, streams, aborts.

    python tutorials/06_serving.py [--out DIR] [--smoke]

The offline `LLM.generate` owns its thread: it adds every request, then steps until all are
done. A server cannot work that way. Requests arrive one by one from many clients while others
are half done, each client wants its tokens as they come, and some clients leave early. What the
OpenAI server (`python -m minivllm serve`) runs underneath is `AsyncLLM`:

    client coroutines ── add / abort ──>  engine process: step(), step(), step() ...
         ^                                        │ one message per step: every new token
         └──── each stream's queue <── reader ────┘

The engine runs in a process of its own and steps back to back; this process only hands each
step's new tokens to the stream they belong to. Here we start it on a tiny model, stream a few
requests concurrently, drop one half way, and look at what arrived when.
"""

from __future__ import annotations

import asyncio
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import heading, parse_args, tiny_model  # noqa: E402

from minivllm import LLM, SamplingParams  # noqa: E402
from minivllm.entrypoints import AsyncLLM  # noqa: E402

ENGINE = dict(device="cpu", block_size=4, num_kv_blocks=64, max_num_seqs=8, max_model_len=128)
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37], [41, 42], [51, 52, 53, 54]]
LEAVES_AFTER = 3  # the client of request 0 disconnects after this many tokens
SLOW_CLIENT, SLOW_S = 4, 0.1  # the client of request 4 reads slowly: SLOW_S seconds per delta


async def client(llm: AsyncLLM, i: int, prompt: list[int], max_tokens: int, t0: float, log: list) -> list[int]:
    """One client: stream a request, note when each delta arrives and how many tokens it holds."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    tokens: list[int] = []
    async for out in llm.generate(prompt, params, request_id=f"req-{i}"):
        new = out.outputs[0].token_ids
        tokens += new
        log.append((i, time.perf_counter() - t0, len(new)))
        if i == 0 and len(tokens) >= LEAVES_AFTER:
            break  # leaving the `async for` aborts the request: its KV blocks go back at once
        if i == SLOW_CLIENT:
            await asyncio.sleep(SLOW_S)  # meanwhile the engine goes on: its tokens queue up
    return tokens


async def serve(model: str, max_tokens: int) -> tuple[list[list[int]], list, dict, dict]:
    heading("1. Start the engine in its own process")
    llm = AsyncLLM.from_config({"model": model, **ENGINE})
    print(f"this process: the clients; engine process pid {llm.engine_pid}: the model and its KV cache")
    free_before = (await llm.stats())["kv_cache"]["num_free_blocks"]
    print(f"free KV blocks before any request: {free_before}")

    heading("2. Five clients stream at once")
    t0, log = time.perf_counter(), []
    outputs = await asyncio.gather(*(client(llm, i, p, max_tokens, t0, log) for i, p in enumerate(PROMPTS)))
    for i, tokens in enumerate(outputs):
        note = f"  (left after {LEAVES_AFTER} tokens: aborted)" if i == 0 else ""
        print(f"req-{i}: {len(tokens)} tokens {tokens[:8]}{' ...' if len(tokens) > 8 else ''}{note}")
    slow = [n for i, _, n in log if i == SLOW_CLIENT]
    print(f"req-{SLOW_CLIENT} read slowly ({SLOW_S} s per delta): its {sum(slow)} tokens came in {len(slow)} "
          f"deltas of {slow} tokens. A delta is\nwhat is new for a request when its client asks: a client "
          "that falls behind gets what it missed merged\ninto one, so a slow reader never builds a backlog "
          "and never slows the engine or the other clients.")

    heading("3. Everything is back in the pool")
    await asyncio.sleep(0.2)  # the abort of req-0 and the last finishes are reported by the next message
    stats = await llm.stats()
    print(f"engine state: {llm.state}")
    print(f"free KV blocks now: {stats['kv_cache']['num_free_blocks']} (before: {free_before})")
    await llm.shutdown()
    print(f"shut down: engine process gone, is_running={llm.is_running}")
    return outputs, log, stats, {"free_before": free_before}


def plot(log: list, path) -> None:
    """Each dot is one delta: when it reached its client, and (its size) how many tokens it held."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for i in sorted({i for i, _, _ in log}):
        times = [t * 1e3 for j, t, _ in log if j == i]
        sizes = [30 * n for j, _, n in log if j == i]
        ax.scatter(times, [i] * len(times), s=sizes, alpha=0.7)
    ax.set_yticks(range(len(PROMPTS)), [f"req-{i}" for i in range(len(PROMPTS))])
    ax.set_xlabel("ms since the clients started")
    ax.set_title("Tutorial 6: deltas as they reached each client (dot size = tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], "06_serving")
    model = tiny_model(args.model)
    max_tokens = 6 if args.smoke else 24
    outputs, log, stats, before = asyncio.run(serve(model, max_tokens))
    plot(log, args.out / "deltas.png")
    print(f"\nfigure: {args.out / 'deltas.png'}")

    heading("4. The same tokens as offline generate")
    with LLM(model, **ENGINE) as offline:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        expected = [o.outputs[0].token_ids for o in offline.generate(PROMPTS, params, use_tqdm=False)]
    for i, (got, want) in enumerate(zip(outputs, expected)):
        same = got == want[:len(got)]
        print(f"req-{i}: {'equal' if same else 'DIFFERENT'} to LLM.generate" + (" (its first tokens)" if i == 0 else ""))
        assert same, f"req-{i}: streamed {got}, offline {want}"
    assert stats["kv_cache"]["num_free_blocks"] == before["free_before"], "a block was not returned"
    print("Streaming and batching change when tokens arrive, never which tokens: greedy outputs are the same.")


if __name__ == "__main__":  # the engine process is spawned: this guard is required
    main()
