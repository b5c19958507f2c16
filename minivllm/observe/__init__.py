"""Looking inside the engine: statistics, the step trace, and pictures of both.

    records.py    StepRecord / StepTimings: what one step did, written once by the engine
    stats.py      StatsCollector (folds step records), request latency summaries, the table
    trace.py      StepTrace: a bounded, JSON-lines flight recorder of every step
    block_map.py  who owns which KV block, as text and as a picture; KV-cache statistics
    plots.py      schedule timeline, throughput and KV usage over time; `visualize()` draws all
    figures.py    matplotlib figures without pyplot

Everything here reads the engine's state, never changes it; nothing here runs on the engine's
hot path unless asked (a trace, `get_stats()`). matplotlib is imported only when a picture is
drawn.
"""

from minivllm.observe.block_map import kv_cache_stats, plot_block_map, snapshot_blocks, text_block_map
from minivllm.observe.plots import plot_throughput, plot_timeline, visualize
from minivllm.observe.stats import format_stats, percentile, summarize_requests
from minivllm.observe.trace import StepTrace, events_from_history, read_trace

__all__ = [
    "StepTrace", "events_from_history", "format_stats", "kv_cache_stats", "percentile", "plot_block_map", "plot_throughput",
    "plot_timeline", "read_trace", "snapshot_blocks", "summarize_requests", "text_block_map", "visualize",
]
