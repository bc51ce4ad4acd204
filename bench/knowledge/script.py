"""The plain-script baseline: what a person gets from a few lines of Python and no doclora.

The document's extracted text is cut into 120-word chunks, the question's top 3 chunks by BM25
(written here on purpose: doclora's own retrieval is one of the things being compared) go into a
prompt "Passages: [1] ... [2] ... [3] ...  Question: ..." in the chat template, and the base model
answers greedily, in this process.
"""

from __future__ import annotations

import math
import re
from collections import Counter

CHUNK_WORDS = 120
TOP_K = 3


def chunks(text: str, words: int = CHUNK_WORDS) -> list[str]:
    w = text.split()
    return [" ".join(w[i : i + words]) for i in range(0, len(w), words)]


def terms(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 (k1 = 1.5, b = 0.75) over a list of passages."""

    def __init__(self, passages: list[str], k1: float = 1.5, b: float = 0.75):
        self.passages = passages
        self.docs = [Counter(terms(p)) for p in passages]
        self.lens = [sum(d.values()) for d in self.docs]
        self.avg = sum(self.lens) / max(1, len(self.lens))
        df = Counter(t for d in self.docs for t in d)
        n = len(passages)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.k1, self.b = k1, b

    def score(self, query: list[str], i: int) -> float:
        d, norm = self.docs[i], self.k1 * (1 - self.b + self.b * self.lens[i] / (self.avg or 1))
        return sum(self.idf.get(t, 0.0) * d[t] * (self.k1 + 1) / (d[t] + norm) for t in query if t in d)

    def top(self, query: str, k: int = TOP_K) -> list[str]:
        q = terms(query)
        ranked = sorted(range(len(self.passages)), key=lambda i: -self.score(q, i))
        return [self.passages[i] for i in ranked[:k]]


def prompt(question: str, passages: list[str]) -> str:
    numbered = " ".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
    return f"Passages: {numbered}\n\nQuestion: {question}"


class Baseline:
    """The base model loaded once in this process (as the services load it), answering greedily."""

    def __init__(self):
        from services.common.config import Settings
        from services.common.model import load_base_model

        self.model, self.tok = load_base_model(Settings.from_env())

    def answer(self, question: str, passages: list[str], max_tokens: int) -> str:
        return self.reply([{"role": "user", "content": prompt(question, passages)}], max_tokens)

    def reply(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        """The greedy reply to a chat; a chat ending with the assistant's words is continued from
        them, and the reply includes them."""
        import torch

        from services.common.model import chat_prompt

        primed = messages[-1]["role"] == "assistant"
        text = chat_prompt(self.tok, messages)
        enc = self.tok(text, add_special_tokens=False, return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, do_sample=False, max_new_tokens=max_tokens)
        said = self.tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        return (messages[-1]["content"] if primed else "") + said
