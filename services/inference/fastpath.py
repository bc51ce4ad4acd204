"""A lean forward for Llama-layout models: transformers' arithmetic with less Python around it.

In a decode step each row adds one token, and on a CPU a 135M model spends about as long in
transformers' module machinery (nn.Module calls, kwargs plumbing, decorators, mask and output
bookkeeping) as in the attention and norms themselves. This walks the decoder layers directly,
repeating transformers' operations in their order.

Its linear layers run one of three ways:
- fp32 on a CPU with oneDNN (the default there): `pack` gives the step packed weights (packed.py),
  q/k/v and gate/up fused into one matmul each, and the adapters' LoRA terms of each fused group
  added in two batched matmuls (`lora_rows.add_fused_terms`). The step then runs prefill chunks too.
  Logits differ from the model's own forward in the last bits (other kernels sum in another order:
  within LOGIT_TOLERANCE), and a row's logits are the same whatever else is in its batch.
- int8 weights (int8.py): the model's int8 modules, q/k/v and gate/up fused (`fuse_int8`); logits
  bit for bit the model's own forward's.
- otherwise (a GPU, another dtype) the model's own linear modules, logits bit for bit its own.
In the last two the step runs decode steps only; prefill chunks go through the model's forward.

`DecodeStep.of(model)` returns None for any other layout (it checks module types, not just the
config), and the caller falls back to the model's forward.
"""

from __future__ import annotations

from typing import Any

import torch

from services.inference import kv, lora_rows

# How far the packed step's logits may be from the model's own forward (other matmul kernels sum in
# another order): the largest difference, relative to the largest logit (`logit_gap`).
LOGIT_TOLERANCE = 1e-4


def logit_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b| relative to the largest |b| (0 when equal)."""
    scale = float(b.abs().max()) or 1.0
    return float((a.float() - b.float()).abs().max()) / scale


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
        # per layer: (packed q/k/v, o, gate/up, down; the linear layers they were packed from), and
        # the head's, after `pack` (packed.py)
        self.packed: list[tuple[tuple, tuple]] = []
        self.packed_head: tuple[Any, list] | None = None

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

    def pack(self) -> int:
        """Give the step oneDNN-packed fp32 weights (packed.py): q/k/v and gate/up fused into one
        matmul each, o, down and the head packed alone. Returns the bytes packed (0: not
        available here, or the weights aren't plain fp32 CPU linears, e.g. int8)."""
        from services.inference.packed import PackedLinear

        packs = []
        for _, _, attn, _, _, mlp in self.layers:
            groups = (
                [_base(attn.q_proj), _base(attn.k_proj), _base(attn.v_proj)],
                [_base(attn.o_proj)],
                [_base(mlp.gate_proj), _base(mlp.up_proj)],
                [_base(mlp.down_proj)],
            )
            layer = tuple(PackedLinear.of(g) for g in groups)
            if any(p is None for p in layer):
                self.packed = []
                return 0
            packs.append((layer, groups))
        head = PackedLinear.of([_base(self.model.lm_head)])
        if head is None:
            return 0
        self.packed, self.packed_head = packs, (head, [_base(self.model.lm_head)])
        return sum(p.nbytes for layer, _ in packs for p in layer) + head.nbytes

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits of the last position of each row ([rows, 1, vocab]); rows have `new` tokens each
        (1 in a decode step, a prompt chunk in prefill)."""
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(hidden, position_ids)
        # rotate_half(x) * sin == x.roll(half) * sin with the first half of sin negated: bit for bit
        # the same (negating is exact), in two ops where rotate_half takes five
        half = cos.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rows, new = input_ids.shape
        for idx, (w_in, eps_in, attn, w_post, eps_post, mlp) in enumerate(self.layers):
            residual = hidden
            h = _rms_norm(hidden, w_in, eps_in)
            shape = (rows, new, -1, attn.head_dim)
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            packs = self._packs(idx, attn, mlp)
            fused = self.fused[idx] if self.fused else None
            if packs is not None:
                q, k, v = _packed(packs[0], projections, h)
            elif fused is not None and fused[0] is not None and _same(fused[1], projections):
                q, k, v = _projected(projections, h, fused[0](h))
            else:
                q, k, v = (m(h) for m in projections)
            q = q.view(shape).transpose(1, 2)
            k = k.view(shape).transpose(1, 2)
            v = v.view(shape).transpose(1, 2)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            keys, values = cache.update(k, v, idx)
            out, _ = kv.rows_attention(attn, q, keys, values, None, scaling=attn.scaling)
            out = out.reshape(rows, new, -1)
            if packs is not None:
                (attn_out,) = _packed(packs[1], (attn.o_proj,), out)
            else:
                attn_out = attn.o_proj(out.contiguous())
            hidden = residual + attn_out
            residual = hidden
            h = _rms_norm(hidden, w_post, eps_post)
            pair = (mlp.gate_proj, mlp.up_proj)
            if packs is not None:
                gate, up = _packed(packs[2], pair, h)
            elif fused is not None and fused[2] is not None and _same(fused[3], pair):
                gate, up = _projected(pair, h, fused[2](h))
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            act = mlp.act_fn(gate) * up
            if packs is not None:
                (mlp_out,) = _packed(packs[3], (mlp.down_proj,), act)
            else:
                mlp_out = mlp.down_proj(act)
            hidden = residual + mlp_out
        if new > 1:
            hidden = hidden[:, -1:]
        hidden = _rms_norm(hidden, self.norm.weight, self.norm.variance_epsilon)
        head = self.model.lm_head
        if self.packed_head is not None and _same(self.packed_head[1], (head,)):
            (logits,) = _packed(self.packed_head[0], (head,), hidden)
            return logits
        return head(hidden)

    def _packs(self, idx: int, attn: Any, mlp: Any) -> tuple | None:
        """Layer `idx`'s packed matmuls while its modules still wrap (or are) the packed layers."""
        if not self.packed:
            return None
        packs, groups = self.packed[idx]
        modules = (
            (attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)
        )  # fmt: skip
        if all(_same(g, m) for g, m in zip(groups, modules, strict=True)):
            return packs
        return None


def _packed(pack: Any, modules: tuple, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The modules' outputs for `x` from their packed matmul, the step's LoRA terms added: fused
    over the modules where lora_rows can, else module by module."""
    out = pack(x)
    if lora_rows.add_fused_terms(modules, x, out):
        return out.split(pack.sizes, dim=-1) if len(pack.sizes) > 1 else (out,)
    return _projected(modules, x, out.split(pack.sizes, dim=-1))


def _projected(modules: tuple, x: torch.Tensor, bases: tuple) -> tuple[torch.Tensor, ...]:
    """Each module's output for `x`, given its base layer's output (from a fused or packed matmul):
    the adapters' LoRA terms of the step are added (lora_rows.project)."""
    return tuple(lora_rows.project(m, x, b) for m, b in zip(modules, bases, strict=True))


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
