"""Evidence first: a reply that reads passages starts by quoting the sentence of them that answers
the question, and the model goes on from there.

Why: the default 135M reader, given three whole passages (~1,000 tokens), writes the key fact in
about a third of its answers while the fact is in its prompt nine times in ten; it invents numbers
and names near the right ones ("5 cm" for "50 cm"). Finding the answering sentence is easier for a
sentence-embedding model than for the reader: all-MiniLM-L6-v2's closest sentence of the top three
passages holds the key fact for 57% of the harness's tune questions, its two closest 75%
(bench/knowledge/RESULTS.md).
Quoting it first (as RAFT's answers quote before they answer) puts the fact in the reply in the
document's own words, cited `[n]`. The gain is the quote's: on those questions the model's own words
after it carry the key fact no more often than without it (bench/knowledge/RESULTS.md), so a reader
should take the quote as the answer and the rest as the model's commentary.

`pick` chooses the sentences (embeddings when the bot has the model, BM25 over sentences without
it); `opening` writes the start of the reply. A question no sentence is close to (a greeting, a
question the documents don't cover) gets no quote.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from services.common.passages import BM25, Hit, Passage, words
from services.common.sentences import split_sentences

# cosine similarity (all-MiniLM-L6-v2) a sentence needs to be quoted: unrelated sentences score
# about -0.1 to 0.2, close paraphrases 0.4 and up (the same bound as retrieval's, retrieve.Hybrid)
MIN_SIMILARITY = 0.3
# a question that asks for a quantity, a price, a time or a date ("How much ...", "What does it cost",
# "When ...", "until when", "What percentage ...")
WANTS_NUMBER = re.compile(
    r"\b(?:how\s+(?:many|much|long|big|heavy|often|far|old|tall|deep|wide|thick|high|low|late|early|fast"
    r"|quickly|soon|strong|accurate)|what\s+(?:percentage|proportion|share|number|time|date|day|year|month"
    r"|price|temperature|size|weight)|costs?|when|until|latest|earliest|per\s+cent|percent)\b",
    re.I,
)
# added to the similarity of a sentence with a digit in it when the question asks for a figure: the
# sentence closest in meaning often restates the question ("What's the latest time I can put my bins
# out on collection day?" -> "Your collection day depends on your zone.") while a near one holds the
# figure ("Put your containers out by 06:30 on collection day, ..."). The two quoted sentences hold
# the key fact for 78 -> 81 of 104 tune questions, none lost (bench/knowledge/RESULTS.md)
NUMBER_BONUS = 0.05
_DIGIT = re.compile(r"\d")
# a sentence is not quoted twice in other words: see `_repeats`
REPEAT_SHARE = 0.8
# words of one quoted sentence at most: a table or a list without full stops is one "sentence"
MAX_WORDS = 80


def sentences(hits: Sequence[Hit]) -> list[tuple[int, str]]:
    """(passage number from 1, sentence with its spaces collapsed) of every sentence of `hits`."""
    out = []
    for n, hit in enumerate(hits, 1):
        text = hit.passage.text
        for start, end in split_sentences(text):
            spaced = text[start:end].split()
            if len(spaced) >= 3:  # a heading or a lone number is not evidence
                out.append((n, " ".join(spaced[:MAX_WORDS]) + (" …" if len(spaced) > MAX_WORDS else "")))
    return out


def pick(
    question: str,
    hits: Sequence[Hit],
    embedder: Any | None,
    n: int = 1,
    known: dict[str, Any] | None = None,
) -> list[tuple[int, str]]:
    """The `n` sentences of `hits` that best answer `question`, best first, with their passage
    numbers: by meaning with `embedder` (at least MIN_SIMILARITY; a sentence with a figure goes up by
    NUMBER_BONUS when the question asks for one), else by BM25. `known` {sentence:
    vector}, when given, keeps the sentences' vectors between calls (the passage index holds it):
    only sentences not in it are embedded, and added."""
    found = sentences(hits)
    if not found or n <= 0:
        return []
    if embedder is not None:
        vectors = _vectors([text for _, text in found], embedder, {} if known is None else known)
        sims = (vectors @ embedder.encode([question])[0]).tolist()
        bonus = NUMBER_BONUS if WANTS_NUMBER.search(question) else 0.0
        score = [
            s + (bonus if _DIGIT.search(text) else 0.0) for s, (_, text) in zip(sims, found, strict=True)
        ]
        order = sorted((i for i, s in enumerate(sims) if s >= MIN_SIMILARITY), key=lambda i: -score[i])
    else:
        order = BM25([Passage("", "", "", 0, 0, 0, text) for _, text in found]).ranked(question)
    picked: list[tuple[int, str]] = []
    for i in order:
        if not any(_repeats(found[i][1], text) for _, text in picked):
            picked.append(found[i])
            if len(picked) == n:
                break
    return picked


def _repeats(a: str, b: str) -> bool:
    """Whether one sentence says again what the other says: a figure's caption printed twice
    ("Figure 3: Battery state of charge ..." and "Battery state of charge ..."), by REPEAT_SHARE
    of the shorter one's words being in the other."""
    wa, wb = set(words(a)), set(words(b))
    return bool(wa and wb) and len(wa & wb) >= REPEAT_SHARE * min(len(wa), len(wb))


def _vectors(texts: list[str], embedder: Any, known: dict[str, Any]) -> Any:
    """The embeddings of `texts`, one row each, those not in `known` computed (once) and added."""
    import torch

    missing = [t for t in dict.fromkeys(texts) if t not in known]
    if missing:
        known.update(zip(missing, embedder.encode(missing), strict=True))
    return torch.stack([known[t] for t in texts])


def opening(picked: Sequence[tuple[int, str]], cite: bool = True) -> str:
    """The start of the reply that quotes `picked` ("" for nothing picked); the model goes on after
    it. Each sentence is cited `[n]` unless `cite` is False (a share link whose owner hides the
    citations: the markers would point at nothing the reader sees)."""
    if not picked:
        return ""
    quoted = (f'"{text}" [{n}]' if cite else f'"{text}"' for n, text in picked)
    return "The document says: " + " ".join(quoted) + "\n\n"
