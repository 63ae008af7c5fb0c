#!/usr/bin/env python3
"""GPU check: a model of a real size on one GPU, served by sagellm, driven by the loadgen grid.

Builds a Llama-3-8B-shaped model with random bf16 weights (the bundled tokenizer, so vocab 49152),
serves it with `serve` (bf16, our paged attention), runs bench/loadgen.py at concurrency
1/4/16/64, and prints tokens/s beside the floor a decode step's weight reads set on this GPU's
measured HBM bandwidth. Meant to finish within 8 minutes on an H100 or H200.

    python bench/gpu_check.py --tokenizer DIR [--out DIR] [--tiny]

--tokenizer: a folder with tokenizer.json / tokenizer_config.json (bench/gpu_prepare.sh puts the
bundled model's into bench/.gpu-carry/tokenizer). --tiny builds a 2-layer model instead (a CPU
rehearsal of the plumbing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen.py"

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(tokenizer_dir: Path, out: Path, shape: dict, device: str) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():  # small weights keep activations finite through 32 layers
        p.data.normal_(0.0, 0.02)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for name in ("chat_template.jinja",):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


def hbm_gbps(device: str) -> float:
    """Measured copy bandwidth (read + write) of 2 GiB on the device."""
    import torch

    if device != "cuda":
        return float("nan")
    x = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    gbps = 10 * 2 * x.numel() * 2 / (time.perf_counter() - t) / 1e9
    del x, y
    torch.cuda.empty_cache()
    return gbps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu-check"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    log(f"device {gpu}; torch {torch.__version__}")
    a.out.mkdir(parents=True, exist_ok=True)
    model_dir = Path("/tmp/gpu-check-model")
    shutil.rmtree(model_dir, ignore_errors=True)
    t = time.time()
    params = build_model(a.tokenizer, model_dir, TINY if a.tiny else LLAMA3_8B, device)
    weight_gb = params * 2 / 1e9
    log(f"built {params / 1e9:.2f}B params ({weight_gb:.1f} GB bf16) in {time.time() - t:.0f}s")
    bw = hbm_gbps(device)
    log(f"measured device copy bandwidth {bw:.0f} GB/s")

    port = free_port()
    env = {**os.environ, "HF_MODEL_ID": str(model_dir), "PORT": str(port), "HF_HUB_OFFLINE": "1",
           "DTYPE": "bfloat16", "MAX_TOTAL_TOKENS": "4096", "MAX_CONCURRENT_REQUESTS": "128"}
    server_log = open(a.out / "server.log", "w")
    t = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve"), "serve"], cwd=ROOT, env=env,
                            stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request

    try:
        while True:
            if proc.poll() is not None:
                log("server exited during start-up; last lines:")
                print((a.out / "server.log").read_text()[-3000:])
                return 1
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        log(f"server ready in {time.time() - t:.0f}s")
        rows = []
        for c in map(int, a.concurrency.split(",")):
            n = max(8, 2 * c)
            out = subprocess.run([sys.executable, str(LOADGEN), "--url", f"http://127.0.0.1:{port}", "--model", "x",
                                  "--concurrency", str(c), "--requests", str(n), "--max-tokens", str(a.max_tokens),
                                  "--force", "min_tokens", "--warmup", "1"], capture_output=True, text=True,
                                 timeout=300)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            log(f"c={c} {r['out_tok_per_s']:.0f} tok/s, TTFT p50 {r['ttft_ms_p50']} ms, errors {r['errors']}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    # A decode step reads every weight once: at batch B the HBM floor allows B * bw / weights tok/s.
    floor_b1 = bw / weight_gb if weight_gb else float("nan")
    print(f"\n{gpu}: {params / 1e9:.2f}B params, {weight_gb:.1f} GB bf16 weights, copy bandwidth {bw:.0f} GB/s")
    print("| c | tok/s | HBM floor tok/s (c x bw / weights) | share of floor | TTFT p50 ms | ITL p50 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["concurrency"]
        floor = c * floor_b1
        print(f"| {c} | {r['out_tok_per_s']:.0f} | {floor:.0f} | {r['out_tok_per_s'] / floor:.0%} | "
              f"{r['ttft_ms_p50']} | {r['itl_ms_p50']} | {r['errors']} |")
    (a.out / "gpu_check.json").write_text(json.dumps({"gpu": gpu, "params": params, "bw_gbps": bw, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
