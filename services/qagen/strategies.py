"""The extractive strategies: separate rule sets, each asking about a document in its own way.

A model that is to learn a document needs each fact asked about more than once and in more than one
form, plus the questions people actually open with ("What is this about?"). Each strategy below is a
rule set; every pair it makes names its rule in `strategy` and its source chunk, and every answer
is text of that chunk (or, for summaries and lists of headings, of the chunks named in `sources`).

| strategy          | rules (pair.strategy)                      | scope    |
| ----------------- | ------------------------------------------ | -------- |
| `quiz`            | heading, date, number, entity, fallback    | chunk    |
| `definition`      | definition                                 | chunk    |
| `wh`              | who, what, when, where, why, how           | chunk    |
| `summary`         | summary (whole document, 3 lengths)        | document |
| `section_summary` | section_summary                            | document |
| `metadata`        | metadata (title, authors, date)            | document |
| `vague`           | vague (what a person knowing only the title asks) | document |
| `paraphrase`      | paraphrase (2 rewordings of each question) | pairs    |

The rules are deliberately plain: regular expressions over sentences, a small table of irregular
verbs, sentence scores from word frequencies. They can miss a fact; they never invent one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import PurePosixPath

from services.common.options import (
    QA_CHUNK_STRATEGIES,
    QA_DOCUMENT_STRATEGIES,
    QA_STRATEGIES,
    resolve_strategies,
)
from services.common.qapair import QAPair, pair_id_for
from services.qagen.chunk import Chunk
from services.qagen.extractive import (
    _AUTHOR_LINE,
    _DATE,
    _DATE_LINE,
    _DATE_PASSIVE,
    _DATE_RE,
    _MONTHS,
    _NAME_LIST,
    _NUMBER,
    _PRONOUNS,
    _STOPWORDS,
    _TITLE_WORDS,
    MAX_ANSWER_CHARS,
    MAX_PER_RULE,
    MIN_ANSWER_CHARS,
    _fits,
    _lower_first,
    _names_in,
    _Sentence,
    _sentences,
    _wh_for,
    _words,
    generate_pairs,
    has_content,
)

CHUNK_STRATEGIES = QA_CHUNK_STRATEGIES
DOCUMENT_STRATEGIES = QA_DOCUMENT_STRATEGIES
ALL_STRATEGIES = QA_STRATEGIES
RULES: dict[str, tuple[str, ...]] = {
    "quiz": ("heading", "date", "number", "entity", "fallback"),
    "definition": ("definition",),
    "wh": ("who", "what", "when", "where", "why", "how"),
    "summary": ("summary",),
    "section_summary": ("section_summary",),
    "metadata": ("metadata",),
    "vague": ("vague",),
    "paraphrase": ("paraphrase",),
}
PARAPHRASES = 2
# A document needs this many prose sentences before it is summarised or asked about as a whole.
MIN_DOCUMENT_SENTENCES = 3


def _pair(chunk: Chunk, question: str, answer: str, strategy: str, sources: Sequence[str] = ()) -> QAPair:
    return QAPair(
        pair_id=pair_id_for(chunk.chunk_id, question, answer),
        question=question,
        answer=answer,
        doc_id=chunk.doc_id,
        chunk_id=chunk.chunk_id,
        start=chunk.start,
        end=chunk.end,
        strategy=strategy,
        sources=tuple(s for s in dict.fromkeys(sources) if s != chunk.chunk_id),
    )


# --- chunk strategies --------------------------------------------------------------------------


def chunk_pairs(
    chunk: Chunk, *, doc_title: str | None = None, strategies: Iterable[str] | None = None
) -> list[QAPair]:
    """The pairs of the selected chunk-scope strategies for one chunk, in a fixed order."""
    selected = resolve_strategies(strategies)
    rules = {r for s in selected for r in RULES[s]}
    pairs: list[QAPair] = []
    if "quiz" in selected or "definition" in selected:
        title = clean_title(doc_title)
        pairs += [p for p in generate_pairs(chunk, doc_title=title) if p.strategy in rules]
    if "wh" in selected and has_content(chunk):
        asked = {p.question for p in pairs}
        sentences = _sentences(chunk)
        facts = [
            (f.question, s, f.rule) for s in sentences for f in sentence_facts(s.text) if f.rule != "number"
        ]
        for question, sentence, rule in [*facts, *wh_questions(sentences)]:
            if question not in asked:
                asked.add(question)
                pairs.append(_pair(chunk, question, sentence.text, rule))
    return pairs


# verbs: enough morphology to turn "X installed Y" into "When did X install Y?"

_AUX = frozenset("is are was were has have had".split())
_IRREGULAR_PAST = dict(
    pair.split(":")
    for pair in """arose:arise ate:eat became:become began:begin bent:bend bit:bite blew:blow
    broke:break brought:bring built:build burnt:burn bought:buy caught:catch chose:choose came:come
    dealt:deal drew:draw drank:drink drove:drive dug:dig fell:fall fed:feed felt:feel fought:fight
    found:find fled:flee flew:fly forgot:forget froze:freeze gave:give got:get went:go grew:grow
    hung:hang heard:hear held:hold hid:hide kept:keep knew:know laid:lay led:lead left:leave lent:lend
    lost:lose made:make meant:mean met:meet paid:pay ran:run rang:ring rose:rise said:say saw:see
    sold:sell sent:send shot:shoot sang:sing sank:sink sat:sit slept:sleep spoke:speak spent:spend
    stood:stand stole:steal struck:strike swam:swim took:take taught:teach tore:tear told:tell
    thought:think threw:throw understood:understand woke:wake wore:wear won:win wrote:write lit:light
    sought:seek withdrew:withdraw overcame:overcome undertook:undertake shone:shine spun:spin
    swore:swear wove:weave rode:ride shook:shake sprang:spring stuck:stick swept:sweep wept:weep
    bore:bear forgave:forgive foresaw:foresee oversaw:oversee rebuilt:rebuild""".split()
)
_PARTICIPLES = frozenset(
    """built bought brought caught chosen done drawn driven eaten fallen found given gone grown held
    hidden kept known laid led left lent lit lost made meant met paid run said seen sold sent set shown
    shut spoken spent stood taken taught told thought thrown understood won worn written born borne
    begun broken frozen forgotten stolen struck sung sunk hung rebuilt put cut""".split()
)
_LEMMA_EXCEPTIONS = dict(
    pair.split(":")
    for pair in """created:create treated:treat added:add used:use guided:guide opened:open
    happened:happen listened:listen offered:offer covered:cover entered:enter ordered:order
    answered:answer visited:visit edited:edit limited:limit benefited:benefit developed:develop
    equipped:equip preferred:prefer referred:refer occurred:occur transferred:transfer
    controlled:control travelled:travel cancelled:cancel labelled:label modelled:model
    united:unite fuelled:fuel considered:consider delivered:deliver discovered:discover
    gathered:gather governed:govern numbered:number remembered:remember suffered:suffer
    wondered:wonder""".split()
)
_NOT_VERBS_ED = frozenset(
    "bed red shed fed wed need seed speed breed bred hundred sacred naked wicked kindred rugged".split()
)


def _past_verb(word: str) -> bool:
    w = word.lower()
    if w in _IRREGULAR_PAST:
        return True
    return len(w) > 4 and w.endswith("ed") and w not in _NOT_VERBS_ED and w.isalpha()


def lemma(past: str) -> str:
    """The base form of a past-tense verb ("installed" -> "install", "lit" -> "light")."""
    w = past.lower()
    if w in _IRREGULAR_PAST:
        return _IRREGULAR_PAST[w]
    if w in _LEMMA_EXCEPTIONS:
        return _LEMMA_EXCEPTIONS[w]
    if not w.endswith("ed"):
        return w
    if w.endswith("ied") and len(w) > 4:
        return w[:-3] + "y"
    stem = w[:-2]
    if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in "aeiouylsz":
        return stem[:-1]  # stopped -> stop
    if stem.endswith(
        ("at", "bl", "iz", "yz", "dl", "tl", "gl", "pl", "cl", "kl", "fl", "rg", "dg", "lg", "ang")
    ):
        return stem + "e"  # located, enabled, organized, charged, changed
    if stem.endswith(("c", "v", "u", "ib")) or re.search(r"[^aeiou][iu]d$", stem):
        return stem + "e"  # produced, moved, continued, described, decided, included
    if re.search(r"(?:[^aeiou]ur|[^aeo]ir|[^aeiou]ar|(?:st|pl|gn|sc|d)or)$", stem):
        return stem + "e"  # measured, required, compared, restored (not poured, chaired, cleared)
    if re.search(r"[aeiou]s$", stem) and not re.search(r"[^aeiou]us$", stem):
        return stem + "e"  # caused, used, closed (not focused)
    if len(stem) <= 4 and re.fullmatch(r"[^aeiou]*[aeiou][^aeiouwxy]", stem):
        return stem + "e"  # named, voted, stated
    return stem


@dataclass(frozen=True, slots=True)
class _Clause:
    intro: str  # a leading "In 1902" (without its comma), or ""
    subject: str
    verb: str
    rest: str  # after the verb, final punctuation removed

    @property
    def aux(self) -> bool:
        return self.verb.lower() in _AUX and not self.perfect_main_verb

    @property
    def perfect_main_verb(self) -> bool:
        """ "had" as the main verb ("The island had 300 residents"), not an auxiliary."""
        if self.verb.lower() not in ("has", "have", "had"):
            return False
        nxt = self.rest.split()[0].lower() if self.rest else ""
        return not (_past_verb(nxt) or nxt in _PARTICIPLES)

    @property
    def person(self) -> bool:
        return any(_wh_for(name) == "Who" for name, _ in _names_in(self.subject))


_INTRO = re.compile(
    r"(?P<intro>(?:In|On|At|During|By|Since|After|Before|Around|From|Until|Between)\s+[^,]{1,60}?),\s+"
)
_DETERMINERS = frozenset("the a an this that these those its their our his her".split())


def parse_clause(sentence: str) -> _Clause | None:
    """Split "[In 1902, ]<subject> <verb> <rest>." where the verb is a form of be/have or a past
    tense; None when the sentence does not start that way (or its subject is a pronoun)."""
    text = sentence.strip().rstrip(".!?;:").strip()
    intro = ""
    if m := _INTRO.match(text):
        intro, text = m.group("intro"), text[m.end() :]
    words = text.split()
    if len(words) < 3 or not (words[0][:1].isupper() or (intro and words[0] in _DETERMINERS)):
        return None
    if words[0].lower() in _PRONOUNS or words[0].lower() in _CLAUSE_OPENERS | _PREPOSITIONS:
        return None  # "In 2023 the households ...", "Under Tidewell the gateway ...": no subject first
    for i in range(1, min(len(words) - 1, 8)):
        prev = words[i - 1]
        if prev.endswith((",", ";", ":")) or '"' in prev or "(" in prev:
            return None
        w = words[i]
        if w.lower() in _MODALS or w.lower() in ("does", "do", "did") or w.lower() in _RELATIVES:
            return None  # a modal verb group or a relative clause: `parse_finite` reads those
        if w.lower() in _AUX or (_past_verb(w) and w.islower()):
            subject = words[:i]
            if all(x.lower() in _DETERMINERS for x in subject):
                continue  # "The automated station": an adjective, the verb comes later
            if subject[-1].lower() in _ORDINALS or subject[0] in ("Each", "All", "Most", "Some", "Both"):
                return None  # "The first is ...", "Each had ...": the subject is elsewhere
            if any(x in _PREPOSITIONS - {"of", "from"} for x in subject[1:]):
                return None  # "Drill the holes with a 6 mm bit": an imperative, "bit" is no verb here
            later = " ".join(words[i + 1 :]).split(",")[0].split()
            if w.lower() not in _AUX and any(x.lower() in _MODALS | _AUX for x in later):
                return None  # "Containers left outside ... may be removed": a reduced relative
            return _Clause(intro, " ".join(subject), w, " ".join(words[i + 1 :]))
        if not re.fullmatch(r"[\w'’-]+", w):
            return None
    return None


def _shorten(rest: str, max_words: int = 16) -> str | None:
    """The verb phrase up to the first comma or semicolon (what follows is often another clause:
    ", and the keeper left", ", most of whom ..."); None when that is longer than `max_words`."""
    cut = re.search(r"[,;(](?!\d)|:\s", rest)  # not the comma of "41,800" or the colon of "07:00"
    if cut and len(rest[: cut.start()].split()) >= 2:
        rest = rest[: cut.start()]
    rest = rest.strip()
    return rest if len(rest.split()) <= max_words else None


def _intro_tail(intro: str) -> str:
    return f" {intro[0].lower()}{intro[1:]}" if intro else ""


_DATE_PHRASE = re.compile(
    rf",?\s*\b(?:from|between)\s+{_DATE_RE}\s+(?:to|and|until)\s+{_DATE_RE}(?![\w-])"
    rf"|,?\s*\b(?:in|on|during|by|around|since|from|until)\s+{_DATE_RE}(?![\w-])|,?\s*\b{_DATE_RE}(?![\w-])"
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
_NOT_PLACES = frozenset(_MONTHS.split("|")) | frozenset(
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday The This That".split()
)


def _subject_phrase(subject: str) -> str:
    """The subject as it reads mid-sentence: "The tower" -> "the tower", "Engineers" -> "engineers"
    (a capitalised plural is a common noun that opened the sentence); names keep their capitals."""
    first, _, rest = subject.partition(" ")
    # "Event loans", "Installing": a common word capitalised only because it opens the sentence
    if first[1:].islower() and (first.endswith("ing") or (rest and rest.split()[0].islower())):
        if first not in _TITLE_WORDS and first.lower() not in _DETERMINERS:
            return first.lower() + (" " + rest if rest else "")
    if len(first) > 3 and first.endswith("s") and not first.endswith("ss") and first[1:].islower():
        if not (rest and _wh_for(f"{first} {rest.split()[0]}") == "Who" and rest.split()[0][:1].isupper()):
            return first.lower() + (" " + rest if rest else "")
    return _lower_first(subject)


def _inverted(clause: _Clause, wh: str, rest: str) -> str | None:
    """ "Why was X closed", "When did X install Y": the subject after an auxiliary or "did"."""
    subject = _subject_phrase(clause.subject)
    rest = rest.strip()
    if clause.aux:
        return f"{wh} {clause.verb.lower()} {subject}{' ' + rest if rest else ''}?"
    if clause.verb.lower() in ("has", "have", "had"):
        return f"{wh} did {subject} have{' ' + rest if rest else ''}?"
    if _past_verb(clause.verb):
        return f"{wh} did {subject} {lemma(clause.verb)}{' ' + rest if rest else ''}?"
    return None


def wh_questions(sentences: list[_Sentence]) -> Iterator[tuple[str, _Sentence, str]]:
    """Who/what/when/where/why/how questions about the sentences that state a fact: a name, a
    number, a date, a place, a cause or a means. Yields (question, sentence, rule)."""
    counts: Counter[str] = Counter()
    for s in sentences:
        if not _fits(s) or (clause := parse_clause(s.text)) is None:
            continue
        found: list[tuple[str, str]] = []
        fact = bool(_DATE.search(s.text) or _NUMBER.search(s.text) or list(_names_in(clause.rest)))
        rest = _shorten(clause.rest)
        # who/what: the subject becomes the question word; a past tense needs no agreement
        if rest and (clause.aux or _past_verb(clause.verb) or clause.verb.lower() in ("has", "had")):
            # "What is reviewed ...?": the question word is singular whatever the subject was
            verb = {"are": "is", "were": "was", "have": "has"}.get(clause.verb.lower(), clause.verb.lower())
            # "Who is a cliff top?", "What was 6.4 minutes?": a definition or a measure, asked elsewhere
            copula = verb in ("is", "was") and (
                rest.split()[0].lower() in ("a", "an", "the", "one")
                or rest[:1].isdigit()
                or clause.verb == "had"
            )
            if clause.person and not copula:  # "Who is a cliff top?": a definition, asked as one
                found.append((f"Who {verb} {rest}{_intro_tail(clause.intro)}?", "who"))
            elif fact and not copula:
                found.append((f"What {verb} {rest}{_intro_tail(clause.intro)}?", "what"))
        # when: active sentences with a date (passive ones are the `date` rule's)
        if _DATE.search(s.text) and not _DATE_PASSIVE.match(s.text) and not clause.aux:
            undated = _DATE_PHRASE.sub("", clause.rest).strip(" ,")
            short = _shorten(undated) if undated else ""
            if short is not None and (q := _inverted(clause, "When", short)):
                found.append((q, "when"))
        # where: a place named after the verb
        if (place := _PLACE.search(clause.rest)) and place.group("place").split()[0] not in _NOT_PLACES:
            before = clause.rest[: place.start()].strip(" ,")
            first = before.split()[0].lower() if before else ""
            if clause.aux and clause.verb.lower() in ("is", "are", "was", "were"):
                tail = first if first in _LOCATIVE_PARTICIPLES else ""
                if tail or not before or before.split()[0].lower() in ("a", "an", "the", "one"):
                    where = f"Where {clause.verb.lower()} {_subject_phrase(clause.subject)}"
                    found.append((f"{where}{' ' + tail if tail else ''}?", "where"))
            elif (short := _shorten(before) if before else "") is not None and (
                q := _inverted(clause, "Where", short)
            ):
                found.append((q, "where"))
        # why and how: the clause before "because" / "by doing"
        for pattern, wh in ((_WHY, "Why"), (_HOW, "How")):
            if m := pattern.search(" " + clause.rest + " "):
                before = clause.rest[: max(0, m.start() - 1)].strip(" ,")
                short = _shorten(before) if before else ""
                if short is not None and (q := _inverted(clause, wh, short)):
                    found.append((q, wh.lower()))
        for question, rule in found:
            if counts[rule] < MAX_PER_RULE:
                counts[rule] += 1
                yield re.sub(r"\s+", " ", question), s, rule


# --- facts: a quantity and what it measures, a step, an agent --------------------------------------
#
# A fact question asks for the fact and names what it is about in the sentence's own clause, moved
# into question order ("A crew will return within 3 working days." -> "Within how many working
# days will a crew return?"). Each comes with rewordings made from the same parse (another
# question word, the embedded "Do you know ..." order), which `paraphrases` looks up by answer.


@dataclass(frozen=True, slots=True)
class Fact:
    """A question about one fact of a sentence, its rewordings, and the rule that made it."""

    question: str
    variants: tuple[str, ...]
    rule: str


_MODALS = frozenset("can could will would may might must shall should".split())
_FINITE_AUX = frozenset("is are was were has have had does do did".split())
# a sentence opening with one of these starts with a subordinate clause, not its subject
_CLAUSE_OPENERS = frozenset(
    """if when whenever although though because while unless as once after before since until where
    whether so and but or yet to for with without unlike like otherwise however also then instead
    meanwhile therefore thus""".split()
)
_RELATIVES = frozenset("that which who whom whose where when if".split())
_PREPOSITIONS = frozenset("in on at under over across from since until during by with for of".split())
_POSSESSIVES = frozenset("its their his her our".split())
_ORDINALS = frozenset("first second third last next previous further final".split())
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
    dates = [(m.start(), m.end()) for m in _DATE.finditer(text)]
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
            elif first.islower() and first not in _STOPWORDS and first.isalpha():
                noun, end = first, end + words.end(1)
                if second and not set(second.split()) & _STOPWORDS and second[-1] == "s":
                    noun, end = f"{first} {second}", end - words.end(1) + words.end(2)
                elif of and noun in _MEASURE_NOUNS and what not in _STOPWORDS:
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


@dataclass(frozen=True, slots=True)
class _Finite:
    intro: str  # "In 2023" (a leading adverbial), or ""
    subject: str  # as it reads mid-sentence ("a crew")
    aux: str  # what inverts: an auxiliary or modal, or the "does"/"did" a lexical verb needs
    verb: str  # the rest of the verb group in question order ("be reserved", "cost"), "" for "is"
    declarative: str  # the verb group as the sentence has it ("may be reserved", "costs")
    start: int  # where the clause's remainder starts in the sentence
    rest: str


_PRESENT_NEXT = frozenset(
    "a an the its their every each one up about around only more less at over under almost nearly".split()
)
_DATE_INTRO = re.compile(rf"(?P<intro>(?:In|On|During|By|Since|Until)\s+{_DATE_RE})\s+(?=[a-z])")


def _present_base(verb: str) -> str | None:
    """ "costs" -> "cost", "carries" -> "carry"; None when the word is no third-person verb."""
    if len(verb) < 4 or not verb.endswith("s") or verb.endswith(("ss", "us", "is", "ous")):
        return None
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith(("ches", "shes", "sses", "xes", "zes", "oes")):
        return verb[:-2]
    return verb[:-1]


def parse_finite(sentence: str) -> _Finite | None:
    """The subject and finite verb group of a declarative sentence, ready to invert into a question;
    None for imperatives, sentences that open with a subordinate clause, pronoun subjects and
    subjects with a relative clause or participle ("Containers left outside ... may be removed")."""
    text = sentence.rstrip().rstrip(".!?;:")
    offset, intro = 0, ""
    if m := _INTRO.match(text) or _DATE_INTRO.match(text):
        offset, intro = m.end(), m.group("intro")
    spans = [(w.start() + offset, w.end() + offset, w.group(0)) for w in re.finditer(r"\S+", text[offset:])]
    words = [w for _, _, w in spans]
    if len(words) < 3 or words[0].lower() in _CLAUSE_OPENERS | _PRONOUNS | _PREPOSITIONS | _POSSESSIVES:
        return None  # "Its footage is kept ...": whose, the question could not say
    if not (words[0][:1].isupper() or (intro and words[0].lower() in _DETERMINERS)):
        return None
    for i in range(1, min(len(words) - 1, 9)):
        prev, w = words[i - 1], words[i]
        lw = w.lower()
        if not re.fullmatch(r"[\w'’-]+", prev) or lw in _RELATIVES:
            return None
        subject = _subject_phrase(" ".join(words[:i]))
        if all(x.lower() in _DETERMINERS for x in words[:i]):
            continue
        if lw in _MODALS or lw in _FINITE_AUX:
            j = i + 1
            group = [lw]
            while j < len(words) and words[j].lower() in ("not", "be", "been", "have", "being", "also"):
                group.append(words[j].lower())
                j += 1
            nxt = words[j].lower().rstrip(",") if j < len(words) else ""
            if nxt.isalpha() and (
                _past_verb(nxt)
                or nxt in _PARTICIPLES
                or (lw in _MODALS and group[-1] == lw and nxt not in _STOPWORDS and not nxt.endswith("ly"))
            ):
                group.append(nxt)
                j += 1
            if lw in ("has", "have", "had") and len(group) == 1:
                aux, verb = {"has": "does", "have": "do", "had": "did"}[lw], "have"
            else:
                aux, verb = lw, " ".join(group[1:])
            start = spans[j][0] if j < len(spans) else len(text)
            return _Finite(intro, subject, aux, verb, " ".join(group), start, text[start:])
        if w.islower() and w.isalpha():
            base = lemma(w) if _past_verb(w) else None
            aux = "did"
            if base is None and (base := _present_base(w)) is not None:
                # "writes 8,640", "takes about": a plural noun ("Event loans must") is followed by a verb
                if not (re.match(r"[£€$\d]", words[i + 1]) or words[i + 1].lower() in _PRESENT_NEXT):
                    continue
                aux = "does"
            if base is None:
                continue
            # a participle that opens a reduced relative: the sentence's verb comes after it
            clause = text[spans[i][1] :].split(",")[0].split()
            if aux == "did" and any(x.lower() in _MODALS or x.lower() in _FINITE_AUX for x in clause):
                return None
            start = spans[i + 1][0]
            return _Finite(intro, subject, aux, base, w, start, text[start:])
        if not re.fullmatch(r"[\w'’-]+", w):
            return None
    return None


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
    if not m or any(w in _STOPWORDS for w in m.group(1).split()) or _past_verb(m.group(1).split()[-1]):
        return None
    after = re.match(
        r"\s+((?:per\s+[a-z]+\s*)+|for\s+[a-z][\w-]*(?:\s+[a-z][\w-]*)?(?=[,.;]|$))", text[q.end :]
    )
    np = f"the {m.group(1)}{' ' + q.tail if q.tail else ''}{' ' + after.group(1).strip() if after else ''}"
    if len(np.split()) < 3:
        return None  # "the depth": too little to know what is asked about
    verb = "was" if re.search(r"\b(?:was|were|had)\b", text) else "is"
    wh = {"money": "How much", "time": "How long", "percent": "What percentage"}.get(q.kind)
    if wh is None:  # "a bin of 240 litres": asking "What is the bin?" would ask for a definition
        if not q.noun:
            return None
        wh = f"How many {q.noun}"
    question = f"{wh} {verb} {np}?"
    variants = [f"Do you know {wh.lower()} {np} {verb}?"]
    variants.insert(0, f"What {verb} {np}?")
    return Fact(_tidy(question), tuple(_tidy(v) for v in variants), "number")


def number_facts(sentence: str) -> list[Fact]:
    """Questions that ask for a sentence's first quantity, each with its rewordings."""
    text = sentence.strip().split("; ")[0].rstrip(".!?;: ")
    clause = parse_finite(text)
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
        last = (before.split() or [""])[-1].lower()
        if re.search(r"[,;:(]|\b(?:that|which|who|whom|whose)\b", before) or last in _STOPWORDS | _ORDINALS:
            return []  # another clause's quantity, or one inside a phrase ("to a depth of 40 mm")
        rest = _shorten(_tidy(before + " " + after))
        if rest is None:
            return []
        rest = re.sub(r"\s+(?:and|or|but|which|that|only|each|respectively|alone)$", "", rest)
        intro = _intro_tail(clause.intro)
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
    return w.isalpha() and w not in _STOPWORDS and w not in _PRONOUNS and not w.endswith(("ed", "ly", "s"))


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
        if m.group("cond").split()[0].lower() in _CLAUSE_OPENERS | (_PRONOUNS - {"you", "we", "i"}):
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
        if main.lower() in _DETERMINERS or main[:1].isupper():
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
    text = sentence.strip().split("; ")[0].rstrip(".!?;: ")
    clause = parse_finite(text)
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
    reverse = f"What {'does' if present else 'did'} {agent} {base}?"
    return [
        Fact(forward, tuple(v for v in variants if v != forward), "who"),
        Fact(reverse, (f"Which {obj.split()[-1]} {'does' if present else 'did'} {agent} {base}?",), "what"),
    ]


@lru_cache(maxsize=4096)
def sentence_facts(sentence: str) -> tuple[Fact, ...]:
    """Every fact question the rules find in one sentence (a pure function of the sentence, so a
    paraphrase can find its question's rewordings again from the answer)."""
    return (*step_facts(sentence), *agent_facts(sentence), *number_facts(sentence))


# --- document strategies -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Placed:
    """A prose sentence of the document, with the chunk it is asked about from."""

    chunk: Chunk
    text: str
    order: int
    section: int
    first_in_section: bool


def _document_sentences(chunks: Sequence[Chunk]) -> list[_Placed]:
    out: list[_Placed] = []
    section = -1
    for chunk in chunks:
        if chunk.part == 0:
            section += 1
        first = chunk.part == 0
        for s in _sentences(chunk):
            out.append(_Placed(chunk, s.text, len(out), section, first))
            first = False
    return out


def _content_words(text: str) -> list[str]:
    return [w.lower() for w in _words(text) if w.lower() not in _STOPWORDS and len(w) > 2]


def _scores(sentences: Sequence[_Placed]) -> list[float]:
    """Centrality from word frequencies (sqrt-length normalised), with a bonus for the document's
    first sentence and each section's first: leads tend to say what a text is about."""
    tf = Counter(w for s in sentences for w in set(_content_words(s.text)))
    raw = []
    for s in sentences:
        words = set(_content_words(s.text))
        raw.append(sum(math.log1p(tf[w]) for w in words) / math.sqrt(len(words) + 1))
    top = max(raw, default=1.0) or 1.0
    return [
        r + (0.5 * top if s.order == 0 else 0.25 * top if s.first_in_section else 0.0)
        for r, s in zip(raw, sentences, strict=True)
    ]


def _select(
    sentences: Sequence[_Placed], scores: Sequence[float], budget: int, max_n: int, spread: bool = True
) -> list[_Placed]:
    """The best-scored sentences that fit `budget` characters, not repeating each other, at most one
    per section first (when `spread`), returned in document order."""
    usable = [
        (score, s)
        for score, s in zip(scores, sentences, strict=True)
        if 40 <= len(s.text) <= min(350, budget) and not s.text.endswith("?")
    ]
    ranked = sorted(usable, key=lambda x: (-x[0], x[1].order))
    chosen: list[_Placed] = []
    taken: set[int] = set()
    used = -1
    for pass_ in (0, 1) if spread else (1,):
        for _, s in ranked:
            if len(chosen) >= max_n:
                break
            if s.order in taken or used + 1 + len(s.text) > budget:
                continue
            if pass_ == 0 and any(c.section == s.section for c in chosen):
                continue
            words = set(_content_words(s.text))
            if any(_jaccard(words, set(_content_words(c.text))) > 0.5 for c in chosen):
                continue
            chosen.append(s)
            taken.add(s.order)
            used += 1 + len(s.text)
    return sorted(chosen, key=lambda s: s.order)


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def _answer_pair(question: str, picked: Sequence[_Placed], strategy: str) -> QAPair | None:
    if not picked:
        return None
    answer = " ".join(s.text for s in picked)
    return _pair(picked[0].chunk, question, answer, strategy, [s.chunk.chunk_id for s in picked])


def clean_title(name: str | None) -> str | None:
    """A title a person would type, from a document name: "annual_report-2021.pdf" -> "annual report
    2021"; None for names that look like ids or are empty."""
    if not name:
        return None
    name = name.strip()
    if "://" in name:
        name = name.split("://", 1)[1].split("?", 1)[0].rstrip("/")
        name = name.rsplit("/", 1)[-1] if "/" in name else name
    stem = PurePosixPath(name).name
    if re.search(r"\.(?:pdf|docx?|txt|md|markdown|html?|rtf|odt|epub|jsonl?|csv)$", stem, re.I):
        stem = stem.rsplit(".", 1)[0]
    title = re.sub(r"[\s_]+", " ", stem.replace("-", " ")).strip()
    letters = sum(c.isalpha() for c in title)
    if letters < 3 or letters < 0.5 * len(title.replace(" ", "")) or len(title) > 120:
        return None
    if not re.search(r"[aeiouy]", title, re.I) or re.fullmatch(r"[0-9a-f ]{8,}", title, re.I):
        return None
    return title


# metadata: the lines at the top of the document

_METADATA_LINES = 12


def _metadata_lines(chunk: Chunk) -> Iterator[str]:
    for line in chunk.text.splitlines()[:_METADATA_LINES]:
        line = line.strip().strip("*_").strip()
        if line:
            yield line


def _metadata(chunks: Sequence[Chunk], title: str | None) -> list[QAPair]:
    """Title, authors and date, when the document's first lines state them."""
    first = [c for c in chunks[:2] if c.start < 600]
    if not first:
        return []
    about = _lower_first(title) if title else "the document"
    pairs: list[QAPair] = []
    lead = first[0]
    if lead.heading and lead.part == 0 and lead.start < 300:
        pairs.append(_pair(lead, "What is the title of the document?", lead.heading, "metadata"))
    got_authors = got_date = False
    for chunk in first:
        for line in _metadata_lines(chunk):
            if not got_authors and (m := _AUTHOR_LINE.fullmatch(line)):
                names = m.group("names").strip()
                if _NAME_LIST.fullmatch(names):
                    pairs.append(_pair(chunk, f"Who wrote {about}?", names, "metadata"))
                    got_authors = True
            if not got_date and (m := _DATE_LINE.fullmatch(line)):
                kind = (m.group("kind") or "").lower()
                verb = "last updated" if ("updated" in kind or "revised" in kind) else "published"
                pairs.append(_pair(chunk, f"When was {about} {verb}?", m.group("date"), "metadata"))
                got_date = True
    return pairs


def document_pairs(
    chunks: Sequence[Chunk], *, doc_title: str | None = None, strategies: Iterable[str] | None = None
) -> list[QAPair]:
    """The pairs of the selected document-scope strategies: summaries of the whole document at three
    lengths and one that walks every section, a summary per section, metadata, and the vague
    questions a person knowing only the title would ask."""
    selected = resolve_strategies(strategies)
    if not any(s in selected for s in DOCUMENT_STRATEGIES):
        return []
    sentences = _document_sentences(chunks)
    if len(sentences) < MIN_DOCUMENT_SENTENCES:
        return []  # too little text to say what it is about: nothing to summarise, nothing invented
    scores = _scores(sentences)
    lead = chunks[0]
    title = lead.heading if (lead.heading and lead.part == 0 and lead.start < 300) else clean_title(doc_title)
    title = _short_title(title)
    about = _lower_first(title) if title else "the document"
    pairs: list[QAPair | None] = []
    if "summary" in selected:
        pairs += [
            _answer_pair(
                f"Can you summarize {about} in one sentence?", _select(sentences, scores, 250, 1), "summary"
            ),
            _answer_pair(
                f"Can you give a short summary of {about}?", _select(sentences, scores, 450, 3), "summary"
            ),
            _answer_pair(
                f"Can you give a detailed summary of {about}?",
                _select(sentences, scores, MAX_ANSWER_CHARS, 6),
                "summary",
            ),
        ]
        sections = sorted({s.section for s in sentences})
        if len(sections) > 1:
            leads = []
            for sec in sections:
                in_section = [(sc, s) for sc, s in zip(scores, sentences, strict=True) if s.section == sec]
                best = _select([s for _, s in in_section], [sc for sc, _ in in_section], 220, 1, spread=False)
                leads += best
            walk = _fit(sorted(leads, key=lambda s: s.order), MAX_ANSWER_CHARS)
            pairs.append(
                _answer_pair("Can you summarize the whole document, section by section?", walk, "summary")
            )
    if "section_summary" in selected:
        for sec in sorted({s.section for s in sentences}):
            members = [(sc, s) for sc, s in zip(scores, sentences, strict=True) if s.section == sec]
            heading = _section_name(members[0][1].chunk.heading)
            if not heading or len(members) < 2 or _short_title(heading) == title:
                continue
            picked = _select([s for _, s in members], [sc for sc, _ in members], 450, 3, spread=False)
            if len(picked) >= 2:
                pairs.append(
                    _answer_pair(
                        f"Can you summarize the section on {_lower_first(heading)}?",
                        picked,
                        "section_summary",
                    )
                )
    if "metadata" in selected:
        pairs += _metadata(chunks, title)
    if "vague" in selected:
        pairs += [
            _answer_pair(f"What is {about} about?", _select(sentences, scores, 300, 2), "vague"),
            _answer_pair(f"Can you tell me about {about}?", _select(sentences, scores, 450, 3), "vague"),
            _answer_pair(f"What should I know about {about}?", _select(sentences, scores, 600, 4), "vague"),
        ]
        headings = [c for c in chunks if c.part == 0 and c.heading and _short_title(c.heading) != title]
        names = list(dict.fromkeys(c.heading for c in headings))
        if len(names) >= 2:
            firsts = [next(c for c in headings if c.heading == n) for n in names]
            names = [_section_name(n) for n in names]
            answer = "; ".join(names)
            if len(answer) <= MAX_ANSWER_CHARS and len(answer) >= MIN_ANSWER_CHARS:
                pairs.append(
                    _pair(
                        firsts[0],
                        f"What topics does {about} cover?",
                        answer,
                        "vague",
                        [c.chunk_id for c in firsts],
                    )
                )
    return [p for p in pairs if p is not None]


def _short_title(title: str | None) -> str | None:
    """The title a person would say: no site name after "|", no subtitle after a dash, and no
    subtitle after a colon when the whole is long ("Tidewell: Adaptive Message Batching ... Sites")."""
    if not title:
        return title
    title = re.split(r"\s+[|—–]\s+|\s+-\s+", title)[0].strip()
    if len(title) > 60 and ":" in title:
        title = title.split(":")[0].strip()
    return title or None


def _section_name(heading: str | None) -> str | None:
    """A heading without its number: "5.2 Mounting steps" -> "Mounting steps"."""
    return re.sub(r"^\s*(?:\d+(?:\.\d+)*\.?|[IVX]+\.)\s+", "", heading).strip() if heading else heading


def _fit(sentences: Sequence[_Placed], budget: int) -> list[_Placed]:
    out, used = [], -1
    for s in sentences:
        if used + 1 + len(s.text) <= budget:
            out.append(s)
            used += 1 + len(s.text)
    return out


# --- paraphrases -------------------------------------------------------------------------------

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
