"""Tiny random-weight models of each supported family, built from transformers configurations
(fixed seed, fp32, head_dim 64 so the fused kernels run), saved with the bundled tokenizer into a
folder the server and the reference both load, and the reference: transformers' eager forward on
that folder. Shared by the family tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# Per family: the configuration class, and what differs from the shared shape below. Sliding
# windows are small (32-48 tokens) so the test prompts run past them; layers alternate where the
# family has sliding and full layers.
# initializer_range 0.1 (not transformers' 0.02): peaked enough that greedy tokens vary and no
# two candidates tie within the arithmetic's noise.
COMMON = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
              bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True, initializer_range=0.1)
ALTERNATE = ["sliding_attention", "full_attention"] * 2
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=32)),
    "qwen2": ("Qwen2Config", dict(hidden_size=256, use_sliding_window=True, sliding_window=32, max_window_layers=2)),
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {}),
    # Softcaps far below the defaults (50, 30), so that they change the answers.
    "gemma2": ("Gemma2Config", dict(sliding_window=32, query_pre_attn_scalar=48, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=4.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(sliding_window=32, query_pre_attn_scalar=48, layer_types=ALTERNATE)),
    "phi3": ("Phi3Config", dict(hidden_size=256, sliding_window=48)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(sliding_window=32, num_local_experts=4, num_experts_per_tok=2,
                                     layer_types=ALTERNATE)),
    "olmo2": ("Olmo2Config", dict(hidden_size=256)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=256, rotary_pct=0.5)),
    "starcoder2": ("Starcoder2Config", dict(hidden_size=256, sliding_window=32)),
}


def config_for(family: str, **overrides):
    import transformers

    cls_name, extra = FAMILIES[family]
    kwargs = {**COMMON, **extra, **overrides}
    cls = getattr(transformers, cls_name)
    # Shared keys a family has no field for (GPT-NeoX has no KV heads of its own, several derive
    # head_dim from hidden_size / heads) would be stored as stray attributes: leave them out.
    known = set(cls.__dataclass_fields__) | set(cls.attribute_map)
    return cls(**{k: v for k, v in kwargs.items() if k in known})


def build(family: str, folder: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Random fp32 weights of `family` with the tokenizer of `tokenizer_dir`, saved to `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = config_for(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):  # gpt-oss starts them at 0; give each head its own
                p.copy_(torch.randn(p.shape))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    if (tokenizer_dir / "chat_template.jinja").exists():
        shutil.copy(tokenizer_dir / "chat_template.jinja", folder)
    return folder


class Reference:
    """transformers' eager forward on the model folder, with the folder's own tokenizer."""

    def __init__(self, folder):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                          attn_implementation="eager").eval()

    @torch.inference_mode()
    def greedy(self, ids: list[int], n: int) -> list[int]:
        out = self.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        return out[0, len(ids):].tolist()

    @torch.inference_mode()
    def logprobs(self, ids: list[int]) -> list[float]:
        """Entry p: the logprob of ids[p + 1] after ids[:p + 1]."""
        lp = self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
