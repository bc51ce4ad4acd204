"""fp32 weights laid out for oneDNN's matmul, for the lean step of fastpath.py on a CPU.

A decode step multiplies a few rows of activations by every weight matrix of the model, and on a
CPU the time goes into reading the weights. torch's default fp32 path (MKL's sgemm on a weight
stored [out, in]) reads them at about half the machine's bandwidth for one row and gets *slower per
row* as rows are added: on a 2-core AVX2 EPYC the matrices of SmolLM2-135M took 42 ms for one row
and 62 ms for 8; oneDNN's matmul on weights reordered once into its blocked layout took 32 ms and
38 ms: the same bytes read at a better rate, and the rows of a batch ride along almost free
(bench/bench_inference.py prints what the whole step gains).

Weights are packed for `PACK_ROWS` rows. The layout chosen for that row count serves every row count
with the same kernel, so a row's output does not depend on how many rows share the matmul
(`rows_independent` probes it; tests/test_inference_batching.py checks whole logits bit for bit
where it holds); a pack for 1 row would pick a different kernel for one row than for two.

The packed copies are extra memory (the model's own weights stay, for prefill of layouts the lean
step doesn't cover, PEFT's per-adapter path and `close`): about the fp32 size of the model's linear
layers and head.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

# rows the layout is chosen for (see the docstring): past the batch sizes a decode step sees, and
# prefill chunks of hundreds of rows run on it as fast as on MKL
PACK_ROWS = 64


@functools.cache
def available() -> bool:
    """Whether this torch has oneDNN's packed linear (x86 builds do) and it works here."""
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(8, 4)
        out = _linear(torch.ones(2, 4), torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS), None)
        return bool(torch.equal(out, torch.full((2, 8), 4.0)))
    except (AttributeError, RuntimeError, TypeError):
        return False


@functools.cache
def rows_independent() -> bool:
    """Whether a row's output here is the same bit for bit alone and among other rows (true of the
    kernel oneDNN picks for a PACK_ROWS layout on the x86 CPUs tried; probed, not assumed)."""
    if not available():
        return False
    gen = torch.Generator().manual_seed(0)
    for out_features, in_features in ((128, 64), (384, 320), (2048, 64), (576, 1536)):
        weight = torch.randn(out_features, in_features, generator=gen)
        weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        x = torch.randn(PACK_ROWS + 3, in_features, generator=gen)
        alone = _linear(x[:1], weight, None)
        if not all(
            torch.equal(_linear(x[:rows], weight, None)[:1], alone) for rows in (2, 3, 8, PACK_ROWS + 3)
        ):
            return False
    return True


class PackedLinear:
    """`F.linear(x, cat(weights), cat(biases))` for fp32 CPU tensors, with the weight in oneDNN's
    layout: several linear layers that read the same input become one matmul."""

    def __init__(self, layers: Sequence[torch.nn.Linear]):
        weight = (
            torch.cat([m.weight.detach() for m in layers]) if len(layers) > 1 else layers[0].weight.detach()
        )
        self.bias = joined_bias(layers)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)
        self.sizes = [m.out_features for m in layers]
        self.in_features = layers[0].in_features
        self.nbytes = weight.numel() * weight.element_size()

    @classmethod
    def of(cls, layers: Sequence[object]) -> PackedLinear | None:
        """The packed matmul of these layers, or None unless they are plain fp32 CPU linears of one input."""
        if not layers or not available():
            return None
        for m in layers:
            if (
                type(m) is not torch.nn.Linear
                or m.weight.dtype != torch.float32
                or m.weight.device.type != "cpu"
                or m.in_features != layers[0].in_features
            ):
                return None
        return cls(layers)  # type: ignore[arg-type]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., sum of outs]."""
        lead = x.shape[:-1]
        out = _linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return out.view(*lead, out.shape[-1])


def joined_bias(layers: Sequence[Any]) -> torch.Tensor | None:
    """The biases of linear layers fused into one matmul, side by side (zeros for a layer without
    one); None when none has a bias."""
    biases = [m.bias for m in layers]
    first = next((b for b in biases if b is not None), None)
    if first is None:
        return None
    return torch.cat(
        [
            b.detach() if b is not None else first.new_zeros(m.out_features)
            for m, b in zip(layers, biases, strict=True)
        ]
    )


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not x.is_contiguous():
        x = x.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
