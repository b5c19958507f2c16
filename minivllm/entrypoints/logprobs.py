"""The engine's log-probabilities in the OpenAI API's two shapes.

The engine gives one record per position, `TokenLogprobs` (minivllm/step.py): the position's own
token with its log-probability and rank, and the top-k, best first, as ids and numbers in a tuple. Tokens
are named here, each id decoded once by the server (`token_text`), not by the engine at every
token. The API wants:

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

from minivllm.step import TokenLogprobs

LOGPROB_FLOOR = -9999.0

TokenText = Callable[[int], str]


def _clamp(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _by_rank(record: TokenLogprobs) -> list[tuple[int, float]]:
    """(token id, logprob) of the top-k and of the position's own token, best first. The token
    goes where its rank says, ahead of any top-k token it ties with (its rank counts only the
    strictly likelier ones), and after all of them when it ranks below the top-k."""
    token_id, logprob, rank, top_ids, top_logprobs = record
    ranked = [(t, lp) for t, lp in zip(top_ids, top_logprobs) if t != token_id]
    ranked.insert(min(rank - 1, len(ranked)), (token_id, logprob))
    return ranked


def completion_logprobs(token_ids: list[int], records: list[TokenLogprobs | None], token_text: TokenText,
                        text_offset: int = 0) -> dict:
    """The completions shape for these tokens; offsets count on from `text_offset`."""
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for token_id, record in zip(token_ids, records):
        text = token_text(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
        if record is None:  # the first prompt token: nothing came before it
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_clamp(record[1]))  # (token_id, logprob, ...)
        top: dict[str, float] = {}
        for t, logprob in _by_rank(record):
            top.setdefault(token_text(t), _clamp(logprob))  # the likelier wins a shared text
        out["top_logprobs"].append(top)
    return out


def next_text_offset(logprobs: dict) -> int:
    """Where the next token's text starts, after the tokens of a completions-shape dict."""
    if not logprobs["tokens"]:
        return 0
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def chat_logprobs(token_ids: list[int], records: list[TokenLogprobs], num_top: int, token_text: TokenText) -> dict:
    """The chat shape for these (generated) tokens, `num_top` alternatives each."""
    content = []
    for token_id, record in zip(token_ids, records):
        content.append({**_chat_entry(token_id, record[1], token_text),  # (token_id, logprob, ...)
                        "top_logprobs": [_chat_entry(t, lp, token_text) for t, lp in _by_rank(record)[:num_top]]})
    return {"content": content}


def _chat_entry(token_id: int, logprob: float, token_text: TokenText) -> dict:
    text = token_text(token_id)
    return {"token": text, "logprob": _clamp(logprob), "bytes": list(text.encode("utf-8"))}
