"""Microbenchmark: a decode step's bf16 linears at M rows, oneDNN's packed matmul (what
cpu_linear.PackedLinear calls) against sagellm's gemm_rows_bf16 (csrc/gemm_rows.cpp), alternating
in one process; prints medians per SmolLM2-135M shape and M. Each shape cycles through enough
copies of its weight to pass L3 (64 MB), as a step's 30 layers do.

Prefill sizes (BATCH_INVARIANT sends those to gemm_rows_bf16 too): --m 128,256,512 --shapes qkv,o,gate_up,down.

Usage: flock -x /tmp/sagellm-cpu.lock .venv/bin/python bench/linear_rows.py [--m 2,4,8,16,32,64] [--shapes qkv,o]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sagellm.model import cpu_kernels, cpu_linear

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def timed(fn, weights, x) -> float:
    t = time.perf_counter()
    for w in weights:
        fn(x, w)
    return (time.perf_counter() - t) / len(weights) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="2,4,8,16,32,64")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ops = cpu_kernels.load()
    onednn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w[1], None, "none", [], "")
    ours = lambda x, w: ops.gemm_rows_bf16(x, w[0], w[2])
    print(f"{'shape':8} {'M':>4} {'oneDNN us':>10} {'rows us':>9} {'ratio':>6} {'GFLOP/s':>8}")
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(2, (64 << 20) // (n * k * 2))
        weights = []
        for _ in range(copies):
            w = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
            weights.append((cpu_linear.pack_rows_weight(w), torch.ops.mkldnn._reorder_linear_weight(w, 1), n))
        for m in map(int, a.m.split(",")):
            x = torch.randn(m, k).to(torch.bfloat16)
            timed(onednn, weights, x), timed(ours, weights, x)  # warm
            od, us = [], []
            for _ in range(a.rounds):
                od.append(timed(onednn, weights, x))
                us.append(timed(ours, weights, x))
            od_m, us_m = statistics.median(od), statistics.median(us)
            print(f"{name:8} {m:4d} {od_m:10.1f} {us_m:9.1f} {od_m / us_m:6.2f} {2 * m * n * k / us_m / 1e3:8.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
