"""The step trace: a flight recorder of what every engine step did.

    llm.engine.enable_trace()             # off by default
    llm.generate(prompts, max_tokens=32)
    llm.engine.trace.save("trace.jsonl")  # then: python -m minivllm visualize trace.jsonl --out figs/

One event per step, built on the step's `StepRecord` (token counts, queue lengths, block counts,
preemptions with their reason, phase timings) plus what only the engine sees around it:

* `seqs`: which sequences ran, with their prefill and decode tokens and where they started (and,
  speculating, the drafts each verified and how many it accepted);
* `blocks_allocated` / `blocks_freed`: physical blocks that became held / free during the step
  (net: a block freed by a preemption and handed out again in the same step appears in neither);
* `num_shared_blocks`, `finished`, `num_sampled`, `step_time` (planned until folded in: with
  overlap, steps in flight overlap in time);
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
    def start(self, scheduler, step, record, held_before: set[int]) -> dict:
        """After `schedule()`: who runs, with what, and which blocks changed hands.

        step: the scheduler's `ScheduledStep`; record: its `StepRecord` (completed in `finish`).
        """
        held = blocks_held(scheduler)
        bm = scheduler.block_manager
        event = {"type": "step", "seqs": [
            {
                "seq_id": seq.seq_id,
                "request_id": seq.request_id,
                "start": s.start,
                "prefill": 0 if s.is_decode else s.num_new_tokens - s.num_draft_tokens,
                "decode": 1 if s.is_decode else 0,
                "drafts": s.num_draft_tokens,
                "forks": [child.seq_id for child in step.forks if child.request_id == seq.request_id],
            }
            for seq, s in zip(step.seqs, step.output.seqs)
        ]}
        event["blocks_allocated"] = sorted(held - held_before)
        event["blocks_freed"] = sorted(held_before - held)
        event["num_shared_blocks"] = sum(1 for b in held if bm.ref_count(b) > 1)
        if self.block_snapshots:
            event["blocks"] = snapshot_blocks(bm, scheduler.running)
        event["_held"] = held
        event["_record"] = record
        return event

    def finish(self, event: dict, scheduler, finished: list, record, step_acceptance: dict) -> None:
        """After `update()`: the record's final numbers; what finished; blocks the finished ones
        gave back count as freed; the drafts each sequence accepted (`step_acceptance`: seq id ->
        (drafts, accepted), as `ScheduledStep.acceptance`)."""
        event.update(record.to_dict())
        event.pop("_record", None)
        event["t"] = event.pop("time") - self._t0
        held = blocks_held(scheduler)
        freed_now = event.pop("_held") - held
        event["blocks_freed"] = sorted(set(event["blocks_freed"]) | freed_now)
        event["finished"] = [seq.seq_id for seq in finished]
        for entry in event["seqs"]:
            if entry["drafts"]:
                entry["accepted"] = step_acceptance.get(entry["seq_id"], (0, 0))[1]
        event["step_time"] = record.finish_time - record.time
        event["execute_time"] = record.timings.prepare + record.timings.forward + record.timings.sample + record.timings.wait
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
    """`StepRecord`s (the stats history) in the trace's event format, for plots when no trace was
    on. They lack what only the trace sees (per-sequence detail, block snapshots)."""
    records = list(records)
    if not records:
        return []
    t0 = records[0].time
    events = []
    for record in records:
        event = {"type": "step", **record.to_dict()}
        event["t"] = event.pop("time") - t0
        event["step_time"] = record.finish_time - record.time
        events.append(event)
    return events
