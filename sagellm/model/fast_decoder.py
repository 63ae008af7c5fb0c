"""A lean forward pass for Llama-architecture decoders (Llama, Mistral, Qwen2), on one rank.

The same weights and the same arithmetic as transformers' modules (its rotary embedding is
reused; each layer's attention gets the arguments transformers' module passes, as the start-up
probe recorded them: scaling, sliding window, ...), minus their per-call Python, with q/k/v and gate/up fused into one matmul each (4 linear
calls per layer instead of 7) and the q and k heads rotated in one pass. Measured on this
project's 2-core machines, transformers' module overhead was about half of a batch-1 decode step
(docs/performance.md). Tensor-parallel ranks keep transformers' modules and TP plan.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from sagellm.model import cpu_linear, lora_stack
from sagellm.model.attention import last_rows_only


SUPPORTED = ("llama", "mistral", "qwen2")


def eligible(model: nn.Module) -> bool:
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED or getattr(cfg, "hidden_act", None) != "silu":
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return False
    first = layers[0]
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return all(type(getattr(first.self_attn, n, None)) is nn.Linear for n in names) and all(
        type(getattr(first.mlp, n, None)) is nn.Linear for n in ("gate_proj", "up_proj", "down_proj"))


class _PlainLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, row_tile: int = 1):
        super().__init__()
        self.weight, self.bias, self.row_tile = weight, bias, row_tile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_tile > 1:
            return F.linear(cpu_linear.pad_rows(x, self.row_tile), self.weight, self.bias)[:x.shape[0]]
        return F.linear(x, self.weight, self.bias)


def _Linear(weight: torch.Tensor, bias: torch.Tensor | None, row_tile: int = 1, rows=None) -> nn.Module:
    """y = x W^T + b, with oneDNN-packed weights for bf16 on CPU (up to 64 rows on `rows`,
    cpu_linear.rows_kernel); row_tile > 1 (batch invariance): every call on `rows`, or without it
    rows padded to a multiple of row_tile."""
    if weight.device.type == "cpu" and cpu_linear.available(weight.dtype):
        return cpu_linear.PackedLinear(weight, bias, row_tile, rows)
    return _PlainLinear(weight, bias, row_tile)


def _detached(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return lin.weight.detach(), None if lin.bias is None else lin.bias.detach()


def _fuse(*linears: nn.Linear, row_tile: int = 1, rows=None) -> nn.Module:
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    biases = [lin.bias for lin in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else torch.zeros(lin.out_features, dtype=weight.dtype, device=weight.device)
         for b, lin in zip(biases, linears)])
    for lin in linears:  # the fused copy replaces them; free the originals
        lin.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False)
    return _Linear(weight, bias, row_tile, rows)


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    # transformers' LlamaRMSNorm (normalised in float32, then cast back and scaled) in one fused
    # operator instead of six: served, each operator boundary costs a GIL hand-off.
    return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # transformers' apply_rotary_pos_emb and rotate_half, op for op, on the q and k heads at once.
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _Layer:
    def __init__(self, layer: nn.Module, config, attention_arguments: dict, row_tile: int, rows=None):
        attn, mlp = layer.self_attn, layer.mlp
        self.head_dim = attn.head_dim
        self.q_size = config.num_attention_heads * self.head_dim
        self.kv_size = config.num_key_value_heads * self.head_dim
        self.qkv = _fuse(attn.q_proj, attn.k_proj, attn.v_proj, row_tile=row_tile, rows=rows)
        self.o = _Linear(*_detached(attn.o_proj), row_tile, rows)
        self.gate_up = _fuse(mlp.gate_proj, mlp.up_proj, row_tile=row_tile, rows=rows)
        self.down = _Linear(*_detached(mlp.down_proj), row_tile, rows)
        self.intermediate = mlp.down_proj.in_features
        self.in_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.attn_module = SimpleNamespace(layer_idx=attn.layer_idx)
        self.index = attn.layer_idx
        self.attention_arguments = attention_arguments  # scaling, sliding_window, softcap, s_aux


class FastDecoder:
    def __init__(self, model: nn.Module, kernels, layer_attention: list[dict], batch_invariant: bool = False):
        """kernels: torch.ops.sagellm (sagellm.model.cpu_kernels) for the fused residual add and
        RMSNorm, SwiGLU, and rotary embedding with the KV cache write; None: torch's operators.
        layer_attention: per layer, the attention arguments transformers' module passes
        (sagellm.model.probe.check). batch_invariant: every row computed the same whatever else is
        in the step (every matmul on gemm_rows_bf16, or rows padded to 8 without it; rotary angles
        from one table)."""
        inner = model.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        row_tile = 8 if batch_invariant else 1
        rows = cpu_linear.rows_kernel(kernels, model, sole=batch_invariant)
        self.lm_head = _Linear(*_detached(model.lm_head), row_tile, rows)
        self.layers = [_Layer(layer, model.config, args, row_tile, rows)
                       for layer, args in zip(inner.layers, layer_attention, strict=True)]
        # Rotary cos/sin of positions 0 .. max_position_embeddings - 1, computed once: computed per
        # step, a position's angle goes through a vector lane or the scalar tail of cos/sin
        # depending on how many tokens the step holds.
        self.batch_invariant = batch_invariant
        # The last layer past its attention on the rows read only (__call__); tests turn it off to compare.
        self.trim_last_layer = True
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        fits = model.config.hidden_size % 16 == 0 and model.config.intermediate_size % 16 == 0
        self.kernels = kernels if fits else None
        first = self.layers[0]
        hidden = model.config.hidden_size
        # LoRA adapters stacked per fused projection (sagellm.model.lora_stack), by set of adapters.
        self.lora_stacks = lora_stack.LoraStacks(len(self.layers), (
            (first.q_size, first.kv_size, first.kv_size), (hidden,), (first.intermediate,) * 2, (hidden,)), self.kernels)

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(h + delta), h + delta); the fused kernel adds into h in place."""
        k = self.kernels
        if k is None:
            h = h if delta is None else h + delta
            return _rms_norm(h, norm), h
        if delta is None:
            return k.rms_norm(h, norm.weight, norm.variance_epsilon), h
        return k.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon), h

    def _swiglu(self, gu: torch.Tensor, intermediate: int) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.silu_mul(gu)
        return F.silu(gu[:, :intermediate]) * gu[:, intermediate:]

    def _rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [T, hidden]; position_ids: [1, T] -> cos, sin [1, T, D] in h's dtype."""
        if not self.batch_invariant:
            return self.rotary(h[None], position_ids)
        if self._rope_table is None:
            n = self.rotary.config.max_position_embeddings
            self._rope_table = self.rotary(h[None, :1], torch.arange(n, device=h.device)[None])
        cos, sin = self._rope_table
        return cos.index_select(1, position_ids[0]), sin.index_select(1, position_ids[0])

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor,
                 attention, meta, lora=None) -> torch.Tensor:
        """input_ids, position_ids: [1, T]; keep: [N] -> logits [N, vocab] in the model dtype.
        lora: the step's sagellm.model.lora_step.LoraBatch (adapters' rows), or None."""

        h = self.embed(input_ids)[0]  # [T, hidden]
        if lora is not None:  # the step's adapters stacked, per row (lora_stack.StackedLora)
            lora = self.lora_stacks.for_step(lora, h.shape[0], h.dtype)
        cos, sin = self._rotary(h, position_ids)  # [1, T, D]
        t = h.shape[0]
        cos2, sin2 = cos[0], sin[0]  # [T, D]
        cos, sin = cos2[:, None], sin2[:, None]  # [T, 1, D]: q and k heads rotate together
        rope_kernel = (self.kernels is not None and self.layers[0].head_dim % 32 == 0
                       and meta.cache.keys[0].dtype == h.dtype)
        delta = None  # the MLP output still to be added to h (fused with the next norm)
        # Only the `keep` rows of the last layer's output are read (their logits): past its
        # attention, which every row's k/v went into, that layer runs on those rows alone. Each
        # step below is row-wise; in BATCH_INVARIANT the linears' rows (gemm_rows_bf16) are
        # unchanged by it. With LoRA the adapters' row groups index all T rows: no trim.
        trim = self.trim_last_layer and lora is None and keep.shape[0] < t
        last = self.layers[-1]
        for layer in self.layers:
            x, h = self._add_norm(h, delta, layer.in_norm)
            qkv = layer.qkv(x)  # [T, q + 2 kv]
            d, heads = layer.head_dim, layer.q_size // layer.head_dim
            if lora is not None:  # before the rotation: the adapters change q, k and v themselves
                qkv = lora.apply(qkv, x, layer.index, lora_stack.QKV)
            if rope_kernel:  # rotated and the new k/v stored in the cache in one operator
                idx = layer.attn_module.layer_idx
                qk = self.kernels.rope_write_kv(qkv, cos2, sin2, meta.slot_mapping, meta.cache.keys[idx],
                                                meta.cache.values[idx], heads, layer.kv_size // d)
            else:
                qk = _rotate(qkv[:, :layer.q_size + layer.kv_size].view(t, -1, d), cos, sin)  # [T, H + KVH, D]
            q = qk[:, :heads].transpose(0, 1)[None]  # [1, H, T, D]
            k = qk[:, heads:].transpose(0, 1)[None]
            v = qkv[:, layer.q_size + layer.kv_size:].view(t, -1, d).transpose(0, 1)[None]
            trim_here = trim and layer is last
            # The last layer's attention for the kept rows alone, where the flash kernel can.
            rows = last_rows_only(meta, keep.tolist(), q, layer.index, layer.attention_arguments) if trim_here else None
            o, _ = attention(layer.attn_module, q if rows is None else q.index_select(2, keep), k, v, None,
                             sagellm_meta=meta if rows is None else rows, sagellm_cache_written=rope_kernel,
                             **layer.attention_arguments)
            o = o.reshape(o.shape[1], -1)  # [T or N, q]
            if trim_here:  # [N, q], [N, hidden]
                o, h = o if rows is not None else o.index_select(0, keep), h.index_select(0, keep)
            out = layer.o(o)
            if lora is not None:
                out = lora.apply(out, o, layer.index, lora_stack.O)
            x, h = self._add_norm(h, out, layer.post_norm)
            gu = layer.gate_up(x)  # [T, 2 intermediate]
            if lora is not None:
                gu = lora.apply(gu, x, layer.index, lora_stack.GATE_UP)
            act = self._swiglu(gu, layer.intermediate)
            delta = layer.down(act)
            if lora is not None:
                delta = lora.apply(delta, act, layer.index, lora_stack.DOWN)
        h = h + delta if trim else (h + delta).index_select(0, keep)
        return self.lm_head(self._add_norm(h, None, self.norm)[0])
