"""The `wh` strategy: who/what/when/where/why/how questions about the sentences that state a fact,
plus the step, agent and condition questions of `facts`."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

from services.common.qapair import QAPair
from services.qagen.chunk import Chunk
from services.qagen.rules.base import MAX_PER_RULE, pair_for
from services.qagen.rules.clause import (
    Clause,
    intro_tail,
    parse_clause,
    shorten,
    subject_phrase,
)
from services.qagen.rules.facts import sentence_facts
from services.qagen.rules.verbs import lemma, past_verb
from services.qagen.text import (
    DATE,
    DATE_PASSIVE,
    DATE_RE,
    MONTHS,
    NUMBER,
    PARTICIPLE,
    Sentence,
    fits,
    named_in,
    names_in,
    prose_sentences,
)

_DATE_PHRASE = re.compile(
    rf",?\s*\b(?:from|between)\s+{DATE_RE}\s+(?:to|and|until)\s+{DATE_RE}(?![\w-])"
    rf"|,?\s*\b(?:in|on|during|by|around|since|from|until)\s+{DATE_RE}(?![\w-])|,?\s*\b{DATE_RE}(?![\w-])"
)
_PLACE = re.compile(
    r"\b(?P<prep>in|at|on|near|outside|inside|beside|across)\s+(?:the\s+)?(?:[a-z][\w-]*\s+){0,3}?"
    r"(?:of\s+)?(?P<place>[A-Z][\w'’-]+(?:\s+(?:of\s+)?[A-Z][\w'’-]+)*)"
)
_LOCATIVE_PARTICIPLES = frozenset(
    "located situated based built born held founded buried found kept housed placed set stored".split()
)
_WHY = re.compile(r"\s(?:because|due to|owing to|so that|in order to|as a result of|thanks to)\s")
_HOW = re.compile(r"\s(?:by\s+(?:means\s+of\s+|[a-z]+ing\b)|using\s|with\s+the\s+help\s+of\s)")
_NOT_PLACES = frozenset(MONTHS.split("|")) | frozenset(
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday The This That".split()
)


# a second verb the inversion would leave unchanged ("did removing X save energy but raised the
# latency"), or the main verb after a comma, which shows the first was a participle ("Bags left
# next to a full bin, known as side waste, are not collected": the bags did not leave)
_COMPOUND_OR_REDUCED = re.compile(
    r"\b(?:but|and)\s+(?!(?:the|a|an)\b)[a-z]+ed\b|,\s+(?:is|are|was|were|has|have)\s+(?:not\s+)?[a-z]+\b"
)


def _inverted(clause: Clause, wh: str, rest: str) -> str | None:
    """ "Why was X closed", "When did X install Y": the subject after an auxiliary or "did"."""
    subject = subject_phrase(clause.subject)
    rest = rest.strip()
    if not clause.aux and _COMPOUND_OR_REDUCED.search(f"{rest} {clause.rest}"):
        return None
    if clause.aux:
        return f"{wh} {clause.verb.lower()} {subject}{' ' + rest if rest else ''}?"
    if clause.verb.lower() in ("has", "have", "had"):
        return f"{wh} did {subject} have{' ' + rest if rest else ''}?"
    if past_verb(clause.verb):
        return f"{wh} did {subject} {lemma(clause.verb)}{' ' + rest if rest else ''}?"
    return None


def wh_questions(sentences: list[Sentence]) -> Iterator[tuple[str, Sentence, str]]:
    """Who/what/when/where/why/how questions about the sentences that state a fact: a name, a
    number, a date, a place, a cause or a means. Yields (question, sentence, rule)."""
    counts: Counter[str] = Counter()
    for s in sentences:
        if not fits(s) or (clause := parse_clause(s.text)) is None:
            continue
        found: list[tuple[str, str]] = []
        fact = bool(DATE.search(s.text) or NUMBER.search(s.text) or list(names_in(clause.rest)))
        rest = shorten(clause.rest)
        # who/what: the subject becomes the question word; a past tense needs no agreement
        if rest and (clause.aux or past_verb(clause.verb) or clause.verb.lower() in ("has", "had")):
            # "What is reviewed ...?": the question word is singular whatever the subject was
            verb = {"are": "is", "were": "was", "have": "has"}.get(clause.verb.lower(), clause.verb.lower())
            # "Who is a cliff top?", "What was 6.4 minutes?": a definition or a measure, asked elsewhere
            copula = verb in ("is", "was") and (
                rest.split()[0].lower() in ("a", "an", "the", "one")
                or rest[:1].isdigit()
                or clause.verb == "had"
            )
            # "What is free of charge?", "What is only a warning?": an adjective after "is" names
            # no action to ask about, and many things in a document are free (a passive, "What is
            # kept for 31 days?", does)
            adjectival = verb in ("is", "was") and (
                rest.split()[0].lower() == "only" or not PARTICIPLE.match(rest.split()[0].lower())
            )
            copula = copula or adjectival
            if clause.person and not copula:  # "Who is a cliff top?": a definition, asked as one
                found.append((f"Who {verb} {rest}{intro_tail(clause.intro)}?", "who"))
            elif fact and not copula and not named_in(clause.subject, rest):
                # not "What is heard by the Appeals Panel?": the question names its answer
                found.append((f"What {verb} {rest}{intro_tail(clause.intro)}?", "what"))
        # when: active sentences with a date (passive ones are the `date` rule's)
        if DATE.search(s.text) and not DATE_PASSIVE.match(s.text) and not clause.aux:
            undated = _DATE_PHRASE.sub("", clause.rest).strip(" ,")
            short = shorten(undated) if undated else ""
            if short is not None and (q := _inverted(clause, "When", short)):
                found.append((q, "when"))
        # where: a place named after the verb
        if (place := _PLACE.search(clause.rest)) and place.group("place").split()[0] not in _NOT_PLACES:
            before = clause.rest[: place.start()].strip(" ,")
            first = before.split()[0].lower() if before else ""
            if clause.aux and clause.verb.lower() in ("is", "are", "was", "were"):
                tail = first if first in _LOCATIVE_PARTICIPLES else ""
                if tail or not before or before.split()[0].lower() in ("a", "an", "the", "one"):
                    where = f"Where {clause.verb.lower()} {subject_phrase(clause.subject)}"
                    found.append((f"{where}{' ' + tail if tail else ''}?", "where"))
            elif (short := shorten(before) if before else "") is not None and (
                q := _inverted(clause, "Where", short)
            ):
                found.append((q, "where"))
        # why and how: the clause before "because" / "by doing"
        for pattern, wh in ((_WHY, "Why"), (_HOW, "How")):
            if m := pattern.search(" " + clause.rest + " "):
                before = clause.rest[: max(0, m.start() - 1)].strip(" ,")
                if ";" in before:
                    continue  # "X did A; Y did B, because ...": the cause is B's, not X's
                short = shorten(before) if before else ""
                if short is not None and (q := _inverted(clause, wh, short)):
                    found.append((q, wh.lower()))
        for question, rule in found:
            if counts[rule] < MAX_PER_RULE:
                counts[rule] += 1
                yield re.sub(r"\s+", " ", question), s, rule


def wh_pairs(chunk: Chunk, asked: set[str]) -> list[QAPair]:
    """The `wh` strategy's pairs for one chunk: the fact rules' step, agent and condition questions,
    then `wh_questions`; a question in `asked` (which grows) is not asked again."""
    pairs: list[QAPair] = []
    sentences = prose_sentences(chunk)
    facts = [(f.question, s, f.rule) for s in sentences for f in sentence_facts(s.text) if f.rule != "number"]
    for question, sentence, rule in [*facts, *wh_questions(sentences)]:
        if question not in asked:
            asked.add(question)
            pairs.append(pair_for(chunk, question, sentence.text, rule))
    return pairs
