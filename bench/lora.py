#!/usr/bin/env python3
"""Multi-LoRA throughput, in-process (no HTTP): generated tokens per second with C concurrent
requests on the base model only, against the same requests spread over 4 adapters (rank 16,
all seven projections), alternating rounds in one run so the machine's load hits both alike.

    python bench/lora.py [--concurrency 16] [--tokens 64] [--rounds 3] [--dtype bfloat16] [--engine sagellm]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lora_adapters import SPECS, make_adapter  # noqa: E402
from sagellm.engine.builder import build_engine  # noqa: E402
from sagellm.engine.sampling_params import SamplingParams  # noqa: E402
from sagellm.model import bundled  # noqa: E402
from sagellm.settings import Settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--engine", default="sagellm", choices=["sagellm", "vllm"])
    args = ap.parse_args()
    SPECS["gamma2"] = SPECS["gamma"]
    SPECS["gamma3"] = SPECS["gamma"]
    SPECS["gamma4"] = SPECS["gamma"]
    names = ["gamma", "gamma2", "gamma3", "gamma4"]
    out = Path(tempfile.mkdtemp())
    base = str(bundled.bundled_model_dir(None))
    adapters = tuple((n, make_adapter(base, n, out, i).path) for i, n in enumerate(names))
    client = build_engine(Settings(engine=args.engine, dtype=args.dtype, lora_adapters=adapters, max_loras=4))
    prompt = client.tokenize("Write a long story about a lighthouse keeper and the sea. " * 4)

    def run(adapter: str | None) -> int:
        params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True, adapter=adapter)
        return len(list(client.submit(prompt, params)))

    def rate(choose) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            n = sum(pool.map(run, [choose(i) for i in range(args.concurrency)]))
        return n / (time.perf_counter() - t0)

    rate(lambda i: None)  # warm-up
    base_rates, lora_rates = [], []
    for _ in range(args.rounds):
        base_rates.append(rate(lambda i: None))
        lora_rates.append(rate(lambda i: names[i % 4]))
    for b, lo in zip(base_rates, lora_rates):
        print(f"base {b:7.1f} tok/s   4 adapters {lo:7.1f} tok/s   ratio {lo / b:.2f}")
    print(f"median ratio {sorted(lo / b for b, lo in zip(base_rates, lora_rates))[args.rounds // 2]:.2f} "
          f"(c={args.concurrency}, {args.tokens} tokens, {args.dtype}, {args.engine})")
    client.shutdown()


if __name__ == "__main__":
    main()
