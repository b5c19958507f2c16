"""Check and time the CUDA extension's tensor-core kernels on a GPU, in one run.

1. Builds (MINIVLLM_CUDA_JIT=1, cached by torch under TORCH_EXTENSIONS_DIR) and loads csrc/.
2. Checks every kernel against the reference (minivllm/kernels/reference.py) on awkward shapes: head_dim
   64/128, GQA groups 1/2/4/8, block sizes 8/16/32/64, contexts ending mid-block, -1 garbage in
   unused block-table entries, split-KV forced on and off, fp16 and bf16; then prefill, chunked
   prefill, mixed batches and non-causal prefill. One PASS/FAIL line per case.
3. Times, side by side on the same inputs (medians of CUDA-graph replays, `attn_bench.time_ms`):
   the extension against the Triton kernel and dense SDPA at decode B=64/ctx 4096 and
   B=1/ctx 32768 (bf16, Hq 32, Hkv 8, D 128, block 16), the extension's decode at every forced
   split count (to tune minivllm/kernels/cuda.py's heuristic), and causal prefill 4 x 2048, chunked
   prefill (512 new over 8k) and the mixed step against Triton (and SDPA for prefill), in TFLOP/s
   against the bf16 matmul rate of the same run.
4. Writes everything to --out as JSON and prints a short table last.

Each part runs in its own Python process, decode before prefill and correctness before timing, so
a kernel that crashes (an illegal address poisons the CUDA context) loses only its own part:
the report says which part died and shows its last lines.

    MINIVLLM_CUDA_JIT=1 python benchmarks/cuda_mma_check.py --out benchmarks/results/cuda_mma_check_gpu.json
    python benchmarks/cuda_mma_check.py --parts decode,time-decode     # some parts only
    python benchmarks/cuda_mma_check.py --quick      # a quarter of the correctness cases
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks`, `minivllm` and `tests` importable
    sys.path.insert(0, str(ROOT))

PARTS = ("build", "decode", "prefill", "time-decode", "time-prefill")
PART_TIMEOUT_S = {"build": 420, "decode": 240, "prefill": 240, "time-decode": 240,
                  "time-prefill": 240}
GQA = {1: (4, 4), 2: (8, 4), 4: (8, 2), 8: (16, 2)}  # group -> (Hq, Hkv), as the tests
TARGETS = {"decode_vs_triton": 1.0, "prefill_vs_sdpa": 1.3}  # issue 18, part 2


# ------------------------------------------------------------------------------------------------
# Parts (each runs in a child process and returns a JSON-able dict)
# ------------------------------------------------------------------------------------------------
def part_build() -> dict:
    import torch

    from minivllm.kernels import cuda as cuda_ext

    start = time.perf_counter()
    ok = cuda_ext.is_available()
    seconds = time.perf_counter() - start
    print(f"extension available: {ok} ({seconds:.1f} s); {cuda_ext.unavailable_reason()}")
    return dict(available=ok, seconds=seconds, reason=cuda_ext.unavailable_reason(),
                device=torch.cuda.get_device_name(), torch=torch.__version__,
                capability=list(torch.cuda.get_device_capability()))


def _problem(query_lens, seq_lens, group: int, head_dim: int, block_size: int, dtype, seed: int):
    import torch

    from tests.kernels.paged_inputs import make_problem

    hq, hkv = GQA[group]
    g = torch.Generator().manual_seed(seed)
    return make_problem(query_lens, seq_lens, hq, hkv, head_dim, block_size, dtype, "cuda",
                        generator=g)


def _check(name: str, results: list, problem, group: int, block_size: int, **kwargs) -> None:
    """One correctness case: extension vs reference on `problem`, recorded whatever happens."""
    import torch

    from minivllm.kernels import paged_attention
    from tests.kernels.paged_inputs import TOLERANCE, rel_error

    dtype, head_dim = problem.query.dtype, problem.query.shape[2]
    q_lens = (problem.cu_seqlens_q[1:] - problem.cu_seqlens_q[:-1]).tolist()
    rec = dict(case=name, group=group, head_dim=head_dim, block_size=block_size,
               dtype=str(dtype).removeprefix("torch."), query_lens=q_lens,
               seq_lens=problem.seq_lens.tolist(), **kwargs)
    try:
        ref = paged_attention(*problem.args(), backend="torch", **kwargs)
        out = torch.full_like(problem.query, float("nan"))  # every element must be written
        paged_attention(*problem.args(), backend="cuda", out=out, **kwargs)
        torch.cuda.synchronize()
        err = rel_error(out, ref)
        rec.update(rel_error=err, tol=TOLERANCE[dtype], passed=bool(err < TOLERANCE[dtype]))
    except Exception as exc:  # noqa: BLE001 - record and go on
        rec.update(passed=False, error=f"{type(exc).__name__}: {exc}")
    status = "PASS" if rec["passed"] else "FAIL"
    detail = f"rel_error {rec['rel_error']:.2e}" if "rel_error" in rec else rec.get("error")
    print(f"{status} {name:<9} G{group} D{head_dim} bs{block_size:<3} {rec['dtype']:<8} "
          f"{kwargs or ''} {detail}", flush=True)
    results.append(rec)


QUICK = False  # --quick: bf16 and block sizes 8 and 16 only (the pytest file covers the rest)


def _matrix():
    import torch

    for dtype in (torch.bfloat16,) if QUICK else (torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            for group in (1, 2, 4, 8):
                for block_size in (8, 16) if QUICK else (8, 16, 32, 64):
                    yield dtype, head_dim, group, block_size


def part_decode() -> dict:
    import warnings

    import torch

    warnings.filterwarnings("error", message="backend='cuda'")  # a fallback would test Triton
    results = []
    for seed, (dtype, head_dim, group, bs) in enumerate(_matrix()):
        seq_lens = [1, bs, bs + 1, 7 * bs - 3, 260, 1000, 3001]
        problem = _problem([1] * len(seq_lens), seq_lens, group, head_dim, bs, dtype, seed)
        for splits in (None, 1, 3, 16):  # the heuristic's choice, unsplit, forced splits
            _check("decode", results, problem, group, bs, num_splits=splits)
    # The heuristic on one long context among short ones, bounded by max_seq_len or not.
    problem = _problem([1, 1, 1], [33000, 17, 500], 4, 128, 16, torch.bfloat16, 99)
    for max_seq_len in (None, 40000):
        _check("decode", results, problem, 4, 16, max_seq_len=max_seq_len)
    return dict(cases=results)


def part_prefill() -> dict:
    import warnings

    import torch

    warnings.filterwarnings("error", message="backend='cuda'")
    results = []
    for seed, (dtype, head_dim, group, bs) in enumerate(_matrix()):
        lens = [1, 5, 2 * bs + 3, 77, 300]
        _check("prefill", results, _problem(lens, lens, group, head_dim, bs, dtype, seed), group, bs)
        chunked = _problem([1, 17, 64, 200], [40, 17 + 3 * bs + 5, 1000, 1200], group, head_dim,
                           bs, dtype, seed)
        _check("chunked", results, chunked, group, bs)
        mixed = _problem([1, 1, 130, 1, 9, 1], [500, 1, 900, 33, 9, 2048], group, head_dim, bs,
                         dtype, seed)
        _check("mixed", results, mixed, group, bs)
    _check("noncausal", results, _problem([30, 7, 100], [90, 7, 100], 4, 64, 16, torch.float16, 7),
           4, 16, causal=False)
    _check("long", results, _problem([2048, 512], [2048, 8192], 4, 128, 16, torch.bfloat16, 8), 4, 16)
    return dict(cases=results)


def _timing_env():
    import torch

    from benchmarks.common import measure_matmul_rate

    device = torch.device("cuda")
    return device, measure_matmul_rate(device) / 1e12


def _time_backends(case, device, backends, extra_cuda: dict | None = None) -> dict:
    """Times (ms) of SDPA (where it has an equivalent) and each backend on one set of inputs,
    plus each backend's error against the reference; `extra_cuda`: label -> extension kwargs."""
    import torch

    from benchmarks.attn_bench import make_inputs, sdpa_fn, time_ms
    from minivllm.kernels import paged_attention
    from tests.kernels.paged_inputs import rel_error

    paged, (k_dense, v_dense) = make_inputs(case, device)
    ref = paged_attention(*paged, backend="torch")
    row = {}
    sdpa, kd, vd = sdpa_fn(case, paged[0], k_dense, v_dense)
    if sdpa is not None:
        row["sdpa"] = dict(ms=time_ms(sdpa, device))
    del k_dense, v_dense, kd, vd, sdpa
    runs = [(b, b, {}) for b in backends] + [(label, "cuda", kw)
                                             for label, kw in (extra_cuda or {}).items()]
    for label, backend, kwargs in runs:
        try:
            out = torch.empty_like(paged[0])

            def fn(backend=backend, out=out, kwargs=kwargs):
                return paged_attention(*paged, backend=backend, out=out,
                                       max_seq_len=case.context, **kwargs)

            fn()
            err = rel_error(out, ref)
            row[label] = dict(ms=time_ms(fn, device), rel_error=err)
        except Exception as exc:  # noqa: BLE001 - one failure must not lose the others
            row[label] = dict(ms=None, error=f"{type(exc).__name__}: {exc}")
        print(f"  {label:<12} {row[label]}", flush=True)
    return row


def _case_record(name, case, row, matmul_tflops) -> dict:
    from benchmarks.attn_bench import attention_flops, bytes_moved

    rec = dict(name=name, batch=case.batch, context=case.context, query_len=case.query_len,
               block_size=case.block_size, dtype=case.dtype, num_q_heads=case.num_q_heads,
               num_kv_heads=case.num_kv_heads, head_dim=case.head_dim, times=row,
               flops=attention_flops(case), bytes=bytes_moved(case), matmul_tflops=matmul_tflops)
    for label, r in row.items():
        if r.get("ms"):
            r["tflops"] = rec["flops"] / (r["ms"] * 1e-3) / 1e12
            r["gbps"] = rec["bytes"] / (r["ms"] * 1e-3) / 1e9
    return rec


def part_time_decode() -> dict:
    from benchmarks.attn_bench import Case
    from minivllm.kernels import cuda as cuda_ext

    device, matmul_tflops = _timing_env()
    from benchmarks.attn_bench import copy_bandwidth_gbps

    copy_gbps = copy_bandwidth_gbps(device, 1 << 30)
    records = []
    for batch, context in ((64, 4096), (1, 32768)):
        case = Case("decode", batch, context, 1, 16, "bf16", 32, 8, 128)
        heuristic = cuda_ext.decode_num_splits(batch, 8, 128, context,
                                               cuda_ext._num_sms(device.index or 0))
        sweep = {f"cuda_s{s}": dict(num_splits=s) for s in (1, 2, 3, 4, 8, 16, 32, 64, 128)
                 if s * 512 <= context or s == 1}
        print(f"decode B={batch} ctx={context} (heuristic: {heuristic} splits)", flush=True)
        try:
            row = _time_backends(case, device, ["triton", "cuda"], sweep)
            rec = _case_record(f"decode B={batch} ctx={context}", case, row, matmul_tflops)
            rec["heuristic_splits"] = heuristic
            rec["copy_gbps"] = copy_gbps
            records.append(rec)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            records.append(dict(name=f"decode B={batch} ctx={context}", error=traceback.format_exc()))
    return dict(cases=records, matmul_tflops=matmul_tflops, copy_gbps=copy_gbps)


def part_time_prefill() -> dict:
    from benchmarks.attn_bench import MIXED, Case, mixed_case

    device, matmul_tflops = _timing_env()
    records = []
    cases = [
        ("prefill 4x2048", Case("prefill", 4, 2048, 2048, 16, "bf16", 32, 8, 128)),
        ("chunked 4x512/8k", Case("chunked_prefill", 4, 8192, 512, 16, "bf16", 32, 8, 128)),
        ("mixed 62x2k+2x512/8k", mixed_case(*MIXED["gpu"], 16, "bf16", 32, 8, 128)),
    ]
    for name, case in cases:
        print(name, flush=True)
        try:
            row = _time_backends(case, device, ["triton", "cuda"])
            records.append(_case_record(name, case, row, matmul_tflops))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            records.append(dict(name=name, error=traceback.format_exc()))
    return dict(cases=records, matmul_tflops=matmul_tflops)


PART_FUNCTIONS = {"build": part_build, "decode": part_decode, "prefill": part_prefill,
                  "time-decode": part_time_decode, "time-prefill": part_time_prefill}


# ------------------------------------------------------------------------------------------------
# Driver: every part in its own process, then the report
# ------------------------------------------------------------------------------------------------
def run_part(name: str, quick: bool = False) -> dict:
    """Run one part in a child process; its result, or what is known of its death."""
    with tempfile.TemporaryDirectory() as tmp:
        part_out = Path(tmp) / "part.json"
        cmd = [sys.executable, __file__, "--part", name, "--part-out", str(part_out)]
        cmd += ["--quick"] if quick else []
        env = dict(os.environ, MINIVLLM_CUDA_JIT=os.environ.get("MINIVLLM_CUDA_JIT", "1"))
        start = time.perf_counter()
        tail: list[str] = []
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=env, cwd=ROOT)
        except Exception as exc:  # noqa: BLE001
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        # A hung kernel prints nothing, so the time limit is a timer, not a check per line.
        watchdog = threading.Timer(PART_TIMEOUT_S[name], proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:  # stream the child's lines as they come
                print(f"[{name}] {line}", end="", flush=True)
                tail = (tail + [line.rstrip()])[-40:]
            rc = proc.wait()
        finally:
            timed_out = watchdog.finished.is_set()  # set only by firing, until cancel()
            watchdog.cancel()
        if timed_out:
            tail.append(f"killed after {PART_TIMEOUT_S[name]} s")
        seconds = time.perf_counter() - start
        if part_out.is_file():
            result = json.loads(part_out.read_text())
            result.update(ok=rc == 0, returncode=rc, seconds=seconds)
            if rc != 0:
                result["tail"] = tail
            return result
        return {"ok": False, "returncode": rc, "seconds": seconds, "tail": tail}


def summary_lines(report: dict) -> list[str]:
    lines = []
    for part in ("decode", "prefill"):
        res = report["parts"].get(part)
        if not res:
            continue
        cases = res.get("cases", [])
        failed = [c for c in cases if not c.get("passed")]
        state = "ran" if res.get("ok") else f"DIED (rc {res.get('returncode')})"
        lines.append(f"{part} correctness: {len(cases) - len(failed)}/{len(cases)} passed, {state}")
        for c in failed[:10]:
            lines.append(f"  FAIL {c['case']} G{c['group']} D{c['head_dim']} bs{c['block_size']} "
                         f"{c['dtype']} {c.get('rel_error', c.get('error'))}")
    header = (f"{'case':<24}{'sdpa ms':>10}{'triton ms':>11}{'cuda ms':>10}{'cuda/triton':>13}"
              f"{'cuda/sdpa':>11}{'cuda TF/s':>11}{'best split':>12}")
    rows = []
    for part in ("time-decode", "time-prefill"):
        res = report["parts"].get(part) or {}
        for rec in res.get("cases", []):
            if "times" not in rec:
                rows.append(f"{rec['name']:<24} error")
                continue
            t = rec["times"]

            def ms(label, t=t):
                return (t.get(label) or {}).get("ms")

            def fmt(x, spec=".4f", width=10):
                return f"{x:>{width}{spec}}" if x else f"{'-':>{width}}"

            cuda, triton, sdpa = ms("cuda"), ms("triton"), ms("sdpa")
            splits = {k: v["ms"] for k, v in t.items() if k.startswith("cuda_s") and v.get("ms")}
            best = min(splits, key=splits.get) if splits else None
            best_text = f"{best[6:]} {splits[best]:.4f}" if best else "-"
            rows.append(
                f"{rec['name']:<24}{fmt(sdpa)}{fmt(triton, width=11)}{fmt(cuda)}"
                f"{fmt(cuda / triton if cuda and triton else None, '.2f', 13)}"
                f"{fmt(cuda / sdpa if cuda and sdpa else None, '.2f', 11)}"
                f"{fmt((t.get('cuda') or {}).get('tflops'), '.1f', 11)}{best_text:>12}")
    if rows:
        lines += ["", header, *rows]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cuda_mma_check_gpu.json")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--quick", action="store_true",
                    help="correctness on bf16 and block sizes 8, 16 only (a quarter of the cases)")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.part:  # child: run one part, write its JSON
        global QUICK
        QUICK = args.quick
        result = PART_FUNCTIONS[args.part]()
        args.part_out.write_text(json.dumps(result, indent=1, default=str))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("cuda_mma_check needs a CUDA GPU (and nvcc for the JIT build); nothing to do here")
        return 2
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    report = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), device=torch.cuda.get_device_name(),
                  torch=torch.__version__, targets=TARGETS, quick=args.quick, parts={})
    for name in parts:
        print(f"==== {name}", flush=True)
        report["parts"][name] = run_part(name, args.quick)
        if name == "build" and not report["parts"][name].get("available"):
            print("the extension did not build or load: stopping")
            break
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))  # after every part
    lines = summary_lines(report)
    report["summary"] = lines
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.out}\n")
    print("\n".join(lines))
    all_ok = all(p.get("ok") for p in report["parts"].values())
    all_pass = all(c.get("passed", True) for part in ("decode", "prefill")
                   for c in (report["parts"].get(part) or {}).get("cases", []))
    return 0 if all_ok and all_pass else 1


if __name__ == "__main__":
    raise SystemExit(main())
