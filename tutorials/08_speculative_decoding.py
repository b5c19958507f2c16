"""Tutorial 8: speculative decoding: guess several tokens, let the model check them all at once.

    python tutorials/08_speculative_decoding.py [--out DIR] [--smoke]

At batch 1 a decode step reads every weight to compute one token; computing five costs about the
same, because the step is bound by reading, not by arithmetic. So a *proposer* guesses the next
tokens (drafts), the model computes the last token and the drafts in one forward, and keeps the
drafts it agrees with, plus one token of its own. Here:

1. the n-gram proposer (prompt lookup) by hand: where it finds the last tokens, what it proposes;
2. the rule that keeps or rejects a draft, on a vocabulary of five tokens;
3. the real engine with `speculative_config`: the same greedy tokens in fewer steps, and the
   acceptance at each draft position, for the n-gram proposer and for two draft models.

docs/speculative_decoding.md has the design.
"""

from __future__ import annotations

import atexit
import json
import random
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import heading, parse_args, tiny_model  # noqa: E402

from minivllm import LLM, SamplingParams  # noqa: E402
from minivllm.engine.sequence import Sequence  # noqa: E402
from minivllm.engine.speculation import NgramProposer  # noqa: E402
from minivllm.layers.rejection_sampler import NO_TOKEN, rejection_sample  # noqa: E402
from minivllm.layers.sampler import SamplingBatch  # noqa: E402

ENGINE = dict(device="cpu", dtype="float32", attention_backend="torch", block_size=4, num_kv_blocks=256,
              max_model_len=160)


def first_layer_of(model: str) -> str:
    """A draft that is the model's first layer alone: the same files, and a config.json that says
    one layer (the loader skips the tensors of the others). Same vocabulary, by construction."""
    out = Path(tempfile.mkdtemp(prefix="minivllm-first-layer-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    for f in Path(model).iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((Path(model) / "config.json").read_text())
    config["num_hidden_layers"] = 1
    if "layer_types" in config:  # newer configs list each layer's kind
        config["layer_types"] = config["layer_types"][:1]
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def prompts_that_repeat(count: int) -> list[list[int]]:
    """A phrase said three times and begun a fourth: what prompt lookup is made for."""
    rng = random.Random(1)
    phrases = [[rng.randrange(4, 500) for _ in range(8)] for _ in range(count)]
    return [p * 3 + p[:3] for p in phrases]


def lookup_by_hand() -> None:
    heading("1. Prompt lookup: find the last tokens earlier on, propose what followed")
    tokens = [7, 3, 9, 4, 8, 1, 2, 7, 3, 9]
    proposer = NgramProposer(min_n=2, max_n=4)
    drafts = proposer.propose(Sequence("demo", tokens, SamplingParams()), max_drafts=4)
    print(f"tokens so far: {tokens}")
    print(f"the last 3 tokens {tokens[-3:]} occurred at position 0, followed by {tokens[3:7]}")
    print(f"proposed drafts (k = 4): {drafts}")
    print("the model computes positions 9..13 in one forward: after 9, after 4, after 8, ... and keeps the")
    print("drafts while its own choice agrees; at the first disagreement its own token replaces the draft.")


def the_rule() -> torch.Tensor:
    heading("2. Keep a draft x with probability min(1, p(x) / q(x)); else draw from max(p - q, 0)")
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])  # the model's distribution at the first position
    logits = p.log().expand(2, 5)  # [positions, V]: the same distribution after the draft, for simplicity
    n = 20_000
    params = SamplingParams(temperature=1.0)
    batch = SamplingBatch.build([params] * n, [[]] * n, [[]] * n, [[]] * n, [None] * n, 5)
    drafts = torch.full((n, 1), 3)  # an n-gram proposer's guess: a point mass on token 3
    out = rejection_sample(logits.expand(n, 2, 5), drafts, torch.ones(n, dtype=torch.long), batch)
    first = torch.bincount(out[:, 0], minlength=5).float() / n
    print(f"target p:                          {[round(v, 3) for v in p.tolist()]}")
    print(f"first token over {n} verifications: {[round(v, 3) for v in first.tolist()]}")
    print(f"draft 3 kept in {(out[:, 0] == 3).float().mean():.1%} of them (p(3) = 10%): a point-mass q")
    print("is accepted with probability p(x), and a rejection draws from p without x, so the first")
    print(f"token is distributed exactly as p. Tokens gained per step: 1 or 2 "
          f"(mean {(out != NO_TOKEN).sum(1).float().mean():.2f}).")
    return first


def run_engine(model: str, max_tokens: int, draft_model: str) -> dict:
    heading("3. The engine: the same greedy tokens, in fewer steps")
    prompts = prompts_that_repeat(1)  # one sequence: its steps are the engine's steps
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    off = LLM(model, **ENGINE)
    expected = [o.token_ids for o in off.generate(prompts, params, use_tqdm=False)]
    steps_off = off.engine.get_stats()["engine"]["num_steps"]
    configs = {
        "n-gram (k=4)": {"method": "ngram", "num_speculative_tokens": 4},
        "draft = the model itself (k=4)": {"method": "draft", "model": model, "num_speculative_tokens": 4},
        "draft = its first layer (k=4)": {"method": "draft", "model": draft_model, "num_speculative_tokens": 4},
    }
    per_position = {}
    print(f"without speculation: {steps_off} steps")
    for name, spec in configs.items():
        llm = LLM(model, speculative_config=spec, **ENGINE)
        got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == expected, f"{name}: speculation changed the greedy output"
        stats = llm.engine.get_stats()
        s = stats["speculative"]
        per_position[name] = s["acceptance_rate_per_position"]
        print(f"{name:<31} {stats['engine']['num_steps']:>3} steps, same tokens; drafts {s['num_draft_tokens']}, "
              f"accepted {s['num_accepted_tokens']}, mean acceptance length {s['mean_acceptance_length']:.2f}")
    print("\nA rejected draft's K/V was written too: the scheduler moves num_computed_tokens back over it")
    print("and returns blocks that held nothing else; the next step writes those slots again.")
    return per_position


def draw(per_position: dict, first: torch.Tensor, out) -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(per_position)
    for i, (name, rates) in enumerate(per_position.items()):
        positions = [int(p) for p in rates]
        ax.bar([p + (i - (len(per_position) - 1) / 2) * width for p in positions], list(rates.values()),
               width, label=name)
    ax.set_xticks(sorted({int(p) for rates in per_position.values() for p in rates}))
    ax.set_xlabel("draft position (1 = the token right after the last known one)")
    ax.set_ylabel("verifications that accepted a draft there")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance per draft position (tiny random model, greedy)")
    ax.legend(fontsize=8)
    p = [0.5, 0.2, 0.15, 0.1, 0.05]
    bx.bar(range(5), p, 0.4, label="target p", color="tab:gray")
    bx.bar([x + 0.4 for x in range(5)], first.tolist(), 0.4, label="first token, verified", color="tab:green")
    bx.set_xlabel("token")
    bx.set_title("Rejection sampling keeps p")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "acceptance_per_position.png", dpi=120)
    plt.close(fig)
    print(f"\nwrote {out / 'acceptance_per_position.png'}")


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], "08_speculative_decoding")
    model = tiny_model(args.model)
    draft = first_layer_of(model)
    lookup_by_hand()
    first = the_rule()
    per_position = run_engine(model, 24 if args.smoke else 48, draft)
    draw(per_position, first, args.out)


if __name__ == "__main__":
    main()
