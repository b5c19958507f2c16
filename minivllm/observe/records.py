"""The step record: what one engine step did, as plain data.

The engine writes one `StepRecord` per step, once the step's tokens are back, and hands it to
the stats collector (`stats.py`) and, when on, to the trace (`trace.py`). Its `StepTimings` is
filled by the two sides of a step: the model runner times its phases (prepare, forward, sample)
into a fresh one and hands it back with the step's tokens; the engine adds its own (schedule,
wait, update).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# The host-side phases of one step, in order (see StepTimings).
STEP_PHASES = ("schedule", "prepare", "forward", "grammar", "sample", "wait", "update")


@dataclass
class StepTimings:
    """Where one step's host time went, in seconds of `time.perf_counter()`.

    On a GPU the host only *launches* work, so read these as host time, not GPU time:

    * schedule: `Scheduler.schedule()`;
    * prepare: copy-on-write block copies, packing the step metadata, its upload (runner);
    * forward: launching the forward pass or replaying its CUDA graph (runner); run eagerly, its
      attention plan too (a CPU's gather indices);
    * grammar: filling the grammar bitmask of the rows with structured output (engine; 0 without);
    * sample: launching the LM head and the sampler (runner);
    * wait: the host blocked until the GPU had the step's tokens. With overlap the host plans
      the next step first, so this shrinks to what the GPU still needed after that;
    * update: `Scheduler.update()` (tokens appended, stop rules) and the finished outputs.

    `graph_batch_size` is the bucket whose CUDA graph ran the forward (None: eager);
    `graph_miss` says why a runner that has graphs ran this step eagerly (None otherwise).
    """

    schedule: float = 0.0
    prepare: float = 0.0
    forward: float = 0.0
    grammar: float = 0.0
    sample: float = 0.0
    wait: float = 0.0
    update: float = 0.0
    graph_batch_size: int | None = None
    graph_miss: str | None = None

    @property
    def cuda_graph(self) -> bool:
        """Did the forward replay a CUDA graph (of bucket `graph_batch_size`)?"""
        return self.graph_batch_size is not None

    def phases(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in STEP_PHASES}

    @property
    def host(self) -> float:
        """The host's own work on this step: every phase but waiting for the GPU."""
        return sum(self.phases().values()) - self.wait


@dataclass
class StepRecord:
    """What one step did, for stats, traces and plots."""

    step: int
    time: float  # when it was planned (perf_counter)
    num_prefill_seqs: int
    num_decode_seqs: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_sampled: int
    token_budget: int
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_free_blocks: int
    num_cached_free_blocks: int
    num_block_copies: int
    num_prefix_hit_tokens: int  # tokens taken from the prefix cache by admissions of this step
    num_partial_prefills: int  # prefill chunks that did not reach the end of their prompt
    preemptions: list = field(default_factory=list)  # Preemption records of the scheduler
    # Speculative decoding (counted in num_decode_tokens): drafts verified, and once the tokens
    # are back, how many were accepted, in all and at each draft position (1st, 2nd, ...).
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verifications: int = 0  # sequences that verified at least one draft
    drafts_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    finish_time: float = 0.0  # when its tokens were back and folded in (perf_counter)
    timings: StepTimings = field(default_factory=StepTimings)

    @property
    def num_scheduled_seqs(self) -> int:
        return self.num_prefill_seqs + self.num_decode_seqs

    @property
    def num_batched_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def num_generated_tokens(self) -> int:
        """Tokens the step gave its sequences: one per sampled row, plus accepted drafts."""
        return self.num_sampled + self.num_accepted_tokens

    @property
    def kind(self) -> str:
        """"prefill", "decode" or "mixed": which work the step's forward did."""
        if self.num_prefill_tokens and self.num_decode_tokens:
            return "mixed"
        return "prefill" if self.num_prefill_tokens else "decode"

    def add_acceptance(self, acceptance) -> None:
        """Count the (drafts, accepted) pairs of the sequences that verified drafts this step."""
        for num_drafts, num_accepted in acceptance:
            self.num_verifications += 1
            self.num_accepted_tokens += num_accepted
            add_per_position(self.drafts_per_position, [1] * num_drafts)
            add_per_position(self.accepted_per_position, [1] * num_accepted)

    def to_dict(self) -> dict:
        return {**asdict(self), "num_batched_tokens": self.num_batched_tokens,
                "num_scheduled_seqs": self.num_scheduled_seqs, "kind": self.kind,
                "num_generated_tokens": self.num_generated_tokens}


def add_per_position(total: list[int], counts: list[int]) -> None:
    """total[i] += counts[i] for every draft position i, growing `total` as needed."""
    total.extend([0] * (len(counts) - len(total)))
    for i, n in enumerate(counts):
        total[i] += n
