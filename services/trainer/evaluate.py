"""Proof an adapter learned: greedy answers of base and adapter on held-out QA pairs, scored by
answer token-F1 and exact match after SQuAD-style normalisation (lower case, no punctuation, no
articles, single spaces).

Also a small held-out split by source chunk, used when qagen's own `split_pairs` is not there:
pairs from one chunk share their facts, so holding out whole chunks keeps a question's answer out
of the training data rather than merely its wording.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _overlap(prediction: str, reference: str) -> tuple[int, int, int]:
    """(tokens shared as multisets, prediction tokens, reference tokens) of the normalised answers."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    return sum((Counter(pred) & Counter(ref)).values()), len(pred), len(ref)


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall between the normalised answers."""
    common, n_pred, n_ref = _overlap(prediction, reference)
    if not n_pred or not n_ref:
        return float(n_pred == n_ref)
    if common == 0:
        return 0.0
    precision, recall = common / n_pred, common / n_ref
    return 2 * precision * recall / (precision + recall)


def token_recall(prediction: str, reference: str) -> float:
    """The share of the reference's normalised tokens (a multiset) that the prediction holds: high
    for a long answer that quotes the reference, which token-F1 scores low for its length."""
    common, _, n_ref = _overlap(prediction, reference)
    return common / n_ref if n_ref else 1.0


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def score(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """Mean token-F1 and exact match over paired predictions and references."""
    if not references:
        return float("nan"), float("nan")
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)
    em = sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)
    return f1, em


def _prompt(tokenizer: Any, question: str, system_prompt: str | None, prime: str = "") -> str:
    """The chat template's prompt for `question`, ending with the start of the reply `prime` when
    given (the evidence chat quotes first, services/common/evidence.py), as chat prompts it."""
    from services.common.model import chat_prompt

    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": question})
    if prime:
        msgs.append({"role": "assistant", "content": prime})
    return chat_prompt(tokenizer, msgs)


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    system_prompt: str | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    should_stop: Callable[[], bool] | None = None,
    by_length: bool = True,
    primes: Sequence[str] | None = None,
) -> list[str]:
    """Greedy answers to `questions`, prompted with the chat template exactly as in training.
    `primes`, when given, are the starts of the replies (one per question, "" for none): the model
    goes on from each, and the answer is the prime with the model's words after it.

    Prompts are batched by length (shortest first; `by_length=False`: in the order given, for
    comparison in bench/bench_exam.py), so a batch pads little: exam prompts with
    passages run from ~100 to ~1,300 tokens, and one long prompt in a batch of short ones made the
    whole batch pay for its length. Batches are left-padded; the answers come back in the order of
    `questions`. `should_stop` is polled between batches and True ends early with the answers of
    the longest leading run of questions answered so far (the caller decides what a partial
    evaluation means).
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos
    )
    primes = list(primes) if primes is not None else [""] * len(questions)
    prompts = [_prompt(tokenizer, q, system_prompt, pr) for q, pr in zip(questions, primes, strict=True)]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i) if by_length else i)
    answers: dict[int, str] = {}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            if should_stop is not None and should_stop():
                break
            batch = order[start : start + batch_size]
            enc = tokenizer(
                [prompts[i] for i in batch], add_special_tokens=False, padding=True, return_tensors="pt"
            ).to(device)
            out = model.generate(**enc, generation_config=gen)
            new = out[:, enc["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, text in zip(batch, decoded, strict=True):
                answers[i] = (primes[i] + text).strip()
    finally:
        tokenizer.padding_side = side
    done = next((i for i in range(len(prompts)) if i not in answers), len(prompts))
    return [answers[i] for i in range(done)]


def evaluate_adapter(
    peft_model: Any,
    tokenizer: Any,
    pairs: Sequence[Mapping[str, Any]],
    *,
    system_prompt: str | None = None,
    max_pairs: int = 32,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    samples: int = 5,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Score the adapter and, with it disabled, the base model on the first `max_pairs` pairs.

    Returns eval_count, eval_base_f1, eval_adapter_f1, eval_base_em, eval_adapter_em, a few
    eval_samples (question, reference, base, adapter) for people to read, and eval_answers: the
    same for every pair answered, with pair_id.
    """
    usable = [p for p in pairs if str(p.get("question") or "").strip() and str(p.get("answer") or "").strip()]
    usable = usable[:max_pairs]
    questions = [str(p["question"]).strip() for p in usable]
    references = [str(p["answer"]).strip() for p in usable]
    kwargs = dict(
        primes=[str(p.get("prime") or "") for p in usable],
        system_prompt=system_prompt,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        should_stop=should_stop,
    )
    was_training = peft_model.training
    peft_model.eval()
    try:
        adapter = generate_answers(peft_model, tokenizer, questions, **kwargs)
        with peft_model.disable_adapter():
            base = generate_answers(peft_model, tokenizer, questions, **kwargs)
    finally:
        peft_model.train(was_training)
    n = min(len(adapter), len(base))
    answers = [
        {"pair_id": str(p.get("pair_id") or ""), "question": q, "reference": r, "base": b, "adapter": a}
        for p, q, r, b, a in zip(usable, questions, references, base, adapter, strict=False)
    ]
    base_f1, base_em = score(base[:n], references[:n])
    adapter_f1, adapter_em = score(adapter[:n], references[:n])
    return {
        "eval_count": n,
        "eval_base_f1": base_f1,
        "eval_adapter_f1": adapter_f1,
        "eval_base_em": base_em,
        "eval_adapter_em": adapter_em,
        "eval_samples": [{k: v for k, v in a.items() if k != "pair_id"} for a in answers[:samples]],
        "eval_answers": answers,
    }


def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_by_chunk(
    pairs: Sequence[Mapping[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Hold out whole source chunks, about `eval_fraction` of the pairs, chosen by a seeded hash.

    Deterministic for a seed and independent of the pairs' order. Pairs without a chunk_id count
    as their own chunk (keyed by pair_id, else question). At least one chunk stays for training;
    nothing is held out when there is only one chunk or the fraction is 0.
    """

    def chunk_of(p: Mapping[str, Any]) -> str:
        return str(p.get("chunk_id") or p.get("pair_id") or p.get("question") or "")

    by_chunk: dict[str, list[Mapping[str, Any]]] = {}
    for p in pairs:
        by_chunk.setdefault(chunk_of(p), []).append(p)
    if eval_fraction <= 0 or len(by_chunk) < 2:
        return list(pairs), []
    target = eval_fraction * len(pairs)
    held: set[str] = set()
    count = 0
    for chunk in sorted(by_chunk, key=lambda c: _rank(c, seed)):
        if count >= target or len(held) == len(by_chunk) - 1:
            break
        held.add(chunk)
        count += len(by_chunk[chunk])
    train = [p for p in pairs if chunk_of(p) not in held]
    held_out = [p for p in pairs if chunk_of(p) in held]
    return train, held_out
