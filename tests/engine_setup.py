"""What the engine tests share: questions, building an engine on the bundled model, reading a
request's tokens, greedy parameters and transformers' own greedy continuation."""

from __future__ import annotations

import torch

from sagellm.engine.engine import EngineConfig, LLMEngine
from sagellm.engine.sampling_params import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Why is the sky blue?",
    "Explain photosynthesis in simple terms, with an example.",
    "How do bees make honey?",
    "What is a black hole?",
]


def make_engine(lm, **overrides) -> LLMEngine:
    cfg = dict(max_batch_size=32, max_prefill_tokens=512, max_total_tokens=2048, num_kv_blocks=1024)
    cfg.update(overrides)
    engine = LLMEngine(lm.model, lm.tokenizer, EngineConfig(**cfg), lm.eos_token_ids)
    engine.start()
    return engine


def token_ids(handle) -> list[int]:
    return [e.token_id for e in handle if e.token_id >= 0]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


def reference(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()
