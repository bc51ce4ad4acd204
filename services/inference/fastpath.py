"""A lean decode step for Llama-layout models: the same arithmetic as transformers' forward, with
less Python around it.

In a decode step each row adds one token, and on a CPU a 135M model spends about as long in
transformers' module machinery (nn.Module calls, kwargs plumbing, decorators, mask and output
bookkeeping) as in the attention and norms themselves. This walks the decoder layers directly,
calling the model's own linear modules (so int8 layers and the LoRA layers of lora.py apply
unchanged) and repeating transformers' operations in their order, so logits are bit for bit the
ones the model's own forward gives. Prefill chunks still go through the model's forward.

`DecodeStep.of(model)` returns None for any other layout (it checks module types, not just the
config), and the caller falls back to the model's forward.
"""

from __future__ import annotations

from typing import Any

import torch

from services.inference import kv


class DecodeStep:
    """`step(input_ids [rows, 1], position_ids [rows, 1], cache) -> logits [rows, 1, vocab]`."""

    def __init__(self, model: torch.nn.Module):
        # modules are looked up at each call where adapters may wrap them (PEFT replaces them in
        # place) or int8 may change them: the projections, the head
        self.model = model
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.layers = [
            (
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                layer.self_attn, layer.post_attention_layernorm.weight,
                layer.post_attention_layernorm.variance_epsilon, layer.mlp,
            )
            for layer in inner.layers[: model.config.num_hidden_layers]
        ]  # fmt: skip

    @classmethod
    def of(cls, model: torch.nn.Module) -> DecodeStep | None:
        """The lean step for `model`, or None when its layout isn't exactly Llama's."""
        try:
            from transformers.models.llama import modeling_llama as llama
        except ImportError:  # pragma: no cover
            return None
        if type(model) is not llama.LlamaForCausalLM or type(model.model) is not llama.LlamaModel:
            return None
        inner = model.model
        if type(inner.norm) is not llama.LlamaRMSNorm or type(inner.rotary_emb) is not llama.LlamaRotaryEmbedding:
            return None
        for layer in inner.layers:
            if (
                type(layer) is not llama.LlamaDecoderLayer
                or type(layer.self_attn) is not llama.LlamaAttention
                or type(layer.mlp) is not llama.LlamaMLP
                or type(layer.input_layernorm) is not llama.LlamaRMSNorm
                or type(layer.post_attention_layernorm) is not llama.LlamaRMSNorm
            ):
                return None
        return cls(model)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(hidden, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rows = hidden.shape[0]
        for idx, (w_in, eps_in, attn, w_post, eps_post, mlp) in enumerate(self.layers):
            residual = hidden
            h = _rms_norm(hidden, w_in, eps_in)
            shape = (rows, 1, -1, attn.head_dim)
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            keys, values = cache.update(k, v, idx)
            out, _ = kv.rows_attention(attn, q, keys, values, None, scaling=attn.scaling)
            hidden = residual + attn.o_proj(out.reshape(rows, 1, -1).contiguous())
            residual = hidden
            h = _rms_norm(hidden, w_post, eps_post)
            hidden = residual + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
        return self.model.lm_head(_rms_norm(hidden, self.norm.weight, self.norm.variance_epsilon))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, op for op."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
