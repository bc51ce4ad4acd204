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

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
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
        for question, sentence, rule in wh_questions(_sentences(chunk)):
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
    if words[0].lower() in _PRONOUNS:
        return None
    for i in range(1, min(len(words) - 1, 8)):
        prev = words[i - 1]
        if prev.endswith((",", ";", ":")) or '"' in prev or "(" in prev:
            return None
        w = words[i]
        if w.lower() in _AUX or (_past_verb(w) and w.islower()):
            subject = words[:i]
            if all(x.lower() in _DETERMINERS for x in subject):
                continue  # "The automated station": an adjective, the verb comes later
            return _Clause(intro, " ".join(subject), w, " ".join(words[i + 1 :]))
        if not re.fullmatch(r"[\w'’-]+", w):
            return None
    return None


def _shorten(rest: str, max_words: int = 16) -> str | None:
    """The verb phrase up to the first comma or semicolon (what follows is often another clause:
    ", and the keeper left", ", most of whom ..."); None when that is longer than `max_words`."""
    cut = re.search(r"[,;:(]", rest)
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
            verb = clause.verb.lower()
            if clause.person:
                found.append((f"Who {verb} {rest}{_intro_tail(clause.intro)}?", "who"))
            elif fact:
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
            heading = members[0][1].chunk.heading
            if not heading or len(members) < 2 or heading == title:
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
        headings = [c for c in chunks if c.part == 0 and c.heading and c.heading != title]
        names = list(dict.fromkeys(c.heading for c in headings))
        if len(names) >= 2:
            firsts = [next(c for c in headings if c.heading == n) for n in names]
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
        (r"^What does the (?:document|text) say about (?P<x>.+)\?$", ("What can you tell me about {x}?", "What do we learn about {x}?")),
        (r"^What is known about (?P<x>.+)\?$", ("What can you tell me about {x}?", "What does the document say about {x}?")),
        (r"^How many (?P<n>.+?) (?P<d>does|do|did) (?P<x>.+) have\?$", ("What is the number of {n} that {x} {has}?", "{X} {has} how many {n}?")),
        (r"^How (?P<a>tall|high|long|wide|deep|old|heavy|far|thick) (?P<v>is|are|was|were) (?P<x>.+)\?$", ("What {v1} the {m} of {x}?", "Do you know how {a} {x} {v}?")),
        (r"^When (?P<v>was|were|did) (?P<x>.+)\?$", ("In which year {v} {x}?", "At what point {v} {x}?")),
        (r"^What happened (?P<x>(?:in|on|during|since|by|until|from|around) .+)\?$", ("What took place {x}?", "What event does the text mention {x}?")),
        (r"^Where (?P<v>is|are|was|were|did) (?P<x>.+)\?$", ("In what place {v} {x}?", "Where exactly {v} {x}?")),
        (r"^Why (?P<x>.+)\?$", ("For what reason {x}?",)),
        (r"^How (?P<v>was|were|did|is|are) (?P<x>.+)\?$", ("In what way {v} {x}?", "By what means {v} {x}?")),
        (r"^Who (?P<v>is|was) (?P<x>[A-Z][^?]*)\?$", ("Can you tell me who {x} {v}?", "What does the document say about {x}?"), _DEFINES),
        (r"^Who (?P<x>.+)\?$", ("Which person {x}?", "Who was it that {x}?"), frozenset({"who"})),
        (r"^What does (?P<x>.+) (?:mean|refer to)\?$", ("What is meant by {x}?", "Can you explain the term {x}?")),
        (r"^What (?P<v>is|are|was|were) (?P<x>.+)\?$", ("Can you explain what {x} {v}?", "What is meant by {x}?"), _DEFINES),
        (r"^What (?P<x>(?P<v>is|are|was|were|has|had|[a-z]+ed) .+)\?$", ("What {it} that {x}?", "Which thing {x}?"), frozenset({"what"})),
        (r"^What is (?P<x>.+) about\?$", ("What is the subject of {x}?", "What does {x} cover?")),
    ]
]  # fmt: skip
_FRAMES = (
    "According to the document, {q}",
    "{Q}, according to the text?",
    "Based on the document, {q}",
    "Quick question: {Q}?",
    "From what the text says, {q}",
    "I was wondering, {q}",
)


def paraphrases(question: str, answer: str = "", n: int = PARAPHRASES, strategy: str = "") -> list[str]:
    """Up to `n` rewordings of a question that ask for the same fact (rule-based, deterministic).

    A rule for the question's form comes first ("How tall is X?" -> "What is the height of X?");
    `strategy` (the rule that made the question) tells apart forms that look alike ("What is X?"
    asks for a definition, "What was automated in 1971?" for a subject). Framings that fit any
    question ("According to the document, ...") make up the rest.
    """
    out: list[str] = []
    seen = {question.lower()}
    for pattern, templates, only in _PARAPHRASE_RULES:
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
            if "In which year" in t and not _YEAR.search(answer):
                t = t.replace("In which year", "On what date")
            out.append(t.format(**g))
        break
    digest = int(hashlib.sha1(question.encode()).hexdigest(), 16)
    body = question.rstrip("?").rstrip()
    lowered = body if body.split()[0] in ("I",) or _is_name_start(body) else body[:1].lower() + body[1:]
    for k in range(len(_FRAMES)):
        frame = _FRAMES[(digest + k) % len(_FRAMES)]
        out.append(frame.format(q=lowered + "?", Q=body))
    result = []
    for q in out:
        q = re.sub(r"\s+", " ", q).strip()
        if q.lower() not in seen:
            seen.add(q.lower())
            result.append(q)
        if len(result) == n:
            break
    return result


def _is_name_start(text: str) -> bool:
    """Whether the first word keeps its capital mid-sentence (a name), e.g. "Anna Roth ...?"."""
    first = text.split()[0]
    return first[:1].isupper() and first.lower() not in _STOPWORDS and first not in (
        "What", "Who", "When", "Where", "Why", "How", "Which", "Can", "Could", "Do", "Does", "Did",
        "Is", "Are", "Was", "Were", "In", "At", "On", "For", "By", "From", "Quick",
    )  # fmt: skip


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
