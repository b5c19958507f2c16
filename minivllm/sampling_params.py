"""SamplingParams: how to pick each next token and when to stop, for one request.

The names and meanings follow vLLM (and the OpenAI API), so code written for either reads the
same here. Every field is checked when the object is built; an error names the field.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

# A temperature below this is treated as 0, i.e. greedy: dividing logits by ~0 is numerically
# meaningless and gives the same argmax anyway.
GREEDY_EPSILON = 1e-5
# torch.Generator.manual_seed takes a 64-bit seed; sample i of a request is seeded with seed + i.
SEED_LIMIT = 2**64
# top_k goes into an int64 tensor in the sampler.
INT64_LIMIT = 2**63
# Beyond these the penalty only says "never" or "always" for a seen token, and dividing a logit
# by a penalty near 0 overflows float32 to inf, which turns the row's probabilities into NaN.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# How many most likely tokens a request may ask to see per position (OpenAI's and vLLM's limit).
MAX_LOGPROBS = 20
# OpenAI's range for a logit_bias value: -100 bans a token in practice, 100 all but forces it.
LOGIT_BIAS_LIMIT = 100.0
LOGPROBS_MODES = ("raw", "processed")


def _is_number(value) -> bool:
    """A real number that stays finite as the float32 the sampler computes in."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        as_float32 = struct.unpack("f", struct.pack("f", float(value)))[0]  # past ~3.4e38: inf
    except OverflowError:  # an int too large for a float (or an older Python's struct)
        return False
    return math.isfinite(as_float32)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must look like: exactly one of these (vLLM's names).

    json: a JSON schema, as a dict or a JSON string. The output is one JSON value that validates
        against it, written compactly (no free whitespace between tokens: a random or a wandering
        model cannot fill its budget with newlines). Keys not in the schema are not allowed.
    json_object: any JSON object (OpenAI's `response_format={"type": "json_object"}`).
    regex: the whole output matches this regular expression.
    choice: the output is exactly one of these strings.
    grammar: an EBNF grammar (xgrammar's dialect, as GBNF: `root ::= "yes" | "no"`).

    Only the form is checked here. Whether a schema, regex or grammar compiles is checked when the
    request is added to an engine (the compiler needs the tokenizer): a bad one raises ValueError
    there, naming the field, before anything is queued.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be True or False, got {self.json_object!r}")
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice, "
                             f"grammar; got {given or 'none'}")
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as err:
                raise ValueError(f"structured_outputs.json is not valid JSON: {err}") from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema (a dict, or a JSON string of "
                             f"one), got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        """Which of the fields is set: "json", "json_object", "regex", "choice" or "grammar"."""
        if self.json_object:
            return "json_object"
        return next(name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None)


@dataclass
class SamplingParams:
    """Sampling and stopping options of one request.

    n: number of independent samples (completions) of the prompt; they share the prompt's KV
        blocks (the prompt is computed once).
    temperature: 0 = greedy (argmax); higher flattens the distribution.
    top_k: keep the k most likely tokens (0 or -1 = all; at most 2**63 - 1).
    top_p: keep the smallest set of most likely tokens whose probability adds up to top_p.
    min_p: keep tokens at least min_p times as likely as the most likely one.
    repetition_penalty: >1 discourages tokens already in the prompt or output (divides a positive
        logit, multiplies a negative one; the Hugging Face / CTRL rule). 1 = off; in [0.01, 100].
    presence_penalty: subtracted once from the logit of every token already generated.
    frequency_penalty: subtracted once per earlier occurrence of the token in the output.
    seed: makes this request's sampling reproducible, whatever else is in the batch. Sample i of
        the request (i < n) seeds its own torch.Generator with seed + i, so the seed must satisfy
        0 <= seed and seed + n - 1 < 2**64 (the generator's unsigned 64-bit range; torch would
        also take a negative seed and wrap it around, so -1 and 2**64 - 1 would be the same seed).
    logit_bias: {token id: bias} added to those tokens' logits before anything else chooses
        (OpenAI's field): each bias in [-100, 100], each id below the vocabulary size (checked
        when the request is submitted). -100 bans a token in practice, +100 all but forces it.
    logprobs: per generated token, return its log-probability, its rank, and the `logprobs`
        most likely tokens with theirs (0..20; 0 = the chosen token's own only; None = off).
    prompt_logprobs: the same for every prompt token after the first (the first has nothing
        before it to be predicted from: its entry is None). Always the model's own distribution.
        Such a request takes no prompt tokens from the prefix cache (no logits exist for them).
    logprobs_mode: which distribution `logprobs` reports. "raw" (the default, as vLLM's): the
        model's own, log_softmax of the logits as the model gave them. "processed": the one the
        token was actually drawn from, after penalties, logit_bias, the min_tokens bans,
        temperature and top-k/top-p/min-p (tokens those filters drop have -inf); a greedy row
        reports the distribution its argmax was taken of (no temperature, no filters).

    How an output ends (the first rule that fires decides; see engine/stopping.py):

    stop: strings that end the output when generated. The text is cut before the stop string
        (kept with include_stop_str_in_output); token_ids still hold every token generated.
    stop_token_ids: token ids that end the output; the stop token is kept in token_ids, and in
        the text unless it is a special token and skip_special_tokens. Each id must be below the
        model's vocabulary size, which is only known when the request is submitted.
        The model's EOS ends the output the same way (finish_reason "stop") unless ignore_eos;
        EOS is checked before stop_token_ids, then stop strings, then the length limits.
    max_tokens: most tokens to generate (None = up to the model's max length); finish_reason
        "length". 0 generates nothing and only scores the prompt: it needs prompt_logprobs
        (the answer is the prompt's log-probabilities) and n = 1.
    min_tokens: until this many tokens are out, EOS and stop_token_ids cannot be drawn (the
        sampler bans them) and stop strings do not end the output; only max_tokens /
        max_model_len can.
    ignore_eos: keep generating after the end-of-sequence token (stop_token_ids still stop).
    skip_special_tokens: leave special tokens out of the text.
    structured_outputs: a `StructuredOutputsParams`: the output follows a JSON schema, a regex, a
        choice or a grammar, and ends (finish reason "stop", with EOS) where the grammar is
        complete. It cannot be combined with min_tokens or ignore_eos, which would keep EOS away
        where the grammar allows nothing else.

    Floats must be finite, and stay finite as float32 (the sampler's dtype): a temperature of 1e39
    would become inf there.
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
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprobs_mode: str = "raw"
    structured_outputs: StructuredOutputsParams | None = None
    # Filled in by __post_init__ from `stop`: always a list, possibly empty.
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a number >= 0 and finite as a float32 (below about 3.4e38), "
                f"got {self.temperature!r}"
            )
        if not _is_int(self.top_k) or not -1 <= self.top_k < INT64_LIMIT:
            raise ValueError(
                f"top_k must be an int in [1, 2**63), or 0 / -1 for no limit, got {self.top_k!r}"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        low, high = REPETITION_PENALTY_RANGE
        if not _is_number(self.repetition_penalty) or not low <= self.repetition_penalty <= high:
            raise ValueError(
                f"repetition_penalty must be in [{low}, {high}] (1 = off), got {self.repetition_penalty!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        self._check_seed()
        self._check_logprobs()
        self._check_max_tokens()
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
        self.logit_bias = self._normalize_logit_bias(self.logit_bias)
        self._check_structured_outputs()

    def _check_max_tokens(self) -> None:
        if self.max_tokens is None:
            return
        # 0 only scores the prompt, which a request without prompt_logprobs does not ask for.
        if not _is_int(self.max_tokens) or self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if self.max_tokens == 0 and self.n != 1:
            raise ValueError(f"max_tokens=0 only scores the prompt, once: it needs n=1, got n={self.n}")

    def _check_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an int in [0, {MAX_LOGPROBS}] or None, got {value!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")

    def _check_seed(self) -> None:
        """Every sample's generator seed, seed + i for i < n, must fit the 64-bit range."""
        if self.seed is None:
            return
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.seed + self.n - 1 >= SEED_LIMIT:
            raise ValueError(
                f"seed must satisfy seed + n - 1 < 2**64 (sample i is seeded with seed + i), got "
                f"seed={self.seed} with n={self.n}"
            )

    def _check_structured_outputs(self) -> None:
        spec = self.structured_outputs
        if spec is None:
            return
        if not isinstance(spec, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams or None, got "
                             f"{type(spec).__name__}")
        # The grammar ends the output with EOS and allows nothing else there: banning EOS (min_tokens)
        # or ignoring it would leave a row with no token to draw, or a grammar past its end.
        if self.min_tokens:
            raise ValueError("min_tokens cannot be combined with structured_outputs: the grammar decides "
                             "where the output ends")
        if self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with structured_outputs: the grammar ends the "
                             "output with EOS")

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

    @staticmethod
    def _normalize_logit_bias(bias) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict {{token id: bias}}, got {type(bias).__name__}")
        for token_id, value in bias.items():
            if not _is_int(token_id) or token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token_id!r}")
            if not _is_number(value) or not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"logit_bias[{token_id}] must be a number in [-100, 100], got {value!r}")
        return {token_id: float(value) for token_id, value in bias.items()} or None

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

    @property
    def scores_prompt_only(self) -> bool:
        """max_tokens=0: the request computes its prompt (for prompt_logprobs) and samples nothing."""
        return self.max_tokens == 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        """Build from keyword arguments, naming any that SamplingParams does not have."""
        known = {f.name for f in cls.__dataclass_fields__.values() if f.init}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)
