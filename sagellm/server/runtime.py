"""The engine behind the app: built in the background so /ping can answer 503 (fast) until the
model is loaded and warmed up, then 200 while the engine is healthy."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import threading
import time

from sagellm.api.context import ServingContext
from sagellm.engine.client import EngineClient
from sagellm.errors import SagellmError
from sagellm.settings import Settings

log = logging.getLogger("sagellm")

# gunicorn's master halts (instead of restarting the worker) on this exit status.
WORKER_BOOT_ERROR = 3


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = "loading"  # loading -> ready | failed; stopping at shutdown
        self.error: str | None = None
        self.engine: EngineClient | None = None
        self.ctx: ServingContext | None = None
        self.handlers = None  # sagellm.server.handlers.Handlers once ready
        self.started = time.monotonic()
        self.ready_at: float | None = None

    # ---- start-up ----

    def start_background(self, exit_on_failure: bool = True) -> threading.Thread:
        t = threading.Thread(target=self._load, args=(exit_on_failure,), name="sagellm-load", daemon=True)
        t.start()
        return t

    def _load(self, exit_on_failure: bool) -> None:
        try:
            self._build()
            if self.state != "loading":  # SIGTERM came while loading: stay stopping
                return
            # As vLLM's own server does once started: what start-up allocated (torch, transformers,
            # vLLM, the tokenizer: ~730k objects with ENGINE=vllm) leaves the collector's reach. A
            # full collection over it took ~375 ms here, every stream stalled meanwhile, whenever
            # the oldest generation came due under load (TTFT p99 1,056 ms against p50 382 ms).
            gc.collect()
            gc.freeze()
            _return_freed_heap()
            self.state = "ready"
            self.ready_at = time.monotonic()
            log.info("ready in %.1fs: serving %s", self.ready_at - self.started, self.engine.model.served_name)
        except Exception as exc:
            self.state = "failed"
            self.error = exc.message if isinstance(exc, SagellmError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, SagellmError):
                log.exception("start-up failed")
            log.error("start-up failed: %s", self.error)
            if exit_on_failure:
                logging.shutdown()
                os._exit(WORKER_BOOT_ERROR)

    def _build(self) -> None:
        from sagellm.engine.builder import build_engine
        from sagellm.server.handlers import Handlers

        self.engine = build_engine(self.settings)
        self.ctx = ServingContext.serving(self.settings, self.engine)
        self.handlers = Handlers(self.settings.model_dir, self.ctx)
        threading.Thread(target=self._watch_engine, name="sagellm-watch", daemon=True).start()

    def _watch_engine(self) -> None:
        """A dead engine (its loop, or a tensor-parallel rank) never recovers: fail /ping and stop
        the server, non-zero, so SageMaker replaces it."""
        while self.state in ("loading", "ready"):
            health = self.engine.health()
            # Read the state after the health: stop() marks it before it shuts the engine down.
            if not health.alive and self.state in ("loading", "ready"):
                self.state = "failed"
                self.error = health.reason
                log.error("%s; stopping the server", self.error)
                time.sleep(1.0)  # let in-flight /ping calls see 503
                self.engine.shutdown()  # what is left of it (vLLM's processes, ranks) must not outlive us
                logging.shutdown()
                os._exit(WORKER_BOOT_ERROR)
            time.sleep(0.5)

    # ---- health ----

    def healthy(self) -> tuple[bool, str]:
        if self.state != "ready":
            return False, self.error or self.state
        health = self.engine.health()
        return health.ok, health.reason

    def draining(self) -> None:
        """SIGTERM: /ping and new requests get 503 from now on."""
        self.state = "stopping"
        self.error = "the server is shutting down"

    def stop(self) -> None:
        self.state = "stopping"
        if self.engine is not None:
            self.engine.shutdown()


def _return_freed_heap() -> None:
    """Hand back to the OS the heap start-up used and freed (loading and converting the weights,
    the warm-up): glibc keeps it otherwise, ~160-180 MB of the worker's RSS with the bundled model
    (docs/reliability.md, the soak), though nothing uses it again. Not glibc: nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
