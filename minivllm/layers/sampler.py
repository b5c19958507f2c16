"""The Sampler: from one row of logits per sequence to one next token per sequence.

Each row goes through the same pipeline, with its own request's settings:

0. grammar      structured output: the tokens the row's grammar forbids are dropped (-inf), from
                a bitmask the engine fills on the host (`apply_token_bitmask`)
1. penalties    repetition (prompt + output tokens), presence and frequency (output tokens)
2. logit_bias   the request's {token id: bias} added to those logits
3. bans         EOS and stop tokens are forbidden until `min_tokens` tokens were generated
4. greedy rows  take the argmax here and skip the rest
5. temperature  logits / T
6. filters      top-k, top-p (nucleus), min-p: drop unlikely tokens (their logit becomes -inf)
7. sample       one draw from softmax(logits)

Then, for the rows that asked for `logprobs`, the log-probabilities of the chosen tokens and the
top-k (layers/logprobs.py), of the raw logits (the model's own distribution) or of the processed
ones (what step 7 drew from; for a greedy row, what step 4 took the argmax of).

Drawing: instead of `torch.multinomial` we use the "exponential race": with E_i ~ Exp(1)
independent, argmax_i p_i / E_i is distributed exactly like a draw from p. It needs exactly one
random number per vocabulary entry, so a request with a `seed` draws from its own
`torch.Generator` the same numbers whatever else is in the batch: seeded sampling is
reproducible regardless of batch composition.

`Sampler.sample(logits, rows, bitmask)` is what the model runner calls each step: it takes the
step's plain `SampleRow`s (and, when some follow a grammar, the step's bitmask), keeps the seeded
generators of live sequences between steps, and skips the pipeline altogether (one argmax) when
every row is plain greedy: a step in which no row asks for penalties, bans, a bias,
log-probabilities or a grammar does no more than that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minivllm.layers.logprobs import logprobs_payload
from minivllm.sampling_params import SamplingParams
from minivllm.step import SampleRow


@dataclass
class SamplerOutput:
    """One step's draws, on the device.

    logprobs: the payload (layers/logprobs.py) of the rows whose request set `logprobs`, in row
    order; None when no row asked.
    """

    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None


@dataclass
class SamplingBatch:
    """Per-row sampling settings of one step, as tensors on the logits' device.

    Built by `SamplingBatch.build`; the token lists are only kept for rows with penalties or bans.
    """

    temperature: torch.Tensor  # [B] float32; 0 for greedy rows
    top_k: torch.Tensor  # [B] int64; vocab size = no limit
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    banned_token_ids: list[list[int]]
    generators: list[torch.Generator | None]
    all_greedy: bool
    any_penalties: bool
    any_bans: bool
    any_filters: bool
    # (rows, token ids, biases) of every logit_bias entry, flat; None when no row has one.
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    any_processed_logprobs: bool = False  # some row reports the processed distribution

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        banned_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> SamplingBatch:
        n = len(params)
        for name, values in (("prompt_token_ids", prompt_token_ids), ("output_token_ids", output_token_ids),
                             ("banned_token_ids", banned_token_ids), ("generators", generators)):
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} rows but params has {n}")

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        any_penalties = any(p.has_penalties for p in params)
        return cls(
            temperature=column([0.0 if p.is_greedy else p.temperature for p in params]),
            top_k=column([p.top_k if p.has_top_k else vocab_size for p in params], torch.int64),
            top_p=column([p.top_p for p in params]),
            min_p=column([p.min_p for p in params]),
            repetition_penalty=column([p.repetition_penalty for p in params]),
            presence_penalty=column([p.presence_penalty for p in params]),
            frequency_penalty=column([p.frequency_penalty for p in params]),
            prompt_token_ids=prompt_token_ids if any_penalties else [[] for _ in params],
            output_token_ids=output_token_ids if any_penalties else [[] for _ in params],
            banned_token_ids=banned_token_ids,
            generators=generators,
            all_greedy=all(p.is_greedy for p in params),
            any_penalties=any_penalties,
            any_bans=any(banned_token_ids),
            any_filters=any(p.has_top_k or p.top_p < 1.0 or p.min_p > 0.0 for p in params),
            logit_bias=_pack_logit_bias(params, device),
            any_processed_logprobs=any(p.logprobs is not None and p.logprobs_mode == "processed" for p in params),
        )


def _pack_logit_bias(params: list[SamplingParams], device):
    """Every row's logit_bias as three flat tensors (row, token id, bias), or None."""
    entries = [(row, token_id, bias) for row, p in enumerate(params) if p.logit_bias
               for token_id, bias in p.logit_bias.items()]
    if not entries:
        return None
    rows, token_ids, biases = zip(*entries)
    return (torch.tensor(rows, dtype=torch.int64, device=device),
            torch.tensor(token_ids, dtype=torch.int64, device=device),
            torch.tensor(biases, dtype=torch.float32, device=device))


def _token_counts(rows: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[B, V] count of each token id in each row's list."""
    counts = torch.zeros(len(rows), vocab_size, dtype=torch.float32, device=device)
    lengths = [len(r) for r in rows]
    if sum(lengths) == 0:
        return counts
    row_idx = torch.repeat_interleave(torch.arange(len(rows), device=device), torch.tensor(lengths, device=device))
    tokens = torch.tensor([t for r in rows for t in r], dtype=torch.int64, device=device)
    counts.index_put_((row_idx, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
    return counts


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (HF/CTRL rule), presence and frequency penalties, in place on a copy."""
    vocab_size = logits.shape[-1]
    output_counts = _token_counts(batch.output_token_ids, vocab_size, logits.device)
    prompt_counts = _token_counts(batch.prompt_token_ids, vocab_size, logits.device)
    seen = (output_counts + prompt_counts) > 0
    rep = batch.repetition_penalty[:, None].expand_as(logits)
    # A seen token becomes less likely either way: a positive logit shrinks, a negative one grows.
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - batch.frequency_penalty[:, None] * output_counts
    logits = logits - batch.presence_penalty[:, None] * (output_counts > 0).float()
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Add each (row, token id, bias) entry to that logit, on a copy: one scatter for the step."""
    rows, token_ids, biases = bias
    return logits.index_put((rows, token_ids), biases, accumulate=True)


def apply_bans(logits: torch.Tensor, banned_token_ids: list[list[int]]) -> torch.Tensor:
    """Make the banned tokens of each row impossible (min_tokens keeps EOS away)."""
    logits = logits.clone()
    for row, banned in enumerate(banned_token_ids):
        if banned:
            logits[row, banned] = float("-inf")
    return logits


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Set the logits of the tokens each row's filters drop to -inf.

    top_k [B] (vocab size = keep all), top_p [B] (1 = keep all), min_p [B] (0 = keep all).
    All three work on the sorted distribution; the most likely token always survives.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches top_p, i.e. drop a token once the mass
    # *before* it already reaches top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    # min-p: drop tokens less than min_p times as likely as the most likely one.
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def exponential_noise(shape, generators: list[torch.Generator | None], device) -> torch.Tensor:
    """Exp(1) noise per row; a row with a generator draws from it alone."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        noise.exponential_()  # the unseeded rows share the global RNG
    for i in seeded:
        noise[i].exponential_(generator=generators[i])
    # An exact 0 would turn p / E into inf (or nan for p = 0); it is a 1-in-billions draw.
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The logits with -inf wherever a row's grammar forbids the token (a new tensor).

    bitmask: [B, ceil(V / 32)] int32 on the logits' device, xgrammar's layout: bit t % 32 of word
    t // 32 is 1 when token t is allowed; a row of -1 (every bit set) allows everything. Read as
    bytes, which on every little-endian machine (x86, ARM, NVIDIA GPUs) keep that order, it is bit
    t % 8 of byte t // 8: unpacking bytes takes a quarter of the memory of unpacking int32 words.
    Bits past the vocabulary (the last word's padding) are dropped.
    """
    rows, vocab_size = logits.shape
    packed = bitmask.view(torch.uint8)  # [B, 4 * words]
    # 1, 2, 4, ..., 128, made on the device: a tensor built from a list would be a blocking copy.
    bits = torch.ones(8, dtype=torch.uint8, device=logits.device) << torch.arange(8, dtype=torch.uint8,
                                                                                  device=logits.device)
    forbidden = (packed.unsqueeze(-1) & bits) == 0  # [B, 4 * words, 8]: token 8 * byte + bit
    return logits.masked_fill(forbidden.view(rows, -1)[:, :vocab_size], float("-inf"))


def plain_greedy(row: SampleRow) -> bool:
    """Greedy, no penalties, no bias, nothing banned: the pipeline would reduce to an argmax (and
    the row's processed distribution is its raw one)."""
    params = row.params
    return params.is_greedy and not params.has_penalties and not row.banned_token_ids and not params.logit_bias


class Sampler:
    """Turns [B, V] logits into [B] token ids, each row with its own SamplingParams."""

    def __init__(self, vocab_size: int | None = None, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._generators: dict[int, torch.Generator] = {}  # seq id -> its seeded RNG

    def sample(self, logits: torch.Tensor, rows: list[SampleRow],
               bitmask: torch.Tensor | None = None) -> SamplerOutput:
        """One token per row of `logits` ([len(rows), V]), and the log-probabilities of the rows
        that asked, as device tensors (no host sync).

        bitmask: the step's grammar bitmask ([len(rows), ceil(V / 32)] int32, on the logits'
        device; see `apply_token_bitmask`), or None when no row follows a grammar. The raw
        log-probabilities are the model's, before the mask; the processed ones come after it.
        """
        masked = logits if bitmask is None else apply_token_bitmask(logits, bitmask)
        if all(plain_greedy(row) for row in rows):
            tokens = masked.argmax(dim=-1)  # without a mask: the raw logits' argmax, as logprobs may know
            return SamplerOutput(tokens, self.logprobs(rows, logits, None if bitmask is None else masked, tokens,
                                                       greedy=bitmask is None))
        tokens, processed = self.run(masked, self.batch(rows))
        return SamplerOutput(tokens, self.logprobs(rows, logits, processed, tokens))

    def logprobs(self, rows: list[SampleRow], raw: torch.Tensor, processed: torch.Tensor | None,
                 tokens: torch.Tensor, greedy: bool = False) -> torch.Tensor | None:
        """The payload of the rows that asked for logprobs, each from its own distribution:
        `raw` (the logits as the model gave them) or `processed` (None: same as raw). greedy:
        `processed` is None and every token is the argmax of `raw`."""
        asked = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        if not asked:
            return None
        num_top = max(rows[i].params.logprobs for i in asked)
        index = None if len(asked) == len(rows) else torch.tensor(asked, device=raw.device)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if index is None else t.index_select(0, index)

        source = pick(raw)
        wants_processed = [rows[i].params.logprobs_mode == "processed" for i in asked]
        if processed is not None and any(wants_processed):
            mask = torch.tensor(wants_processed, device=raw.device)
            source = torch.where(mask[:, None], pick(processed), source)
        return logprobs_payload(source, pick(tokens), num_top, greedy)

    def batch(self, rows: list[SampleRow]) -> SamplingBatch:
        """The step's rows as a SamplingBatch (settings as tensors, the seeded generators)."""
        return SamplingBatch.build(
            [row.params for row in rows],
            prompt_token_ids=[row.prompt_token_ids for row in rows],
            output_token_ids=[row.output_token_ids for row in rows],
            banned_token_ids=[list(row.banned_token_ids) for row in rows],
            generators=[self._generator(row) for row in rows],
            vocab_size=self.vocab_size,
            device=self.device,
        )

    def _generator(self, row: SampleRow) -> torch.Generator | None:
        """The seeded RNG of a sequence, made on its first draw and kept until `release`."""
        seed = row.params.seed
        if seed is None:
            return None
        generator = self._generators.get(row.seq_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed + row.seed_offset)
            self._generators[row.seq_id] = generator
        return generator

    def release(self, seq_ids) -> None:
        """Forget the generators of sequences that finished."""
        for seq_id in seq_ids:
            self._generators.pop(seq_id, None)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """[B, V] logits -> [B] tokens."""
        return self.run(logits, batch)[0]

    def run(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pipeline: (tokens [B], the processed logits [B, V] each row's token came from, or
        None when no row reports the processed distribution)."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        if logits.shape[0] != batch.temperature.shape[0]:
            raise ValueError(
                f"logits has {logits.shape[0]} rows but the sampling batch has {batch.temperature.shape[0]}"
            )
        logits = logits.float()
        if batch.any_penalties:
            logits = apply_penalties(logits, batch)
        if batch.logit_bias is not None:
            logits = apply_logit_bias(logits, batch.logit_bias)
        if batch.any_bans:
            logits = apply_bans(logits, batch.banned_token_ids)
        greedy_tokens = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy_tokens, logits if batch.any_processed_logprobs else None

        is_greedy = batch.temperature == 0
        # Greedy rows divide by 1 (their result is replaced by the argmax anyway).
        temperature = torch.where(is_greedy, torch.ones_like(batch.temperature), batch.temperature)
        scaled = logits / temperature[:, None]
        if batch.any_filters:
            scaled = apply_top_k_top_p_min_p(scaled, batch.top_k, batch.top_p, batch.min_p)
        probs = scaled.softmax(dim=-1)
        noise = exponential_noise(probs.shape, batch.generators, probs.device)
        sampled_tokens = (probs / noise).argmax(dim=-1)
        tokens = torch.where(is_greedy, greedy_tokens, sampled_tokens)
        if not batch.any_processed_logprobs:
            return tokens, None
        return tokens, torch.where(is_greedy[:, None], logits, scaled)
