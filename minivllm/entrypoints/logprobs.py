"""The engine's log-probabilities in the OpenAI API's two shapes, written as JSON text.

The engine gives one record per position, `TokenLogprobs` (minivllm/step.py): the position's own
token with its log-probability and rank, and the top-k, best first, as ids and numbers in a tuple. Tokens
are named here, each id decoded once by the server (`TokenTexts`), not by the engine at every
token. The API wants:

* completions (the legacy shape, the one evaluation harnesses read), per choice:

      {"text_offset": [0, 4, ...], "token_logprobs": [-1.2, ...], "tokens": [" the", ...],
       "top_logprobs": [{" the": -1.2, " a": -1.9}, ...]}

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

**Why JSON text, not dicts.** A stream sends a chunk per token. With logprobs=5, building these
dicts and `json.dumps`-ing them with the chunk took a completions chunk from ~2.1 us to ~9.5 us,
a chat chunk's shape alone ~15.4 us (timeit, 2-core CPU). Here each token's name is JSON-quoted once
per id (`TokenTexts`), each number written once (the floats, ~0.6 us each, are most of what is
left), and the text joined: ~7.4 us for the completions chunk, ~5.7 us for the chat shape. It is
exactly what `json.dumps` writes of the same dicts (a test checks); a plain answer parses it back
(`json.loads`) for its response model.
"""

from __future__ import annotations

import json
import math

from minivllm.step import TokenLogprobs

LOGPROB_FLOOR = -9999.0


class TokenTexts(dict):
    """token id -> (its text as a JSON string, the text's length, its UTF-8 bytes as a JSON list),
    what the shapes write of a token: worked out on first use, a plain dict lookup after that."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        """The token decoded alone. A model without a tokenizer names it by id, as `token_id:123`."""
        return f"token_id:{token_id}" if self.tokenizer is None else self.tokenizer.decode([token_id])

    def __missing__(self, token_id: int) -> tuple[str, int, str]:
        text = self.text(token_id)
        entry = self[token_id] = (json.dumps(text), len(text), json.dumps(list(text.encode("utf-8"))))
        return entry


def _numbers(logprobs) -> list[str]:
    """Log-probabilities, each at least LOGPROB_FLOOR, as `json.dumps` writes them."""
    return [repr(v) if LOGPROB_FLOOR <= v < math.inf else json.dumps(max(v, LOGPROB_FLOOR))  # NaN, inf: JSON's words
            for v in logprobs]


def _by_rank(record: TokenLogprobs) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The ids and logprobs of the top-k and of the position's own token, best first. The token
    goes where its rank says, ahead of any top-k token it ties with (its rank counts only the
    strictly likelier ones), and after all of them when it ranks below the top-k: at
    min(rank, len) - 1, with its own logprob. Usually it is in the top-k already, where its rank
    says: then the top-k is that order as it is."""
    token_id, logprob, rank, top_ids, top_logprobs = record
    at = rank - 1
    if at < len(top_ids) and top_ids[at] == token_id and top_logprobs[at] == logprob:
        return top_ids, top_logprobs
    ranked = [(t, lp) for t, lp in zip(top_ids, top_logprobs) if t != token_id]
    ranked.insert(min(at, len(ranked)), (token_id, logprob))
    ids, logprobs = zip(*ranked)
    return ids, logprobs


def completion_logprobs(token_ids: list[int], records: list[TokenLogprobs | None], texts: TokenTexts,
                        text_offset: int = 0) -> tuple[str, int]:
    """The completions shape for these tokens, offsets counting on from `text_offset`; and the
    offset of the token after them."""
    offsets, tokens, values, tops = [], [], [], []
    for token_id, record in zip(token_ids, records):
        quoted, length, _ = texts[token_id]
        tokens.append(quoted)
        offsets.append(str(text_offset))
        text_offset += length
        if record is None:  # the first prompt token: nothing came before it
            values.append("null")
            tops.append("null")
            continue
        ids, logprobs = _by_rank(record)
        names, numbers = [texts[t][0] for t in ids], _numbers(logprobs)
        values.append(numbers[min(record[2], len(ids)) - 1])  # the token's own, where its rank put it
        if len(set(names)) < len(names):  # two tokens with the same text: the likelier (first) wins
            top: dict[str, str] = {}
            for name, number in zip(names, numbers):
                top.setdefault(name, number)
            names, numbers = top.keys(), top.values()
        tops.append("{" + ", ".join([f"{name}: {number}" for name, number in zip(names, numbers)]) + "}")
    return (f'{{"text_offset": [{", ".join(offsets)}], "token_logprobs": [{", ".join(values)}], '
            f'"tokens": [{", ".join(tokens)}], "top_logprobs": [{", ".join(tops)}]}}'), text_offset


def chat_logprobs(token_ids: list[int], records: list[TokenLogprobs], num_top: int, texts: TokenTexts) -> str:
    """The chat shape for these (generated) tokens, `num_top` alternatives each."""
    content = []
    for token_id, record in zip(token_ids, records):
        ids, logprobs = _by_rank(record)
        top = ", ".join([_chat_entry(t, number, texts) + "}"
                         for t, number in zip(ids[:num_top], _numbers(logprobs[:num_top]))])
        content.append(f'{_chat_entry(token_id, _numbers([record[1]])[0], texts)}, "top_logprobs": [{top}]}}')
    return f'{{"content": [{", ".join(content)}]}}'


def _chat_entry(token_id: int, number: str, texts: TokenTexts) -> str:
    """One token's entry, left open (the position's own gets its top_logprobs after it)."""
    quoted, _, utf8 = texts[token_id]
    return f'{{"token": {quoted}, "logprob": {number}, "bytes": {utf8}'
