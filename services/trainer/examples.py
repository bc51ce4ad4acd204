"""Training examples: QA pairs -> chat-formatted token ids with labels on the answer only, and the
order the loop takes them in (`step_batches`, a fresh shuffle every epoch from the seed).

The prompt is tokenized exactly as inference will tokenize it (see evaluate.py and the inference
service), so the adapter learns to answer the prompt it will be given.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument
from services.trainer.packing import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One tokenized QA exchange; `labels` is IGNORE_INDEX outside the answer."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def label_count(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _messages(question: str, answer: str | None, system_prompt: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": question})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def _encode(tokenizer: Any, text: str) -> list[int]:
    # the chat template already writes every special token it wants: add none of our own
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_examples(
    tokenizer: Any,
    pairs: Iterable[Mapping[str, Any]],
    system_prompt: str | None = None,
    max_seq_len: int = 512,
) -> list[Example]:
    """Format each {"question", "answer"} pair with the tokenizer's chat template.

    The prompt (system + user turn + assistant header) is tokenized on its own, exactly as
    inference will tokenize it, then the answer and the end-of-turn token follow; only those carry
    labels. Whatever the template writes after the end-of-turn token (a newline) is context only.
    Pairs with an empty side, or whose prompt alone fills `max_seq_len`, are skipped; an example
    longer than `max_seq_len` loses the end of its answer.
    """
    eos = tokenizer.eos_token
    examples: list[Example] = []
    skipped = 0
    for pair in pairs:
        question = str(pair.get("question") or "").strip()
        answer = str(pair.get("answer") or "").strip()
        if not question or not answer:
            skipped += 1
            continue
        prompt = tokenizer.apply_chat_template(
            _messages(question, None, system_prompt), tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(_messages(question, answer, system_prompt), tokenize=False)
        if not full.startswith(prompt):
            raise InvalidArgument("the chat template does not render a conversation as prompt + answer")
        completion = full[len(prompt) :]
        cut = completion.find(eos) if eos else -1
        if cut >= 0:
            cut += len(eos)
        else:  # templates without an end-of-turn token: learn the answer and stop there
            cut = len(completion.rstrip())
        prompt_ids = _encode(tokenizer, prompt)
        answer_ids = _encode(tokenizer, completion[:cut])
        tail_ids = _encode(tokenizer, completion[cut:]) if completion[cut:] else []
        input_ids = prompt_ids + answer_ids + tail_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [IGNORE_INDEX] * len(tail_ids)
        truncated = len(input_ids) > max_seq_len
        if truncated:
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        example = Example(input_ids, labels, truncated)
        # a label at position 0 has nothing before it to be predicted from
        if sum(1 for x in labels[1:] if x != IGNORE_INDEX) == 0:
            skipped += 1
            continue
        examples.append(example)
    if skipped:
        log.warning("skipped %d QA pairs (empty, or prompt longer than %d tokens)", skipped, max_seq_len)
    return examples


def step_batches(n_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Example indices of each step, forever: every epoch a fresh shuffle drawn from `seed`.

    A pure function of its arguments, so a resumed run gets its next batches by skipping the ones
    already done.
    """
    rng = random.Random(seed)
    while True:
        order = list(range(n_examples))
        rng.shuffle(order)
        for start in range(0, n_examples, batch_size):
            yield order[start : start + batch_size]
