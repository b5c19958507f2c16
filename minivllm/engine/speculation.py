"""Speculative decoding, the scheduler's half: who speculates, with how many drafts, and the
n-gram proposer.

A decode step computes one token per sequence, and at small batch that step costs about as much
as one computing several: it is bound by reading the weights, not by arithmetic. Speculation
spends that idle arithmetic. A *proposer* guesses the next tokens (drafts); the scheduler plans
them as ordinary tokens of the step (KV slots, the token budget); the model computes the last
known token and the drafts in one forward, and the rejection sampler (layers/rejection_sampler.py)
keeps the drafts that agree with the model plus one token of the model's own. Greedy output is
exactly what decoding one token at a time gives; sampled output follows the same distribution.

Two proposers, behind one interface (`Speculation.plan_drafts`):

* **n-gram** (prompt lookup, on the host): find the latest earlier place where the sequence's last
  n tokens occurred, in its prompt or its output, and propose the tokens that followed there.
  Rewriting, editing or quoting a text given in the prompt repeats long runs of it. n goes from
  `prompt_lookup_max` down to `prompt_lookup_min`; no match, no drafts.
* **draft model** (on the device): the runner runs a small model k times before the verifying
  forward (worker/draft_model.py); here only their number is planned. A model on the device
  proposes all k or none, so that its forward passes keep one shape. EAGLE-style heads would be
  one more device proposer.

One rule says which sequences may speculate (`may_speculate`), and one threshold turns
speculation off for large batches (`SpeculativeConfig.disable_by_batch_size`).
"""

from __future__ import annotations

from minivllm.config import EngineConfig, SpeculativeConfig, read_config_json
from minivllm.engine.sequence import Sequence
from minivllm.engine.tokenizer import load_tokenizer


def may_speculate(seq: Sequence) -> bool:
    """Whether the requests of `seq` allow speculation once its newest token is known: the one
    rule. Not with penalties, which need the exact output before each verified position; not
    before `min_tokens` (the sampler bans EOS and stop tokens per position until then); not when
    the request wants the log-probabilities of its tokens: it decodes one token a step and gets
    them exactly as without speculation, while the other requests of the batch still speculate;
    nor with structured output: each verified position would need the bitmask of the grammar
    advanced through the drafts before it. (logit_bias is fine: the rejection sampler verifies
    against the biased distribution.)

    (The scheduler also waits for a sequence's newest token to be on the host: the n-gram
    proposer reads it, and how many drafts the step that made it accepted decides where the
    next step starts.)
    """
    params = seq.sampling_params
    return (not params.has_penalties and params.logprobs is None and params.structured_outputs is None
            and seq.num_generated_tokens >= params.min_tokens)


def check_draft_vocabulary(config: EngineConfig, tokenizer) -> None:
    """A draft model must speak the target's vocabulary: the same logits width, and the same
    token for every id when both directories have a tokenizer. Checked before any weight loads.
    tokenizer: the target's (None if its directory has none)."""
    spec = config.speculative_config
    if spec is None or spec.method != "draft":
        return
    target_dir = config.model_config.model
    sizes = [read_config_json(d).get("vocab_size") for d in (target_dir, spec.model)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"speculative_config.model: the draft's vocabulary has {sizes[1]} tokens, the "
                         f"target's {sizes[0]}; a draft model must share the target's vocabulary")
    draft_tokenizer = load_tokenizer(spec.model)
    if tokenizer is not None and draft_tokenizer is not None and tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ValueError("speculative_config.model: the draft's tokenizer maps tokens to other ids than "
                         "the target's; a draft model must share the target's vocabulary")


class NgramProposer:
    """Prompt lookup over each sequence's tokens, through an index of its n-grams kept up to date.

    A proposal must find the earlier occurrences of the sequence's last n tokens. Scanning the
    whole history for them at every step costs more as the sequence grows; instead each sequence
    keeps, for each n in [min_n, max_n], a chain of occurrences per n-gram, as a compressor's
    hash chains do: the latest start of every n-gram (a dict), and for every start the previous
    start of the same n-gram. A step indexes the few tokens it appended (each ends one n-gram per
    n) and a proposal is a dict lookup per n and a short walk back. The index covers the n-grams
    that end before the last token: exactly the earlier occurrences a proposal may follow. Its
    memory grows with the tokens, a dict entry and a list slot per token and n; `release`
    forgets a finished sequence.
    """

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self._index: dict[int, _NgramIndex] = {}

    def propose(self, seq: Sequence, max_drafts: int) -> list[int]:
        """Up to `max_drafts` tokens that followed an earlier occurrence of the last n tokens,
        for the longest n in [min_n, max_n] that occurs; [] when none does.

        Of the occurrences, the latest that is followed by `max_drafts` tokens (nearby text
        predicts best), else the earliest (followed by the most): in a loop of period p, the
        latest occurrence is p tokens back and followed by only p tokens.
        """
        tokens = seq.token_ids
        index = self._index.get(seq.seq_id)
        if index is None:
            index = self._index[seq.seq_id] = _NgramIndex(self.min_n, self.max_n)
        index.extend(tokens)
        num = len(tokens)
        keys = list(_ngram_keys(tokens, num - 1, min(self.max_n, num - 1)))
        for n in range(len(keys), self.min_n - 1, -1):
            start = index.latest[n].get(keys[n - 1])
            if start is not None:
                # Walk back to the latest start followed by max_drafts tokens, or to the first.
                # Starts after that bound lie within max_drafts tokens of it: a few steps at most.
                previous, bound = index.previous[n], num - n - max_drafts
                while start > bound and previous[start] >= 0:
                    start = previous[start]
                return tokens[start + n:start + n + max_drafts]
        return []

    def release(self, seq_id: int) -> None:
        self._index.pop(seq_id, None)


def _ngram_keys(tokens: list[int], end: int, max_n: int):
    """The keys of the n-grams that end at position `end`, for n = 1 .. max_n: each token id in
    32 bits of one int. An int, not a tuple: the garbage collector does not track ints, and a
    prompt's index makes thousands of keys at once."""
    key = 0
    for n in range(1, max_n + 1):
        key |= tokens[end - n + 1] << (32 * (n - 1))
        yield key


class _NgramIndex:
    """One sequence's n-gram chains: for each n, `latest[n]` maps each n-gram's key to its latest
    start and `previous[n][s]` is the start of the same n-gram before start s (-1: none). The
    n-grams ending before position `num_ends` are indexed."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.latest: dict[int, dict[int, int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.previous: dict[int, list[int]] = {n: [] for n in range(min_n, max_n + 1)}
        self.num_ends = 0

    def extend(self, tokens: list[int]) -> None:
        """Index the n-grams ending at positions num_ends .. len(tokens) - 2 (a sequence's tokens
        only grow: a proposal reads them, and appended tokens are never taken back)."""
        min_n, max_n, latest, previous = self.min_n, self.max_n, self.latest, self.previous
        for end in range(self.num_ends, len(tokens) - 1):
            key = 0
            for n in range(1, min(max_n, end + 1) + 1):  # `_ngram_keys`, inlined: it runs per token
                key |= tokens[end - n + 1] << (32 * (n - 1))
                if n >= min_n:  # n-grams start at 0, 1, 2, ...: this start is previous[n]'s next slot
                    previous[n].append(latest[n].get(key, -1))
                    latest[n][key] = end - n + 1
        self.num_ends = max(self.num_ends, len(tokens) - 1)


class Speculation:
    """The scheduler's speculation policy: whether a step speculates, and each sequence's drafts."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.num_speculative_tokens = config.num_speculative_tokens
        self.max_model_len = max_model_len
        self.ngram = (NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
                      if config.method == "ngram" else None)

    def enabled(self, num_running: int) -> bool:
        """Speculation is on for a step planned while `num_running` sequences run."""
        limit = self.config.disable_by_batch_size
        return limit is None or num_running <= limit

    def room(self, seq: Sequence, budget: int) -> int:
        """The most drafts `seq` may verify: k, what the token budget spares, and what its
        max_tokens and max_model_len leave after the step's own token."""
        room = min(self.num_speculative_tokens, budget,
                   self.max_model_len - seq.num_tokens - 1)
        max_tokens = seq.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - seq.num_output_tokens - 1)
        return max(room, 0)

    def plan_drafts(self, seq: Sequence, budget: int) -> tuple[list[int], int]:
        """(draft ids known on the host, number of drafts) for a decoding `seq` that
        `may_speculate`, with `budget` tokens to spare. A device proposer makes all k or none."""
        room = self.room(seq, budget)
        if self.ngram is None:
            return [], self.num_speculative_tokens if room == self.num_speculative_tokens else 0
        drafts = self.ngram.propose(seq, room) if room else []
        return drafts, len(drafts)

    def release(self, seq_id: int) -> None:
        """Forget a finished sequence."""
        if self.ngram is not None:
            self.ngram.release(seq_id)
