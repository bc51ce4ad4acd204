"""The lean step (fastpath.py) against the model's own forward: the same logits bit for bit with int8
weights (fused projections), within `fastpath.LOGIT_TOLERANCE` with packed fp32 weights (packed.py),
adapters included; a row's logits don't depend on its batch; other layouts keep the model's forward."""

from __future__ import annotations

import pytest
import torch

from services.inference import kv, packed
from services.inference.fastpath import LOGIT_TOLERANCE, DecodeStep, logit_gap
from tests import test_engine as base
from tests.test_engine import CHAT, GREEDY

_one_torch_thread = base._one_torch_thread
tokenizer = base.tokenizer
adapter_dirs = base.adapter_dirs
reference = base.reference
make_engine = base.make_engine


@pytest.mark.parametrize("int8", [False, True])
def test_a_decode_step_gives_the_logits_of_the_models_own_forward(make_engine, tokenizer, int8):
    """Rows for adapters a, b and the base, one token each after different prompts: the lean step
    and the model's forward give identical logits."""
    engine, _ = make_engine(capacity=2, int8=int8)
    for adapter in ("a", "b"):
        list(engine.stream_chat(CHAT, adapter, GREEDY))
    cache = engine.adapters
    assert cache._mixed.step is not None
    # with int8 weights q/k/v and gate/up run fused (int8.FusedInt8), adapters' terms added after
    fused = cache._mixed.step.fused
    assert (
        (len(fused) == 2 and all(f[0] is not None and f[2] is not None for f in fused)) if int8 else not fused
    )
    names = sorted([cache._names["a"], "__base__", cache._names["b"]])
    prompts = [tokenizer(f"Question {i}: what is in chapter {i}?")["input_ids"] for i in range(3)]

    def step(fast: bool) -> torch.Tensor:
        rows = [kv.RequestKV(len(p) + 1) for p in prompts]
        cache.fast_decode = fast
        with torch.inference_mode():
            for row, prompt, name in zip(rows, prompts, names, strict=True):
                ids = torch.tensor([prompt])
                cache.run([name], ids, kv.BatchKV([row]), position_ids=torch.arange(len(prompt))[None],
                          logits_to_keep=1)  # fmt: skip
                row.advance(len(prompt))
            positions = torch.tensor([[len(p)] for p in prompts])
            return cache.run(names, torch.tensor([[7], [8], [9]]), kv.BatchKV(rows), position_ids=positions,
                             logits_to_keep=1)  # fmt: skip

    fast, own = step(True), step(False)
    assert fast.shape == own.shape and not torch.equal(fast[0], fast[1])
    if int8:
        assert torch.equal(fast, own)
    else:  # packed fp32 weights: other matmul kernels, within the documented tolerance
        assert cache._mixed.step.packed or not packed.available()
        assert logit_gap(fast, own) < LOGIT_TOLERANCE, logit_gap(fast, own)
        if packed.available():  # each adapter's LoRA terms went fused over q/k/v (a wraps q and v only)
            fused_for = engine.model.model.layers[0].self_attn.q_proj.base_layer._doclora_fused
            assert {cache._names["a"], cache._names["b"]} <= set(fused_for)


def test_other_layouts_keep_the_models_forward(tokenizer):
    """A Mistral (sliding windows) or a Llama whose layer was swapped gets no lean step."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    assert DecodeStep.of(mistral) is None
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    assert DecodeStep.of(llama) is not None
    llama.model.layers[0].mlp = torch.nn.Identity()
    assert DecodeStep.of(llama) is None
