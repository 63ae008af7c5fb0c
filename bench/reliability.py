#!/usr/bin/env python3
"""The figures of docs/reliability.md, on the bundled model through real gunicorn: many streams
held at once (with /ping timed throughout), a soak at a fixed concurrency (the worker's RSS and
each slice's throughput and latency over time), the outcomes /metrics counted, and shutdown
timings (SIGTERM idle, and with streams running past GRACEFUL_TERMINATION_TIMEOUT).
Run it alone on the machine:

    flock -x /tmp/sagellm-cpu.lock .venv/bin/python bench/reliability.py --soak-s 300
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {**os.environ, "HF_HUB_OFFLINE": "1", "PORT": str(self.port), "LOG_LEVEL": "warning", **env}
        full.pop("HF_MODEL_ID", None)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve")], cwd=ROOT, env=full,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/ping", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError("server not ready")

    def worker_rss_mb(self) -> float:
        kids = psutil.Process(self.proc.pid).children(recursive=True)
        return round(sum(k.memory_info().rss for k in kids) / 2**20, 1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def loadgen(url: str, concurrency: int, n: int, max_tokens: int) -> dict:
    out = subprocess.run([sys.executable, str(LOADGEN), "--url", url, "--model", "m", "-c", str(concurrency),
                          "-n", str(n), "--max-tokens", str(max_tokens), "--force", "ignore_eos",
                          "--warmup", "0", "--timeout", "600"], capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class PingSampler(threading.Thread):
    """GET /ping every 0.5 s on a fresh connection: the slowest answer and any non-200."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.times, self.bad = url, threading.Event(), [], 0
        self.start()

    def run(self):
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                ok = requests.get(self.url + "/ping", timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            self.times.append(time.monotonic() - t)
            self.bad += not ok
            self.stop.wait(0.5)

    def summary(self) -> dict:
        self.stop.set()
        self.join()
        ts = sorted(self.times)
        return {"pings": len(ts), "non_200": self.bad, "p50_ms": round(ts[len(ts) // 2] * 1000, 1),
                "max_ms": round(ts[-1] * 1000, 1)}


def pick(r: dict) -> dict:
    keys = ("completed", "errors", "error_kinds", "req_per_s", "out_tok_per_s", "ttft_ms_p50", "ttft_ms_p99",
            "itl_ms_p50", "e2e_s_p50", "e2e_s_p99", "wall_s", "loadavg_end")
    return {k: r.get(k) for k in keys if k in r}


def metric_lines(url: str, prefixes: tuple[str, ...]) -> list[str]:
    text = requests.get(url + "/metrics", timeout=30).text
    return [line for line in text.splitlines() if line.startswith(prefixes)]


def held_and_soak(args) -> dict:
    srv = Server(MAX_CONCURRENT_REQUESTS=str(args.streams))
    try:
        out = {"rss_mb_ready": srv.worker_rss_mb()}
        pings = PingSampler(srv.url)
        out["held"] = {"streams": args.streams, **pick(loadgen(srv.url, args.streams, args.streams, args.max_tokens))}
        out["held"]["ping"] = pings.summary()
        out["rss_mb_after_held"] = srv.worker_rss_mb()
        slices, t0 = [], time.monotonic()
        pings = PingSampler(srv.url)
        while time.monotonic() - t0 < args.soak_s:
            r = pick(loadgen(srv.url, args.soak_c, args.soak_slice, args.max_tokens))
            slices.append({"t_s": round(time.monotonic() - t0), "rss_mb": srv.worker_rss_mb(), **r})
            print(json.dumps(slices[-1]), file=sys.stderr, flush=True)
        out["soak"] = {"concurrency": args.soak_c, "seconds": round(time.monotonic() - t0), "slices": slices,
                       "ping": pings.summary()}
        out["metrics"] = metric_lines(srv.url, ("sagellm_request_outcome_total", "tgi_request_failure",
                                                "vllm:request_success_total"))
        return out
    finally:
        srv.kill()


def shutdown_timings(args) -> dict:
    out = {}
    srv = Server()
    t = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    out["idle"] = {"exit_s": round(_wait(srv.proc) - t, 2), "rc": srv.proc.returncode}

    grace = 10
    srv = Server(GRACEFUL_TERMINATION_TIMEOUT=str(grace))
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 4000, "ignore_eos": True,
            "stream": True}
    ends: list[tuple[float, bytes]] = []

    def stream():
        with requests.post(srv.url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
            raw = b"".join(r.iter_content(chunk_size=None))
        ends.append((time.monotonic(), raw[-200:]))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for th in threads:
        th.start()
    time.sleep(3)
    t = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    p0 = time.monotonic()
    ping = requests.get(srv.url + "/ping", timeout=10)
    ping_s = time.monotonic() - p0
    rc_at = _wait(srv.proc)
    for th in threads:
        th.join()
    out["streams_past_deadline"] = {
        "grace_s": grace, "streams": len(threads), "ping_status": ping.status_code, "ping_ms": round(ping_s * 1000, 1),
        "last_stream_end_s": round(max(e for e, _ in ends) - t, 2), "exit_s": round(rc_at - t, 2),
        "rc": srv.proc.returncode, "all_ended_with_error_and_done": all(
            b'"code":503' in raw and raw.endswith(b"data: [DONE]\n\n") for _, raw in ends)}
    return out


def _wait(proc: subprocess.Popen) -> float:
    proc.wait(120)
    return time.monotonic()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--soak-s", type=float, default=300)
    p.add_argument("--soak-c", type=int, default=16)
    p.add_argument("--soak-slice", type=int, default=64, help="requests per loadgen run in the soak")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--skip-load", action="store_true")
    args = p.parse_args()
    result = {} if args.skip_load else held_and_soak(args)
    result["shutdown"] = shutdown_timings(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
