"""Prometheus metrics of the server (`GET /metrics`): requests, tokens, queue, latency.

    metrics = ServerMetrics(scheduler, rows=lambda: len(batcher.active))
    metrics.requests.labels(route="/v1/chat/completions", status="200").inc()

A registry of its own (not the process-global one), so several servers in one
process (tests) do not collide. Queue depth and active generations are read from
the scheduler at scrape time, and the rows of the continuous batcher in use from
`rows` (0 without a batcher): after any burst, all three return to 0.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler, rows=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qlora_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.tokens = Counter("qlora_tokens", "Tokens processed", ["kind"], registry=r)  # prompt | completion
        self.latency = Histogram(
            "qlora_request_latency_seconds",
            "Generation request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "qlora_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.rejected = Counter("qlora_rejected", "Requests refused for load", ["reason"], registry=r)
        queue = Gauge("qlora_queue_depth", "Generations waiting for a slot", registry=r)
        queue.set_function(lambda: scheduler.waiting)
        active = Gauge("qlora_active_generations", "Generations running", registry=r)
        active.set_function(lambda: scheduler.active)
        batch_rows = Gauge("qlora_batch_rows_active", "Rows of the continuous batcher holding a request", registry=r)
        batch_rows.set_function(rows or (lambda: 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
