"""The `quiz` strategy: dates, numbers and people asked in the sentence's own words, and a fallback
so that every chunk with real content yields at least one pair.

Headings and references are not asked about: "What does the document say about 5.2 Mounting
steps?" teaches a title. `generate_pairs` runs these rules together with `definition.definitions`
(a defined term gets no entity question of its own).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator

from services.common.qapair import QAPair
from services.qagen.chunk import Chunk
from services.qagen.rules.base import MAX_PER_RULE, Candidate, pair_for
from services.qagen.rules.definition import definitions
from services.qagen.rules.facts import number_facts
from services.qagen.text import (
    CLAUSE_START,
    DATE,
    DATE_PASSIVE,
    DATE_RE,
    MAX_ANSWER_CHARS,
    MIN_ANSWER_CHARS,
    NOT_NAME_START,
    NUMBER,
    PERSON_NOUNS,
    PRONOUNS,
    STOPWORDS,
    TITLE_WORDS,
    Sentence,
    fits,
    has_content,
    lower_first,
    names_in,
    prose_sentences,
    words_of,
)

_DATE_LEAD = re.compile(rf"(?P<prep>In|On|During|By|Since|Around|From|Until)\s+(?P<date>{DATE_RE}),?\s+\S")


def dates(sentences: list[Sentence]) -> Iterator[Candidate]:
    """Sentences with a date: "When was X built?", or "What happened in 1902?" for a sentence that
    opens with its date."""
    n = 0
    for s in sentences:
        if n >= MAX_PER_RULE or not fits(s) or not DATE.search(s.text):
            continue
        question = None
        if m := DATE_PASSIVE.match(s.text):
            subj = m.group("subj")
            if "," not in subj and subj.split()[0].lower() not in PRONOUNS:
                question = f"When {m.group('aux')} {lower_first(subj)} {m.group('mid')}?"
        if question is None and (m := _DATE_LEAD.match(s.text)):
            # "What happened in 2023?" is ambiguous when other sentences of the chunk name 2023 too
            if sum(m.group("date") in other.text for other in sentences) == 1:
                question = f"What happened {m.group('prep').lower()} {m.group('date')}?"
        if question is None:
            continue  # "What happened in 2022?" about a date deep in a sentence asks about nothing
        n += 1
        yield Candidate(question, s.start, s.end, "date")


_AUX = r"is|are|was|were|has|have|had|can|could|will|would|may|might|must|should|does|do|did"
_VERB_SUBJECT = re.compile(
    rf"(?P<subj>(?:(?:The|An?)\s+)?[A-Z][\w'’-]*(?:\s+[\w'’-]+){{0,6}}?)\s+(?P<aux>{_AUX})\b"
)


_APPROX = r"(?:(?:about|around|over|nearly|almost|approximately|roughly|some|exactly|only|just)\s+)?"
_MEASURE = re.compile(
    rf"(?P<subj>(?:(?:The|An?)\s+)?[A-Z][\w'’-]*(?:\s+[\w'’-]+){{0,5}}?)\s+(?P<aux>is|are|was|were)\s+"
    rf"{_APPROX}\d[\d,.]*\s+[a-z]+\s+(?P<adj>tall|high|long|wide|deep|old|heavy|thick|across|away)\b"
)
_HAVE = re.compile(
    rf"(?P<subj>(?:(?:The|An?)\s+)?[A-Z][\w'’-]*(?:\s+[\w'’-]+){{0,5}}?)\s+(?P<verb>has|have|had)\s+"
    rf"{_APPROX}\d[\d,.]*\s+(?P<noun>[a-z][\w-]*(?:\s+[a-z][\w-]*){{0,2}})"
)
_DO = {"has": "does", "have": "do", "had": "did"}


def _trim_noun(noun: str) -> str:
    words = []
    for w in noun.split():
        if w in STOPWORDS:
            break
        words.append(w)
    return " ".join(words)


def numbers(sentences: list[Sentence]) -> Iterator[Candidate]:
    """Sentences with a quantity: "How tall is X?", "How many Y does X have?", "Within how many days
    will a crew return?" (see `facts.number_facts`)."""
    n = 0
    for s in sentences:
        if not fits(s):  # no cap per chunk: every quantity is a fact worth asking for
            continue
        date_spans = [(m.start(), m.end()) for m in DATE.finditer(s.text)]
        num = next(
            (m for m in NUMBER.finditer(s.text) if not any(a <= m.start() < b for a, b in date_spans)), None
        )
        if num is None:
            continue
        question = None
        if (m := _MEASURE.match(s.text)) and "," not in m.group("subj"):
            if m.group("subj").split()[0].lower() not in PRONOUNS:
                question = f"How {m.group('adj')} {m.group('aux')} {lower_first(m.group('subj'))}?"
        if question is None and (m := _HAVE.match(s.text)) and "," not in m.group("subj"):
            noun = _trim_noun(m.group("noun"))
            if noun and m.group("subj").split()[0].lower() not in PRONOUNS:
                question = f"How many {noun} {_DO[m.group('verb')]} {lower_first(m.group('subj'))} have?"
        if question is None:
            # the fact rules: the quantity asked for in the sentence's own clause, or nothing (a
            # question the clause cannot carry, "How many minutes does the text mention?", teaches noise)
            facts = number_facts(s.text)
            if not facts:
                continue
            question = facts[0].question
        n += 1
        yield Candidate(question, s.start, s.end, "number")


def _person_evidence(name: str, text: str, at: int) -> bool:
    """Whether the sentence shows `name` is a person: a title ("Dr Anna Roth") or a role before it
    ("the keeper Anna Roth") or after it ("Anna Roth, the keeper")."""
    if name.split()[0] in TITLE_WORDS:
        return True
    before = text[:at].split()[-1:]
    after = re.match(r",\s+(?:an?|the)\s+(?:[a-z-]+\s+)?([a-z]+)", text[at + len(name) :])
    return bool((before and before[0].lower() in PERSON_NOUNS) or (after and after.group(1) in PERSON_NOUNS))


def entities(sentences: list[Sentence], skip: Iterable[str] = ()) -> Iterator[Candidate]:
    """People: "Who is Anna Roth?", answered by the first sentence that says who she is. Places and
    things get no question of their own ("What is Quarry Road?" answered by a sentence that only
    mentions it teaches nothing; their facts are asked about by the other rules)."""
    seen = {t.lower() for t in skip if t}
    n = 0
    for s in sentences:
        if not fits(s):
            continue
        for name, at in names_in(s.text):
            if n >= MAX_PER_RULE:
                return
            if name.lower() in seen or not _person_evidence(name, s.text, at):
                continue
            seen.add(name.lower())
            n += 1
            yield Candidate(f"Who is {name}?", s.start, s.end, "entity")


def _clip(text: str, start: int, end: int, limit: int) -> int:
    """An end for `text[start:end]` at most `limit` long, at a clause or word boundary."""
    if end - start <= limit:
        return end
    window = text[start : start + limit]
    for sep in (";", ",", ":"):
        cut = window.rfind(sep)
        if cut > limit // 2:
            return start + cut
    cut = window.rstrip().rfind(" ")
    return start + (cut if cut > 0 else limit)


_VERBISH = re.compile(r"\w+(?:ly|ed)$")
# verbs that open instructions ("Put glass bottles in ..."): the sentence has no topic phrase
_IMPERATIVE_VERBS = frozenset(
    """put take keep use check make give open close press hold turn fill leave bring place mount drill
    clean remove insert choose enter set stick refill write read replace report book call collected tie
    fold wrap rinse flatten squash empty""".split()
)
_OPENING_PHRASE = re.compile(
    rf"(?P<np>[A-Z][a-z][\w-]*(?:\s+[a-z][\w-]*){{0,2}}?)\s+[a-z][\w-]*\s+(?:{'|'.join(sorted(STOPWORDS))})\b"
)


def _key_phrases(sentence: Sentence) -> Iterator[tuple[str, list[str], int]]:
    """Candidate topics of a sentence: its subject (words before the first auxiliary verb), then runs
    of up to two content words (a cheap stand-in for noun phrases). The last item is a score bonus."""
    if (m := _VERB_SUBJECT.match(sentence.text)) and "," not in m.group("subj"):
        subj = m.group("subj")
        words = [w.lower() for w in words_of(subj) if w.lower() not in STOPWORDS]
        if words and subj.split()[0].lower() not in PRONOUNS and len(words) <= 3:
            yield subj, words, 2
    elif opening := _OPENING_PHRASE.match(sentence.text):
        # "Storm petrels nest on ...": the words before the first verb-like word that a function
        # word follows ("nest on", "arrive on") are the sentence's topic
        phrase = opening.group("np")
        first = phrase.split()[0].lower()
        noun_like = phrase.endswith("s") or first in ("the", "a", "an")  # not "Line the kitchen"
        if (
            noun_like
            and phrase.split()[0] not in NOT_NAME_START
            and first not in STOPWORDS | _IMPERATIVE_VERBS
        ):
            yield phrase, [w.lower() for w in phrase.split()], 1
    run: list[str] = []
    for w in [*words_of(sentence.text), ""]:
        if w and w.lower() not in STOPWORDS and len(w) >= 3 and w.isalpha() and not _VERBISH.match(w):
            run.append(w)
            continue
        while run:
            yield " ".join(run[:2]), [x.lower() for x in run[:2]], 0
            run = run[2:]


# a phrase opening with one of these points at something the text introduced earlier ("the second",
# "the hub", "our period", "all roles", "a person whose ...") or is a quantity, not a named topic
_NOT_TOPIC_START = frozenset(
    """the a an all our their its his her your my this these those each every some any no only both
    either several many most few various other such one two three four five six seven eight nine ten
    more less fewer further heavier lighter larger smaller higher lower longer shorter newer older
    earlier later""".split()
)
# at least this many content words must follow the topic: "Nodes did not need any change",
# "Batching has a long history" say nothing about it
MIN_FALLBACK_FACT_WORDS = 3


def _topic_phrase(phrase: str, sentence: str) -> bool:
    """Whether `phrase` is a real noun phrase to ask about: two or more words, no determiner or
    quantifier in front, no relative clause, and followed in its sentence by a fact about it."""
    words = phrase.split()
    if len(words) < 2 or words[0].lower() in _NOT_TOPIC_START or words[0].lower() in _IMPERATIVE_VERBS:
        return False
    if re.search(r"\b(?:that|which|who|whose|whom)\b", phrase) or phrase.split()[0] in CLAUSE_START:
        return False
    rest = sentence[sentence.find(phrase) + len(phrase) :] if phrase in sentence else sentence
    return len([w for w in words_of(rest) if w.lower() not in STOPWORDS]) >= MIN_FALLBACK_FACT_WORDS


def fallback(chunk: Chunk, sentences: list[Sentence]) -> Iterator[Candidate]:
    """The fallback: "What can you tell me about <key phrase>?" for the chunk's most central phrase
    (a noun phrase of two or more words that the sentence says something about: never a clause
    opener, a number, a year, a bare generic noun or a reference such as "the second")."""
    freq = Counter(w.lower() for s in sentences for w in words_of(s.text) if w.lower() not in STOPWORDS)
    best: tuple[int, int, str, Sentence] | None = None
    for order, s in enumerate(sentences):
        if len(s.text) < MIN_ANSWER_CHARS:
            continue
        for phrase, words, bonus in _key_phrases(s):
            if not bonus or not _topic_phrase(phrase, s.text):
                continue  # only the sentence's subject: a run of content words is rarely a topic
            key = (-(sum(freq[w] for w in words) + bonus), order)
            if best is None or key < best[:2]:
                best = (*key, phrase, s)
    if best is None:
        return
    _, _, phrase, s = best
    first, _, rest = phrase.partition(" ")
    # a capital only because the phrase opens the sentence: lower it if the chunk uses the word so
    if s.text.startswith(phrase) and (
        first in NOT_NAME_START
        or re.search(rf"\b{first.lower()}\b", chunk.text)
        or (first[1:].islower() and (rest[:1].islower() or (not rest and first.endswith("s"))))
    ):
        phrase = (
            lower_first(phrase)
            if first in ("The", "A", "An")
            else first.lower() + (" " + rest if rest else "")
        )
    end = _clip(chunk.text, s.start, s.end, MAX_ANSWER_CHARS)
    yield Candidate(f"What can you tell me about {phrase}?", s.start, end, "fallback")


def generate_pairs(chunk: Chunk, *, doc_title: str | None = None) -> list[QAPair]:
    """The `quiz` and `definition` rules' pairs for one chunk, in a fixed order; unfiltered (see
    `extractive.filter_pairs`)."""
    if not has_content(chunk):
        return []
    sentences = prose_sentences(chunk)
    if not sentences:
        return []
    # no "What does the document say about <heading>?": a title question answered by a paragraph
    found: list[Candidate] = [*definitions(sentences), *dates(sentences), *numbers(sentences)]
    # names already asked about (as a heading, title or definition) get no entity question of their own
    asked = [chunk.heading or "", doc_title or ""]
    asked += [
        re.sub(r"^(?:What|Who) (?:is|are|was|were) |\?$", "", c.question)
        for c in found
        if c.strategy == "definition"
    ]
    found.extend(entities(sentences, skip=[re.sub(r"^(?:the|an?) ", "", t, flags=re.I) for t in asked]))
    if not found:
        found.extend(fallback(chunk, sentences))
    return [pair_for(chunk, c.question, chunk.text[c.start : c.end], c.strategy) for c in found]
