"""How the driver hands each step to its tensor-parallel workers: a pipe, or a gloo broadcast?

Under tensor parallelism the driver (rank 0) sends every step's `SchedulerOutput` to the other
ranks before they can launch it, so the transfer sits on every step's critical path. Two ways
that need nothing but the standard library and torch.distributed:

* `pipe`        pickle the output once, `Connection.send_bytes` it down a pipe per worker; the
                worker `recv_bytes` and unpickles (minivllm/worker/executor.py does this);
* `broadcast`   `torch.distributed.broadcast_object_list` over a gloo group (it pickles, sends
                the length, then the bytes, to every rank).

The step is a decode batch of B sequences at a given context: per sequence its block table
(context / 16 entries) and a sample row. Timed: the round trip from "the driver starts sending"
to "the driver has the worker's acknowledgement that it holds the unpickled step" (the same
pipe acknowledgement for both), median over --repeats. Host-only: the same numbers on a CPU box
and a GPU box of similar CPUs.

    python benchmarks/tp_transport.py                          # B = 1, 64, 256; context 1024
    python benchmarks/tp_transport.py --batch-sizes 256 --context 8192
"""

from __future__ import annotations

import argparse
import datetime
import pickle
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, environment, write_json
from minivllm.sampling_params import SamplingParams
from minivllm.step import SampleRow, ScheduledSeq, SchedulerOutput

TRANSPORTS = ("pipe", "broadcast")


def decode_step(batch: int, context: int, block_size: int = 16) -> SchedulerOutput:
    """A decode step as the scheduler makes it: every sequence one pending token, its whole table."""
    params = SamplingParams(temperature=0.0, max_tokens=1024, ignore_eos=True)
    blocks = -(-context // block_size)
    seqs = [ScheduledSeq(seq_id=i, start=context - 1, token_ids=[], pending=True,
                         block_table=list(range(i * blocks, (i + 1) * blocks)), num_samples=1)
            for i in range(batch)]
    return SchedulerOutput(seqs=seqs, sample_rows=[SampleRow(i, params) for i in range(batch)])


def worker(port: int, conn) -> None:
    """Rank 1: receive each step by the transport named in the message, acknowledge it."""
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(minutes=2))
    dist.init_process_group("gloo", store=store, rank=1, world_size=2)
    while True:
        transport = conn.recv()
        if transport is None:
            break
        if transport == "pipe":
            output = pickle.loads(conn.recv_bytes())
        else:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            output = box[0]
        conn.send(len(output.seqs))
    dist.destroy_process_group()


def round_trip(transport: str, output: SchedulerOutput, conn) -> float:
    conn.send(transport)
    start = time.perf_counter()
    if transport == "pipe":
        conn.send_bytes(pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL))
    else:
        dist.broadcast_object_list([output], src=0)
    assert conn.recv() == len(output.seqs)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="1,64,256")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=datetime.timedelta(minutes=2),
                          wait_for_workers=False)
    context = torch.multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    proc = context.Process(target=worker, args=(store.port, theirs), daemon=True)
    proc.start()
    dist.init_process_group("gloo", store=store, rank=0, world_size=2)
    rows = []
    try:
        for batch in batches:
            output = decode_step(batch, args.context)
            size = len(pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL))
            for transport in TRANSPORTS:
                for _ in range(10):  # warm-up
                    round_trip(transport, output, ours)
                times = [round_trip(transport, output, ours) for _ in range(args.repeats)]
                rows.append({"transport": transport, "batch_size": batch, "context": args.context,
                             "pickled_bytes": size, "round_trip_s": statistics.median(times)})
                print(f"  {transport:>9}  B={batch:>4}  {size / 1024:8.1f} KiB  "
                      f"{1e6 * rows[-1]['round_trip_s']:9.1f} us", flush=True)
    finally:
        ours.send(None)
        proc.join(timeout=10)
        dist.destroy_process_group()
    out = args.out or RESULTS_DIR / "cpu" / "tp_transport.json"
    payload = {"bench": "tp_transport", "rows": rows, **environment(torch.device("cpu"))}
    write_json(out, payload)
    print(f"\nwrote {out}")
    print(f"{'batch':>6} {'KiB':>8} " + " ".join(f"{t + ' us':>14}" for t in TRANSPORTS))
    for batch in batches:
        sel = {r["transport"]: r for r in rows if r["batch_size"] == batch}
        print(f"{batch:>6} {sel['pipe']['pickled_bytes'] / 1024:>8.1f} "
              + " ".join(f"{1e6 * sel[t]['round_trip_s']:>14.1f}" for t in TRANSPORTS))
    return payload


if __name__ == "__main__":
    main()
