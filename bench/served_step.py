#!/usr/bin/env python3
"""Where a served cell's time goes: sagellm served as bench/run.py serves it, one loadgen cell
per concurrency (greedy, forced length), and over each cell the engine's steps and per-phase
seconds from /metrics, the CPU seconds of every thread of the gunicorn worker (/proc), and the
load generator's own CPU seconds. Set beside bench/profile_step.py's in-process step, this splits
the served slowdown into the step itself, the time between steps, and the CPU that the HTTP
threads and the client take from the engine's two cores.

    python bench/served_step.py [--cells 16:48,64:128] [--env GOMP_SPINCOUNT=3000000]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: the server and loadgen cells)


def engine_counters(url: str) -> tuple[float, dict[str, float]]:
    """(steps, {phase: seconds}) since the server started."""
    text = requests.get(url + "/metrics", timeout=10).text
    steps = float(re.search(r"^sagellm_engine_steps (\S+)", text, re.M).group(1))
    phases = {m.group(1): float(m.group(2))
              for m in re.finditer(r'^sagellm_engine_phase_seconds\{phase="(\w+)"\} (\S+)', text, re.M)}
    return steps, phases


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of the process."""
    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # the loadgen runs, once reaped
    return ru.ru_utime + ru.ru_stime


def measure(srv: run.Running, worker: int, c: int, n: int, max_tokens: int) -> dict:
    steps0, phases0 = engine_counters(srv.url)
    threads0, client0 = thread_cpu(worker), children_cpu()
    t0 = time.monotonic()
    cell = run.run_cell(srv, c, n, max_tokens)
    wall = time.monotonic() - t0
    threads1, client1 = thread_cpu(worker), children_cpu()
    steps1, phases1 = engine_counters(srv.url)
    steps = steps1 - steps0
    used = sorted((threads1[t] - threads0.get(t, 0.0) for t in threads1), reverse=True)
    tokens = (n + 2) * max_tokens  # run_cell's two warm-up requests too; the length is forced
    phases = {k: 1000 * (phases1[k] - phases0[k]) / steps for k in phases1}
    return {"c": c, "tok_per_s": cell["out_tok_per_s"], "itl_ms_p50": cell["itl_ms_p50"], "steps": int(steps),
            "wall_ms_per_step": 1000 * wall / steps, "busy_ms_per_step": sum(phases.values()),
            **{f"{k}_ms": v for k, v in phases.items()},
            # The two busiest threads are the engine loop and torch's second OpenMP thread.
            "engine_cpu_s": sum(used[:2]), "http_cpu_us_per_token": 1e6 * sum(used[2:]) / tokens,
            "client_cpu_us_per_token": 1e6 * (client1 - client0) / tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="16:48,64:128", help="concurrency:requests, comma separated")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server, repeatable")
    a = ap.parse_args()
    os.environ.update(kv.split("=", 1) for kv in a.env)  # Running passes its environment on
    log_dir = Path(tempfile.mkdtemp(prefix="sagellm-served-step-"))
    print(f"server log: {log_dir / 'sagellm.log'}", file=sys.stderr)
    srv = run.Running("sagellm", run.model_dir(), log_dir)
    try:
        srv.wait_ready()
        worker = psutil.Process(srv.proc.pid).children()[0].pid  # gunicorn's one worker
        rows = [measure(srv, worker, *map(int, cell.split(":")), a.max_tokens) for cell in a.cells.split(",")]
    finally:
        srv.stop()
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
