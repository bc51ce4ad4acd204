"""Fact questions: a quantity and what it measures, a step, an agent.

A fact question asks for the fact and names what it is about in the sentence's own clause, moved
into question order ("A crew will return within 3 working days." -> "Within how many working
days will a crew return?"). Each comes with rewordings made from the same parse (another
question word, the embedded "Do you know ..." order), which `paraphrase.paraphrases` looks up by
answer. The `quiz` strategy's number rule and the `wh` strategy ask them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from services.qagen.rules.clause import (
    CLAUSE_OPENERS,
    DETERMINERS,
    ORDINALS,
    Finite,
    intro_tail,
    parse_finite,
    shorten,
)
from services.qagen.rules.verbs import lemma, past_verb
from services.qagen.text import DATE, PRONOUNS, STOPWORDS, named_in


@dataclass(frozen=True, slots=True)
class Fact:
    """A question about one fact of a sentence, its rewordings, and the rule that made it."""

    question: str
    variants: tuple[str, ...]
    rule: str


_TIME_UNITS = frozenset(
    "second seconds minute minutes hour hours day days week weeks month months year years".split()
)
_MONEY_WORDS = frozenset("pound pounds euro euros dollar dollars pence cents".split())
_UNITS = {
    "mm": "millimetres", "cm": "centimetres", "m": "metres", "km": "kilometres", "kg": "kilograms",
    "g": "grams", "ms": "milliseconds", "s": "seconds", "h": "hours", "min": "minutes", "W": "watts",
    "V": "volts", "kWh": "kilowatt-hours", "Wh": "watt-hours", "mJ": "millijoules", "KB": "kilobytes",
    "MB": "megabytes", "GB": "gigabytes", "MHz": "megahertz", "l": "litres",
}  # fmt: skip
# counted things that take "of" ("41,800 tonnes of waste")
_MEASURE_NOUNS = frozenset(
    "tonnes tons litres kilograms grams pieces sheets bags boxes cups lines units".split()
)
_QUALIFIERS = re.compile(
    r"(?:\b(?:about|around|nearly|almost|approximately|roughly|some|only|just|exactly|up\s+to|at\s+least"
    r"|at\s+most|no\s+more\s+than|more\s+than|less\s+than|fewer\s+than|over|under|a\s+further|another)\s+)+$"
)
_NUM_TOKEN = re.compile(r"(?<![\w.,:/±+-])(?P<cur>[£€$]\s?)?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w-]|[.:,/]\d)"
                        r"|(?<![\w.,:/±+-])(?P<cur2>[£€$]\s?)?\d+(?:\.\d+)?(?![\w-]|[.:,/]\d)")  # fmt: skip
_MOVED_TAIL = re.compile(
    r"\s+(?P<tail>in\s+advance|ago|(?:after|before)\s+(?:the\s+|a\s+|an\s+)?[a-z][\w-]*(?:\s+[a-z][\w-]*)?)\b"
)


@lru_cache(maxsize=4096)
def _first_clause(sentence: str) -> tuple[str, Finite | None]:
    """The sentence up to its first "; ", without final punctuation, and its clause (parsed once for
    the several rules that read it)."""
    text = sentence.strip().split("; ")[0].rstrip(".!?;: ")
    return text, parse_finite(text)


@dataclass(frozen=True, slots=True)
class _Quantity:
    start: int  # the span to remove from the sentence: qualifiers, number, unit and a moved tail
    end: int
    prep: str  # the preposition before it ("within", "for", "every", "of") or ""
    kind: str  # "time", "money", "percent" or "count"
    noun: str  # what is counted ("working days", "tonnes of waste"), "" for money
    tail: str  # "in advance", "before the event": moves with the question word


def _quantities(text: str) -> Iterator[_Quantity]:
    """The quantities of a sentence with what they measure; dates, clock times and model numbers
    ("QP-20") are not quantities."""
    dates = [(m.start(), m.end()) for m in DATE.finditer(text)]
    for m in _NUM_TOKEN.finditer(text):
        if any(a <= m.start() < b for a, b in dates):
            continue
        end, after = m.end(), text[m.end() :]
        kind, noun = "count", ""
        if u := re.match(r"\s*(?:%|per\s?cent\b)(?:\s+of\s+(?:the\s+|their\s+|its\s+)?[a-z][\w-]*)?", after):
            kind, end = "percent", end + u.end()
            noun = re.sub(r"^\s*(?:%|per\s?cent)\s*", "", u.group(0))
        elif m.group("cur") or m.group("cur2"):
            kind = "money"
        elif u := re.match(r"\s*(?:°C|°F)", after):
            kind, noun, end = "count", "degrees", end + u.end()
        else:
            words = re.match(
                r"\s+([A-Za-z][\w-]*)(?:\s+(?!of\b)([a-z][\w-]*(?:\s+[a-z][\w-]*s\b)?))?"
                r"(?:\s+(of)\s+([a-z][\w-]*))?",
                after,
            )
            if not words:
                continue
            first, second, of, what = words.groups()
            if first in _UNITS:
                noun, end = _UNITS[first], end + words.end(1)
            elif first.islower() and first not in STOPWORDS and first.isalpha():
                noun, end = first, end + words.end(1)
                if second and not set(second.split()) & STOPWORDS and second[-1] == "s":
                    noun, end = f"{first} {second}", end - words.end(1) + words.end(2)
                elif of and noun in _MEASURE_NOUNS and what not in STOPWORDS:
                    noun, end = f"{noun} of {what}", end - words.end(1) + words.end(4)
            else:
                continue
            if noun.split()[-1] in _TIME_UNITS:
                kind = "time"
            elif noun in _MONEY_WORDS:
                kind = "money"
        before = text[: m.start()]
        start = m.start()
        if q := _QUALIFIERS.search(before):
            start, before = q.start(), before[: q.start()]
        prep = (
            re.search(r"\b(within|for|every|after|of|by|to|in|at|from|on|with|between)\s+$", before) or [""]
        )[0]
        prep = prep.strip()
        tail = ""
        if t := _MOVED_TAIL.match(text[end:]):
            tail, end = t.group("tail"), end + t.end()
        if prep in ("within", "for", "every", "after"):
            start -= len(re.search(r"\S+\s+$", before).group(0))
        yield _Quantity(start, end, prep, kind, noun, tail)


_WH_SYNONYMS = {"How long": "How much time", "How often": "How frequently", "How much": "What amount"}


def _wh_phrase(q: _Quantity, copula: bool) -> str | None:
    tail = f" {q.tail}" if q.tail else ""
    if q.kind == "percent":
        return f"What percentage{' ' + q.noun if q.noun else ''}"
    if q.kind == "money":
        return "How much"
    if q.kind == "time" and not q.tail:
        if q.prep == "every":
            return "How often"
        if q.prep == "within":
            return f"Within how many {q.noun}"
        if q.prep in ("for", "") or copula:
            return "How long"
        return None
    if q.prep in ("", "for", "after") or (q.prep == "within" and q.kind == "time"):
        return f"How many {q.noun}{tail}"
    return None


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([,.;:?])", r"\1", text)


def _of_fact(text: str, q: _Quantity) -> Fact | None:
    """ "a fixed penalty of £400 for fly-tipping" -> "How much is the fixed penalty for fly-tipping?"."""
    m = re.search(r"\b(?:[Aa]n?|[Tt]he)\s+((?:[a-z][\w-]*\s+){0,3}?[a-z][\w-]*)\s+of\s+$", text[: q.start])
    if not m or any(w in STOPWORDS for w in m.group(1).split()) or past_verb(m.group(1).split()[-1]):
        return None
    after = re.match(
        r"\s+((?:per\s+[a-z]+\s*)+|for\s+[a-z][\w-]*(?:\s+[a-z][\w-]*)?(?=[,.;]|$))", text[q.end :]
    )
    np = f"the {m.group(1)}{' ' + q.tail if q.tail else ''}{' ' + after.group(1).strip() if after else ''}"
    if len(np.split()) < 3:
        return None  # "the depth": too little to know what is asked about
    verb = "was" if re.search(r"\b(?:was|were|had)\b", text) else "is"
    wh = {"money": "How much", "time": "How long", "percent": "What percentage"}.get(q.kind)
    variants = []
    if wh is None:  # "a bin of 240 litres": asking "What is the bin?" would ask for a definition
        if not q.noun:
            return None
        wh = f"How many {q.noun}"
    else:  # "What is the fixed penalty for fly-tipping?" asks for an amount
        variants.append(f"What {verb} {np}?")
    question = f"{wh} {verb} {np}?"
    variants.append(f"Do you know {wh.lower()} {np} {verb}?")
    return Fact(_tidy(question), tuple(_tidy(v) for v in variants), "number")


# what may follow a quantity for its question to be well formed: not a verb of another clause
# ("... after each item is returned") nor an adjective the quantity measures ("10 years old")
_NO_QUANTITY_SLOT = re.compile(
    r"\s*(?:(?:is|are|was|were|has|have|had|can|may|must|will|do|does|did)\b"
    r"|(?:old|tall|high|long|wide|deep|thick|heavy|away)\b)"
)


def number_facts(sentence: str) -> list[Fact]:
    """Questions that ask for a sentence's first quantity, each with its rewordings."""
    text, clause = _first_clause(sentence)
    for q in _quantities(text):
        if q.prep == "of":
            fact = _of_fact(text, q)
            return [fact] if fact else []
        if clause is None or q.start < clause.start:
            continue
        copula = clause.verb == "" and clause.aux in ("is", "are", "was", "were")
        if (copula and q.start != clause.start) or re.match(r"\s+of\b", text[q.end :]):
            return []  # "is a cliff top 84 m above ...", "within 28 days of receiving": no clean question
        wh = _wh_phrase(q, copula and q.start == clause.start)
        if wh is None or (q.kind == "count" and not q.noun):
            return []
        before = clause.rest[: q.start - clause.start]
        after = re.split(r"[,;(]| and | but | which ", clause.rest[q.end - clause.start :])[0]
        if _NO_QUANTITY_SLOT.match(after) or (q.kind == "money" and q.prep == "for" and before.strip()):
            # "kept for 18 months after each item | is returned": the quantity sits in another
            # clause; "less than 10 years | old" asks "how old", not "how long"; "buy a set of
            # containers for £96" has no "how much" slot after its object
            return []
        last = (before.split() or [""])[-1].lower()
        if re.search(r"[,;:(]|\b(?:that|which|who|whom|whose)\b", before) or last in STOPWORDS | ORDINALS:
            return []  # another clause's quantity, or one inside a phrase ("to a depth of 40 mm")
        rest = shorten(_tidy(before + " " + after))
        if rest is None:
            return []
        rest = re.sub(r"\s+(?:and|or|but|which|that|only|each|respectively|alone)$", "", rest)
        intro = intro_tail(clause.intro)
        question = f"{wh} {clause.aux} {clause.subject} {clause.verb} {rest}{intro}?"
        variants = [
            f"Do you know {wh[0].lower()}{wh[1:]} {clause.subject} {clause.declarative} {rest}{intro}?"
        ]
        for old, new in _WH_SYNONYMS.items():
            if wh == old and not (new == "What amount" and clause.aux in ("is", "are", "was", "were")):
                variants.insert(0, f"{new} {clause.aux} {clause.subject} {clause.verb} {rest}{intro}?")
        if wh.startswith("How many ") and not q.tail:
            variants.insert(
                0, f"What number of {q.noun} {clause.aux} {clause.subject} {clause.verb} {rest}{intro}?"
            )
        if len(question.split()) > 22:
            return []
        return [Fact(_tidy(question), tuple(_tidy(v) for v in variants), "number")]
    return []


_YOU = {
    "you": "I", "your": "my", "yours": "mine", "yourself": "myself", "you're": "I'm", "you've": "I've",
    "you are": "I am", "you were": "I was",
}  # fmt: skip
_IF_CLAUSE = re.compile(r"If\s+(?P<cond>[^,;]{8,120}),\s+(?P<main>\S+)\s")
_TO_CLAUSE = re.compile(r"To\s+(?P<goal>[a-z][^,;]{6,80}),\s+(?P<main>[a-z]+)\s")


def _first_person(text: str) -> str:
    return re.sub(
        r"\b[Yy]ou(?: are| were|'re|'ve|rself|rs|r)?\b",
        lambda m: _YOU.get(m.group(0).lower(), m.group(0)),
        text,
    )


def _imperative(word: str) -> bool:
    w = word.lower()
    return w.isalpha() and w not in STOPWORDS and w not in PRONOUNS and not w.endswith(("ed", "ly", "s"))


def step_facts(sentence: str) -> list[Fact]:
    """Steps and conditions: "To pair a sensor, hold ..." -> "How do I pair a sensor?"; "If X, do Y."
    -> "What should I do if X?"; "If X, the buzzer sounds." -> "What happens if X?"."""
    text = sentence.strip()
    if m := _TO_CLAUSE.match(text):
        if _imperative(m.group("main")):
            goal = _first_person(m.group("goal"))
            return [
                Fact(f"How do I {goal}?", (f"What are the steps to {goal}?", f"How can I {goal}?"), "how")
            ]
    if m := _IF_CLAUSE.match(text):
        cond = _first_person(m.group("cond"))
        if m.group("cond").split()[0].lower() in CLAUSE_OPENERS | (PRONOUNS - {"you", "we", "i"}):
            return []  # "If it is not, ...": the condition points back at a sentence not in the question
        main = m.group("main")
        if _imperative(main) or main.lower() in ("do", "don't", "never", "always"):
            return [
                Fact(
                    f"What should I do if {cond}?",
                    (f"What do I do if {cond}?", f"If {cond}, what should I do?"),
                    "how",
                )
            ]
        if main.lower() in DETERMINERS or main[:1].isupper():
            return [
                Fact(
                    f"What happens if {cond}?",
                    (f"What is the consequence if {cond}?", f"If {cond}, what happens?"),
                    "what",
                )
            ]
    return []


_ROLE_NOUNS = frozenset(
    """panel board committee council trustees trustee coordinator liaison officer manager director chair
    secretary staff members member team desk volunteers keeper keepers author authors researchers
    engineer engineers operators operator crew crews inspector inspectors residents owner owners""".split()
)


def _is_agent(phrase: str) -> bool:
    """Whether a phrase names people (a role or a body of people): "the Appeals Panel", "staff"."""
    return phrase.split()[-1].lower() in _ROLE_NOUNS


def agent_facts(sentence: str) -> list[Fact]:
    """ "Appeals are heard by the Appeals Panel." -> "Who hears appeals?" and, reversed, "What does the
    Appeals Panel hear?"."""
    text, clause = _first_clause(sentence)
    if clause is None or clause.aux not in ("is", "are", "was", "were") or not clause.verb:
        return []
    participle = clause.verb.split()[-1]
    if not (
        m := re.match(
            r"by\s+(?P<agent>(?:the\s+)?[\w'’-]+(?:\s+[A-Z][\w'’-]*){0,3})(?=[,.;]|$|\s)", clause.rest
        )
    ):
        return []
    agent, base = m.group("agent"), lemma(participle)
    if not _is_agent(agent) or base == participle or " " in clause.verb:
        return []
    present = clause.aux in ("is", "are")
    active = (base + ("es" if base.endswith(("s", "sh", "ch", "x")) else "s")) if present else None
    obj = clause.subject
    forward = f"Who {active} {obj}?" if active else f"Who {clause.aux} {obj} {participle} by?"
    variants = (f"By whom {clause.aux} {obj} {participle}?", f"Who {clause.aux} {obj} {participle} by?")
    facts = [Fact(forward, tuple(v for v in variants if v != forward), "who")]
    if not named_in(obj, agent):  # "What does the Appeals Panel hear?" gives "appeals" away
        reverse = f"What {'does' if present else 'did'} {agent} {base}?"
        which = f"Which {obj.split()[-1]} {'does' if present else 'did'} {agent} {base}?"
        facts.append(Fact(reverse, (which,), "what"))
    return facts


# a clock time after the preposition that says how the question asks for it ("10.30" only with
# am/pm: "from 2.31 W" is a decimal)
_CLOCK = re.compile(
    r"\b(?P<prep>at|by|until|till|before|after|from|between)\s+(?:about\s+|around\s+)?"
    r"(?:\d{1,2}:\d{2}(?:\s*[ap]\.?m\b\.?)?|\d{1,2}(?:\.\d{2})?\s*[ap]\.?m\b\.?|noon|midnight)(?![\w:.]\d)"
)
_CLOCK_WH = {
    "at": "What time", "by": "By what time", "until": "Until what time", "till": "Until what time",
    "before": "Before what time", "after": "After what time", "from": "When", "between": "When",
}  # fmt: skip


def time_facts(sentence: str) -> list[Fact]:
    """A clock time asked for in its clause: "Guided tours start at 11:00." -> "What time do guided
    tours start?"; "Put out by 06:30" is an imperative (no clause), "open from 10:00 to 17:30" ->
    "When is the museum open?"."""
    text, clause = _first_clause(sentence)
    if clause is None or not (m := _CLOCK.search(text, clause.start)):
        return []
    before = text[clause.start : m.start()].strip()
    if re.search(r"[,;:(]|\b(?:that|which|who|whom|whose|and|or|but)\b|\d", before):
        return []  # the time is another clause's, or a second figure sits in the question
    if before and (before.split()[-1].lower() in STOPWORDS | ORDINALS or len(before.split()) > 10):
        return []
    wh = _CLOCK_WH[m.group("prep")]
    tail = f" {before}" if before else ""
    intro = intro_tail(clause.intro)
    verb = f" {clause.verb}" if clause.verb else ""
    question = f"{wh} {clause.aux} {clause.subject}{verb}{tail}{intro}?"
    whl = wh[0].lower() + wh[1:]
    variants = [f"Do you know {whl} {clause.subject} {clause.declarative}{tail}{intro}?"]
    if wh != "When":
        variants.insert(0, f"When {clause.aux} {clause.subject}{verb}{tail}{intro}?")
    return [Fact(_tidy(question), tuple(_tidy(v) for v in variants), "when")]


@lru_cache(maxsize=4096)
def sentence_facts(sentence: str) -> tuple[Fact, ...]:
    """Every fact question the rules find in one sentence (a pure function of the sentence, so a
    paraphrase can find its question's rewordings again from the answer)."""
    return (*step_facts(sentence), *agent_facts(sentence), *time_facts(sentence), *number_facts(sentence))
