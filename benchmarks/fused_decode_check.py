"""Do the small-batch fusions beat the kernels they replace? (issue 26)

For one model's decode shapes this times, per layer, each fused kernel against the unfused
sequence it replaces, and a whole decode layer, with programmatic dependent launch (PDL) on and
off, and checks that fused and unfused outputs agree:

    add+norm+qkv       rms_norm (residual add) + F.linear  |  fused_linear.norm_linear
    rope+kv write      qk_norm_rope + write_kv_cache       |  qk_norm_rope(cache=...)
    o_proj             F.linear                            |  fused_linear.linear
    add+norm+gate_up   rms_norm + F.linear + silu_and_mul  |  norm_linear(swiglu=True)
    down_proj          F.linear                            |  fused_linear.linear
    layer              the above and paged attention (split-KV merge kernel | merged in the
                       attention kernel), in the engine's order

Each row is a CUDA graph of the op repeated over the model's layers, each with its own weights
and cache (so they stream from memory as in a real step), replayed; the time is the median
replay over the number of layers, so a row is "microseconds per layer". The fused linear
kernels run up to 16 rows; at larger batches their rows say n/a. `--sweep` also times the
one-row kernel's launch shapes per projection and prints the fastest.

    python benchmarks/fused_decode_check.py                   # qwen3-0.6b, batch 1, 16, 64
    python benchmarks/fused_decode_check.py --sweep --batch-sizes 1

On CPU it runs the tiny shape in the Triton interpreter, to check agreement; its times are no
GPU claim.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, cpu_disclaimer, environment, write_json
from minivllm.models.random_model import NAMED_SHAPES

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6)
OPS = ("add+norm+qkv", "rope+kv write", "o_proj", "add+norm+gate_up", "down_proj", "layer")


def make_layers(shape: dict, batch: int, context: int, block_size: int, device, dtype, seed=0):
    """Per layer: random weights and a paged cache holding `context` tokens per sequence."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden, inter, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    hq, hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    blocks_per_seq = -(-(context + 1) // block_size)

    def rand(*size, scale=1.0):  # drawn on the device: the caches of 28 layers are gigabytes
        return (torch.randn(*size, generator=g, device=device, dtype=dtype) * scale)

    layers = []
    for _ in range(shape["num_hidden_layers"]):
        cache = rand(batch * blocks_per_seq, block_size, hkv, d)
        layers.append(dict(
            norm1=1 + rand(hidden, scale=0.1), norm2=1 + rand(hidden, scale=0.1),
            q_norm=1 + rand(d, scale=0.1), k_norm=1 + rand(d, scale=0.1),
            qkv=rand((hq + 2 * hkv) * d, hidden, scale=hidden ** -0.5),
            o=rand(hidden, hq * d, scale=(hq * d) ** -0.5),
            gate_up=rand(2 * inter, hidden, scale=hidden ** -0.5),
            down=rand(hidden, inter, scale=inter ** -0.5),
            k_cache=cache, v_cache=cache.clone()))
    tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32).view(batch, blocks_per_seq)
    meta = dict(
        block_tables=tables.to(device),
        seq_lens=torch.full((batch,), context + 1, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=device),
        slot_mapping=(tables[:, context // block_size] * block_size
                      + context % block_size).to(device),
        positions=torch.full((batch,), context, device=device))
    return layers, meta


def layer_ops(shape, layers, meta, rotary, batch, device, dtype):
    """op name -> {"unfused": fn, "fused": fn}; each fn runs the op over every layer and returns
    the last output (the inputs are the same random activations for both)."""
    from minivllm.kernels import paged_attention, write_kv_cache
    from minivllm.layers import fused_linear
    from minivllm.layers.attention import KVCacheWrite
    from minivllm.layers.fused_ops import qk_norm_rope, rms_norm, silu_and_mul

    hidden, d, eps = shape["hidden_size"], shape["head_dim"], shape["rms_norm_eps"]
    hq, hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, hidden, generator=g).to(dtype).to(device)
    residual0 = torch.randn(batch, hidden, generator=g).to(dtype).to(device)
    attn_out = torch.randn(batch, hq * d, generator=g).to(dtype).to(device)
    act = torch.randn(batch, shape["intermediate_size"], generator=g).to(dtype).to(device)
    qkv0 = torch.randn(batch, (hq + 2 * hkv) * d, generator=g).to(dtype).to(device)
    small = batch <= fused_linear.MAX_ROWS
    tables = (rotary.cos_cached, rotary.sin_cached)

    def rope(qkv, layer, fused_write):
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = (t.view(batch, -1, d) for t in (q, k, v))
        cache = KVCacheWrite(layer["k_cache"], layer["v_cache"], meta["slot_mapping"])
        qk_norm_rope(q, k, meta["positions"], *tables, layer["q_norm"], layer["k_norm"], eps,
                     v=v, cache=cache if fused_write else None)
        if not fused_write:
            write_kv_cache(k, v, layer["k_cache"], layer["v_cache"], meta["slot_mapping"])
        return q

    def attend(q, layer):
        return paged_attention(q, layer["k_cache"], layer["v_cache"], meta["block_tables"],
                               meta["seq_lens"], meta["cu_seqlens_q"],
                               max_seq_len=int(meta["seq_lens"].max())).view(batch, hq * d)

    def unfused_layer(layer, h, residual):
        residual = residual.clone()
        qkv = F.linear(rms_norm(h, layer["norm1"], eps, residual), layer["qkv"])
        o = F.linear(attend(rope(qkv, layer, False), layer), layer["o"])
        up = silu_and_mul(F.linear(rms_norm(o, layer["norm2"], eps, residual), layer["gate_up"]))
        return F.linear(up, layer["down"]), residual

    def fused_layer(layer, h, residual):
        qkv, residual = fused_linear.norm_linear(h, residual, layer["norm1"], eps, layer["qkv"])
        o = fused_linear.linear(attend(rope(qkv, layer, True), layer), layer["o"])
        up, residual = fused_linear.norm_linear(o, residual, layer["norm2"], eps, layer["gate_up"],
                                                swiglu=True)
        return fused_linear.linear(up, layer["down"]), residual

    def over_layers(fn):
        def run():
            out = None
            for layer in layers:
                out = fn(layer)
            return out
        return run

    ops = {
        "add+norm+qkv": dict(
            unfused=lambda L: F.linear(rms_norm(x, L["norm1"], eps, residual0.clone()), L["qkv"]),
            fused=lambda L: fused_linear.norm_linear(x, residual0, L["norm1"], eps, L["qkv"])[0]),
        "rope+kv write": dict(unfused=lambda L: rope(qkv0.clone(), L, False),
                              fused=lambda L: rope(qkv0.clone(), L, True)),
        "o_proj": dict(unfused=lambda L: F.linear(attn_out, L["o"]),
                       fused=lambda L: fused_linear.linear(attn_out, L["o"])),
        "add+norm+gate_up": dict(
            unfused=lambda L: silu_and_mul(F.linear(rms_norm(x, L["norm2"], eps, residual0.clone()),
                                                    L["gate_up"])),
            fused=lambda L: fused_linear.norm_linear(x, residual0, L["norm2"], eps, L["gate_up"],
                                                     swiglu=True)[0]),
        "down_proj": dict(unfused=lambda L: F.linear(act, L["down"]),
                          fused=lambda L: fused_linear.linear(act, L["down"])),
        "layer": dict(unfused=lambda L: unfused_layer(L, x, residual0)[0],
                      fused=lambda L: fused_layer(L, x, residual0)[0]),
    }
    if not small:  # the fused linear kernels take at most MAX_ROWS rows
        for name in ("add+norm+qkv", "o_proj", "add+norm+gate_up", "down_proj", "layer"):
            del ops[name]["fused"]
    return {name: {kind: over_layers(fn) for kind, fn in pair.items()} for name, pair in ops.items()}


def time_per_call(fn, device, replays: int) -> tuple[float, torch.Tensor]:
    """(median seconds of one call, its output). CUDA: the call captured as a graph, replays
    timed with events; CPU: one timed call (no claim)."""
    if device.type != "cuda":
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out
    fn()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), out


def rel_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run_batch(shape, batch, context, device, dtype, replays):
    from minivllm.layers.rotary import RotaryEmbedding

    layers, meta = make_layers(shape, batch, context, 16, device, dtype)
    rotary = RotaryEmbedding(shape["head_dim"], context + 16,
                             torch.ones(shape["head_dim"] // 2) * 1e-3).to(device)
    ops = layer_ops(shape, layers, meta, rotary, batch, device, dtype)
    num_layers = len(layers)
    rows = []
    for name, variants in ops.items():
        row = dict(op=name, batch=batch)
        outputs = {}
        for kind in ("unfused", "fused"):
            for pdl in ("0", "1"):
                key = f"{kind}_pdl{pdl}_us"
                if kind not in variants:
                    row[key] = None
                    continue
                os.environ["MINIVLLM_PDL"] = pdl
                os.environ["MINIVLLM_FUSED_MERGE"] = "1" if kind == "fused" else "0"
                seconds, outputs[kind] = time_per_call(variants[kind], device, replays)
                row[key] = seconds / num_layers * 1e6
        os.environ.pop("MINIVLLM_PDL", None)
        os.environ.pop("MINIVLLM_FUSED_MERGE", None)
        if "fused" in outputs:
            row["rel_error"] = rel_error(outputs["fused"], outputs["unfused"])
        rows.append(row)
    del layers
    return rows


def sweep(shape, device, dtype, replays):
    """The one-row kernel's launch shapes per projection: median us per layer of each."""
    from minivllm.layers import fused_linear
    from minivllm.layers.fused_linear import LinearConfig

    hidden, inter, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    hq, hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    projections = {"qkv": ((hq + 2 * hkv) * d, hidden, False), "o_proj": (hidden, hq * d, False),
                   "gate_up": (inter, hidden, True), "down_proj": (hidden, inter, False)}
    results = []
    for name, (n, k, swiglu) in projections.items():
        weights = [torch.randn(n * (2 if swiglu else 1), k, device=device, dtype=dtype)
                   for _ in range(shape["num_hidden_layers"])]
        x = torch.randn(1, k, device=device, dtype=dtype)
        ones = torch.ones(k, device=device, dtype=dtype)
        default = fused_linear.choose_config(n, k, 1, swiglu)
        budget = fused_linear.TILE_ELEMENTS // (2 if swiglu else 1)
        for block_n in (2, 4, 8, 16, 32):
            for warps in (4, 8):
                block_k = min(1 << (k - 1).bit_length(), max(16, budget // block_n))
                cfg = LinearConfig(block_n, block_k, warps)

                def run(cfg=cfg):
                    for w in weights:
                        out = (fused_linear.norm_linear(x, None, ones, 1e-6, w, swiglu=True,
                                                        config=cfg)[0] if swiglu
                               else fused_linear.linear(x, w, config=cfg))
                    return out

                seconds, _ = time_per_call(run, device, replays)
                results.append(dict(projection=name, BLOCK_N=block_n, BLOCK_K=block_k,
                                    num_warps=warps, default=cfg == default,
                                    us=seconds / len(weights) * 1e6))
        del weights
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", default=None, choices=sorted(NAMED_SHAPES),
                        help="default: qwen3-0.6b on a GPU, a tiny shape on the CPU")
    parser.add_argument("--batch-sizes", default=None, help="default: 1,16,64 (GPU), 1,3 (CPU)")
    parser.add_argument("--context", type=int, default=None, help="cached tokens per sequence")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time the one-row launch shapes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    note = cpu_disclaimer(device)
    if note:
        print(note)
    name = args.model_config or ("qwen3-0.6b" if on_gpu else "tiny")
    shape = dict(NAMED_SHAPES[name][1]) if name != "tiny" else dict(TINY)
    batches = [int(b) for b in (args.batch_sizes or ("1,16,64" if on_gpu else "1,3")).split(",")]
    context = args.context or (1024 if on_gpu else 20)
    dtype = torch.bfloat16 if on_gpu else torch.float16

    rows = []
    for batch in batches:
        rows += run_batch(shape, batch, context, device, dtype, args.replays)
    swept = sweep(shape, device, dtype, args.replays) if args.sweep else []
    out = args.out or RESULTS_DIR / f"fused_decode_check_{name}_{device.type}.json"
    write_json(out, dict(environment=environment(device), model_config=name, context=context,
                         dtype=str(dtype), note=note, rows=rows, sweep=swept))

    def us(value):
        return "n/a" if value is None else f"{value:8.2f}"

    if swept:
        print("\nlaunch shapes of the one-row kernel, us per layer (* = the default):")
        for r in sorted(swept, key=lambda r: (r["projection"], r["us"])):
            print(f"  {r['projection']:10s} BLOCK_N={r['BLOCK_N']:3d} BLOCK_K={r['BLOCK_K']:5d} "
                  f"warps={r['num_warps']}  {r['us']:7.2f}{' *' if r['default'] else ''}")
    print(f"\n{name}, context {context}, us per layer ({'CUDA graph replays' if on_gpu else 'CPU'});"
          f" JSON: {out}")
    print(f"{'op':18s} {'batch':>5s} {'unfused':>9s} {'+pdl':>9s} {'fused':>9s} "
          f"{'+pdl':>9s}  rel err")
    for r in rows:
        err = f"{r['rel_error']:.1e}" if "rel_error" in r else ""
        print(f"{r['op']:18s} {r['batch']:5d} {us(r['unfused_pdl0_us']):>9s} "
              f"{us(r['unfused_pdl1_us']):>9s} {us(r['fused_pdl0_us']):>9s} "
              f"{us(r['fused_pdl1_us']):>9s}  {err}")
    bad = [r for r in rows if r.get("rel_error", 0) > 2e-2]
    for r in bad:
        print(f"DISAGREE: {r['op']} at batch {r['batch']}: relative error {r['rel_error']:.3g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
