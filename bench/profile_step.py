#!/usr/bin/env python3
"""Where a decode step's time goes, in-process (no HTTP): for batch sizes 1/16/64 of running
requests, the engine's per-phase time per step (schedule, prepare, forward, sample, output =
detokenize + stop checks + events), the torch profiler's top operators inside `forward`, and the
floors this machine's memory bandwidth and matmul rate allow (bench/hw_limits.py).

    python bench/profile_step.py [--dtype bfloat16] [--batches 1,16,64] [--steps 32]
    python bench/profile_step.py --sampling '{"temperature": 0.8, "top_p": 0.95}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sagellm.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from sagellm.engine.sampling_params import SamplingParams  # noqa: E402
from sagellm.model import load_model  # noqa: E402
from sagellm.settings import Settings  # noqa: E402


def _drive(engine: LLMEngine, steps: int) -> None:
    """Run the engine loop's body on this thread (the profiler only sees the calling thread)."""
    for _ in range(steps):
        engine._drain_inbox()
        engine.step()


SAMPLING: dict = {}  # extra SamplingParams fields for every request (--sampling)


def _start_batch(engine: LLMEngine, prompt: list[int], batch: int, max_new: int):
    # As an OpenAI chat request without logprobs (what loadgen sends); sampled requests get
    # seeds 0, 1, ... so rows differ as different requests' would.
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, logprobs=False, **SAMPLING)
    handles = [engine.submit(prompt, params if not params.do_sample else
                             dataclasses.replace(params, seed=i)) for i in range(batch)]
    _drive(engine, 4)  # prefill (one step for all) and a few decode steps: the batch is steady
    return handles


def _finish(engine: LLMEngine, handles) -> None:
    for h in handles:
        h.abort()
    _drive(engine, 1)


def measure(engine: LLMEngine, prompt: list[int], batch: int, steps: int) -> dict:
    handles = _start_batch(engine, prompt, batch, steps + 16)
    before, n0 = dict(engine.phase_seconds), engine.num_steps
    t0 = time.perf_counter()
    _drive(engine, steps)
    wall = time.perf_counter() - t0
    n = engine.num_steps - n0
    phases = {k: engine.phase_seconds[k] - before[k] for k in before}
    _finish(engine, handles)
    return {"batch": batch, "steps": n, "ms_per_step": 1000 * wall / max(n, 1),
            "tok_per_s": batch * n / wall, **{f"{k}_ms": 1000 * v / max(n, 1) for k, v in phases.items()}}


def top_ops(engine: LLMEngine, prompt: list[int], batch: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    handles = _start_batch(engine, prompt, batch, 40)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _drive(engine, 8)
    _finish(engine, handles)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--cpu-kernels", default="true", help="false: torch operators instead of the fused kernels")
    ap.add_argument("--profile", action="store_true", help="also print the torch profiler's top ops")
    ap.add_argument("--sampling", default="{}", help='JSON of SamplingParams fields, e.g. \'{"temperature": 0.8}\' '
                    "(any field but do_sample turns sampling on)")
    a = ap.parse_args()
    SAMPLING.update(json.loads(a.sampling))
    if SAMPLING:
        SAMPLING.setdefault("do_sample", True)
    lm = load_model(Settings.from_env({"DTYPE": a.dtype, "CPU_KERNELS": a.cpu_kernels}))
    cfg = EngineConfig(max_batch_size=128, max_prefill_tokens=4096, max_total_tokens=2048, num_kv_blocks=2048)
    engine = LLMEngine(lm.model, lm.tokenizer, cfg, lm.eos_token_ids)  # not started: driven here
    engine.is_alive = lambda: True
    prompt = lm.chat.encode(lm.chat.render([{"role": "user", "content": "Explain photosynthesis in simple terms."}]))
    params = 134_515_008 if "SmolLM2" in lm.source.model_id else sum(p.numel() for p in lm.model.module.parameters())
    weight_mb = params * lm.model.dtype.itemsize / 1e6  # packed linears are no longer parameters
    print(f"model: {params / 1e6:.1f}M params, {weight_mb:.0f} MB of weights in {a.dtype}; "
          f"threads={torch.get_num_threads()}; fused CPU kernels {'on' if lm.model.kernels else 'off'}")
    rows = [measure(engine, prompt, b, a.steps) for b in map(int, a.batches.split(","))]
    cols = ["batch", "ms_per_step", "tok_per_s", "schedule_ms", "prepare_ms", "forward_ms", "sample_ms", "output_ms"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if a.profile:
        for b in map(int, a.batches.split(",")):
            print(f"\n## torch profiler, batch {b}, 8 steps\n")
            print(top_ops(engine, prompt, b))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
