"""The engine's log-probabilities in the OpenAI API's two shapes.

The engine gives one entry per position, {token id: Logprob(logprob, rank, decoded_token)}: the
position's own token first, then the top-k (minivllm/outputs.py). The API wants:

* completions (the legacy shape, the one evaluation harnesses read), per choice:

      {"tokens": [" the", ...], "token_logprobs": [-1.2, ...],
       "top_logprobs": [{" the": -1.2, " a": -1.9}, ...], "text_offset": [0, 4, ...]}

  `top_logprobs` holds the position's entries: the top `logprobs` tokens and the token itself;
  two tokens with the same text (pieces of one character both show as U+FFFD) share a key, which
  keeps the likelier value, so the first value is always the most likely token's. With `echo` the
  prompt comes first, and its first token has None for both values.
  `text_offset` is where each token's text starts in the choice's text.

* chat, per choice: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`, with
  exactly `top_logprobs` alternatives, best first.

JSON has no -inf (a token that top-k/top-p dropped, in the processed distribution), so, like vLLM,
a log-probability is sent as at least -9999.0. A token's text is the token decoded alone (a
character split over several tokens shows as U+FFFD), and `bytes` its UTF-8 encoding.
"""

from __future__ import annotations

from collections.abc import Callable

from minivllm.outputs import PositionLogprobs

LOGPROB_FLOOR = -9999.0

TokenText = Callable[[int], str]


def _clamp(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _text(token_id: int, position: PositionLogprobs | None, fallback: TokenText) -> str:
    entry = None if position is None else position.get(token_id)
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return fallback(token_id)


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None], fallback: TokenText,
                        text_offset: int = 0) -> dict:
    """The completions shape for these tokens; offsets count on from `text_offset`."""
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for token_id, position in zip(token_ids, positions):
        text = _text(token_id, position, fallback)
        out["tokens"].append(text)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
        if position is None:  # the first prompt token: nothing came before it
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_clamp(position[token_id].logprob))
        top: dict[str, float] = {}
        for t, lp in sorted(position.items(), key=lambda item: item[1].rank):
            top.setdefault(_text(t, position, fallback), _clamp(lp.logprob))  # the likelier wins a shared text
        out["top_logprobs"].append(top)
    return out


def next_text_offset(logprobs: dict) -> int:
    """Where the next token's text starts, after the tokens of a completions-shape dict."""
    if not logprobs["tokens"]:
        return 0
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], num_top: int,
                  fallback: TokenText) -> dict:
    """The chat shape for these (generated) tokens, `num_top` alternatives each."""
    content = []
    for token_id, position in zip(token_ids, positions):
        best = sorted(position.items(), key=lambda item: item[1].rank)[:num_top]
        content.append({**_chat_entry(token_id, position, fallback),
                        "top_logprobs": [_chat_entry(t, position, fallback) for t, _ in best]})
    return {"content": content}


def _chat_entry(token_id: int, position: PositionLogprobs, fallback: TokenText) -> dict:
    text = _text(token_id, position, fallback)
    return {"token": text, "logprob": _clamp(position[token_id].logprob), "bytes": list(text.encode("utf-8"))}
