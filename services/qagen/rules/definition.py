"""The `definition` strategy: "X is a Y." -> "What is X?", answered with the sentence."""

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
_PARTICIPLE = re.compile(
    r"(?:\w+(?:ed|en|ly)|sold|built|made|held|kept|found|run|shown|done|set|put|cut|led|paid|laid|sent|spent"
    r"|told|brought|bought|caught|taught|thought|won|lost|left|met|born|worn|drawn|grown|thrown|known|not"
    r"|also|still|now|often|always|never|usually|generally)\b"
)
_DEFINITION_OBJECT = re.compile(r"(?:an?|the|one|any|also\s+an?|also\s+the)\s", re.I)


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
        if verb in ("is", "was") and not _DEFINITION_OBJECT.match(rest):
            continue  # "The lamp is bright" describes, it does not define
        if verb in ("are", "were") and not _DEFINITION_OBJECT.match(rest):
            if not rest[:1].islower() or _PARTICIPLE.match(rest):
                continue  # "Tickets are sold on board" is not a definition of tickets
            if " " not in subj:
                subj = subj[:1].lower() + subj[1:]  # "Keepers are ..." -> "What are keepers?"
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
