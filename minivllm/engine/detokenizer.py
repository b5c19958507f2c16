"""Token ids to text, one token at a time.

Decoding a sequence's whole output after every new token costs more each step (quadratic over a
long answer); stop strings and streaming only need the text *added* by the newest token. The
`tokenizers` library's `DecodeStream` gives exactly that in about a microsecond per token, and it
holds back the bytes of a character split over several tokens until the character is complete.

The final text of a finished sequence is one full `decode` of its output (the exact string
`tokenizer.decode` gives, even when the output ends in the middle of a character); the streamed
pieces are always a prefix of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from minivllm.engine.sequence import Sequence


@dataclass
class _StreamState:
    stream: object  # tokenizers.decoders.DecodeStream, or None for a tokenizer without one
    num_decoded: int = 0  # output tokens fed to the stream so far


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # The Rust tokenizer behind a transformers "fast" tokenizer; DecodeStream steps through it.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._token_texts: dict[int, str] = {}  # token id -> its text alone (log-probabilities)

    def token_text(self, token_id: int) -> str:
        """One token decoded alone, special tokens included; each id is decoded once, then
        remembered (a vocabulary is finite, and log-probabilities name the same tokens often)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def update(self, seq: Sequence) -> str:
        """Decode the output tokens of `seq` not decoded yet; append and return the new text."""
        state = seq.detokenizer
        if state is None:
            state = seq.detokenizer = _StreamState(self._new_stream(seq))
        new_ids = seq.output_token_ids[state.num_decoded:]
        state.num_decoded = seq.num_output_tokens
        if state.stream is None:  # no incremental decoder: decode everything, keep the new tail
            text = self.decode(seq)[len(seq.output_text):]
        else:
            text = "".join(piece for token in new_ids
                           if (piece := state.stream.step(self._backend, token)) is not None)
        seq.output_text += text
        return text

    def decode(self, seq: Sequence) -> str:
        """The whole output of `seq` as `tokenizer.decode` gives it."""
        return self.tokenizer.decode(seq.output_token_ids,
                                     skip_special_tokens=seq.sampling_params.skip_special_tokens)

    def _new_stream(self, seq: Sequence):
        if self._backend is None:
            return None
        from tokenizers.decoders import DecodeStream

        return DecodeStream(skip_special_tokens=seq.sampling_params.skip_special_tokens)
