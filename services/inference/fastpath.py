"""A lean decode step for Llama-layout models: the same arithmetic as transformers' forward, with
less Python around it.

In a decode step each row adds one token, and on a CPU a 135M model spends about as long in
transformers' module machinery (nn.Module calls, kwargs plumbing, decorators, mask and output
bookkeeping) as in the attention and norms themselves. This walks the decoder layers directly,
calling the model's own linear modules (so int8 layers and the LoRA layers of lora_rows.py apply
unchanged) and repeating transformers' operations in their order, so logits are bit for bit the
ones the model's own forward gives. Prefill chunks still go through the model's forward.

`DecodeStep.of(model)` returns None for any other layout (it checks module types, not just the
config), and the caller falls back to the model's forward.
"""

from __future__ import annotations

from typing import Any

import torch

from services.inference import kv, lora_rows


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
        # per layer: (fused q/k/v, their int8 layers, fused gate/up, theirs), after `fuse_int8`
        self.fused: list[tuple[Any, list, Any, list]] = []

    def fuse_int8(self) -> int:
        """With int8 weights, run q/k/v and gate/up as one matmul each (int8.FusedInt8: the same
        outputs, three and two calls fewer per layer); returns how many groups were fused."""
        from services.inference.int8 import FusedInt8

        self.fused = []
        for _, _, attn, _, _, mlp in self.layers:
            qkv = [_base(attn.q_proj), _base(attn.k_proj), _base(attn.v_proj)]
            gate_up = [_base(mlp.gate_proj), _base(mlp.up_proj)]
            self.fused.append((FusedInt8.of(qkv), qkv, FusedInt8.of(gate_up), gate_up))
        return sum((f[0] is not None) + (f[2] is not None) for f in self.fused)

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
        if (
            type(inner.norm) is not llama.LlamaRMSNorm
            or type(inner.rotary_emb) is not llama.LlamaRotaryEmbedding
        ):
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
        # rotate_half(x) * sin == x.roll(half) * sin with the first half of sin negated: bit for bit
        # the same (negating is exact), in two ops where rotate_half takes five
        half = cos.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rows = hidden.shape[0]
        for idx, (w_in, eps_in, attn, w_post, eps_post, mlp) in enumerate(self.layers):
            residual = hidden
            h = _rms_norm(hidden, w_in, eps_in)
            shape = (rows, 1, -1, attn.head_dim)
            fused = self.fused[idx] if self.fused else None
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            if fused is not None and fused[0] is not None and _same(fused[1], projections):
                q, k, v = (lora_rows.project(m, h, b) for m, b in zip(projections, fused[0](h), strict=True))
            else:
                q, k, v = (m(h) for m in projections)
            q = q.view(shape).transpose(1, 2)
            k = k.view(shape).transpose(1, 2)
            v = v.view(shape).transpose(1, 2)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            keys, values = cache.update(k, v, idx)
            out, _ = kv.rows_attention(attn, q, keys, values, None, scaling=attn.scaling)
            hidden = residual + attn.o_proj(out.reshape(rows, 1, -1).contiguous())
            residual = hidden
            h = _rms_norm(hidden, w_post, eps_post)
            pair = (mlp.gate_proj, mlp.up_proj)
            if fused is not None and fused[2] is not None and _same(fused[3], pair):
                gate, up = (lora_rows.project(m, h, b) for m, b in zip(pair, fused[2](h), strict=True))
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            hidden = residual + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.model.lm_head(_rms_norm(hidden, self.norm.weight, self.norm.variance_epsilon))


def _base(module: Any) -> Any:
    """The linear layer under a LoRA wrapper (or the module itself)."""
    return getattr(module, "base_layer", module)


def _same(layers: list, modules: tuple) -> bool:
    """Whether `modules` still wrap (or are) the layers a fused group was built from."""
    return all(_base(m) is layer for m, layer in zip(modules, layers, strict=True))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward: for fp32 torch's fused kernel (the same values, one op instead of
    six; fastpath's tests compare them bit for bit), else op for op."""
    if x.dtype == weight.dtype == torch.float32 and _fused_rms_norm is not None:
        return _fused_rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


_fused_rms_norm = getattr(torch, "rms_norm", None)
