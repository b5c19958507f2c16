"""When a sequence stops: every rule in one place.

After each new token, in this order (the first rule that fires decides):

1. `min_tokens`: until that many tokens are out, nothing but a length limit may stop the
   sequence. The sampler is also told not to draw EOS or a stop token yet (`banned_tokens`).
2. the end-of-sequence token (unless `ignore_eos`), then a `stop_token_ids` token;
3. a stop string completed by the new text: the text is cut there (the stop string is kept only
   with `include_stop_str_in_output`). Checked before the length limits, so a stop string that
   the very last allowed token completes still ends the output as a *stop*, cut as documented;
4. `max_tokens`, then the model's `max_model_len`: finish reason "length".

With overlap, a sequence's newest token may still be on the GPU when the next step is planned.
If that token is bound to end it by length (rule 4), computing anything after it would be
wasted: `ends_by_length` lets the scheduler leave the sequence out of the step.
"""

from __future__ import annotations

from minivllm.engine.detokenizer import Detokenizer
from minivllm.engine.sequence import Sequence, SequenceStatus

StopDecision = tuple[SequenceStatus, "int | str | None"]


class StopChecker:
    def __init__(self, max_model_len: int, detokenizer: Detokenizer | None = None):
        self.max_model_len = max_model_len
        self.detokenizer = detokenizer

    def check(self, seq: Sequence) -> StopDecision | None:
        """(status, stop_reason) if the token just appended ends `seq`, else None."""
        params = seq.sampling_params
        token_ids = seq.token_ids  # read directly: this runs for every token of every sequence
        num_output = len(token_ids) - seq.num_prompt_tokens
        may_stop = num_output >= params.min_tokens
        token = token_ids[-1]
        if may_stop and not params.ignore_eos and token in seq.eos_token_ids:
            return SequenceStatus.FINISHED_STOPPED, None
        if may_stop and token in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED, token
        if params.stop_strings and self.detokenizer is not None:
            new_text = self.detokenizer.update(seq)
            stop = self._find_stop_string(seq, len(new_text)) if may_stop and new_text else None
            if stop is not None:
                return SequenceStatus.FINISHED_STOPPED, stop
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return SequenceStatus.FINISHED_LENGTH, None
        if len(token_ids) >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH, None
        return None

    @staticmethod
    def _find_stop_string(seq: Sequence, num_new_chars: int) -> str | None:
        """The earliest stop string that the newest `num_new_chars` characters complete; cuts
        `seq.output_text` at it. Only the new text and the few characters before it are searched:
        an occurrence that ended earlier would have stopped the sequence then."""
        params = seq.sampling_params
        text = seq.output_text
        window = max(len(s) for s in params.stop_strings) - 1 + num_new_chars
        start = max(0, len(text) - window)
        hits = [(i, s) for s in params.stop_strings if (i := text.find(s, start)) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        seq.output_text = text[: index + len(stop) if params.include_stop_str_in_output else index]
        return stop

    def ends_by_length(self, seq: Sequence) -> bool:
        """Will the pending token end `seq` by max_tokens or max_model_len once it arrives?"""
        pending = seq.num_pending_tokens
        if not pending:
            return False
        num_tokens = len(seq.token_ids) + pending  # read directly: asked of every sequence, every step
        max_tokens = seq.sampling_params.max_tokens
        if max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens:
            return True
        return num_tokens >= self.max_model_len

    @staticmethod
    def banned_tokens(seq: Sequence) -> tuple[int, ...]:
        """Tokens the next sample may not be, because `min_tokens` are not out yet."""
        params = seq.sampling_params
        if seq.num_generated_tokens >= params.min_tokens:
            return ()
        banned = set(params.stop_token_ids)
        if not params.ignore_eos:
            banned |= seq.eos_token_ids
        return tuple(sorted(banned))
