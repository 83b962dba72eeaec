"""What ``GET /metrics`` exports, in Prometheus' text format (``prometheus-client``).

Each server has its own registry, so several servers in one process (tests) never share
counters. The engine reports steps, prefills and tokens; the HTTP layer reports requests
by endpoint and outcome and their end-to-end latency. Queue depth and running rows are
read from the engine when scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "mops_serve"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
OUTCOMES = ("completed", "cancelled", "invalid", "overloaded", "error")


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP generation requests by endpoint and outcome (completed, "
                                "cancelled by a client that left, invalid: 400, overloaded: 503, error: 500)",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for a row in the batch", registry=r)
        self.running = Gauge(f"{PREFIX}_running_requests", "Requests holding a row in the batch", registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Running rows per decode step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.padded_batch_size = Histogram(f"{PREFIX}_padded_batch_size", "Rows computed per decode step "
                                           "(running rows padded to a batch-invariant size)", buckets=BATCH_BUCKETS,
                                           registry=r)
        self.step_seconds = Histogram(f"{PREFIX}_decode_step_seconds", "Wall time of one decode step",
                                      buckets=STEP_BUCKETS, registry=r)
        self.prefill_seconds = Histogram(f"{PREFIX}_prefill_seconds", "Wall time of one request's prefill",
                                         buckets=STEP_BUCKETS, registry=r)
        self.queue_seconds = Histogram(f"{PREFIX}_queue_wait_seconds", "Time from arrival to a row in the batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "Time from arrival to the last token "
                                 "of a completed request", buckets=LATENCY_BUCKETS, registry=r)
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            for endpoint in ("completions", "chat_completions"):
                self.requests.labels(endpoint, outcome)

    def watch(self, engine) -> None:
        """Queue depth and running rows are read from the engine at every scrape."""
        self.queue_depth.set_function(lambda: engine.waiting)
        self.running.set_function(lambda: engine.running)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
