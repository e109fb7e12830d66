"""Prometheus metrics of one server (its own registry, so several servers in one process, as in
the tests, do not share counters). /metrics returns `Metrics.render()`."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sparseflow_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.request_seconds = Histogram("sparseflow_request_seconds", "Time from arrival to the last byte",
                                         ["endpoint"], registry=r)
        self.prompt_tokens = Counter("sparseflow_prompt_tokens", "Input tokens accepted", registry=r)
        self.generated_tokens = Counter("sparseflow_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("sparseflow_queue_depth", "Requests waiting to be admitted", registry=r)
        self.active_sequences = Gauge("sparseflow_active_sequences", "Sequences in the decode batch", registry=r)
        self.decode_batch_size = Histogram("sparseflow_decode_batch_size", "Sequences per decode step (the M of the "
                                           "linear layers)", buckets=BATCH_BUCKETS, registry=r)
        self.embedding_batch_size = Histogram("sparseflow_embedding_batch_size", "Inputs per embedding forward pass",
                                              buckets=BATCH_BUCKETS, registry=r)
        self.decode_step_seconds = Histogram("sparseflow_decode_step_seconds", "Time of one decode step", registry=r)
        self.prefill_seconds = Histogram("sparseflow_prefill_seconds", "Time of one prompt's prefill", registry=r)
        Gauge("sparseflow_model_info", "The served model", ["model"], registry=r).labels(model).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
