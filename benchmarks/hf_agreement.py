"""How often minivllm's greedy tokens agree with Hugging Face `generate`, per dtype: a figure.

In float32 the engine must equal `generate` token for token (tests/engine/test_engine_vs_hf.py
asserts that). In bf16 exact equality is not a fair demand: two correct implementations sum in a
different order, round differently, and once two candidate tokens' logits are closer than that
rounding, greedy decoding may pick either, after which the continuations differ. This script
measures how far they agree instead of asserting it:

* exact: fraction of prompts whose whole continuation is identical;
* prefix: mean length of the common prefix, as a fraction of max_tokens (divergence point);
* first-token: fraction of prompts whose first generated token agrees (one forward pass each).

Random-weight models have flat next-token distributions (near-ties everywhere), so their bf16
agreement is a pessimistic bound for a trained model.

    python benchmarks/hf_agreement.py                     # GPU: bf16 and float32, all four archs
    python benchmarks/hf_agreement.py --dtypes float32 --archs llama --num-prompts 4

On CPU it runs float32 only, with the reference backend.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import default_out, environment, write_json

ARCHS = ("llama", "qwen2", "qwen3", "opt")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def hf_greedy(model, prompts: list[list[int]], max_tokens: int, device) -> list[list[int]]:
    """One prompt at a time: no padding, so HF computes exactly the unpadded sequence."""
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens)
        outs.append(out[0, len(prompt):].tolist())
    return outs


def greedy_tokens(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """minivllm's greedy outputs, exactly max_tokens each (EOS ignored), as token ids."""
    outputs = llm.generate(prompts, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, use_tqdm=False)
    return [o.token_ids for o in outputs]


def agreement(ours: list[list[int]], theirs: list[list[int]], max_tokens: int) -> dict:
    """Exact rows, mean common prefix as a share of max_tokens, first-token agreement."""
    prefixes = []
    for a, b in zip(ours, theirs, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
    return {
        "exact": float(np.mean([a == b for a, b in zip(ours, theirs, strict=True)])),
        "prefix": float(np.mean(prefixes)) / max_tokens,
        "first_token": float(np.mean([p > 0 for p in prefixes])),
        "common_prefix_lengths": prefixes,
    }


def run_arch(arch: str, dtype_name: str, args, device, workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from minivllm import LLM, SamplingParams
    from minivllm.models import make_random_model

    model_dir = workdir / f"{arch}-{args.size}"
    if not model_dir.exists():
        make_random_model(model_dir, arch=arch, size=args.size, seed=args.seed)
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(args.seed)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    vocab = hf.config.vocab_size
    lengths = rng.integers(8, args.max_prompt_len + 1, size=args.num_prompts)
    prompts = [rng.integers(4, vocab, size=int(n)).tolist() for n in lengths]
    theirs = hf_greedy(hf, prompts, args.max_tokens, device)
    del hf
    llm = LLM(str(model_dir), dtype=dtype_name, device=device.type,
              num_kv_blocks=4096 if device.type == "cuda" else None, max_num_seqs=64)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    del llm
    result = {"arch": arch, "dtype": dtype_name, "num_prompts": args.num_prompts,
              "max_tokens": args.max_tokens, **agreement(ours, theirs, args.max_tokens)}
    print(f"  {arch:<6} {dtype_name:<9} exact {result['exact']:.2f}  prefix {result['prefix']:.2f}  "
          f"first token {result['first_token']:.2f}", flush=True)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--dtypes", default=None, help="comma list of bfloat16, float16, float32")
    p.add_argument("--size", default="small", help="random model size (tiny, small)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-prompt-len", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = (args.dtypes or ("bfloat16,float32" if device.type == "cuda" else "float32")).split(",")
    archs = args.archs.split(",")
    for name in dtypes:
        if name not in DTYPES:
            p.error(f"--dtypes: unknown {name!r} (choose from {sorted(DTYPES)})")
    for arch in archs:
        if arch not in ARCHS:
            p.error(f"--archs: unknown {arch!r} (choose from {ARCHS})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="minivllm-agree-") as tmp:
        for dtype_name in dtypes:
            for arch in archs:
                rows.append(run_arch(arch, dtype_name, args, device, Path(tmp)))
    out = args.out or default_out("hf_agreement", args.size, device)
    payload = {"bench": "hf_agreement", "size": args.size, "rows": rows, **environment(device)}
    write_json(out, payload)
    print(f"\nwrote {out}\n{'arch':<7}{'dtype':<10}{'exact':>7}{'prefix':>8}{'first':>7}")
    for r in rows:
        print(f"{r['arch']:<7}{r['dtype']:<10}{r['exact']:>7.2f}{r['prefix']:>8.2f}{r['first_token']:>7.2f}")
    return payload


if __name__ == "__main__":
    main()
