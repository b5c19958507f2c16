"""Tensor parallelism on GPUs: the decode step, end-to-end throughput and the all-reduce, at 1 and N GPUs.

One call measures everything on the same machine, in this order:

1. **all-reduce** (no engine alive): `torch.distributed.all_reduce` of a [B, hidden] bf16 tensor
   over N GPUs (NCCL), and the one-shot sum through peer memory the engine uses for decode-sized
   tensors (minivllm/distributed/peer_all_reduce.py) where it can run, eager and replayed from a
   CUDA graph (as the decode graphs run it), per call; times 2 x layers + 1 calls (two per
   decoder layer, one for the embedding), the all-reduce cost of one decode step.
2. For each model shape (--models; default the 8B and 1B Llama shapes, random weights) and each
   tensor_parallel_size (--tp; default 1 and 2), one engine (bf16, CUDA graphs, overlap on):
   * **decode roofline**, as benchmarks/roofline.py: B prompts of --context tokens prefilled,
     then --steps all-decode steps timed (median). The roofline is per GPU: this rank's weight
     bytes plus this rank's KV bytes, over the copy bandwidth measured in the same run; with N
     GPUs the ideal step is 1/N of the one-GPU step plus the all-reduces of step 1;
   * **bf16 agreement**: greedy tokens of a few prompts, compared with tensor_parallel_size=1's
     (float32 equality is tests/distributed/test_tp_gpu.py; in bf16 the split changes the order of
     the sums, and rounding may tip a near tie);
   * **throughput** on the random workload of benchmarks/throughput.py (same requests for every
     tensor_parallel_size).
   With N > 1, one engine per --all-reduce choice (default: dist, then auto), so the two ways
   of summing are timed side by side.

Every record carries tensor_parallel_size, num_gpus and all_reduce (the engine's choice, and
whether the peer path was really attached). The JSON is written after each record
(benchmarks/results/tp_bench_<gpu>_<date>.json, or --out), a table is printed last with the
targets of issue 16: the 8B step at batch 64 on 2 GPUs <= 0.6 x its 1-GPU time, the 8B
throughput on 2 GPUs >= 1.6 x its 1-GPU throughput.

    python benchmarks/tp_bench.py --model-dir /tmp/tp-models             # the whole measurement
    python benchmarks/tp_bench.py --models llama-3.2-1b --parts allreduce,roofline
    python benchmarks/tp_bench.py --models tiny --tp 1,2 --batch-sizes 1,2 --num-requests 4   # CPU

Needs N GPUs for tensor_parallel_size N; on CPU the engine parts run over gloo (a smoke test, no
GPU claim) and the all-reduce part is skipped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    MODEL_CONFIGS,
    RESULTS_DIR,
    build_model,
    cpu_disclaimer,
    environment,
    measure_copy_bandwidth,
    measure_matmul_rate,
    parse_range,
    release_memory,
    write_json,
)
from benchmarks.hf_agreement import agreement, greedy_tokens

PARTS = ("allreduce", "roofline", "agreement", "throughput")
SHAPES = sorted(MODEL_CONFIGS)


def build(name: str, root: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """The random-weight model directory of shape `name` under `root` (reused if there)."""
    return build_model(name, root, dtype, seed)


# ---------------------------------------------------------------------------------------------
# 1. The all-reduce alone
# ---------------------------------------------------------------------------------------------
def _all_reduce_rank(rank: int, size: int, port: int, cases: list[tuple[int, int]], calls: int, out: str):
    """One rank of the all-reduce measurement (a spawned process); rank 0 writes the rows."""
    import json

    import torch.distributed as dist

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=dt.timedelta(minutes=5))
    dist.init_process_group("nccl", store=store, rank=rank, world_size=size)
    from minivllm.distributed.peer_all_reduce import PeerAllReduce, unavailable_reason

    methods = {"nccl": lambda x: dist.all_reduce(x)}
    peer_reason = unavailable_reason(size, torch.device("cuda"))
    if peer_reason is None:
        peer = PeerAllReduce(dist.group.WORLD, torch.device("cuda", rank), torch.bfloat16)
        methods["peer"] = peer
    rows = []
    for hidden, batch in cases:
        x = torch.ones(batch, hidden, dtype=torch.bfloat16, device="cuda")
        for method, fn in methods.items():
            if method == "peer" and not peer.fits(x):
                continue
            for _ in range(10):  # the communicator, warm
                fn(x)
            torch.cuda.synchronize()
            check = (methods["peer"](x) if method == "peer" else x.clone().fill_(1.0))
            if method == "nccl":
                dist.all_reduce(check)
            correct = bool((check == size).all())  # a sum of ones
            eager = _time_cuda(lambda fn=fn, x=x: fn(x), repeats=100)
            graphed, error = None, None
            try:  # `calls` all-reduces in one graph, as a decode graph holds 2L + 1 of them
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(calls):
                        fn(x)
                graph.replay()
                torch.cuda.synchronize()
                graphed = _time_cuda(graph.replay, repeats=20) / calls
                del graph
            except Exception as err:  # noqa: BLE001 - recorded: the eager numbers still stand
                error = f"{type(err).__name__}: {err}"
            x.fill_(1.0)  # the NCCL calls summed x in place
            rows.append({"bench": "tp_allreduce", "method": method, "hidden": hidden, "batch_size": batch,
                         "num_gpus": size, "tensor_parallel_size": size, "bytes": x.numel() * x.element_size(),
                         "eager_s": eager, "graphed_s": graphed, "graph_error": error, "correct": correct,
                         "peer_unavailable": peer_reason})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _time_cuda(fn, repeats: int) -> float:
    """Median seconds of `fn` by CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_all_reduce(size: int, hiddens: list[int], batch_sizes: list[int], calls: int = 32) -> list[dict]:
    import json
    import socket

    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        cases = [(h, b) for h in hiddens for b in batch_sizes]
        torch.multiprocessing.spawn(_all_reduce_rank, args=(size, port, cases, calls, out), nprocs=size, join=True)
        return json.loads(Path(out).read_text())


# ---------------------------------------------------------------------------------------------
# 2. One engine: decode roofline, agreement, throughput
# ---------------------------------------------------------------------------------------------
def make_llm(model_dir: Path, tp: int, args, enforce_eager: bool = False, all_reduce: str = "auto"):
    from minivllm import LLM

    return LLM(str(model_dir), tensor_parallel_size=tp, all_reduce=all_reduce, max_num_seqs=args.max_num_seqs,
               max_model_len=args.max_model_len, max_num_batched_tokens=max(8192, args.max_num_seqs),
               gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
               enforce_eager=enforce_eager)


def decode_rows(llm, tp: int, args, copy_bw: float, allreduce: dict) -> list[dict]:
    from benchmarks.roofline import time_decode_steps, weight_bytes

    runner = llm.engine.model_runner
    vocab = runner.vocab_size
    weights = weight_bytes(runner.model)  # this rank's shard
    kv_per_token = runner.kv_bytes_per_block // runner.block_size  # this rank's KV heads
    time_decode_steps(llm, 2, min(args.context, 64), 2, vocab, args.seed)  # warm-up
    rows = []
    for batch in args.batch_sizes:
        m = time_decode_steps(llm, batch, args.context, args.steps, vocab, args.seed + batch)
        kv_bytes = int(batch * m["mean_context"] * kv_per_token)
        roofline = (weights + kv_bytes) / copy_bw
        row = {"bench": "tp_decode_roofline", "tensor_parallel_size": tp, "num_gpus": tp, "batch_size": batch,
               "context": args.context, **m, "weight_bytes_per_gpu": weights, "kv_read_bytes_per_gpu": kv_bytes,
               "roofline_time_s": roofline, "step_over_roofline": m["step_time_s"] / roofline,
               "decode_tokens_per_s": batch / m["step_time_s"], "cuda_graphs": runner.graphs is not None,
               "allreduce_per_step_s": allreduce.get(batch) if tp > 1 else 0.0}
        rows.append(row)
        print(f"  tp={tp} B={batch:>4}  step {1e3 * m['step_time_s']:8.3f} ms  roofline/GPU "
              f"{1e3 * roofline:8.3f} ms  x{row['step_over_roofline']:5.2f}  replayed {m['graph_fraction']:4.0%}",
              flush=True)
    return rows


def throughput_record(llm, prompts, out_lens, device, tp: int) -> dict:
    from benchmarks.throughput import run_minivllm, workload_roofline

    warm = min(4, len(prompts))
    run_minivllm(llm, [p[:16] for p in prompts[:warm]], [4] * warm, device, "warm-up")
    record = run_minivllm(llm, prompts, out_lens, device, f"minivllm tp={tp}")
    roofline = workload_roofline(prompts, out_lens, llm.engine.model_runner.model,
                                 measure_copy_bandwidth(device), measure_matmul_rate(device))
    record.update(roofline, roofline_fraction=roofline["workload_roofline_s"] / record["wall_time_s"],
                  bench="tp_throughput", tensor_parallel_size=tp, num_gpus=tp,
                  roofline_note="per GPU: this rank's weights, KV heads and FLOPs; all-reduces not counted")
    print(f"  tp={tp} throughput {record['output_tokens_per_s']:.0f} output tok/s "
          f"({record['num_output_tokens']} tokens in {record['wall_time_s']:.1f} s)", flush=True)
    return record


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help=f"comma-separated, from {SHAPES} "
                                                   "(default llama-3.1-8b,llama-3.2-1b on GPU, tiny on CPU)")
    p.add_argument("--tp", default="1,2", help="tensor_parallel_size values; the first is the baseline")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--all-reduce", default="dist,auto",
                   help="with tensor_parallel_size > 1, one engine per choice (from minivllm's all_reduce: "
                        "auto, dist, peer)")
    p.add_argument("--batch-sizes", default=None, help="decode batch sizes (default 1,16,64,128 on GPU)")
    p.add_argument("--context", type=int, default=None, help="prompt tokens per decode sequence (default 1024)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    p.add_argument("--num-requests", type=int, default=None, help="throughput requests (default 256 on GPU)")
    p.add_argument("--input-len", default=None, help="throughput prompt lengths LOW:HIGH (default 100:1024)")
    p.add_argument("--output-len", default=None, help="throughput output lengths LOW:HIGH (default 100:1024)")
    p.add_argument("--agreement-prompts", type=int, default=16)
    p.add_argument("--agreement-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None, help="where to build/reuse the random models")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    args.models = (args.models or ("llama-3.1-8b,llama-3.2-1b" if gpu else "tiny")).split(",")
    unknown = [m for m in args.models if m not in SHAPES]
    args.tp = sorted({int(t) for t in args.tp.split(",")}, key=[int(t) for t in args.tp.split(",")].index)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.all_reduce = [x.strip() for x in args.all_reduce.split(",") if x.strip()]
    if not args.all_reduce or any(x not in ("auto", "dist", "peer") for x in args.all_reduce):
        p.error("--all-reduce: comma-separated from auto, dist, peer")
    if unknown or any(x not in PARTS for x in args.parts) or min(args.tp) < 1:
        p.error(f"--models from {SHAPES}, --parts from {PARTS}, --tp >= 1")
    if gpu and max(args.tp) > torch.cuda.device_count():
        p.error(f"--tp {max(args.tp)} needs {max(args.tp)} GPUs; torch sees {torch.cuda.device_count()}")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,16,64,128" if gpu else "1,2")).split(",")]
    args.context = args.context or (1024 if gpu else 32)
    args.num_requests = args.num_requests or (256 if gpu else 4)
    args.input_range = parse_range(args.input_len or ("100:1024" if gpu else "8:32"), "--input-len")
    args.output_range = parse_range(args.output_len or ("100:1024" if gpu else "4:8"), "--output-len")
    args.max_num_seqs = max(args.max_num_seqs, *args.batch_sizes)
    # Room for the workload and for the decode timing (prefill, warm-up, timed steps).
    args.max_model_len = max(args.input_range[1] + args.output_range[1], args.context + args.steps + 64,
                             args.agreement_tokens + 288)
    return args


def main(argv=None) -> dict:
    from benchmarks.throughput import make_workload

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    note = cpu_disclaimer(device)
    if note:
        print(note)
    env = environment(device)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or (RESULTS_DIR / ("" if device.type == "cuda" else "cpu")
                       / f"tp_bench_{device.type}_{stamp}.json")
    payload = {"bench": "tp_bench", "models": args.models, "tp": args.tp, "dtype": str(dtype).removeprefix("torch."),
               "context": args.context, "input_len": list(args.input_range), "output_len": list(args.output_range),
               "num_requests": args.num_requests, "visible_gpus": torch.cuda.device_count(), **env, "note": note,
               "records": []}

    def add(record: dict) -> None:
        payload["records"].append(record)
        write_json(out, payload)

    root = args.model_dir or Path(tempfile.mkdtemp(prefix="minivllm-tp-"))
    model_dirs = {}
    for name in args.models:
        print(f"building the {name} model (random weights) in {root} ...", flush=True)
        start = time.perf_counter()
        model_dirs[name] = build(name, root, dtype, args.seed)
        print(f"  ready in {time.perf_counter() - start:.0f} s", flush=True)
    hidden = {name: _config(model_dirs[name]) for name in args.models}
    # Per decode step: two all-reduces per layer and one for the embedding.
    step_calls = {name: 2 * layers + 1 for name, (_, layers) in hidden.items()}
    allreduce_per_step: dict[tuple[str, int, int], float] = {}
    if "allreduce" in args.parts and device.type == "cuda":
        for size in [t for t in args.tp if t > 1]:
            print(f"all-reduce over {size} GPUs ...", flush=True)
            rows = measure_all_reduce(size, sorted({h for h, _ in hidden.values()}), args.batch_sizes)
            for row in rows:
                for name, (h, _) in hidden.items():
                    if row["hidden"] == h:
                        per_call = row["graphed_s"] if row["graphed_s"] is not None else row["eager_s"]
                        allreduce_per_step[(name, size, row["batch_size"], row["method"])] = per_call * step_calls[name]
                row["calls_per_decode_step"] = {n: step_calls[n] for n, (h, _) in hidden.items() if h == row["hidden"]}
                graphed = "-" if row["graphed_s"] is None else f"{1e6 * row['graphed_s']:7.1f} us"
                print(f"  {row['method']:>4} hidden {row['hidden']} B={row['batch_size']:>4}: eager "
                      f"{1e6 * row['eager_s']:7.1f} us, graphed {graphed} per call, correct {row['correct']} "
                      f"{row['graph_error'] or ''}", flush=True)
                add(row)
            if rows and rows[0]["peer_unavailable"]:
                print(f"  (no peer all-reduce: {rows[0]['peer_unavailable']})", flush=True)
    copy_bw = measure_copy_bandwidth(device)
    payload["copy_bandwidth_bytes_per_s"] = copy_bw
    for name in args.models:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(str(model_dirs[name])).vocab_size
        prompts, out_lens = make_workload(args.num_requests, args.input_range, args.output_range, vocab, args.seed)
        probe = make_workload(args.agreement_prompts, (64, 256), (1, 1), vocab, args.seed + 1)[0]
        reference = None
        for tp, mode in [(tp, mode) for tp in args.tp for mode in (["dist"] if tp == 1 else args.all_reduce)]:
            print(f"\n{name}, tensor_parallel_size={tp}, all_reduce={mode}", flush=True)
            common = {"model_config": name, "tensor_parallel_size": tp, "num_gpus": tp, "all_reduce": mode}
            try:
                llm = make_llm(model_dirs[name], tp, args, all_reduce=mode)
            except Exception as err:  # noqa: BLE001 - e.g. a graph capture failing with NCCL: say so, go on eagerly
                print(f"  the engine failed to start ({type(err).__name__}: {err}); retrying with enforce_eager=True",
                      flush=True)
                add({"bench": "tp_engine_error", **common, "error": f"{type(err).__name__}: {err}"})
                llm = None
            if llm is None:  # outside the except block: the failed engine's memory can go now
                release_memory(device)
                llm = make_llm(model_dirs[name], tp, args, enforce_eager=True, all_reduce=mode)
            common["peer_all_reduce"] = llm.engine.model_runner.tp.peer is not None
            method = "peer" if common["peer_all_reduce"] else "nccl"
            try:
                if "roofline" in args.parts:
                    per_step = {b: allreduce_per_step.get((name, tp, b, method)) for b in args.batch_sizes}
                    for row in decode_rows(llm, tp, args, copy_bw, per_step):
                        add({**row, **common})
                if "agreement" in args.parts:
                    tokens = greedy_tokens(llm, probe, args.agreement_tokens)
                    if tp == args.tp[0] and reference is None:
                        reference = tokens
                    else:
                        add({"bench": "tp_agreement", **common, "baseline_tensor_parallel_size": args.tp[0],
                             "dtype": payload["dtype"], "max_tokens": args.agreement_tokens,
                             **agreement(tokens, reference, args.agreement_tokens)})
                if "throughput" in args.parts:
                    add({**throughput_record(llm, prompts, out_lens, device, tp), **common})
            finally:
                llm.close()
                del llm
                release_memory(device)
    payload["summary"] = summarize(payload["records"], args.tp[0])
    write_json(out, payload)
    print(f"\nwrote {out}")
    print(format_table(payload))
    if note:
        print(note)
    return payload


def _config(model_dir: Path) -> tuple[int, int]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    return config.hidden_size, config.num_hidden_layers


def summarize(records: list[dict], base_tp: int) -> list[dict]:
    """tp=N against the baseline tp, per model: decode step per batch size, throughput."""
    out = []
    decode = {(r["model_config"], r["tensor_parallel_size"], r.get("all_reduce", "dist"), r["batch_size"]): r
              for r in records if r["bench"] == "tp_decode_roofline"}
    for (model, tp, mode, batch), r in decode.items():
        base = next((b for (m, t, _, bb), b in decode.items() if (m, t, bb) == (model, base_tp, batch)), None)
        if tp == base_tp or base is None:
            continue
        ideal = base["step_time_s"] / (tp / base_tp) + (r["allreduce_per_step_s"] or 0.0)
        out.append({"kind": "decode_step", "model_config": model, "tensor_parallel_size": tp, "all_reduce": mode,
                    "batch_size": batch,
                    "step_time_ratio": r["step_time_s"] / base["step_time_s"],
                    "ideal_ratio": ideal / base["step_time_s"],
                    "allreduce_share_of_base_step": (r["allreduce_per_step_s"] or 0.0) / base["step_time_s"]})
    tput = {(r["model_config"], r["tensor_parallel_size"], r.get("all_reduce", "dist")): r
            for r in records if r["bench"] == "tp_throughput"}
    for (model, tp, mode), r in tput.items():
        base = next((b for (m, t, _), b in tput.items() if (m, t) == (model, base_tp)), None)
        if tp != base_tp and base is not None:
            out.append({"kind": "throughput", "model_config": model, "tensor_parallel_size": tp, "all_reduce": mode,
                        "output_tokens_per_s_ratio": r["output_tokens_per_s"] / base["output_tokens_per_s"]})
    return out


def _sum_label(record: dict) -> str:
    """How the record's engine summed: "peer" (one-shot through peer memory) or "nccl"."""
    if record["tensor_parallel_size"] == 1:
        return "-"
    return "peer" if record.get("peer_all_reduce") else "nccl"


def format_table(payload: dict) -> str:
    recs = payload["records"]
    title = (f"{payload['device']} ({payload['dtype']}), context {payload['context']}, throughput workload "
             f"{payload['num_requests']} requests in {payload['input_len']} out {payload['output_len']}")
    header = (f"{'model':<14} {'tp':>3} {'sum':>5} {'batch':>6} {'step ms':>9} {'roofline/GPU ms':>16} {'all-reduce ms':>14} "
              f"{'vs tp=' + str(payload['tp'][0]):>8} {'ideal':>7}")
    lines = [title, header]
    ratio = {(s["model_config"], s["tensor_parallel_size"], s["all_reduce"], s["batch_size"]): s
             for s in payload["summary"] if s["kind"] == "decode_step"}
    for r in recs:
        if r["bench"] != "tp_decode_roofline":
            continue
        mode = r.get("all_reduce", "dist")
        s = ratio.get((r["model_config"], r["tensor_parallel_size"], mode, r["batch_size"]))
        ar = r["allreduce_per_step_s"]
        allreduce = "-" if ar is None else f"{1e3 * ar:.3f}"
        vs_base = "-" if s is None else f"{s['step_time_ratio']:.2f}"
        ideal = "-" if s is None else f"{s['ideal_ratio']:.2f}"
        lines.append(f"{r['model_config']:<14} {r['tensor_parallel_size']:>3} {_sum_label(r):>5} {r['batch_size']:>6} "
                     f"{1e3 * r['step_time_s']:>9.3f} {1e3 * r['roofline_time_s']:>16.3f} "
                     f"{allreduce:>14} {vs_base:>8} {ideal:>7}")
    for r in recs:
        if r["bench"] == "tp_throughput":
            s = next((x for x in payload["summary"] if x["kind"] == "throughput"
                      and (x["model_config"], x["tensor_parallel_size"], x["all_reduce"])
                      == (r["model_config"], r["tensor_parallel_size"], r.get("all_reduce", "dist"))), None)
            lines.append(f"throughput {r['model_config']:<14} tp={r['tensor_parallel_size']} ({_sum_label(r)}): "
                         f"{r['output_tokens_per_s']:.0f} output tok/s"
                         + (f" = {s['output_tokens_per_s_ratio']:.2f}x tp={payload['tp'][0]}" if s else "")
                         + f", TTFT p50 {r['ttft_s']['p50']:.3f} s, {r['roofline_fraction']:.2f} of its per-GPU roofline")
        elif r["bench"] == "tp_agreement":
            lines.append(f"{r['dtype']} agreement {r['model_config']:<14} tp={r['tensor_parallel_size']} vs "
                         f"tp={r['baseline_tensor_parallel_size']}: exact {r['exact']:.2f}, mean common prefix "
                         f"{r['prefix']:.2f} of {r['max_tokens']} tokens, first token {r['first_token']:.2f}")
        elif r["bench"] == "tp_allreduce":
            graphed = "-" if r["graphed_s"] is None else f"{1e6 * r['graphed_s']:.1f}"
            lines.append(f"all-reduce {r.get('method', 'nccl')} hidden {r['hidden']} B={r['batch_size']} over {r['num_gpus']} GPUs: "
                         f"eager {1e6 * r['eager_s']:.1f} us, graphed {graphed} us per call")
        elif r["bench"] == "tp_engine_error":
            lines.append(f"ENGINE ERROR {r['model_config']} tp={r['tensor_parallel_size']} (reran eagerly): {r['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
