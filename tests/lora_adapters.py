"""Tiny peft LoRA adapters of the bundled model, made in the test with random weights large
enough to change its greedy answer, and the reference: greedy tokens of peft's merged model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# name -> (rank, target modules, rslora): attention only, MLP only, and all seven projections.
SPECS = {
    "alpha": (4, ["q_proj", "v_proj"], False),
    "beta": (8, ["gate_proj", "up_proj", "down_proj"], False),
    "gamma": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "delta": (2, ["o_proj", "down_proj"], False),
}


@dataclass
class Adapter:
    name: str
    path: str
    rank: int
    targets: list[str]


def make_adapter(base_path: str, name: str, out_dir: Path, seed: int) -> Adapter:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rank, targets, rslora = SPECS[name]
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                  use_rslora=rslora, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_A" in pname or "lora_B" in pname:
                # peft starts B at zero (no change); these are big enough to change the answer.
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    path = out_dir / name
    peft_model.save_pretrained(str(path))
    return Adapter(name, str(path), rank, targets)


def merged_model(base_path: str, adapter_path: str | None):
    """The base model (adapter None) or peft's merged model, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    if adapter_path is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_path).merge_and_unload().eval()


@torch.no_grad()
def greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens (no stop at EOS, as the server's ignore_eos), with transformers' KV cache."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens
