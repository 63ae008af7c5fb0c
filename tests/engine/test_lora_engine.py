"""LoRA on transformers' modules (the path for families the lean decoder does not take, here a
tiny random Qwen3): rows of the base model and of two adapters share one engine step, and each
sequence's greedy tokens equal peft's merged model in fp32; prefix-cached blocks of one adapter
are never reused by another."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from families import build
from lora_adapters import greedy
from sagellm.engine.builder import build_engine
from sagellm.engine.sampling_params import SamplingParams
from sagellm.model import bundled
from sagellm.model.lora_step import LoraLinear
from sagellm.settings import Settings

N = 8


def adapter(base: Path, out: Path, rank: int, targets: list[str], seed: int) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(out)
    return str(out)


def reference(base: Path, adapter_path: str | None, prompt: list[int]) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload().eval()
    return greedy(model, prompt, N)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-lora")
    base = build("qwen3", root / "model", bundled.bundled_model_dir(None))
    paths = {"attn": adapter(base, root / "attn", 4, ["q_proj", "k_proj", "v_proj", "o_proj"], 1),
             "mlp": adapter(base, root / "mlp", 8, ["gate_proj", "up_proj", "down_proj"], 2)}
    prompt = list(range(1000, 1040))  # 40 tokens: two full prefix-cache blocks
    refs = {name: reference(base, path, prompt) for name, path in [(None, None), *paths.items()]}
    assert len({tuple(r) for r in refs.values()}) == 3, refs
    client = build_engine(Settings(model_id=str(base), dtype="float32", max_total_tokens=256,
                                   max_batch_total_tokens=2048, max_batch_size=8,
                                   lora_adapters=tuple(paths.items())))
    yield client, refs, prompt
    client.shutdown()


def run(client, prompt, adapter):
    events = list(client.submit(prompt, SamplingParams(max_new_tokens=N, ignore_eos=True, adapter=adapter)))
    return [e.token_id for e in events]


def test_projections_are_wrapped_not_the_lean_decoder(setup):
    client = setup[0]
    forward = client.engine.runner.model
    assert forward.fast is None and forward.lora_slot is not None
    assert sum(isinstance(m, LoraLinear) for m in forward.module.modules()) == 4 * 7


def test_base_and_two_adapters_share_steps_and_equal_peft(setup):
    client, refs, prompt = setup
    assert run(client, prompt, None) == refs[None]  # the base model's blocks now in the prefix cache
    steps = []
    runner = client.engine.runner
    inner = runner.model

    class Spy:
        kernels = inner.kernels
        batch_invariant = inner.batch_invariant

        def __call__(self, *args):
            steps.append((args[0].shape[1], args[4]))  # (tokens T, the step's LoraBatch)
            return inner(*args)

    runner.model = Spy()
    try:
        names = [None, "attn", "mlp"] * 2
        with ThreadPoolExecutor(len(names)) as pool:
            got = list(pool.map(lambda a: run(client, prompt, a), names))
    finally:
        runner.model = inner
    for name, ids in zip(names, got):
        assert ids == refs[name], name
    assert any(lora is not None and len(lora.groups) == 2 and all(g.rows is not None for g in lora.groups)
               and sum(len(g.rows) for g in lora.groups) < t for t, lora in steps), \
        "no step held rows of both adapters and the base model"
