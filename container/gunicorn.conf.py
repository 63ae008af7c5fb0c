"""gunicorn settings for sagellm, derived from the same Settings the app reads.

One worker (each worker would hold its own copy of the model), gthread threads so streams run
concurrently and /ping always finds a free thread.
"""

import logging
import sys

from sagellm.server.drain import FLUSH_S, install
from sagellm.settings import Settings

_s = Settings.from_env()

bind = [f"{_s.bind_host}:{_s.port}"]
workers = 1
# gunicorn's gthread worker, answering the requests it refuses itself in JSON (sagellm/server/worker.py).
worker_class = "sagellm.server.worker.JsonErrorWorker"
# Enough threads for every admitted request plus headroom for /ping and refusals (429).
threads = _s.worker_threads or _s.max_concurrent_requests + 8
# Generation can take minutes; the engine watchdog, not gunicorn, decides when a worker is stuck.
timeout = 0
# The app cuts requests still running at GRACEFUL_TERMINATION_TIMEOUT and lets them write their
# last event; gunicorn's SIGKILL comes only after that (sagellm.server.drain).
graceful_timeout = int(_s.graceful_termination_timeout + FLUSH_S) + 1
keepalive = 75  # longer than typical load-balancer idle timeouts
accesslog = None
errorlog = "-"
loglevel = _s.log_level
limit_request_line = 8190


def post_worker_init(worker):
    logging.basicConfig(stream=sys.stdout, level=_s.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    install(worker)  # SIGTERM drains the app first


def worker_exit(server, worker):
    app = getattr(worker, "wsgi", None)
    runtime = app.config.get("SAGELLM_RUNTIME") if app is not None and hasattr(app, "config") else None
    if runtime is not None:
        runtime.stop()
