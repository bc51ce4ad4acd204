"""The `definition` strategy: "X is a Y." -> "What is X?", answered with the sentence.

Only a sentence that says what X is makes a definition: "X is a/an/the <kind> ...", "X means ...",
"X refers to ...". One that gives a property or a rule of X ("Garden waste collections are
optional", "Appeals are heard by the Appeals Panel"), a judgement ("Batching is the obvious
remedy") or has an activity or a bit of document furniture as its subject ("Moving away from the
parishes is ...", "The intervals below are ...") defines nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator

from services.qagen.rules.base import Candidate
from services.qagen.text import (
    CLAUSE_START,
    PERSON_NOUNS,
    PRONOUNS,
    Sentence,
    fits,
    lower_first,
    wh_for,
)

_SUBJECT = r"(?P<subj>(?:(?:The|An?)\s+)?[A-Z][\w'’-]*(?:\s+[\w'’-]+){0,5}?)"
_DEFINITION = re.compile(_SUBJECT + r"\s+(?P<verb>is|are|was|were|refers\s+to|means)\s+(?P<rest>\S.*)$", re.S)
# "X is a/an/the ...": the object a definition names (X is one of a kind, or the one thing)
_DEFINITION_OBJECT = re.compile(r"(?:an?|the|one|any|also\s+an?|also\s+the)\s", re.I)
# "... is the obvious remedy / the one case / the same as": a judgement or comparison, not a kind
_EVALUATION = re.compile(
    r"(?:also\s+)?(?:the|an?)\s+(?:one|only|obvious|main|best|worst|first|last|same|minimum|maximum|most|least"
    r"|usual|default|biggest|largest|smallest|key|real|simplest|easiest|hardest)\b",
    re.I,
)


_QUANTIFIERS = frozenset("All Each Every Most Some Both Many Few Several No Other".split())
_ORDINAL_WORDS = frozenset("first second third fourth last former latter".split())


def definitions(sentences: list[Sentence]) -> Iterator[Candidate]:
    """Definitions: "X is a Y." -> "What is X?", answered with the sentence."""
    for s in sentences:
        m = _DEFINITION.match(s.text)
        if not m or not fits(s):
            continue
        subj, verb, rest = m.group("subj"), re.sub(r"\s+", " ", m.group("verb")), m.group("rest")
        if "," in subj or subj.split()[0].lower() in PRONOUNS or subj.split()[0] in CLAUSE_START:
            continue
        if any(w in ("that", "which", "who", "whose") for w in subj.split()):
            continue  # "Textiles that are wet ...": a relative clause, not the defined term
        if subj.split()[0] in _QUANTIFIERS or subj.split()[-1].lower() in _ORDINAL_WORDS:
            continue  # "All 48 gateways were identical", "The first is ...": nothing is defined
        if re.fullmatch(r"[A-Z][a-z]+(?:\s+[a-z][\w-]*)+", subj):
            subj = subj[0].lower() + subj[1:]  # "Garden waste collections": capital only as the opener
        if verb in ("is", "was", "are", "were") and not _DEFINITION_OBJECT.match(rest):
            # "The lamp is bright", "Event loans are free of charge", "Appeals are heard by the
            # Panel": a property or a rule of X, not what X is
            continue
        if _EVALUATION.match(rest):
            continue  # "Batching is the obvious remedy", "Moving away is the one case in which ..."
        if re.match(r"[A-Z][a-z]+ing\s+\S", subj) or re.search(r"\s(?:below|above)$", subj):
            continue  # "Moving away from the parishes" is an activity; "the intervals below" furniture
        if verb in ("are", "were") and " " not in subj:
            subj = subj[:1].lower() + subj[1:]  # "Keepers are people ..." -> "What are keepers?"
        topic = lower_first(subj)
        if verb == "refers to":
            question = f"What does {topic} refer to?"
        elif verb == "means":
            question = f"What does {topic} mean?"
        else:
            # "Who" only when the sentence says the subject is a person ("a botanist", "a person who")
            person = any(w in PERSON_NOUNS for w in rest.lower().split()[:3])
            question = f"{'Who' if person and wh_for(subj) == 'Who' else 'What'} {verb} {topic}?"
        yield Candidate(question, s.start, s.end, "definition")
