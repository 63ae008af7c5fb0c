"""One generation request's measures: fed by the typed TokenEvents of its streams (so any engine
behind EngineClient gets them), written to /metrics and to the request's one log line when its
response ends. A request is a success, a failure, or cancelled (its client left)."""

from __future__ import annotations

import threading
import time

from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.server.metrics import Metrics, log_request

# vLLM's words for how a request finished (vllm:request_success's finished_reason).
_VLLM_REASON = {FinishReason.LENGTH: "length", FinishReason.EOS_TOKEN: "stop", FinishReason.STOP_SEQUENCE: "stop",
                FinishReason.ABORTED: "abort", FinishReason.ERROR: "error"}


class RequestRecord:
    def __init__(self, metrics: Metrics, route: str, request_id: str, t0: float):
        self.metrics, self.route, self.request_id, self.t0 = metrics, route, request_id, t0
        self.model_name = ""
        self.adapter: str | None = None  # the LoRA adapter the request ran with
        self.admitted = False  # it reached the engine's door (after validation and admission)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.error_type: str | None = None  # set when a stream failed (TGI's error type)
        self.client_gone = False
        self.finish: FinishReason | None = None  # how the last stream to end finished
        self._last: dict[int, float] = {}  # stream -> when its last token came (several choices: several streams)
        self._lock = threading.Lock()  # choices are read in threads of their own
        self._closed = False

    # ---- fed by sagellm.server.http.WatchedStream ----

    def submitted(self, prompt_len: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_len

    def event(self, stream_key: int, ev: TokenEvent) -> None:
        now = time.monotonic()
        m, name = self.metrics, self.model_name
        if ev.queue_s is not None:
            m.tgi_queue.observe(ev.queue_s)
            m.v_queue.labels(name).observe(ev.queue_s)
        with self._lock:
            if ev.finish_reason is not None:
                self.finish = ev.finish_reason
            if ev.finish_reason == FinishReason.ERROR:
                self.error_type = self.error_type or "generation"
            if ev.token_id < 0:  # the event that ends an aborted or failed request carries no token
                return
            self.generated_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = now
                m.v_ttft.labels(name).observe(now - self.t0)
            last = self._last.get(stream_key)
            self._last[stream_key] = self.last_token_at = now
        if last is not None:
            m.v_itl.labels(name).observe(now - last)

    def failed(self, error_type: str) -> None:
        with self._lock:
            self.error_type = self.error_type or error_type

    # ---- at the end of the response ----

    def close(self, status: int, completed: bool = True, error: str | None = None,
              param: str | None = None) -> None:
        """`completed`: the whole response went out (a stream not cut by the client leaving)."""
        if self._closed:
            return
        self._closed = True
        now = time.monotonic()
        elapsed = now - self.t0
        if self.client_gone or (status < 400 and not completed):
            outcome = "cancelled"
        elif status >= 400 or self.error_type is not None:
            outcome = "failure"
        else:
            outcome = "success"
        self._observe(outcome, status, elapsed)
        fields = dict(id=self.request_id, route=self.route, status=status, outcome=outcome,
                      prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                      ttft_ms=round((self.first_token_at - self.t0) * 1000, 1) if self.first_token_at else None,
                      ms=round(elapsed * 1000, 1))
        if self.adapter:
            fields["adapter"] = self.adapter
        if error:
            fields["error"] = error
        if param:
            fields["param"] = param
        log_request(**fields)

    def _observe(self, outcome: str, status: int, elapsed: float) -> None:
        m, name = self.metrics, self.model_name
        m.outcomes.labels(outcome).inc()
        if outcome == "success":
            m.success.inc()
            m.duration.observe(elapsed)
        elif outcome == "failure":
            m.failure.labels(self.error_type or "generation").inc()
        if not self.admitted:
            return
        m.v_prompt_tokens.labels(name).inc(self.prompt_tokens)
        m.v_generation_tokens.labels(name).inc(self.generated_tokens)
        m.tgi_input.observe(self.prompt_tokens)
        m.tgi_generated.observe(self.generated_tokens)
        m.v_prompt_hist.labels(name).observe(self.prompt_tokens)
        m.v_generation_hist.labels(name).observe(self.generated_tokens)
        m.v_e2e.labels(name).observe(elapsed)
        reason = {"cancelled": "abort", "failure": "error"}.get(outcome) or _VLLM_REASON.get(self.finish)
        if reason is not None:  # None: a custom handler answered without generating
            m.v_success.labels(name, reason).inc()
        if outcome == "success" and self.generated_tokens > 1:
            m.tgi_per_token.observe((self.last_token_at - self.first_token_at) / (self.generated_tokens - 1))
