"""Paged attention vs dense SDPA, the memory-bandwidth limit and the matmul rate; and its tuning.

The cases (batch x context x block size x dtype x KV-cache dtype):

    decode           B sequences, one new token each, over the same context
    prefill          causal prefill: the whole context is new
    chunked_prefill  512 new tokens at the end of an 8k context (a long prompt's later chunk)
    mixed            the engine's mixed step, in ONE call: 62 decodes at 2k context, then 2
                     chunks of 512 new tokens over 8k
    ragged_decode    128 decodes whose contexts are drawn uniformly from [100, 2048] (seed 0):
                     real batches are ragged, and every sequence ends somewhere inside a block
    write            write_kv_cache of 256 tokens (a decode step) and of 8192 (a prefill chunk)
                     into shuffled slots (not in the default sweep)

For each case it

1. builds a random paged KV cache (shuffled block tables, unused table entries 0 as the engine pads them) and, for
   the uniform cases, the same K/V as contiguous tensors; with `--kv-cache-dtypes auto,fp8` also an fp8 (e4m3)
   copy, written by `write_kv_cache` as the engine writes it (one float32 scale per token and KV head);
2. checks every backend's output against the reference on the *same* cache (REL_TOL), and records the error against
   the reference on the model-dtype cache too (`rel_error_vs_model_dtype`: what the fp8 format costs);
3. times each backend and dense `scaled_dot_product_attention` on the contiguous K/V (median of CUDA-graph replays
   after warm-up: `benchmarks/common.py`'s `time_ms`; on the CPU, wall time);
4. reports bytes moved over time as a fraction of a copy bandwidth measured in the same run, TFLOP/s as a fraction
   of a matmul rate measured in the same run, and the time over dense SDPA's ("time/SDPA"; below 1 is faster).
   The mixed step is also timed as its two parts, each in its own call, to see what one launch for both buys.

What is counted (`bytes_moved`, `attention_flops`):

    bytes = K and V of every sequence's whole context (fp8: 1 byte per value plus the float32
            scales) + the queries read + the output written
    FLOPs = 4 * Hq * D * sum over queries of the keys each query sees (query j of a chunk of q
            new tokens over a context of L sees L - q + j + 1 keys)

**Tuning.** `--tune tiles` also times the Triton kernel at every launch configuration of a grid (BLOCK_M, BLOCK_N,
num_warps, num_stages: decode and prefill grids differ), `--tune splits` every split-KV count (Triton and the CUDA
extension), and `--configs '[{...}, ...]'` any list of the kernel's `config` dicts (launch options and switches,
e.g. `{"INT64_OFFSETS": true}`). Each setting is checked against the reference like the default;
`ratio_vs_default` is its time over the default's. A setting that cannot compile or launch (too much shared memory)
is recorded as not run. The kernel's defaults (`_launch_config`, `choose_num_splits`) come from these sweeps.

A backend that cannot run a case gets a record that says why; one that raises gets a `failed` record and the sweep
goes on. A wrong or failed output makes the run exit with 1. On a machine without CUDA it runs small shapes with the
reference backend in seconds: CPU timings say nothing about the GPU, so they go to benchmarks/results/cpu/, which
git ignores.

    python benchmarks/attn_bench.py                          # default sweep on this device
    python benchmarks/attn_bench.py --block-sizes 16 --kv-cache-dtypes auto,fp8
    python benchmarks/attn_bench.py --backends triton,cuda --block-sizes 16   # MINIVLLM_CUDA_JIT=1
    python benchmarks/attn_bench.py --cases prefill,chunked,mixed --block-sizes 16 --tune tiles
    python benchmarks/attn_bench.py --smoke                  # tiny shapes, seconds (tests)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivllm.kernels import available_backends, fp8, paged_attention, write_kv_cache
from minivllm.kernels import cuda as cuda_ext
from minivllm.kernels.backends import kv_cache_unsupported
from minivllm.kernels.fp8 import FP8_DTYPE

from benchmarks.common import (copy_bandwidth, default_out, format_table, int_list, matmul_rate,
                               names, new_record, pick_device, sig, time_ms, write_json)


def triton_fp8_unsupported(device: torch.device) -> str | None:
    """Why Triton cannot read an fp8 cache on `device` (None: it can)."""
    return kv_cache_unsupported(FP8_DTYPE, "triton", device)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KV_CACHE_DTYPES = ("auto", "fp8")  # "auto": the model dtype, as the engine's kv_cache_dtype
CASE_NAMES = {"decode": "decode", "prefill": "prefill", "chunked": "chunked_prefill",
              "mixed": "mixed", "ragged": "ragged_decode", "write": "write_kv_cache"}
# Relative error allowed against the reference on the same cache, by query dtype (the kernel
# tests' bounds, tests/kernels/paged_inputs.py). The reference works in float32 from the very
# values stored in the cache (for fp8: the same e4m3 values and scales), so a correct kernel
# differs only by rounding its probabilities and output to the query dtype: about two ulps of
# bf16 (2^-7) or fp16 (2^-10), and summation order in fp32. A wrong mask, a missed block or a
# misread scale costs orders of magnitude more.
REL_TOL = {"bf16": 1.5e-2, "fp16": 2e-3, "fp32": 1e-5}
NO_SDPA = {  # why a case has no dense SDPA time to compare with
    "chunked_prefill": "queries at the end of a longer context need a bottom-right causal mask; "
                       "SDPA's is_causal is top-left",
    "mixed": "one SDPA call takes one query length and one context length; this step has two of "
             "each (and its chunks need the bottom-right mask)",
    "ragged_decode": "one SDPA call takes one context length; ragged contexts would need padding "
                     "and a mask, and it would time the padding",
}
# --tune: the Triton kernel's launch configurations, (BLOCK_M, BLOCK_N, num_warps, num_stages)
# (BLOCK_M None: the kernel's own, 16 rows in decode); and split-KV counts.
TILES = {
    "decode": [(None, n, w, s) for n, w, s in itertools.product([32, 64, 128, 256], [2, 4, 8], [2, 3])],
    "prefill": list(itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4])),
}
SMOKE_TILES = {"decode": [(None, 16, 1, 1)], "prefill": [(32, 16, 1, 1)]}
SPLITS = [1, 2, 4, 8, 16, 32, 64]


@dataclass(frozen=True)
class Case:
    op: str  # one of CASE_NAMES' values
    batch: int
    context: int  # tokens of context per sequence, including the new queries (ragged: the longest)
    query_len: int  # new query tokens per sequence (mixed: the longest)
    block_size: int
    dtype: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    # Per sequence, for the batches whose sequences differ (mixed, ragged_decode); None: uniform.
    query_lens: tuple[int, ...] | None = None
    context_lens: tuple[int, ...] | None = None

    def seqs(self) -> list[tuple[int, int]]:
        """(new query tokens, context) of every sequence of the batch."""
        if self.query_lens is None:
            return [(self.query_len, self.context)] * self.batch
        return list(zip(self.query_lens, self.context_lens))


def mixed_case(decodes: int, decode_context: int, chunks: int, chunk: int, chunk_context: int,
               *rest) -> Case:
    """The engine's mixed step: `decodes` running decodes, then `chunks` prefill chunks."""
    query_lens = (1,) * decodes + (chunk,) * chunks
    context_lens = (decode_context,) * decodes + (chunk_context,) * chunks
    return Case("mixed", decodes + chunks, max(context_lens), max(query_lens), *rest,
                query_lens=query_lens, context_lens=context_lens)


def ragged_decode_case(batch: int, low: int, high: int, *rest, seed: int = 0) -> Case:
    """`batch` decodes with contexts drawn uniformly from [low, high]: the same on every device
    (drawn on the CPU from a fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    context_lens = tuple(torch.randint(low, high + 1, (batch,), generator=g).tolist())
    return Case("ragged_decode", batch, max(context_lens), 1, *rest, query_lens=(1,) * batch,
                context_lens=context_lens)


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------
def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """A paged cache with shuffled block tables, and, for a uniform case, the same K/V as
    contiguous [B, L, Hkv, D] tensors (None, None otherwise).

    Returns (paged, dense): paged = (q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q),
    the arguments of `paged_attention`.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    hkv, d, bs = case.num_kv_heads, case.head_dim, case.block_size
    query_lens, context_lens = zip(*case.seqs())
    k_tokens = torch.randn(sum(context_lens), hkv, d, device=device, dtype=dtype, generator=g)
    v_tokens = torch.randn(sum(context_lens), hkv, d, device=device, dtype=dtype, generator=g)
    # Each sequence gets its own shuffled set of physical blocks; the rest of its table row is 0,
    # as the engine pads it (the kernel must never read past the context).
    blocks = [math.ceil(L / bs) for L in context_lens]
    perm = torch.randperm(sum(blocks), device=device, generator=g).to(torch.int32)
    block_tables = torch.zeros(case.batch, max(blocks), dtype=torch.int32, device=device)
    slots, first = [], 0
    for b, (n, L) in enumerate(zip(blocks, context_lens)):
        block_tables[b, :n] = perm[first:first + n]
        first += n
        pos = torch.arange(L, device=device)
        slots.append(block_tables[b, pos // bs].long() * bs + pos % bs)
    k_cache = torch.zeros(sum(blocks), bs, hkv, d, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    write_kv_cache(k_tokens, v_tokens, k_cache, v_cache, torch.cat(slots))
    q = torch.randn(sum(query_lens), case.num_q_heads, d, device=device, dtype=dtype, generator=g)
    seq_lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    cu = torch.tensor([0, *query_lens], device=device).cumsum(0).to(torch.int32)
    paged = (q, k_cache, v_cache, block_tables, seq_lens, cu)
    if case.query_lens is not None:
        return paged, (None, None)
    return paged, (k_tokens.view(case.batch, case.context, hkv, d),
                   v_tokens.view(case.batch, case.context, hkv, d))


def fp8_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, write_backend: str):
    """The same cache in fp8 (e4m3), quantized by `write_kv_cache` as the engine writes it: every
    slot (unused ones hold zeros) with one float32 scale per token and KV head (minivllm/kernels/fp8.py).
    Returns (k8, v8, dict(k_scale=..., v_scale=...))."""
    k8 = torch.zeros(k_cache.shape, dtype=fp8.FP8_DTYPE, device=k_cache.device)
    v8 = torch.zeros_like(k8)
    k_scale, v_scale = fp8.empty_scales(k8)
    slots = torch.arange(k_cache.shape[0] * k_cache.shape[1], device=k_cache.device)
    write_kv_cache(k_cache.flatten(0, 1), v_cache.flatten(0, 1), k8, v8, slots,
                   backend=write_backend, k_scale=k_scale, v_scale=v_scale)
    return k8, v8, dict(k_scale=k_scale, v_scale=v_scale)


def sub_batch(paged: tuple, first: int, last: int) -> tuple:
    """Sequences first..last-1 of a paged batch as a batch of their own (same cache)."""
    q, k_cache, v_cache, block_tables, seq_lens, cu = paged
    rows = slice(int(cu[first]), int(cu[last]))
    return (q[rows], k_cache, v_cache, block_tables[first:last], seq_lens[first:last],
            cu[first:last + 1] - cu[first])


def sdpa_fn(case: Case, q: torch.Tensor, k_dense: torch.Tensor, v_dense: torch.Tensor):
    """Dense SDPA on contiguous [B, H, L, D] K/V: what a paged kernel aims to match (None where
    no SDPA call computes the same thing: NO_SDPA says why)."""
    if case.op not in ("decode", "prefill"):
        return None, None, None
    b, ql = case.batch, case.query_len
    qd = q.view(b, ql, case.num_q_heads, case.head_dim).transpose(1, 2)
    group = case.num_q_heads // case.num_kv_heads
    if case.op == "decode":
        # GQA-aware kernel: reads each KV head once, like ours.
        kd, vd = (t.transpose(1, 2) for t in (k_dense, v_dense))
        return lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True), kd, vd
    # Prefill: heads expanded so the flash backend is used for sure (compute-bound: the extra
    # K/V bytes cost nothing measurable).
    kd, vd = (t.repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
              for t in (k_dense, v_dense))
    return lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True), kd, vd


# ------------------------------------------------------------------------------------------
# What an op must move and compute
# ------------------------------------------------------------------------------------------
def kv_bytes(case: Case, kv_cache_dtype: str = "auto") -> int:
    """Bytes of K and V the op must read at least once: every sequence's whole context, and for
    an fp8 cache one byte per value plus a float32 scale per token and KV head."""
    tokens = sum(L for _, L in case.seqs())
    if kv_cache_dtype == "fp8":
        per_token = case.num_kv_heads * (case.head_dim * 1 + 4)
    else:
        per_token = case.num_kv_heads * case.head_dim * DTYPES[case.dtype].itemsize
    return 2 * tokens * per_token


def bytes_moved(case: Case, kv_cache_dtype: str = "auto") -> int:
    """K/V (`kv_bytes`) plus the queries read and the output written; for a write, the K/V rows
    read plus what is written into the cache."""
    if case.op == "write_kv_cache":
        return 2 * case.batch * case.num_kv_heads * case.head_dim * DTYPES[case.dtype].itemsize + kv_bytes(
            case, kv_cache_dtype)
    num_tokens = sum(q for q, _ in case.seqs())
    q_and_out = 2 * num_tokens * case.num_q_heads * case.head_dim * DTYPES[case.dtype].itemsize
    return kv_bytes(case, kv_cache_dtype) + q_and_out


def attention_flops(case: Case, prefill_only: bool = False) -> float:
    """4 * Hq * D * sum over queries of the keys each sees (causal; see the module docstring).
    `prefill_only`: count only the sequences with more than one new token."""
    if case.op == "write_kv_cache":
        return 0.0
    visible = sum(q * (L - q) + q * (q + 1) / 2 for q, L in case.seqs()
                  if not (prefill_only and q == 1))
    return 4 * case.num_q_heads * case.head_dim * visible


def has_prefill(case: Case) -> bool:
    return any(q > 1 for q, _ in case.seqs())


# ------------------------------------------------------------------------------------------
# Sweep
# ------------------------------------------------------------------------------------------
# (decodes, decode context, chunks, chunk, chunk context) and (batch, low, high) per device.
MIXED = {"gpu": (62, 2048, 2, 512, 8192), "cpu": (14, 64, 2, 32, 256), "smoke": (3, 24, 2, 8, 40)}
RAGGED = {"gpu": (128, 100, 2048), "cpu": (16, 10, 256), "smoke": (6, 5, 40)}
WRITES = {"gpu": (256, 8192), "cpu": (64, 1024), "smoke": (16,)}  # tokens written at once


def build_cases(args, on_gpu: bool) -> list[Case]:
    heads = (args.num_q_heads, args.num_kv_heads, args.head_dim)
    size = "smoke" if args.smoke else ("gpu" if on_gpu else "cpu")
    long_ones = not args.quick or on_gpu  # the CPU's --quick leaves these out
    cases = []
    for dtype, bs in itertools.product(args.dtypes, args.block_sizes):
        rest = (bs, dtype, *heads)
        if "decode" in args.cases:
            cases += [Case("decode", b, L, 1, *rest) for b, L in _pairs(args, decode=True, size=size)]
        if "prefill" in args.cases:
            cases += [Case("prefill", b, L, L, *rest) for b, L in _pairs(args, decode=False, size=size)]
        if "chunked_prefill" in args.cases and long_ones:
            b, L, ql = {"gpu": (4, 8192, 512), "cpu": (2, 256, 32), "smoke": (2, 40, 8)}[size]
            cases.append(Case("chunked_prefill", args.batch or b, args.context or L, args.chunk or ql, *rest))
        if "mixed" in args.cases and long_ones:
            cases.append(mixed_case(*MIXED[size], *rest))
        if "ragged_decode" in args.cases and long_ones:
            cases.append(ragged_decode_case(*RAGGED[size], *rest))
        if "write_kv_cache" in args.cases:
            cases += [Case("write_kv_cache", t, 1, 1, *rest) for t in WRITES[size]]  # t tokens
    return cases


def _pairs(args, decode: bool, size: str) -> list[tuple[int, int]]:
    if args.batch or args.context:
        default_b, default_l = (64, 4096) if decode else (4, 2048)
        return [(args.batch or default_b, args.context or default_l)]
    if size == "smoke":
        return [(3, 40)] if decode else [(2, 24)]
    if size == "cpu":
        return [(4, 256), (1, 1024)] if decode else [(2, 128)]
    if decode:
        pairs = [(64, 4096), (256, 1024), (16, 8192), (1, 32768)]
        return pairs[:2] if args.quick else pairs
    return [(4, 2048)]


@dataclass
class Run:
    """What every record of a run shares."""
    device: torch.device
    copy_gbps: float
    matmul_tflops: float
    repeats: int = 5
    tune: str | None = None  # "tiles" or "splits"
    configs: tuple = ()  # extra `config` dicts for the Triton kernel
    smoke: bool = False


def settings(case: Case, backend: str, run: Run) -> list[dict | None]:
    """What to time for one backend: the default (None), then --tune's and --configs' settings,
    each a dict of the Triton kernel's `config` keys (and `num_splits`)."""
    out = [None]
    if backend == "triton" and run.tune == "tiles":
        grid = (SMOKE_TILES if run.smoke else TILES)["decode" if case.op.endswith("decode") else "prefill"]
        out += [{k: v for k, v in zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tile) if v}
                for tile in grid]
    if backend in ("triton", "cuda") and run.tune == "splits" and case.op.endswith("decode"):
        out += [{"num_splits": n} for n in (SPLITS[:2] if run.smoke else SPLITS)]
    if backend == "triton":
        out += list(run.configs)
    return out


def run_case(case: Case, backends: list[str], kv_cache_dtypes: list[str], run: Run) -> list[dict]:
    """Every record of one case: SDPA (when it has an equivalent), then each KV-cache dtype x
    backend x setting, checked against the reference on the same cache."""
    if case.op == "write_kv_cache":
        return [run_write(case, backend, kv, run) for kv in kv_cache_dtypes for backend in backends]
    device = run.device
    paged, (k_dense, v_dense) = make_inputs(case, device)
    q, k_cache, v_cache, *meta = paged
    model_reference = paged_attention(*paged, backend="torch")
    records = []
    sdpa_ms = None
    sdpa, kd, vd = sdpa_fn(case, q, k_dense, v_dense)
    if sdpa is not None:
        err = _rel(sdpa().transpose(1, 2).reshape_as(q), model_reference)
        sdpa_ms = time_ms(sdpa, device, repeats=run.repeats)
        records.append(_record(case, "sdpa", "auto", sdpa_ms, run, sdpa_ms, err, err))
    del k_dense, v_dense, kd, vd, sdpa
    auto_ms = {}  # backend -> default time on the model-dtype cache, for fp8's ratio
    for kv_cache_dtype in kv_cache_dtypes:
        if kv_cache_dtype == "fp8":
            write_backend = "torch" if triton_fp8_unsupported(device) else "auto"
            k, v, scales = fp8_cache(k_cache, v_cache, write_backend)
            reference = paged_attention(q, k, v, *meta, backend="torch", **scales)
        else:
            k, v, scales, reference = k_cache, v_cache, {}, model_reference
        for backend in backends:
            default_ms = None
            for setting in settings(case, backend, run):
                try:
                    rec = _run_backend(case, backend, kv_cache_dtype, (q, k, v, *meta), scales,
                                       reference, model_reference, sdpa_ms, run, setting)
                except Exception as exc:  # noqa: BLE001 - one failing kernel must not lose the run
                    reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
                    # A tuning setting that cannot launch (too much shared memory) is not a bug.
                    rec = _not_run(case, backend, kv_cache_dtype, reason if setting else f"failed: {reason}",
                                   device, failed=setting is None, setting=setting)
                    print(f"    {backend} ({kv_cache_dtype} cache) {setting or ''}: {rec['not_run']}")
                if setting is None:
                    default_ms = rec["ms"]
                    if rec["ms"] is not None and kv_cache_dtype == "auto":
                        auto_ms[backend] = rec["ms"]
                    elif rec["ms"] is not None and backend in auto_ms:
                        rec["ratio_vs_model_dtype_kv"] = rec["ms"] / auto_ms[backend]
                elif rec["ms"] is not None and default_ms:
                    rec["ratio_vs_default"] = rec["ms"] / default_ms
                records.append(rec)
        del k, v, scales, reference
    return records


def _run_backend(case: Case, backend: str, kv_cache_dtype: str, call: tuple, scales: dict,
                 reference: torch.Tensor, model_reference: torch.Tensor, sdpa_ms: float | None,
                 run: Run, setting: dict | None = None) -> dict:
    """One backend (with one tuning setting) on one cache: its record, or why it cannot run."""
    out = torch.empty_like(call[0])
    reason = _cannot_run(backend, kv_cache_dtype, call, out, run.device)
    if reason is not None:
        return _not_run(case, backend, kv_cache_dtype, reason, run.device, setting=setting)
    config = dict(setting or {})
    num_splits = config.pop("num_splits", None)

    def fn():
        if config:  # a launch configuration: the Triton kernel itself, past the dispatch
            from minivllm.kernels import triton_attention

            q = call[0]
            return triton_attention.paged_attention(*call, q.shape[-1] ** -0.5, True, out, case.context,
                                                    num_splits, dict(config), **scales)
        return paged_attention(*call, backend=backend, out=out, max_seq_len=case.context,
                               num_splits=num_splits, **scales)

    fn()
    ms = time_ms(fn, run.device, graph=backend != "torch", repeats=run.repeats)
    rec = _record(case, backend, kv_cache_dtype, ms, run, sdpa_ms, _rel(out, reference),
                  _rel(out, model_reference), setting)
    if case.op == "mixed" and setting is None:
        rec.update(_mixed_parts(case, call, backend, kv_cache_dtype, scales, ms, run))
    return rec


def run_write(case: Case, backend: str, kv_cache_dtype: str, run: Run) -> dict:
    """write_kv_cache of `case.batch` tokens' K and V (strided views of one qkv tensor, as in the
    model) into shuffled slots of a cache four times larger, checked against the reference's
    write of the same tokens."""
    device, dtype = run.device, DTYPES[case.dtype]
    hq, hkv, d, bs = case.num_q_heads, case.num_kv_heads, case.head_dim, case.block_size
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(case.batch, hq + 2 * hkv, d, device=device, dtype=dtype, generator=g)
    key, value = qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    num_blocks = 4 * case.batch // bs + 1
    element = fp8.FP8_DTYPE if kv_cache_dtype == "fp8" else dtype
    slots = torch.randperm(num_blocks * bs, device=device, generator=g)[:case.batch]

    def cache():
        k = torch.zeros(num_blocks, bs, hkv, d, device=device, dtype=element)
        scales = dict(zip(("k_scale", "v_scale"), fp8.empty_scales(k))) if kv_cache_dtype == "fp8" else {}
        return k, torch.zeros_like(k), scales

    ref_k, ref_v, ref_scales = cache()
    write_kv_cache(key, value, ref_k, ref_v, slots, backend="torch", **ref_scales)
    k, v, scales = cache()
    reason = (triton_fp8_unsupported(device) if backend == "triton" and kv_cache_dtype == "fp8" else
              cuda_ext.write_kv_unsupported(key, value, k, v, slots) if backend == "cuda" else None)
    if reason is not None:
        return _not_run(case, backend, kv_cache_dtype, reason, device)
    ms = time_ms(lambda: write_kv_cache(key, value, k, v, slots, backend=backend, **scales), device,
                 graph=backend != "torch", repeats=run.repeats)

    def written(k, v, scales):  # the written rows, dequantized
        rows = [c.flatten(0, 1)[slots].float() for c in (k, v)]
        if scales:
            rows = [r * s.flatten(0, 1)[slots].float()[..., None] for r, s in zip(rows, scales.values())]
        return torch.cat(rows)

    rec = _record(case, backend, kv_cache_dtype, ms, run, None,
                  _rel(written(k, v, scales), written(ref_k, ref_v, ref_scales)), None)
    if kv_cache_dtype == "fp8":  # a value may round to the neighbouring e4m3 step (2^-4 apart)
        rec.update(rel_tol=2.0 ** -4, correct=bool(rec["rel_error"] <= 2.0 ** -4))
    return rec


def _mixed_parts(case: Case, call: tuple, backend: str, kv_cache_dtype: str, scales: dict,
                 ms: float, run: Run) -> dict:
    """Time the mixed step's decodes and chunks, each in a call of its own, on the same cache:
    `ratio_vs_parts` below 1 means one launch for both beats two."""
    num_decodes = sum(1 for q, _ in case.seqs() if q == 1)
    parts = {}
    for name, first, last in (("decode", 0, num_decodes), ("prefill", num_decodes, case.batch)):
        part = sub_batch(call, first, last)
        out = torch.empty_like(part[0])
        max_len = int(part[4].max())

        def fn(part=part, out=out, max_len=max_len):
            return paged_attention(*part, backend=backend, out=out, max_seq_len=max_len, **scales)

        parts[name] = time_ms(fn, run.device, graph=backend != "torch", repeats=run.repeats)
    decodes = replace(case, op="decode", batch=num_decodes, query_lens=case.query_lens[:num_decodes],
                      context_lens=case.context_lens[:num_decodes])
    prefill_tflops = attention_flops(case, prefill_only=True) / (parts["prefill"] * 1e-3) / 1e12
    decode_gbps = bytes_moved(decodes, kv_cache_dtype) / (parts["decode"] * 1e-3) / 1e9
    return dict(prefill_part_ms=parts["prefill"], prefill_part_tflops=prefill_tflops,
                prefill_part_frac_matmul_rate=prefill_tflops / run.matmul_tflops,
                decode_part_ms=parts["decode"], decode_part_frac_copy_bw=decode_gbps / run.copy_gbps,
                ratio_vs_parts=ms / (parts["prefill"] + parts["decode"]))


def _cannot_run(backend: str, kv_cache_dtype: str, call: tuple, out: torch.Tensor,
                device: torch.device) -> str | None:
    """Why `backend` cannot run this call here (None: it can)."""
    q, k, v, _, seq_lens, _ = call
    if backend == "cuda":  # it would run on Triton: no record that claims otherwise
        reason = cuda_ext.attention_unsupported(q, k, v, seq_lens, out)
        return None if reason is None else f"the CUDA extension does not cover {reason}"
    if backend == "triton" and kv_cache_dtype == "fp8":
        return triton_fp8_unsupported(device)
    return None


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _record(case: Case, backend: str, kv_cache_dtype: str, ms: float, run: Run,
            sdpa_ms: float | None, err: float, err_vs_model_dtype: float | None,
            setting: dict | None = None) -> dict:
    nbytes, flops = bytes_moved(case, kv_cache_dtype), attention_flops(case)
    gbps = nbytes / (ms * 1e-3) / 1e9
    tflops = flops / (ms * 1e-3) / 1e12
    rel_tol = REL_TOL[case.dtype]
    element = FP8_DTYPE if kv_cache_dtype == "fp8" else DTYPES[case.dtype]
    return dict(
        asdict(case), backend=backend, kv_cache_dtype=kv_cache_dtype, setting=setting,
        kv_cache_element=str(element).removeprefix("torch."),
        ms=ms, bytes=nbytes, gbps=gbps, frac_copy_bw=gbps / run.copy_gbps,
        flops=flops, tflops=tflops,
        frac_matmul_rate=tflops / run.matmul_tflops if has_prefill(case) else None,
        ratio_vs_sdpa=(ms / sdpa_ms) if sdpa_ms else None,  # time / SDPA time
        no_sdpa_reason=NO_SDPA.get(case.op),
        ratio_vs_model_dtype_kv=None,  # fp8: time / the same backend's on the model-dtype cache
        rel_error=err, rel_tol=rel_tol, correct=bool(err <= rel_tol),  # NaN fails too
        rel_error_vs_model_dtype=err_vs_model_dtype,
    )


def _not_run(case: Case, backend: str, kv_cache_dtype: str, reason: str, device: torch.device,
             failed: bool = False, setting: dict | None = None) -> dict:
    """A backend that cannot run this case here (failed=True: it raised)."""
    return dict(asdict(case), backend=backend, kv_cache_dtype=kv_cache_dtype, setting=setting, ms=None,
                not_run=reason, failed=failed)


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def shape_label(r: dict) -> str:
    """'64 x 4096' (B x context), '4 x 512/8192' (B x new/context), the mixed and ragged batches
    spelled out, '256 tokens' for a write."""
    if r["op"] == "mixed":
        groups = {}
        for q, L in zip(r["query_lens"], r["context_lens"]):
            groups[(q, L)] = groups.get((q, L), 0) + 1
        return " + ".join(f"{n} x {q}/{_k(L)}" for (q, L), n in groups.items())
    if r["op"] == "ragged_decode":
        lens = r["context_lens"]
        return f"{r['batch']} x {min(lens)}..{max(lens)} (mean {sum(lens) // len(lens)})"
    if r["op"] == "chunked_prefill":
        return f"{r['batch']} x {r['query_len']}/{_k(r['context'])}"
    if r["op"] == "write_kv_cache":
        return f"{r['batch']} tokens"
    return f"{r['batch']} x {_k(r['context'])}"


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _setting(r: dict) -> str | None:
    s = r.get("setting")
    if not s:
        return None
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "num_warps": "w", "num_stages": "s", "num_splits": "splits"}
    return " ".join(f"{short.get(k, k)}{'' if k in short and k != 'num_splits' else '='}{v}"
                    for k, v in s.items())


COLUMNS = [
    ("op", "op", ""), ("shape", shape_label, ""), ("bs", "block_size", "d"), ("dtype", "dtype", ""),
    ("kv", lambda r: r["dtype"] if r["kv_cache_dtype"] == "auto" else r["kv_cache_dtype"], ""),
    ("backend", "backend", ""), ("setting", _setting, ""),
    ("ms", "ms", ".4f"), ("GB/s", lambda r: sig(r.get("gbps")), ""),
    ("copyBW", lambda r: sig(r.get("frac_copy_bw"), 2), ""),
    ("TFLOP/s", lambda r: sig(r.get("tflops")) if r.get("flops") else None, ""),
    ("matmul", lambda r: sig(r.get("frac_matmul_rate"), 2), ""),
    ("time/SDPA", lambda r: r.get("ratio_vs_sdpa") or (
        "n/a" if r.get("no_sdpa_reason") and r.get("ms") else None), ".2f"),
    ("kv/auto", "ratio_vs_model_dtype_kv", ".3f"), ("x default", "ratio_vs_default", ".3f"),
    ("err", "rel_error", ".1e"), ("err_auto", "rel_error_vs_model_dtype", ".1e"),
    ("note", lambda r: r.get("not_run") or ("WRONG" if r.get("correct") is False else None), ""),
]
MIXED_COLUMNS = [
    ("mixed step", shape_label, ""), ("bs", "block_size", "d"),
    ("kv", lambda r: r["dtype"] if r["kv_cache_dtype"] == "auto" else r["kv_cache_dtype"], ""),
    ("backend", "backend", ""), ("one call ms", "ms", ".4f"), ("decodes ms", "decode_part_ms", ".4f"),
    ("chunks ms", "prefill_part_ms", ".4f"), ("one/parts", "ratio_vs_parts", ".2f"),
    ("chunk TFLOP/s", lambda r: sig(r["prefill_part_tflops"]), ""),
    ("matmul", "prefill_part_frac_matmul_rate", ".2f"), ("dec copyBW", "decode_part_frac_copy_bw", ".2f"),
]


def print_table(records: list[dict], record: dict) -> None:
    print(format_table(records, COLUMNS))
    print("time/SDPA: this backend's time over dense SDPA's in the same run (below 1 = faster)")
    for op in dict.fromkeys(r["op"] for r in records if r.get("no_sdpa_reason") and r.get("ms")):
        print(f"  n/a: no SDPA ratio for {op}: {NO_SDPA[op]}")
    print(f"copyBW: bytes moved (K/V of every context, fp8 scales included, + q + out) over the time, "
          f"over the copy bandwidth of this run ({record['copy_gbps']:.4g} GB/s)")
    print(f"matmul: TFLOP/s over the matmul rate of this run ({record['matmul_tflops']:.3g} TFLOP/s; bf16 "
          f"on a GPU, fp32 on the CPU); prefill cases only")
    print("kv/auto: an fp8 cache's time over the model-dtype cache's; x default: a tuning setting's time "
          "over the default's; err: vs the reference on the same cache; err_auto: vs the reference on "
          "the model-dtype cache (what fp8 storage costs)")
    mixed = [r for r in records if r["op"] == "mixed" and r.get("decode_part_ms")]
    if mixed:
        print("\n" + format_table(mixed, MIXED_COLUMNS))
        print("decodes / chunks: the two parts of the step, each timed in a call of its own; one/parts: "
              "the one call's time over their sum")


def plot(records: list[dict], path: Path, title: str, matmul_tflops: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if r.get("ms") is not None and not r.get("setting")
             and r["op"] != "write_kv_cache"]
    decode = [r for r in timed if r["op"] in ("decode", "ragged_decode")]
    other = [r for r in timed if r["op"] not in ("decode", "ragged_decode")]
    fig, axes = plt.subplots(1, 2, figsize=(18, 6), gridspec_kw={"width_ratios": [3, 2]})
    for ax, recs, key, label in ((axes[0], decode, "frac_copy_bw", "fraction of copy bandwidth"),
                                 (axes[1], other, "tflops", "TFLOP/s")):
        cases = list(dict.fromkeys((r["op"], shape_label(r), r["block_size"], r["dtype"]) for r in recs))
        series = list(dict.fromkeys((r["backend"], r["kv_cache_dtype"]) for r in recs))
        width = 0.8 / max(1, len(series))
        for i, (backend, kv) in enumerate(series):
            values = {(r["op"], shape_label(r), r["block_size"], r["dtype"]): r[key] for r in recs
                      if (r["backend"], r["kv_cache_dtype"]) == (backend, kv)}
            ax.bar([x + i * width for x in range(len(cases))], [values.get(c, 0.0) for c in cases], width,
                   label=backend if kv == "auto" else f"{backend}, {kv} cache")
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(cases))])
        ax.set_xticklabels([f"{op.replace('_prefill', '').replace('_decode', '')}\n"
                            + shape.replace(" + ", "\n+ ").replace(" (", "\n(") + f"\nbs={bs}"
                            for op, shape, bs, _ in cases], fontsize=7)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        if recs:
            ax.legend(fontsize=8)
    axes[0].axhline(1.0, color="gray", lw=0.8, ls="--")
    if matmul_tflops and other:
        axes[1].axhline(matmul_tflops, color="gray", lw=0.8, ls="--")
    axes[0].set_title("decode: bytes moved / time / copy bandwidth (higher is better)")
    axes[1].set_title("prefill, chunked, mixed: attention TFLOP/s (dashed: matmul rate)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def _configs(text: str) -> list[dict]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(c, dict) and c for c in value):
        raise argparse.ArgumentTypeError("--configs: a JSON list of non-empty objects")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few cases only")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes and heads, one timing repeat: checks that everything runs")
    p.add_argument("--cases", type=names(CASE_NAMES, "--cases"),
                   default="decode,prefill,chunked,mixed,ragged",
                   help="comma list of decode, prefill, chunked, mixed, ragged, write")
    p.add_argument("--kv-cache-dtypes", type=names(KV_CACHE_DTYPES, "--kv-cache-dtypes"),
                   default="auto",
                   help="comma list of auto (the model dtype) and fp8 (e4m3 with per token-head "
                        "scales), e.g. auto,fp8")
    p.add_argument("--backends", type=names(("torch", "sdpa", "triton", "cuda"), "--backends"),
                   help="comma list of torch, sdpa, triton, cuda (default: all that run here but "
                        "the PyTorch ones on GPU)")
    p.add_argument("--tune", choices=("tiles", "splits"), default=None,
                   help="also time every launch configuration (tiles) or split count (splits)")
    p.add_argument("--configs", type=_configs, default=[],
                   help="also time these Triton `config` dicts, a JSON list")
    p.add_argument("--dtypes", type=names(tuple(DTYPES), "--dtypes"),
                   help="comma list of bf16, fp16, fp32 (model dtype)")
    p.add_argument("--block-sizes", type=lambda text: int_list(text, "--block-sizes"),
                   help="comma list, e.g. 16,32,64")
    p.add_argument("--batch", type=int, default=None, help="only this batch size (uniform cases)")
    p.add_argument("--context", type=int, default=None, help="only this context length (uniform cases)")
    p.add_argument("--chunk", type=int, default=None, help="new tokens per chunked-prefill step")
    p.add_argument("--num-q-heads", type=int, default=None)
    p.add_argument("--num-kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path; the PNG goes beside it (default: benchmarks/results/, on the "
                        "CPU benchmarks/results/cpu/, which git ignores)")
    args = p.parse_args(argv)  # (argparse runs `type` on the string defaults too)
    # "auto" first, so that fp8 records can give their time over the model-dtype cache's.
    args.kv_cache_dtypes = [d for d in KV_CACHE_DTYPES if d in args.kv_cache_dtypes]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = pick_device()
    on_gpu = device.type == "cuda"
    # GPU defaults are the shapes that matter (Llama-3-8B-like heads); CPU ones stay small.
    q_heads, kv_heads, head_dim = (4, 2, 32) if args.smoke else (32, 8, 128) if on_gpu else (8, 2, 64)
    args.num_q_heads = args.num_q_heads or q_heads
    args.num_kv_heads = args.num_kv_heads or kv_heads
    args.head_dim = args.head_dim or head_dim
    args.dtypes = args.dtypes or ["bf16" if on_gpu else "fp32"]
    args.block_sizes = args.block_sizes or ([8] if args.smoke else [16] if args.quick or not on_gpu else [16, 32, 64])
    runnable = available_backends(device)
    missing = [b for b in args.backends or () if b not in runnable]
    if missing:
        raise SystemExit(f"--backends: {missing} cannot run on {device} (available: {runnable})")
    # By default the kernels; on the CPU the reference (the interpreter would time numpy, not a kernel).
    backends = args.backends or ([b for b in runnable if b not in ("torch", "sdpa")] if on_gpu else ["torch"])
    if (args.tune or args.configs) and not {"triton", "cuda"} & set(backends):
        raise SystemExit("--tune and --configs time the Triton kernel or the CUDA extension: "
                         "add --backends triton (on the CPU: TRITON_INTERPRET=1)")
    if not on_gpu:
        print("NOTE: no CUDA device here: running small shapes on the CPU with the reference "
              "backend. CPU timings are not GPU claims.\n")
    run = Run(device, copy_bandwidth(device) / 1e9, matmul_rate(device) / 1e12,
              repeats=1 if args.smoke else 5, tune=args.tune, configs=tuple(args.configs), smoke=args.smoke)
    record = new_record("attn_bench", device, args)
    record.update(copy_gbps=run.copy_gbps, matmul_tflops=run.matmul_tflops, rel_tol=REL_TOL)
    print(f"device: {record['environment']['device']}; copy bandwidth {run.copy_gbps:.4g} GB/s "
          f"(read + write); {'bf16' if on_gpu else 'fp32'} matmul {run.matmul_tflops:.3g} TFLOP/s")
    cases = build_cases(args, on_gpu)
    out = args.out or default_out("attn_bench", f"tune-{args.tune}" if args.tune else "sweep", device)
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.op} {shape_label(asdict(case))} bs={case.block_size} "
              f"{case.dtype} ({time.perf_counter() - started:.0f} s)", flush=True)
        record["results"].extend(run_case(case, backends, args.kv_cache_dtypes, run))
        # Saved after every case: a run cut short (a time limit, a crash) keeps what it measured.
        record.update(wall_s=time.perf_counter() - started, complete=i == len(cases))
        write_json(out, record)
        if on_gpu:
            torch.cuda.empty_cache()
    plot(record["results"], out.with_suffix(".png"), f"minivllm paged attention, "
         f"{record['environment']['device']}, {record['environment']['date'][:10]}", run.matmul_tflops)
    print(f"\nwrote {out} and its .png ({record['wall_s']:.0f} s)\n")
    print_table(record["results"], record)
    if record["note"]:
        print(f"\n{record['note']}")
    bad = [r for r in record["results"] if r.get("correct") is False or r.get("failed")]
    for r in bad:
        what = r["not_run"] if r.get("failed") else f"rel error {r['rel_error']:.2e} > {r['rel_tol']:.0e}"
        print(f"WRONG: {r['op']} {shape_label(r)} bs={r['block_size']} {r['backend']} "
              f"{r['kv_cache_dtype']} cache {_setting(r) or ''}: {what}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
