"""Per-request generation parameters, already validated by the API layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int  # 0: score the prompt (prompt_logprobs) without generating
    # Greedy when False; temperature and the filters below only apply when sampling, in
    # transformers' order: temperature, top_k, top_p, min_p, typical_p.
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off; keeps tokens at least min_p times as likely as the best
    typical_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # CTRL-style, over prompt + generated tokens
    frequency_penalty: float = 0.0  # OpenAI meaning: minus penalty * count in the output
    presence_penalty: float = 0.0  # OpenAI meaning: minus penalty if present in the output
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = 0
    top_n_tokens: int = 0  # alternatives reported per generated token
    logprobs: bool = True  # report each token's logprob (costs a pass over the vocabulary)
    deadline: float | None = None  # time.monotonic() after which the request ends with `length`
    # A compiled sagellm.engine.constraint.Grammar: the output must match it (structured output).
    grammar: object | None = None
    # Score every prompt token (TGI's decoder_input_details); delivered on the first TokenEvent.
    prompt_logprobs: bool = False
    prompt_top_n: int = 0  # alternatives reported per prompt token (with prompt_logprobs)
    # The LoRA adapter to run with (its name, as EngineClient.adapter_names lists it); None: the base model.
    adapter: str | None = None

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or bool(self.logit_bias)
        )
