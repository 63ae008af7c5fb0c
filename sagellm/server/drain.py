"""Stopping on SIGTERM as SageMaker needs it. From the signal, /ping and new requests get a 503
at once (the worker keeps accepting, so no connection waits in the listen backlog); requests
running finish; at GRACEFUL_TERMINATION_TIMEOUT the ones still running are cut (a stream ends
with its error event and terminator, a plain answer is a 503); then the worker exits 0."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger("sagellm")

# How long cut requests get to write their last bytes before the worker stops accepting and
# exits. gunicorn's graceful_timeout is GRACEFUL_TERMINATION_TIMEOUT plus this, so the master's
# SIGKILL never comes first.
FLUSH_S = 5.0


class Drain:
    def __init__(self, admission, timeout_s: float):
        self.admission = admission  # sagellm.server.http.Admission: counts requests in flight
        self.timeout_s = timeout_s
        self.cut = threading.Event()  # set at the deadline: every WatchedStream ends with a 503
        self.started_at: float | None = None

    def begin(self, runtime, on_done: Callable[[], None]) -> None:
        """Called from the signal handler: only flags and a thread, nothing that blocks."""
        if self.started_at is not None:
            return
        self.started_at = time.monotonic()
        runtime.draining()
        threading.Thread(target=self._run, args=(on_done,), name="sagellm-drain", daemon=True).start()

    def _run(self, on_done: Callable[[], None]) -> None:
        log.info("SIGTERM: refusing new requests, letting running ones finish (at most %.0fs)", self.timeout_s)
        if not self.admission.wait_idle(self.timeout_s):
            log.warning("GRACEFUL_TERMINATION_TIMEOUT (%.0fs) passed: ending the requests still running with 503",
                        self.timeout_s)
            self.cut.set()
            self.admission.wait_idle(FLUSH_S)
        log.info("drained in %.1fs; stopping", time.monotonic() - self.started_at)
        on_done()


def install(worker) -> None:
    """Route gunicorn's SIGTERM in `worker` (gthread) through the app's Drain: gunicorn's own
    handler, which stops accepting at once, runs only once the drain is over."""
    state = worker.wsgi.extensions["sagellm"]  # sagellm.server.checks.ServerState
    gunicorn_handler = worker.handle_exit

    def on_term(sig, frame):
        state.drain.begin(state.runtime, lambda: gunicorn_handler(sig, frame))

    signal.signal(signal.SIGTERM, on_term)
