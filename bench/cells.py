"""The benchmark's workloads beside loadgen's default one (greedy chat, 64 forced tokens): sampled
decoding modes, one long prompt's time to first token, and many requests behind one long shared
system prompt. bench/run.py and bench/interleaved.py run them on every server alike."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

# Added to every request's body (loadgen sends temperature 0 unless told otherwise).
MODES = {
    "greedy": {},
    "sampled": {"temperature": 0.8, "top_p": 0.95},
    "top_k+rep": {"temperature": 1.0, "top_k": 50, "repetition_penalty": 1.1},
}
# Servers that spell a field otherwise (llama-cpp-python's server).
RENAMES = {"llamacpp": {"repetition_penalty": "repeat_penalty"}}

LONG_PROMPT_TOKENS = 2000  # the whole chat prompt, template included
LONG_PROMPT_RUNS = 5  # each with its own text, so no prefix cache helps
SHARED_PREFIX_TOKENS = 1000
SHARED_PREFIX_CELL = (16, 64)  # concurrency, requests

_PLACES = ["harbour", "station", "library", "market", "bridge", "museum", "garden", "tower", "school", "bakery"]
_THINGS = ["opens", "closes", "is cleaned", "is inspected", "takes deliveries", "gets busy", "is quiet"]


def body(mode: str, server: str) -> dict:
    names = RENAMES.get(server, {})
    return {names.get(k, k): v for k, v in MODES[mode].items()}


def filler(tokenizer, tokens: int, seed: int) -> str:
    """Deterministic prose of about `tokens` tokens (as a system prompt, chat template included);
    a different `seed` gives a different text from its first word."""
    rng = random.Random(seed)
    lines = [f"Reference notes, set {seed}. Answer the user's question; use these notes only if they help."]
    while len(tokenizer.encode("\n".join(lines))) < tokens - 40:  # ~40 for the template and question
        place, thing = rng.choice(_PLACES), rng.choice(_THINGS)
        lines.append(f"Note {len(lines)}: the {place} on street {rng.randint(1, 99)} {thing} at "
                     f"{rng.randint(5, 22)}:{rng.choice(['00', '15', '30', '45'])} on weekdays.")
    return "\n".join(lines)


def tokenizer_for(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def long_prompt_ttft(run_one, tokenizer) -> dict:
    """`run_one(system_prompt)` -> a loadgen result of one request. One warm-up, then
    LONG_PROMPT_RUNS distinct long prompts; the median TTFT."""
    run_one(filler(tokenizer, LONG_PROMPT_TOKENS, seed=1000))
    results = [run_one(filler(tokenizer, LONG_PROMPT_TOKENS, seed=1001 + i)) for i in range(LONG_PROMPT_RUNS)]
    ttfts = [r["ttft_ms_p50"] for r in results if r["ttft_ms_p50"] is not None]
    return {"ttft_ms": ttfts, "ttft_ms_median": statistics.median(ttfts) if ttfts else None,
            "prompt_tokens": results[0]["prompt_tokens_mean"], "errors": sum(r["errors"] for r in results)}
