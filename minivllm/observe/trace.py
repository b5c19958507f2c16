"""The step trace: a flight recorder of what every engine step did.

    llm.enable_trace()                    # off by default
    llm.generate(prompts, max_tokens=32)
    llm.engine.trace.save("trace.jsonl")  # then: python -m minivllm visualize trace.jsonl --out figs/

One event per step, built on the scheduler's own `StepRecord` (token counts, queue lengths, block
counts, preemptions with their reason) plus what only the engine sees around it:

* `seqs`: which sequences ran, with their prefill and decode tokens and where they started;
* `blocks_allocated` / `blocks_freed`: physical blocks that became held / free during the step
  (net: a block freed by a preemption and handed out again in the same step appears in neither);
* `num_shared_blocks`, `finished`, `num_sampled`, `step_time` (schedule + forward + update);
* `blocks`: a snapshot of every block table and of the cached free blocks, enough to draw the
  block map of any step later (`block_snapshots=False` leaves it out: it costs a pass over the
  free list, which matters for pools of many thousands of blocks).

The buffer is bounded (the oldest steps fall out). Off, the engine pays one `is None` test per
step; on, a few set operations over the held blocks.

On disk it is JSON lines: a header line (pool geometry and budgets), then one line per step.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

from minivllm.observe.block_map import snapshot_blocks

TRACE_VERSION = 1


def blocks_held(scheduler) -> set[int]:
    """Physical blocks held by the scheduler's running sequences (the only ones holding any)."""
    return {block for seq in scheduler.running for block in seq.block_table}


class StepTrace:
    """A bounded buffer of per-step events (dicts of plain data, JSON-ready)."""

    def __init__(self, max_steps: int = 10_000, block_snapshots: bool = True, header: dict | None = None):
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        self.events: deque[dict] = deque(maxlen=max_steps)
        self.block_snapshots = block_snapshots
        self.header = {"type": "header", "version": TRACE_VERSION, **(header or {})}
        self._t0 = time.perf_counter()

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self):
        return iter(self.events)

    def clear(self) -> None:
        self.events.clear()
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------------------------------
    # Recording (called by LLMEngine.step)
    # ------------------------------------------------------------------------------------------
    def start(self, scheduler, output, held_before: set[int]) -> dict:
        """After `schedule()`: who runs, with what, and which blocks changed hands."""
        held = blocks_held(scheduler)
        bm = scheduler.block_manager
        event = {"type": "step", **output.record.to_dict()}
        event["t"] = event.pop("time") - self._t0
        event["seqs"] = [
            {
                "seq_id": e.seq.seq_id,
                "request_id": e.seq.request_id,
                "start": e.seq.num_computed_tokens,
                "prefill": e.num_new_tokens if e.is_prefill else 0,
                "decode": 0 if e.is_prefill else e.num_new_tokens,
                "forks": [child.seq_id for child in e.forks],
            }
            for e in output.scheduled
        ]
        event["blocks_allocated"] = sorted(held - held_before)
        event["blocks_freed"] = sorted(held_before - held)
        event["num_shared_blocks"] = sum(1 for b in held if bm.ref_count(b) > 1)
        if self.block_snapshots:
            # A child forked this step shares its parent's blocks and its parent's new tokens.
            new_tokens = {s.seq_id: e.num_new_tokens for e in output.scheduled for s in [e.seq, *e.forks]}
            event["blocks"] = snapshot_blocks(bm, scheduler.running, new_tokens)
        event["_held"] = held
        return event

    def finish(self, event: dict, scheduler, finished: list, num_sampled: int, step_time: float,
               record=None) -> None:
        """After `update()`: what finished; blocks the finished ones gave back count as freed.

        record: the step's `StepRecord`, whose runner time and phase timings were filled after
        `start` copied it; given, the event takes their final values.
        """
        if record is not None:
            event["execute_time"], event["timings"] = record.execute_time, asdict(record.timings)
        held = blocks_held(scheduler)
        freed_now = event.pop("_held") - held
        event["blocks_freed"] = sorted(set(event["blocks_freed"]) | freed_now)
        event["finished"] = [seq.seq_id for seq in finished]
        event["num_sampled"] = num_sampled
        event["step_time"] = step_time
        self.events.append(event)

    # ------------------------------------------------------------------------------------------
    # JSON lines
    # ------------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the header and every buffered step as JSON lines; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            f.write(json.dumps(self.header) + "\n")
            for event in self.events:
                f.write(json.dumps(event) + "\n")
        return path


def read_trace(path) -> tuple[dict, list[dict]]:
    """(header, step events) of a trace written by `StepTrace.save`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path}")
    header, events = {}, []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "header":
                header = item
            elif kind == "step":
                events.append(item)
            else:
                raise ValueError(f"{path}:{number}: expected a 'header' or 'step' record, got {kind!r}")
    if not events:
        raise ValueError(f"{path} holds no step records")
    return header, events


def events_from_history(records) -> list[dict]:
    """Scheduler `StepRecord`s in the trace's event format, for plots when no trace was on.

    They lack what only the trace sees (per-sequence detail, block snapshots, step time), so the
    step time is taken as the gap to the next step's start, the last one's forward time.
    """
    records = list(records)
    if not records:
        return []
    t0 = records[0].time
    events = []
    for i, record in enumerate(records):
        event = {"type": "step", **record.to_dict()}
        event["t"] = event.pop("time") - t0
        if i + 1 < len(records):
            event["step_time"] = records[i + 1].time - record.time
        else:
            event["step_time"] = record.execute_time
        events.append(event)
    return events
