"""int8 weights for CPU decoding: fbgemm's dynamic int8 linear in place of fp32 matmuls.

A decode step is bound by reading the weights, and on CPUs without fast bf16 (no AVX512-BF16/AMX)
int8 is the cheap way to read fewer bytes: fbgemm's `quantized::linear_dynamic` takes int8 weights
(one scale per output channel) and quantizes the activations on the fly, with AVX2 kernels. On the
2-core AVX2 test machine it runs the 49k-row output head about 4x faster than MKL's fp32 matvec.

fbgemm quantizes the activations with one range per call, which would make a row's result depend
on the other rows of its batch. So each token is first scaled to max |x| = 1 (its own scale, put
back after the matmul: per-token quantization, which also suits LLM activations better), and two
sentinel columns holding +1 and -1 (with zero weights) pin the range to [-1, 1] for every batch:
integer accumulation is exact, so a chat's answer doesn't depend on who it is batched with.

The lean decode step (fastpath.py) runs the layers that read the same input (q, k, v; gate, up) as
one fbgemm call (`FusedInt8`): integer accumulation is exact and each output channel is scaled on
its own, so each layer's output is bit for bit what it gives alone, for one call instead of three
(or two) and an extra int8 copy of those weights.

The modules stay `nn.Linear` (a subclass) with their fp32 weight kept: PEFT wraps them like any
linear layer (adapters load onto them later, with fp32 LoRA weights), a tied output head still
shares the embedding, and `dequantize` puts the plain class back. The price is the int8 copy's
memory on top (a quarter of the fp32 size).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from services.inference.packed import joined_bias


class Int8Linear(nn.Linear):
    """`nn.Linear` whose forward reads an int8 copy of the weight (see the module docstring)."""

    _packed: Any
    _inputs: dict[int, torch.Tensor]  # rows -> input buffer [rows, in + 2], sentinel columns set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        rows, width = flat.shape
        # per-token scales, and two sentinel columns (+1, -1; their weights are zero) so the range
        # fbgemm quantizes over is [-1, 1] whatever else is in the batch
        scale = torch.linalg.vector_norm(flat, ord=math.inf, dim=1, keepdim=True).clamp_min_(1e-12)
        inputs = self._inputs.get(rows)
        if inputs is None or inputs.dtype != flat.dtype or inputs.device != flat.device:
            inputs = flat.new_empty((rows, width + 2))
            inputs[:, width] = 1.0
            inputs[:, width + 1] = -1.0
            if rows <= _KEEP_ROWS:  # decode steps reuse theirs; a long prefill chunk's goes
                self._inputs[rows] = inputs
        # written in place of a cat: this layer's forwards run one at a time (the model lock)
        torch.div(flat, scale, out=inputs[:, :width])
        out = _linear_dynamic(inputs, self._packed, True).mul_(scale)
        if self.bias is not None:
            out += self.bias
        return out.reshape(*shape[:-1], out.shape[-1])


# the op's overload, resolved once: calling through torch.ops' packet costs a lookup per call, and
# the overload's Python __call__ scans the arguments for fake script objects (tracing only) before
# reaching the C++ operator, which is what `_op` is
_overload = torch.ops.quantized.linear_dynamic.default
_linear_dynamic = getattr(_overload, "_op", _overload)
_KEEP_ROWS = 64


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ("lora_",)) -> int:
    """Give every plain `nn.Linear` of `model` (not LoRA's own) an int8 forward; returns how many.

    Raises RuntimeError when this torch build has no fbgemm (x86 CPUs only).
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise RuntimeError("int8 weights need torch's fbgemm engine (an x86 CPU build)")
    count = 0
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or any(s in name for s in skip):
            continue
        packed = _pack([module.weight])
        module.__class__ = Int8Linear
        module._packed = packed
        module._inputs = {}
        count += 1
    return count


def _pack(weights: list[torch.Tensor]) -> Any:
    """fbgemm's packed int8 weight of these weights stacked by output channel, with the sentinel
    columns; one scale per output channel, so a channel quantizes the same alone or stacked."""
    with torch.inference_mode(False), torch.no_grad():
        w = torch.cat([t.detach().float() for t in weights])
        w = torch.cat([w, w.new_zeros(w.shape[0], 2)], dim=1)  # the sentinel columns
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        qweight = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qweight, None)


class FusedInt8:
    """Several int8 linear layers that read the same input, as one fbgemm matmul (q, k and v; gate
    and up): `__call__(x)` returns each layer's output, bit for bit what the layer gives alone
    (integer accumulation is exact, and each output channel is scaled on its own), at the cost of
    one call instead of several. Holds its own int8 copy of their weights."""

    def __init__(self, layers: list[Int8Linear]):
        self.sizes = [m.out_features for m in layers]
        self.in_features = layers[0].in_features
        self._packed = _pack([m.weight for m in layers])
        self.bias = joined_bias(layers)
        self._inputs: dict[int, torch.Tensor] = {}

    @classmethod
    def of(cls, layers: list[Any]) -> FusedInt8 | None:
        """Fused layers, or None unless all are int8 layers over the same input width."""
        if not layers or any(type(m) is not Int8Linear for m in layers):
            return None
        if len({m.in_features for m in layers}) != 1:
            return None
        return cls(layers)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = Int8Linear.forward(self, x)  # type: ignore[arg-type]  # the same steps, this packed weight
        return list(out.split(self.sizes, dim=-1))


def dequantize(model: nn.Module) -> None:
    """Undo `quantize_int8`: plain fp32 linear layers again."""
    for module in model.modules():
        if type(module) is Int8Linear:
            del module._packed, module._inputs
            module.__class__ = nn.Linear
