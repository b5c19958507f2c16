"""What one engine step hands from the scheduler (engine/) to the model runner (worker/).

Plain data, no live objects: the runner never sees a `Sequence`, a queue or a policy, and the same
record could be pickled to another process (tensor parallelism does exactly that). Both sides
import this module; it imports nothing of theirs, so no dependency runs back up.

Each scheduled sequence says which tokens to compute and where its K/V lives:

    ScheduledSeq(seq_id=7, start=40, token_ids=[], pending=True, block_table=[3, 9, 4], num_samples=1)

reads "sequence 7 computes position 40, whose token is the one the previous step sampled for it
(still on the device), its blocks are 3, 9, 4, and it samples one token". `pending` is what lets
the host schedule step n+1 while the GPU still runs step n (see docs/architecture.md, "Overlap"):
the scheduler knows that a decoding sequence *will* have a new token without knowing its value,
and the runner copies the value from device to device.

With speculative decoding a decoding sequence also verifies draft tokens, guesses of the tokens
that follow its last one:

    ScheduledSeq(seq_id=7, start=40, token_ids=[812], pending=False, block_table=[3, 9, 4],
                 num_samples=1, draft_token_ids=[5, 77], num_draft_tokens=2)

computes positions 40, 41, 42 (inputs 812, 5, 77) and samples at all three: the model's token
after 812 decides whether 5 is accepted, and so on (see layers/rejection_sampler.py). An n-gram
proposer's drafts are known on the host (`draft_token_ids`); a draft model's are made by the
runner on the device, so only their number is planned (`num_draft_tokens`, `draft_token_ids`
empty), as a pending token's value is not known either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minivllm.sampling_params import SamplingParams


@dataclass(slots=True)
class PromptLogprobRows:
    """Prompt positions of a scheduled chunk whose logits score the prompt token after them.

    Positions start, start + 1, ... score target_ids[0], target_ids[1], ... (the prompt tokens at
    start + 1, ...), with the num_logprobs most likely tokens beside each.
    """

    start: int
    target_ids: list[int]
    num_logprobs: int


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step.

    start: position of the first new token (= tokens whose K/V is already cached).
    token_ids: the new tokens the host knows; with `pending`, the first new token is missing here
        and comes from the previous step's sampled tokens on the device.
    block_table: the sequence's whole block table (the runner uploads only what changed).
    num_samples: rows sampled from this sequence's last new token: 0 (a prefill chunk that is not
        the last), 1, or 1 + the parallel samples forked from it this step.
    draft_token_ids / num_draft_tokens: the guesses verified after the known tokens; their ids
        when the host knows them, else (a draft model on the device) empty, with their number.
    """

    seq_id: int
    start: int
    token_ids: list[int]
    pending: bool
    block_table: list[int]
    num_samples: int
    is_decode: bool = False  # computes one output token (else prompt tokens, or a recompute)
    prompt_logprobs: PromptLogprobRows | None = None  # only for requests that asked for them
    draft_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids) + self.pending + self.num_draft_tokens

    @property
    def num_logits_rows(self) -> int:
        """Rows of logits the step computes for this sequence: one per sample of its last token,
        or, verifying drafts, one per position from its last known token on (1 + drafts)."""
        return 1 + self.num_draft_tokens if self.num_draft_tokens else self.num_samples


@dataclass(slots=True)
class SampleRow:
    """One token to sample: whose, and with which settings.

    seed_offset: sample i of a request draws from seed + i, so its n samples differ.
    banned_token_ids: tokens that may not be drawn yet (EOS and stop ids before min_tokens).
    prompt_token_ids / output_token_ids: for penalties only (empty otherwise).
    """

    seq_id: int
    params: SamplingParams
    seed_offset: int = 0
    banned_token_ids: tuple[int, ...] = ()
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)


# What the runner returns for one scored position, a plain tuple:
#
#     (token_id, logprob, rank, top_ids, top_logprobs)
#
# the token there, its log-probability and rank (1 = most likely), and the most likely tokens
# with theirs, best first (two tuples). Ids only: whoever shows it adds the text (the engine for
# `LLM`'s outputs, a server's frontend for its own).
#
# Plain tuples of numbers, because a request keeps one per generated token until it finishes,
# tens of thousands in a busy server: Python's garbage collector stops tracking a plain tuple of
# numbers (or of such tuples) the first time it sees one, but never a dataclass, a NamedTuple or a
# list, so those would make every collection longer and full collections more frequent. They
# also cross the engine's pipe as they are (512 of them pickled in 0.38x the time of as many
# NamedTuples, 2-core CPU).
TokenLogprobs = tuple[int, float, int, tuple[int, ...], tuple[float, ...]]


@dataclass
class StepLogprobs:
    """The log-probabilities a step computed, for the rows and chunks that asked.

    sampled: sample row index (in `SchedulerOutput.sample_rows`) -> its sampled token's.
    prompt: seq id -> one record per position of its chunk's `PromptLogprobRows`, in order.
    """

    sampled: dict[int, TokenLogprobs] = field(default_factory=dict)
    prompt: dict[int, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass
class SchedulerOutput:
    """The batch of one step.

    seqs: the scheduled sequences in batch order. sample_rows: one per sampled token, in the
    order the runner returns tokens; the rows of a sequence follow its `num_samples`, in batch
    order. block_copies: (src, dst) KV blocks to copy before the forward (copy-on-write).
    finished_seq_ids: sequences that ended since the last step (the runner drops their state);
    preempted_seq_ids: sequences that lost their blocks (the runner drops their block table).
    structured_rows: the sample rows whose sequence follows a grammar (structured output). Their
    allowed tokens depend on the token the previous step is still sampling, so the runner only
    launches the forward pass and samples later, when the engine brings the grammar bitmask
    (`ModelRunner.sample`); see docs/structured_output.md.
    """

    seqs: list[ScheduledSeq]
    sample_rows: list[SampleRow]
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)
    preempted_seq_ids: list[int] = field(default_factory=list)
    scores_prompts: bool = False  # some seq has `prompt_logprobs` rows (the runner looks only then)
    structured_rows: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def num_logits_rows(self) -> int:
        return sum(s.num_logits_rows for s in self.seqs)
