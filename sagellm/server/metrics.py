"""Prometheus metrics under both TGI's and vLLM's names (existing dashboards work unchanged), and
one JSON log line per request. Per-request figures come from the typed TokenEvents the server
reads (sagellm.server.request_record), so every engine behind EngineClient gets them; engine
state (queue, batch, KV cache) from EngineClient.stats() at scrape time.

gunicorn runs one worker (each would hold a copy of the model), so this process's registry is
the whole server's."""

from __future__ import annotations

import json
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sagellm.engine.client import EngineStats

log = logging.getLogger("sagellm.request")

_DURATION_BUCKETS = tuple(0.00015 * 1.5 ** i for i in range(35))  # 0.15 ms .. 2.3 h
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                      5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_COUNT_BUCKETS = tuple(2.0 ** i for i in range(18))  # 1 .. 131072 tokens


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()

        # TGI's names. TGI exposes its counters without the `_total` suffix prometheus_client
        # gives a Counter, so they are gauges here, only ever increased.
        self.requests = Gauge("tgi_request_count", "Generation requests received", registry=r)
        self.success = Gauge("tgi_request_success", "Generation requests answered in full", registry=r)
        self.failure = Gauge("tgi_request_failure", "Generation requests failed, by error type", ["err"], registry=r)
        self.duration = Histogram("tgi_request_duration", "End-to-end latency of answered requests (s)",
                                  buckets=_DURATION_BUCKETS, registry=r)
        self.tgi_queue = Histogram("tgi_request_queue_duration", "Time from submit to first scheduled (s)",
                                   buckets=_DURATION_BUCKETS, registry=r)
        self.tgi_per_token = Histogram("tgi_request_mean_time_per_token_duration",
                                       "Mean time between a request's tokens (s)", buckets=_DURATION_BUCKETS,
                                       registry=r)
        self.tgi_input = Histogram("tgi_request_input_length", "Prompt tokens per request",
                                   buckets=_TOKEN_COUNT_BUCKETS, registry=r)
        self.tgi_generated = Histogram("tgi_request_generated_tokens", "Generated tokens per request",
                                       buckets=_TOKEN_COUNT_BUCKETS, registry=r)
        self.queue = Gauge("tgi_queue_size", "Sequences waiting for the engine", registry=r)
        self.batch = Gauge("tgi_batch_current_size", "Sequences in the running batch", registry=r)

        # vLLM's names (label model_name, as vLLM's dashboards select on it).
        m = ["model_name"]
        self.v_running = Gauge("vllm:num_requests_running", "Sequences in the running batch", m, registry=r)
        self.v_waiting = Gauge("vllm:num_requests_waiting", "Sequences waiting for the engine", m, registry=r)
        self.v_kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", m, registry=r)
        self.v_prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens submitted", m, registry=r)
        self.v_generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", m, registry=r)
        self.v_success = Counter("vllm:request_success", "Requests finished, by how (stop, length, abort, error)",
                                 m + ["finished_reason"], registry=r)
        self.v_ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token (s)", m,
                                buckets=_LATENCY_BUCKETS, registry=r)
        self.v_itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive tokens (s)", m,
                               buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.v_e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency (s)", m,
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.v_queue = Histogram("vllm:request_queue_time_seconds", "Time from submit to first scheduled (s)", m,
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.v_prompt_hist = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request", m,
                                       buckets=_TOKEN_COUNT_BUCKETS, registry=r)
        self.v_generation_hist = Histogram("vllm:request_generation_tokens", "Generated tokens per request", m,
                                           buckets=_TOKEN_COUNT_BUCKETS, registry=r)

        # sagellm's own.
        self.outcomes = Counter("sagellm_request_outcome", "Generation requests by outcome (success, failure, "
                                "cancelled: the client left)", ["outcome"], registry=r)
        self.in_flight = Gauge("sagellm_requests_in_flight", "Generation requests in flight", registry=r)
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
        self.adapter_requests = Counter("sagellm_lora_requests", "Requests answered per LoRA adapter", ["adapter"],
                                        registry=r)
        self.adapter_running = Gauge("sagellm_lora_running", "Sequences running per LoRA adapter", ["adapter"],
                                     registry=r)
        self.adapters_resident = Gauge("sagellm_lora_adapters_resident",
                                       "LoRA adapters in memory (at most MAX_LORAS)", registry=r)

    def render(self, stats: EngineStats | None, model_name: str | None) -> bytes:
        if stats is not None:
            self.queue.set(stats.num_waiting)
            self.batch.set(stats.num_running)
            self.v_waiting.labels(model_name).set(stats.num_waiting)
            self.v_running.labels(model_name).set(stats.num_running)
            if stats.kv_blocks_total:
                self.v_kv_usage.labels(model_name).set(stats.kv_blocks_used / stats.kv_blocks_total)
            self.steps.set(stats.num_steps)
            for phase, seconds in stats.phase_seconds.items():
                self.phases.labels(phase).set(seconds)
            self.prefix_query.set(stats.prefix_query_tokens)
            self.prefix_hit.set(stats.prefix_hit_tokens)
            self.kv_used.set(stats.kv_blocks_used)
            self.kv_total.set(stats.kv_blocks_total)
            self.adapters_resident.set(stats.adapters_resident)
            self.adapter_running.clear()
            for name, count in stats.adapters_running.items():
                self.adapter_running.labels(name).set(count)
        return generate_latest(self.registry)


def log_request(**fields) -> None:
    log.info(json.dumps(fields, separators=(",", ":")))
