"""The `paraphrase` strategy: rule-based rewordings of the other strategies' questions."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

from services.common.qapair import QAPair, pair_id_for
from services.qagen.rules.facts import sentence_facts

PARAPHRASES = 2


_MEASURES = {
    "tall": "height", "high": "height", "long": "length", "wide": "width", "deep": "depth",
    "old": "age", "heavy": "weight", "thick": "thickness", "far": "distance",
}  # fmt: skip
_HAS = {"does": "has", "do": "have", "did": "had"}
_YEAR = re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})\b")

_DEFINES = frozenset({"definition", "entity"})
# (pattern on the question, rewordings, the rules it applies to or None for all); the first pattern
# that matches gives the rewordings
_PARAPHRASE_RULES: list[tuple[re.Pattern[str], tuple[str, ...], frozenset[str] | None]] = [
    (re.compile(p), t, *(rest or (None,)))
    for p, t, *rest in [
        (r"^What is the title of (?P<x>.+)\?$", ("What is {x} called?", "What title does {x} have?")),
        (r"^Who wrote (?P<x>.+)\?$", ("Who is the author of {x}?", "Who are the authors of {x}?")),
        (r"^When was (?P<x>.+) (?P<v>published|last updated)\?$", ("On what date was {x} {v}?", "Do you know when {x} was {v}?")),
        (r"^Can you summarize (?P<x>.+) in one sentence\?$", ("What is {x} about, in a single sentence?", "Can you sum up {x} in one sentence?")),
        (r"^Can you give a short summary of (?P<x>.+)\?$", ("Can you briefly summarize {x}?", "What is a short summary of {x}?")),
        (r"^Can you give a detailed summary of (?P<x>.+)\?$", ("Can you summarize {x} in detail?", "What is a detailed summary of {x}?")),
        (r"^Can you summarize the whole document, section by section\?$", ("What does each part of the document cover?", "Can you give an overview of the entire document?")),
        (r"^Can you summarize the section on (?P<x>.+)\?$", ("What is the section on {x} about?", "What are the main points of the section on {x}?")),
        (r"^What does the (?:document|text) say about (?P<x>.+)\?$", ("What can you tell me about {x}?", "What should I know about {x}?")),
        (r"^What is known about (?P<x>.+)\?$", ("What can you tell me about {x}?", "What should I know about {x}?")),
        (r"^How many (?P<n>.+?) (?P<d>does|do|did) (?P<x>.+) have\?$", ("What is the number of {n} that {x} {has}?", "{X} {has} how many {n}?")),
        (r"^How (?P<a>tall|high|long|wide|deep|old|heavy|far|thick) (?P<v>is|are|was|were) (?P<x>.+)\?$", ("What {v1} the {m} of {x}?", "Do you know how {a} {x} {v}?")),
        (r"^When (?P<v>was|were|did) (?P<x>.+)\?$", ("In which year {v} {x}?", "What year {v} {x}?")),
        (r"^What happened (?P<x>(?:in|on|during|since|by|until|from|around) .+)\?$", ("What took place {x}?", "What went on {x}?")),
        (r"^Where (?P<v>is|are|was|were|did) (?P<x>.+)\?$", ("In what place {v} {x}?", "At what location {v} {x}?")),
        (r"^Why (?P<x>.+)\?$", ("For what reason {x}?",)),
        (r"^How (?P<v>was|were|did|is|are) (?P<x>.+)\?$", ("In what way {v} {x}?", "By what means {v} {x}?")),
        (r"^Who (?P<v>is|was) (?P<x>[A-Z][^?]*)\?$", ("Can you tell me who {x} {v}?", "What do you know about {x}?"), _DEFINES),
        (r"^Who (?P<x>.+)\?$", ("Which person {x}?", "Do you know who {x}?"), frozenset({"who"})),
        (r"^What does (?P<x>.+) (?:mean|refer to)\?$", ("What is meant by {x}?", "Can you explain the term {x}?")),
        (r"^What (?P<v>is|are|was|were) (?P<x>.+)\?$", ("Can you explain what {x} {v}?", "What is meant by {x}?"), _DEFINES),
        (r"^What (?P<x>(?P<v>is|are|was|were|has|had|[a-z]+ed) .+)\?$", ("Do you know what {x}?",), frozenset({"what"})),
        (r"^What is (?P<x>.+) about\?$", ("What is the subject of {x}?", "What does {x} cover?")),
    ]
]  # fmt: skip


def paraphrases(question: str, answer: str = "", n: int = PARAPHRASES, strategy: str = "") -> list[str]:
    """Up to `n` rewordings of a question that ask for the same fact (rule-based, deterministic).

    A rule for the question's form comes first ("How tall is X?" -> "What is the height of X?");
    `strategy` (the rule that made the question) tells apart forms that look alike ("What is X?"
    asks for a definition, "What was automated in 1971?" for a subject). A question the fact rules
    made from its answer gets that fact's own rewordings (another question word, other word order)
    instead. No generic framings ("According to the document, ..."): they reword the template, not
    the fact, so a question no rule fits gets none.
    """
    out: list[str] = [v for f in sentence_facts(answer.strip()) if f.question == question for v in f.variants]
    seen = {question.lower()}
    for pattern, templates, only in [] if out else _PARAPHRASE_RULES:
        m = pattern.match(question) if only is None or strategy in only else None
        if not m:
            continue
        g = dict(m.groupdict())
        x = g.get("x", "")
        g["X"] = x[:1].upper() + x[1:]
        if "d" in g:
            g["has"] = _HAS[g["d"]]
        if "v" in g and "x" in g and "it" not in g:
            g["it"] = "is it" if g["v"] in ("is", "are", "has") else "was it"
        if "a" in g:
            g["m"] = _MEASURES[g["a"]]
            g["v1"] = "is" if g["v"] in ("is", "are") else "was"
        for t in templates:
            if "year" in t and not _YEAR.search(answer):
                t = t.replace("In which year", "On what date").replace("What year", "At what time")
            out.append(t.format(**g))
        break
    result = []
    for q in out:
        q = re.sub(r"\s+", " ", q).strip()
        if q.lower() not in seen:
            seen.add(q.lower())
            result.append(q)
        if len(result) == n:
            break
    return result


def paraphrase_pairs(pairs: Iterable[QAPair], n: int = PARAPHRASES) -> list[QAPair]:
    """`n` rewordings of each pair's question, with its answer and source; `variant_of` names the
    original. Vague questions are already rewordings of one another and get none."""
    out = []
    for p in pairs:
        if p.strategy in ("vague", "paraphrase"):
            continue
        for q in paraphrases(p.question, p.answer, n, p.strategy):
            out.append(
                replace(
                    p,
                    pair_id=pair_id_for(p.chunk_id, q, p.answer),
                    question=q,
                    strategy="paraphrase",
                    variant_of=p.pair_id,
                    score=0.0,
                )
            )
    return out
