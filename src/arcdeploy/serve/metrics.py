"""The service's Prometheus metrics (``GET /metrics``), in a registry of each app's own so that
several apps in one process (tests, a user's stack) keep their counts apart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "arcdeploy_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "arcdeploy_request_seconds",
            "Time from a request's arrival to its answer, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "arcdeploy_batch_size", "Faces per engine call (across requests)", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "arcdeploy_batch_requests",
            "Requests whose faces shared one engine call",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.engine_seconds = Histogram(
            "arcdeploy_engine_seconds", "Seconds per engine call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prepare_seconds = Histogram(
            "arcdeploy_prepare_seconds",
            "Seconds to decode one uploaded image, find its faces and align them (in the worker pool)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.faces = Counter("arcdeploy_faces", "Faces embedded", registry=r)
        self.image_errors = Counter("arcdeploy_image_errors", "Uploaded images that could not be used", registry=r)
        self.queue_depth = Gauge("arcdeploy_queue_depth", "Faces waiting for the engine", registry=r)
        self.in_flight = Gauge(
            "arcdeploy_requests_in_flight", "Embedding requests accepted and not yet answered", registry=r
        )
        self.ready = Gauge("arcdeploy_ready", "1 once the model is loaded and warmed up", registry=r)
