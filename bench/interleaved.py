#!/usr/bin/env python3
"""sagellm against vLLM with both servers up, cells alternating between them, so that the
machine's drift hits both alike (single grids swing by 10-15 % here). Each server is checked to
be idle while the other is measured. Every cell runs greedy and sampled (bench/cells.py: MODES).

    python bench/interleaved.py [--cells 16:64,64:128] [--rounds 3] [--modes greedy,sampled]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cells  # noqa: E402  (bench/cells.py: the decoding modes)
import run  # noqa: E402  (bench/run.py: servers and loadgen cells)


def idle_cpu_seconds(srv: run.Running, seconds: float = 5.0) -> float:
    root = psutil.Process(srv.proc.pid)
    procs = [root, *root.children(recursive=True)]

    def used() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in procs)
    before = used()
    time.sleep(seconds)
    return used() - before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="16:64,64:128", help="concurrency:requests, comma separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--modes", default="greedy,sampled", help="comma list of " + ", ".join(cells.MODES))
    a = ap.parse_args()
    grid = [(mode, *map(int, c.split(":"))) for c in a.cells.split(",") for mode in a.modes.split(",")]
    out = run.ROOT / "bench-results" / ("interleaved-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    out.mkdir(parents=True, exist_ok=True)
    folder = run.model_dir()
    servers = [run.Running(name, folder, out) for name in ("vllm", "sagellm")]
    results = {s.name: {f"{m} c={c}": [] for m, c, _ in grid} for s in servers}
    try:
        for s in servers:
            s.wait_ready()
            run.run_cell(s, 4, 8, 16)  # warm-up
        for s in servers:
            print(f"{s.name} idle: {idle_cpu_seconds(s):.2f} CPU s in 5 s", file=sys.stderr)
        for rnd in range(a.rounds):
            for mode, c, n in grid:
                for s in servers if rnd % 2 == 0 else servers[::-1]:
                    r = run.run_cell(s, c, n, a.max_tokens, cells.body(mode, s.name))
                    results[s.name][f"{mode} c={c}"].append(r)
                    print(f"round {rnd + 1} {s.name:8s} {mode:9s} c={c:<3d} {r['out_tok_per_s']:7.1f} tok/s  "
                          f"TTFT p50 {r['ttft_ms_p50']:.0f} ms  ITL p50 {r['itl_ms_p50']:.1f} ms", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("| cell | sagellm tok/s | vLLM tok/s | ratio per round | ratio of sums |")
    print("|---|---|---|---|---|")
    for cell in results["sagellm"]:
        ours = [r["out_tok_per_s"] for r in results["sagellm"][cell]]
        theirs = [r["out_tok_per_s"] for r in results["vllm"][cell]]
        per = ", ".join(f"{x / y:.2f}" for x, y in zip(ours, theirs))
        print(f"| {cell} | {', '.join(f'{x:.0f}' for x in ours)} | {', '.join(f'{y:.0f}' for y in theirs)} "
              f"| {per} | {sum(ours) / sum(theirs):.2f}x |")
    print(f"\nraw results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
