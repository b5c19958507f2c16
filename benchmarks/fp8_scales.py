"""Which scale granularity for an fp8 (e4m3) KV cache? Accuracy against extra bytes, measured.

An e4m3 number has 3 mantissa bits and a range of +-448: every K/V value is divided by a scale
so that its group fits the range, stored in 8 bits, and multiplied back inside the kernel. The
question is how large the group that shares a scale should be:

    tensor       one scale per layer for K and one for V, fixed in advance (calibrated)
    head         one per KV head and layer, fixed in advance
    token        one per token (all its KV heads), computed when the token is written
    token_head   one per (token, KV head), computed when the token is written, stored beside
                 the page (`_bf16`: the same scales stored in bfloat16, half the bytes)

For each granularity and each K/V distribution below, this quantizes a paged cache, runs the
reference attention (`minivllm.kernels.reference`) on the dequantized cache, and reports the
error of the attention output against fp32 attention on the unquantized values, next to the same
error for a bf16 cache; the queries are scaled so that each head's logits have a standard
deviation of 3. A fixed scale needs a calibration: `calibrated` takes it from the amax of
the very data it quantizes (the best a fixed scale can do), `calib10` from the first 10 % of the
tokens (the rest may saturate), `unit` is scale 1 (no calibration at all).

The distributions are synthetic (no checkpoint is downloaded): `gaussian`; `outliers`, K with
log-normal per-channel magnitudes and two channels per head 20x larger, the pattern seen in
LLM keys, V with log-normal per-token magnitudes; `sinks`, `outliers` plus KV heads whose
magnitudes differ by 100x and a first token 50x larger than the rest, as attention sinks are.

Runs on CPU in a few seconds (accuracy, not speed, so CPU numbers are the real ones):

    python benchmarks/fp8_scales.py --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from minivllm.kernels import reference

E4M3_MAX = 448.0
HQ, HKV, D, BLOCK = 32, 8, 128, 16  # the attn_bench shape
QUERY_LENS, SEQ_LENS = [1, 1, 1, 1, 64], [2048, 1500, 700, 33, 1024]  # decodes + a prefill chunk


def make_kv(kind: str, num_tokens: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_tokens, Hkv, D] float32 keys and values of one of the distributions."""
    k = torch.randn(num_tokens, HKV, D, generator=g)
    v = torch.randn(num_tokens, HKV, D, generator=g)
    if kind == "gaussian":
        return k, v
    channel = torch.exp(torch.randn(HKV, D, generator=g))  # log-normal channel magnitudes
    channel[:, torch.randperm(D, generator=g)[:2]] *= 20.0
    k = k * channel
    v = v * torch.exp(0.5 * torch.randn(num_tokens, 1, 1, generator=g))
    if kind == "outliers":
        return k, v
    head = torch.logspace(-1, 1, HKV)[torch.randperm(HKV, generator=g)][None, :, None]
    k, v = k * head, v * head
    return k, v


def scales(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """The scale of each value of x [N, Hkv, D] (broadcastable), amax / 448, never 0."""
    amax = {
        "tensor": lambda: x.abs().amax(),
        "tensor_calib10": lambda: x[: max(1, x.shape[0] // 10)].abs().amax(),
        "head": lambda: x.abs().amax(dim=(0, 2), keepdim=True),
        "head_calib10": lambda: x[: max(1, x.shape[0] // 10)].abs().amax(dim=(0, 2), keepdim=True),
        "token": lambda: x.abs().amax(dim=(1, 2), keepdim=True),
        "token_head": lambda: x.abs().amax(dim=2, keepdim=True),
        "unit": lambda: torch.tensor(E4M3_MAX),
    }[granularity]()
    return (amax / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def bf16_scales(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """The same scales stored in bfloat16: the rounded scale is the one that quantizes, so the
    only cost is the clamp of a value that lands just past 448 when the scale rounded down."""
    return scales(x, granularity).bfloat16().float()


def fp8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize to e4m3 with a clamp to its range (no overflow), then dequantize."""
    q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.float() * scale


# bytes of scales per token and layer (K and V), for Hkv heads; per-layer constants count 0.
SCALE_BYTES = {"unit": 0, "tensor": 0, "tensor_calib10": 0, "head": 0, "head_calib10": 0,
               "token": 2 * 4, "token_head": 2 * HKV * 4, "token_head_bf16": 2 * HKV * 2}


def attention(query, k, v, seq_lens, query_lens, g) -> torch.Tensor:
    """Reference paged attention over k/v [N, Hkv, D] laid out in shuffled blocks."""
    tables, caches, start = [], [], 0
    num_blocks = sum(math.ceil(s / BLOCK) for s in seq_lens)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))
    k_cache = torch.zeros(num_blocks, BLOCK, HKV, D)
    v_cache = torch.zeros_like(k_cache)
    width = max(math.ceil(s / BLOCK) for s in seq_lens)
    first_block = 0
    for s in seq_lens:
        n = math.ceil(s / BLOCK)
        blocks = perm[first_block:first_block + n]
        pos = torch.arange(s)
        slots = blocks[pos // BLOCK] * BLOCK + pos % BLOCK
        reference.write_kv_cache(k[start:start + s], v[start:start + s], k_cache, v_cache, slots)
        tables.append(torch.cat([blocks, torch.zeros(width - n, dtype=blocks.dtype)]))
        start, first_block = start + s, first_block + n
    del caches
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return reference.paged_attention(
        query, k_cache, v_cache, torch.stack(tables).to(torch.int32),
        torch.tensor(seq_lens, dtype=torch.int32), cu, D ** -0.5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(kind: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    k, v = make_kv(kind, sum(SEQ_LENS), g)
    # Queries scaled per head so that the logits q.k / sqrt(D) have a standard deviation of 3:
    # peaked enough to matter, as trained models' are; raw outlier keys would make attention an
    # argmax, where any rounding of a logit flips the output.
    key_power = (k ** 2).mean(dim=(0, 2)).repeat_interleave(HQ // HKV)  # E[k_d^2] per q head
    query = torch.randn(sum(QUERY_LENS), HQ, D, generator=g) * (3.0 / key_power.sqrt())[:, None]
    exact = attention(query, k, v, SEQ_LENS, QUERY_LENS, g)
    row = {"distribution": kind}
    bf16 = attention(query, k.bfloat16().float(), v.bfloat16().float(), SEQ_LENS, QUERY_LENS, g)
    row["bf16"] = dict(attn_rel_error=rel(bf16, exact), kv_rel_error=rel(
        torch.cat([k.bfloat16().float(), v.bfloat16().float()]), torch.cat([k, v])))
    for granularity in SCALE_BYTES:
        if granularity.endswith("_bf16"):
            kq = fp8_round_trip(k, bf16_scales(k, granularity.removesuffix("_bf16")))
            vq = fp8_round_trip(v, bf16_scales(v, granularity.removesuffix("_bf16")))
        else:
            kq = fp8_round_trip(k, scales(k, granularity))
            vq = fp8_round_trip(v, scales(v, granularity))
        out = attention(query, kq, vq, SEQ_LENS, QUERY_LENS, g)
        row[granularity] = dict(attn_rel_error=rel(out, exact),
                                kv_rel_error=rel(torch.cat([kq, vq]), torch.cat([k, v])))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for fp8_scales.json")
    args = parser.parse_args()
    kinds = ["gaussian", "outliers", "sinks"]
    rows = [measure(kind, seed) for kind in kinds for seed in range(args.seeds)]
    columns = ["bf16", *SCALE_BYTES]
    # The worst over seeds: a granularity is as good as its worst case.
    table = {kind: {c: max(r[c]["attn_rel_error"] for r in rows if r["distribution"] == kind)
                    for c in columns} for kind in kinds}
    data_bytes = 2 * HKV * D  # fp8 K and V per token and layer
    extra = {c: (SCALE_BYTES.get(c, 0) / data_bytes if c != "bf16" else 1.0) for c in columns}
    if args.out:
        path = Path(args.out) / "fp8_scales.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(
            shape=dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, block_size=BLOCK,
                       query_lens=QUERY_LENS, seq_lens=SEQ_LENS),
            device="cpu (accuracy only)", torch=torch.__version__, rows=rows,
            worst_attn_rel_error=table, extra_bytes_over_fp8_data=extra), indent=2))
        print(f"wrote {path}")
    print("attention output, relative error vs fp32 (worst of "
          f"{args.seeds} seeds); last row: scale bytes / fp8 K+V bytes")
    print(f"{'distribution':<12}" + "".join(f"{c:>16}" for c in columns))
    for kind in kinds:
        print(f"{kind:<12}" + "".join(f"{table[kind][c]:>16.2e}" for c in columns))
    print(f"{'extra bytes':<12}" + "".join(f"{extra[c]:>16.3f}" for c in columns))


if __name__ == "__main__":
    main()
