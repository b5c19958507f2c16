"""Structured output: the grammar a request's output must follow, and one matcher per sequence.

A request's `StructuredOutputsParams` (a JSON schema, a regex, a choice, an EBNF grammar) becomes a
grammar over the model's *tokens*, compiled by xgrammar before the request is scheduled. Each of
its sequences then carries a `SequenceGrammar`: a matcher (a pushdown automaton) that knows which
tokens may come next. In every step that samples a structured sequence:

    host    its matcher fills the sequence's row of the step's bitmask: bit t = token t is allowed
            ([rows, ceil(vocab / 32)] int32, all rows filled by one call, on xgrammar's threads)
    device  the sampler turns the logits of forbidden tokens into -inf, then samples as always
    host    the sampled token is appended to the sequence, and its matcher accepts it

When the grammar is complete, the only token the matcher allows is the end-of-sequence token, so
the output ends there, with finish reason "stop".

The bitmask of step n+1 needs the token that step n is still sampling. The engine therefore
launches step n+1's forward pass first, folds step n in (the matchers accept its tokens), fills
the bitmask while the GPU computes, and only then launches step n+1's sampling: overlap is kept
(see engine/llm_engine.py and docs/structured_output.md).

**Compiling never stops the engine.** xgrammar must first read the vocabulary (every token's
bytes, into its own tables), then compile each grammar against it: for the real model's 49,152
tokens the read and a first small JSON schema took 0.18-0.44 s, a second schema 4-5 ms (2-core
x86-64 dev machine, docs/structured_output.md; larger vocabularies and schemas take longer). Both run on the
grammar threads (`Grammars.grammar` returns a future), never on the thread that steps the engine:
the vocabulary is read as soon as the engine is built, and a request waits for its grammar outside
the scheduler, while the others keep stepping (engine/llm_engine.py, `prepare_request`).
"""

from __future__ import annotations

import functools
import json
import re
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from minivllm.sampling_params import StructuredOutputsParams

# OpenAI's json_object mode: any JSON object.
_ANY_OBJECT = '{"type": "object"}'
# xgrammar (0.2.9 and earlier) writes one character of a string with minLength/maxLength as any
# character but `"`, `\`, CR and LF: raw control characters too, which JSON forbids inside a
# string (they must be escaped) and a JSON parser rejects. Compact JSON has no place at all for a
# control character, so the class is narrowed to what JSON allows unescaped. (Such strings still
# cannot hold escapes, `\"` or `\n`: xgrammar's bounded strings leave them out.)
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'
_WHAT = {"json": "is not a JSON schema this engine can follow",
         "json_object": "could not be compiled",
         "regex": "is not a regular expression this engine can follow",
         "choice": "could not be compiled",
         "grammar": "is not a valid EBNF grammar"}


class SequenceGrammar:
    """Where one sequence stands in its grammar: its matcher, which has accepted every output
    token of the sequence (`Sequence.append_token` feeds it)."""

    def __init__(self, matcher):
        self.matcher = matcher

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            # The bitmask forbade it, so only a bug gets here: fail the step, loudly.
            raise RuntimeError(f"token {token_id} breaks the grammar that the sampler's bitmask enforced")

    def fork(self) -> SequenceGrammar:
        """An independent copy in the same state (the other samples of an n > 1 request)."""
        return SequenceGrammar(self.matcher.fork())


class Grammars:
    """One engine's grammar side: compiles specs into grammars on its threads, fills each step's bitmask.

    tokenizer: the engine's Hugging Face tokenizer. vocab_size: the model's, which may exceed the
    tokenizer's (padded embedding rows); the bitmask covers it all and never allows a padding row.
    eos_token_ids: the tokens that end a complete output. pin_memory: keep the bitmask in pinned
    host memory (CUDA), so that its upload is one asynchronous copy.

    The vocabulary is read on a grammar thread from here on; the first `grammar` call waits for it.
    (The tokenizer is only read there, never changed, which its Rust core allows beside the engine's
    own encoding and decoding.) A few threads, so that a large schema does not hold up the small
    ones behind it; xgrammar releases the GIL while it compiles. The threads end with this object.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, pin_memory: bool = False):
        try:
            import xgrammar
        except ImportError as err:
            raise ImportError("structured output needs xgrammar (pip install xgrammar)") from err
        self._xgr = xgrammar
        self.vocab_size = vocab_size
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="minivllm-grammar")
        self._compiler = self._threads.submit(_compiler, xgrammar, tokenizer, vocab_size, sorted(eos_token_ids))
        self._batch = xgrammar.BatchGrammarMatcher()  # fills many rows at once, on threads
        self._pin_memory = pin_memory
        self._bitmask = self._allocate(0)

    def grammar(self, spec: StructuredOutputsParams) -> Future[SequenceGrammar]:
        """Start compiling `spec` on a grammar thread. The future gives a fresh matcher of it, or
        raises a ValueError naming the field if it cannot compile."""
        return self._threads.submit(self._matcher, spec)

    def _matcher(self, spec: StructuredOutputsParams) -> SequenceGrammar:
        compiler = self._compiler.result()  # waits for the vocabulary's read, the first time
        try:
            compiled = self._compile(compiler, spec)
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"structured_outputs.{spec.kind} {_WHAT[spec.kind]}: {_reason(err)}") from None
        return SequenceGrammar(self._xgr.GrammarMatcher(compiled))

    @staticmethod
    def _compile(compiler, spec: StructuredOutputsParams):
        kind = spec.kind
        if kind in ("json", "json_object"):
            return compiler.compile_grammar(json_grammar(json.dumps(spec.json) if kind == "json" else _ANY_OBJECT))
        if kind == "regex":
            return compiler.compile_regex(spec.regex)
        if kind == "choice":
            return compiler.compile_grammar(choice_grammar(spec.choice))
        return compiler.compile_grammar(spec.grammar)

    def bitmask(self, sampled, rows: list[int]) -> torch.Tensor:
        """The step's bitmask, one row per sample row: the rows in `rows` (the step's
        `structured_rows`) from their sequences' matchers, every other row -1 (all allowed).

        sampled: the step's sampled sequences, in sample-row order. A sequence that finished
        since the step was planned (overlap: a late stop) has no grammar left; its token will be
        dropped, so its row allows everything.

        One buffer serves every step: this step's bitmask is only filled after every earlier
        step was waited for, and with it the copy that sent that step's bitmask to the device.
        """
        bitmask = self._rows(len(sampled))
        live = [i for i in rows if sampled[i].grammar is not None]
        if len(live) < len(sampled):
            bitmask.fill_(-1)  # every row allowed; the matchers then write their own rows whole
        if live:
            self._batch.batch_fill_next_token_bitmask([sampled[i].grammar.matcher for i in live], bitmask, live)
        return bitmask

    def _rows(self, num_rows: int) -> torch.Tensor:
        if num_rows > self._bitmask.shape[0]:
            self._bitmask = self._allocate(max(num_rows, 2 * self._bitmask.shape[0]))
        return self._bitmask[:num_rows]

    def _allocate(self, num_rows: int) -> torch.Tensor:
        words = -(-self.vocab_size // 32)
        return torch.empty((num_rows, words), dtype=torch.int32, pin_memory=self._pin_memory)


@functools.lru_cache(maxsize=1024)
def json_grammar(schema: str) -> str:
    """The EBNF grammar of a JSON schema (a JSON string), written compactly (any_whitespace=False:
    a grammar that allows free whitespace lets a model wander in newlines until max_tokens, and
    keeps a bounded schema unbounded), strings without raw control characters. Remembered: a
    server sees the same few schemas again and again, and xgrammar then finds the compiled
    grammar in its own cache, keyed by this text."""
    import xgrammar

    ebnf = str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False))
    return ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def choice_grammar(choices) -> str:
    """An EBNF grammar whose only sentences are `choices`: `root ::= "yes" | "no"`.
    (A JSON string literal is also a valid EBNF string literal, escapes included.)"""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _compiler(xgrammar, tokenizer, vocab_size: int, stop_token_ids: list[int]):
    """(grammar thread) xgrammar's compiler for this vocabulary; it caches each grammar by its source."""
    return xgrammar.GrammarCompiler(_tokenizer_info(xgrammar, tokenizer, vocab_size, stop_token_ids))


def _tokenizer_info(xgrammar, tokenizer, vocab_size: int, stop_token_ids: list[int]):
    """xgrammar's view of the vocabulary, with the special tokens (<s>, <pad>, chat markers)
    blanked out. xgrammar never allows a blank token, where it would otherwise read "<pad>" as
    five characters of text, let them into a JSON string, and the detokenizer would then drop them
    from the output text. The vocabulary's encoding (byte-level, ...) is xgrammar's own guess."""
    detected = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=stop_token_ids)
    vocab = [""] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size:
            vocab[i] = token
    for i in tokenizer.all_special_ids:
        if i < vocab_size:
            vocab[i] = ""
    return xgrammar.TokenizerInfo(vocab, detected.vocab_type, vocab_size=vocab_size,
                                  stop_token_ids=stop_token_ids, add_prefix_space=detected.add_prefix_space)


def _reason(err: Exception) -> str:
    """xgrammar's message without its time stamp and C++ source location."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(err).strip())
