"""Prometheus metrics of the server: what `GET /metrics` shows.

Two kinds of numbers, read in two ways:

* **State** (gauges: requests running and waiting, KV-cache usage) is read when Prometheus
  scrapes, through `AsyncLLM.state`: from the engine itself when it runs in this process (single
  reads, safe while the engine thread steps), or, when it runs in its own process, as that
  process reported it with its last message (it sends its state with every step's outputs).
* **Events** (counters of prompt and generated tokens, finished requests by reason; histograms of
  time to first token, time per output token and end-to-end latency) are recorded as the outputs
  go by: `AsyncLLM` calls `record(output)` for every output the engine reports.
* **Speculative decoding's counters** (drafts verified, accepted, accepted per draft position)
  are the engine's own totals, carried in its state and read at scrape time like the gauges.

Names follow vLLM's (`vllm:` becomes `minivllm:`), so existing dashboards read them. Each server
has its own `CollectorRegistry`, so two servers in one process (tests) never share a counter.

**Several frontends** (`serve --api-server-count N`, frontends.py) each see their own requests'
outputs. Their events are summed through `prometheus_client`'s multiprocess mode: when
PROMETHEUS_MULTIPROC_DIR is set (the launcher sets it for its frontends), every counter and
histogram lives in a file of that directory, and `render` reads all of them. The state gauges and
the speculative counters are the engine's, which every frontend hears after every step: each
renders its own copy, never summed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from minivllm.entrypoints.engine_core import EngineState
from minivllm.outputs import RequestOutput

SHARED_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's: the directory of shared metrics

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)


class EngineStateCollector:
    """The engine's state, read at each scrape: gauges of its queues and cache, and speculative
    decoding's counters (none when it does not speculate). A collector, not `Gauge`s: those would
    also be written to the shared files of several frontends, once per process."""

    def __init__(self, state: Callable[[], EngineState]):
        self.state = state

    def collect(self):
        state = self.state()
        yield GaugeMetricFamily("minivllm:num_requests_running", "Requests in the engine's running queue.",
                                value=state.num_running)
        yield GaugeMetricFamily("minivllm:num_requests_waiting", "Requests waiting to be scheduled (new, preempted, or compiling their grammar).",
                                value=state.num_waiting)
        yield GaugeMetricFamily("minivllm:kv_cache_usage_perc", "Fraction of the KV-cache blocks in use (0 to 1).",
                                value=state.kv_cache_usage)
        if state.spec_decode is not None:
            yield from _spec_decode_counters(state.spec_decode)


def _spec_decode_counters(counts):
    for name, doc, value in (
            ("num_drafts", "Sequence-steps that verified draft tokens.", counts.num_verifications),
            ("num_draft_tokens", "Draft tokens verified.", counts.num_draft_tokens),
            ("num_accepted_tokens", "Draft tokens accepted.", counts.num_accepted_tokens)):
        yield CounterMetricFamily(f"minivllm:spec_decode_{name}", doc, value=value)
    per_position = CounterMetricFamily("minivllm:spec_decode_num_accepted_tokens_per_pos",
                                       "Draft tokens accepted at each draft position (0 = first).",
                                       labels=["position"])
    for position, value in enumerate(counts.accepted_per_position):
        per_position.add_metric([str(position)], value)
    yield per_position


class ServerMetrics:
    """The Prometheus collectors of one server, fed by `record` and read by `render`.

    state: returns the engine's current `EngineState` (`lambda: async_llm.state`).
    """

    def __init__(self, state: Callable[[], EngineState]):
        self.registry = CollectorRegistry()
        # Shared by several frontends: the events are read back from every process's files.
        self.shared_dir = os.environ.get(SHARED_DIR_ENV)
        # The engine's own numbers, read from its state: the same in every frontend, never summed.
        self.engine_registry = CollectorRegistry() if self.shared_dir else self.registry
        self.engine_registry.register(EngineStateCollector(state))
        self.prompt_tokens = Counter("minivllm:prompt_tokens", "Prompt tokens of the requests started.",
                                     registry=self.registry)
        self.generation_tokens = Counter("minivllm:generation_tokens", "Tokens generated and reported.",
                                         registry=self.registry)
        self.request_success = Counter("minivllm:request_success", "Finished requests, by finish reason.",
                                       ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("minivllm:time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("minivllm:time_per_output_token_seconds",
                              "Mean time between output tokens of a request, after the first.",
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("minivllm:e2e_request_latency_seconds", "Arrival to finish of a request.",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self._started: set[str] = set()  # requests whose prompt and first token were counted

    def record(self, output: RequestOutput) -> None:
        """Count one output the engine reported (a delta, or a whole finished request)."""
        self.generation_tokens.inc(sum(len(c.token_ids) for c in output.outputs))
        metrics = output.metrics
        request_id = output.request_id
        if request_id not in self._started:
            self._started.add(request_id)
            self.prompt_tokens.inc(len(output.prompt_token_ids))
            if metrics.ttft is not None:
                self.ttft.observe(metrics.ttft)
        if output.finished:
            self._started.discard(request_id)
            for reason in {c.finish_reason for c in output.outputs if c.finish_reason}:
                self.request_success.labels(finished_reason=reason).inc()
            if metrics.tpot is not None:
                self.tpot.observe(metrics.tpot)
            if metrics.e2e_latency is not None:
                self.e2e.observe(metrics.e2e_latency)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        if not self.shared_dir:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        events = CollectorRegistry()
        MultiProcessCollector(events, self.shared_dir)
        return generate_latest(self.engine_registry) + generate_latest(events), CONTENT_TYPE_LATEST
