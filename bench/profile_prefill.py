#!/usr/bin/env python3
"""Where one long prompt's time to first token goes, in-process (no HTTP): the bench's ~2,000-token
chat prompt (bench/cells.py, a new text each run so no prefix cache helps) prefilled alone, for
each prefill budget asked; the wall time to its first token, the engine's phases, and with
--profile the torch profiler's top operators.

    python bench/profile_prefill.py [--budgets 512,2048] [--runs 3] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import cells  # noqa: E402
from sagellm.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from sagellm.engine.sampling_params import SamplingParams  # noqa: E402
from sagellm.model import load_model  # noqa: E402
from sagellm.settings import Settings  # noqa: E402


def first_token_s(engine: LLMEngine, prompt: list[int]) -> tuple[float, int]:
    """Seconds from submit to the first token, and the steps it took; the engine driven here."""
    t0 = time.perf_counter()
    stream = engine.submit(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True, logprobs=False))
    steps = 0
    while engine.scheduler.has_work() or engine._inbox:
        engine._drain_inbox()
        engine.step()
        steps += 1
    wall = time.perf_counter() - t0
    assert stream is not None
    return wall, steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budgets", default="512,2048", help="MAX_BATCH_PREFILL_TOKENS values to try")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=cells.LONG_PROMPT_TOKENS)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    lm = load_model(Settings.from_env({"DTYPE": a.dtype}))
    print(f"threads={torch.get_num_threads()}; fused CPU kernels {'on' if lm.model.kernels else 'off'}; "
          f"dtype {lm.model.dtype}")
    seed = iter(range(5000, 6000))

    def prompt() -> list[int]:
        text = cells.filler(lm.tokenizer, a.tokens, next(seed))
        return lm.chat.encode(lm.chat.render([{"role": "system", "content": text},
                                              {"role": "user", "content": "When does the museum open?"}]))
    for budget in map(int, a.budgets.split(",")):
        cfg = EngineConfig(max_batch_size=64, max_prefill_tokens=budget, max_total_tokens=8192, num_kv_blocks=1024)
        engine = LLMEngine(lm.model, lm.tokenizer, cfg, lm.eos_token_ids)
        engine.is_alive = lambda: True
        first_token_s(engine, prompt())  # warm-up
        before = dict(engine.phase_seconds)
        walls, n = [], 0
        for _ in range(a.runs):
            p = prompt()
            wall, steps = first_token_s(engine, p)
            walls.append(wall)
        phases = {k: 1000 * (engine.phase_seconds[k] - before[k]) / a.runs for k in before}
        print(f"budget {budget}: {len(p)} prompt tokens, {steps} steps, first token "
              f"{', '.join(f'{1000 * w:.0f}' for w in walls)} ms (median {1000 * statistics.median(walls):.0f}); "
              + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            p = prompt()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                first_token_s(engine, p)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        del n
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
