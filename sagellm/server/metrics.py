"""Prometheus metrics (TGI's names where they exist) and one JSON log line per request."""

from __future__ import annotations

import json
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sagellm.engine.client import EngineStats

log = logging.getLogger("sagellm.request")

_DURATION_BUCKETS = tuple(0.00015 * 1.5 ** i for i in range(35))


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tgi_request_count", "Generation requests received", registry=r)
        self.success = Counter("tgi_request_success", "Generation requests answered", registry=r)
        self.failure = Counter("tgi_request_failure", "Generation requests failed", ["err"], registry=r)
        self.duration = Histogram("tgi_request_duration", "Request duration (s)", buckets=_DURATION_BUCKETS,
                                  registry=r)
        self.in_flight = Gauge("sagellm_requests_in_flight", "Generation requests in flight", registry=r)
        self.queue = Gauge("tgi_queue_size", "Sequences waiting for the engine", registry=r)
        self.batch = Gauge("tgi_batch_current_size", "Sequences in the running batch", registry=r)
        # Where the engine's time goes under real load (bench/profile_step.py measures it offline).
        self.steps = Gauge("sagellm_engine_steps", "Engine steps run since start", registry=r)
        self.phases = Gauge("sagellm_engine_phase_seconds", "Engine time per step phase since start, summed",
                            ["phase"], registry=r)
        self.prefix_query = Gauge("sagellm_prefix_cache_query_tokens", "Prompt tokens of admitted requests",
                                  registry=r)
        self.prefix_hit = Gauge("sagellm_prefix_cache_hit_tokens",
                                "Prompt tokens whose K/V came from the prefix cache", registry=r)
        self.kv_used = Gauge("sagellm_kv_cache_blocks_used", "KV cache blocks held by requests", registry=r)
        self.kv_total = Gauge("sagellm_kv_cache_blocks_total", "KV cache blocks in all", registry=r)

    def render(self, stats: EngineStats | None) -> bytes:
        if stats is not None:
            self.queue.set(stats.num_waiting)
            self.batch.set(stats.num_running)
            self.steps.set(stats.num_steps)
            for phase, seconds in stats.phase_seconds.items():
                self.phases.labels(phase).set(seconds)
            self.prefix_query.set(stats.prefix_query_tokens)
            self.prefix_hit.set(stats.prefix_hit_tokens)
            self.kv_used.set(stats.kv_blocks_used)
            self.kv_total.set(stats.kv_blocks_total)
        return generate_latest(self.registry)


def log_request(**fields) -> None:
    log.info(json.dumps(fields, separators=(",", ":")))
