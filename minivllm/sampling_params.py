"""SamplingParams: how to pick each next token and when to stop, for one request.

The names and meanings follow vLLM (and the OpenAI API), so code written for either reads the
same here. Every field is checked when the object is built; an error names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# A temperature below this is treated as 0, i.e. greedy: dividing logits by ~0 is numerically
# meaningless and gives the same argmax anyway.
GREEDY_EPSILON = 1e-5


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """Sampling and stopping options of one request.

    n: number of independent samples (completions) of the prompt; they share the prompt's KV
        blocks (the prompt is computed once).
    temperature: 0 = greedy (argmax); higher flattens the distribution.
    top_k: keep the k most likely tokens (0 or -1 = all).
    top_p: keep the smallest set of most likely tokens whose probability adds up to top_p.
    min_p: keep tokens at least min_p times as likely as the most likely one.
    repetition_penalty: >1 discourages tokens already in the prompt or output (divides a positive
        logit, multiplies a negative one; the Hugging Face / CTRL rule). 1 = off.
    presence_penalty: subtracted once from the logit of every token already generated.
    frequency_penalty: subtracted once per earlier occurrence of the token in the output.
    seed: makes this request's sampling reproducible, whatever else is in the batch.
    stop: strings that end the output when generated (not included unless
        include_stop_str_in_output).
    stop_token_ids: token ids that end the output (kept in the token ids).
    max_tokens: most tokens to generate (None = up to the model's max length).
    min_tokens: tokens to generate before EOS, stop_token_ids or stop strings may end the output.
    ignore_eos: keep generating after the end-of-sequence token.
    skip_special_tokens: leave special tokens out of the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Filled in by __post_init__ from `stop`: always a list, possibly empty.
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= 1, or 0 / -1 for no limit, got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        self.stop_strings = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @staticmethod
    def _normalize_stop(stop) -> list[str]:
        if stop is None:
            return []
        strings = [stop] if isinstance(stop, str) else stop
        if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) for s in strings):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        if any(s == "" for s in strings):
            raise ValueError("stop must not contain the empty string (it would match at once)")
        return list(strings)

    @staticmethod
    def _normalize_stop_token_ids(ids) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple, set, frozenset)) or not all(
            _is_int(i) and i >= 0 for i in ids
        ):
            raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {ids!r}")
        return list(ids)

    # ------------------------------------------------------------------------------------------
    # What the sampler needs to know, in words.
    # ------------------------------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def has_top_k(self) -> bool:
        return self.top_k > 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        """Build from keyword arguments, naming any that SamplingParams does not have."""
        known = {f.name for f in cls.__dataclass_fields__.values() if f.init}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)
