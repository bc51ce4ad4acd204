"""The `extractive` QA backend: deterministic, grounded question-answer pairs without a language model.

Each rule reads a chunk's sentences and writes questions from templates; every answer is quoted from
the chunk (`answer in chunk.text`), so a pair never says more than the document does. The rules:
definitions ("X is a Y"), dates and numbers (asked in the sentence's own words), people, and a
fallback so that every chunk with real content yields at least one pair. Headings and references
are not asked about: "What does the document say about 5.2 Mounting steps?" teaches a title. `filter_pairs` then drops empty, too
short, too long and near-duplicate pairs, and `make_pairs` ties chunking, rules and filtering
together for one document.

These rules are the `quiz` and `definition` strategies; `strategies.py` adds the others (who/what/
when/where/why/how, summaries, metadata, title questions, paraphrases), `quality.py` holds the
checks every pair passes, and `backends.py` the pipeline `make_pairs` runs.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from services.common.qapair import QAPair, pair_id_for
from services.qagen.chunk import Chunk, LengthFn, chunk_text, split_sentences
from services.qagen.clean import chunk_clean

# Answers outside these bounds make poor training targets (fragments, or whole pages).
MIN_ANSWER_CHARS = 20
MAX_ANSWER_CHARS = 800
# Questions whose normalised token sets overlap this much are the same question.
DUPLICATE_JACCARD = 0.9
# A chunk with fewer words than this has no real content and yields no pairs.
MIN_CONTENT_WORDS = 8
# A document with fewer words of prose than this is "not enough text to learn from": no pairs at all.
MIN_DOCUMENT_WORDS = 30
MAX_PER_RULE = 3
# Chunk sizes of `make_pairs` when a tokenizer's `length_fn` is given and no size is: in tokens.
DEFAULT_MAX_TOKENS = 320
DEFAULT_OVERLAP_TOKENS = 40

REASONS = ("empty", "too_short", "too_long", "duplicate_question")


# --- sentences of a chunk ----------------------------------------------------------------------

_WORD = re.compile(r"[^\W_][\w'’-]*")
_NOT_LETTER = re.compile(r"[\W\d_]+")
# a code block closed within the chunk (an unclosed fence's lines are left to `_is_prose`)
_FENCED = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers him his how i if in into is it its itself just may me might
    more most much must my no nor not now of off on once only or other our ours out over own same she
    should so some such than that the their theirs them then there these they this those through to
    too under until up very was we were what when where which while who whom why will with would you
    your yours one two many several every each its new""".split()
)
_PRONOUNS = frozenset("it this that these those there he she they we i you here which who what".split())


@dataclass(frozen=True, slots=True)
class _Sentence:
    start: int  # offsets into chunk.text
    end: int
    text: str


@dataclass(frozen=True, slots=True)
class _Candidate:
    question: str
    start: int  # the answer's span in chunk.text
    end: int
    strategy: str


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


# What a page says when its content did not load: true of the page, worthless to learn.
_BOILERPLATE = re.compile(
    r"\b(?:enable|turn\s+on|activate|allow)\s+javascript\b|\bjavascript\s+(?:is\s+)?(?:disabled|required|needed)"
    r"|</?noscript|\byour\s+browser\s+(?:does\s+not|doesn't|is\s+not)\s+support"
    r"|\b(?:we|this\s+site)\s+uses?\s+cookies\b|\baccept\s+(?:all\s+)?cookies\b",
    re.I,
)


# a reference list entry ("Proceedings of ..., 2022.", "Letters, 9:201–214, 2021.") or a sentence
# glued to a numbered heading ("5.6 Ablation To find out ..."): asking about either teaches noise
_REFERENCE = re.compile(
    r"\bet\s+al\.|\bProceedings\s+of\b|\bProc\.|\bdoi:|\barXiv\b|\b\d+:\d+[–-]\d+\b|^\[\d+\]"
    r"|^\d+(?:\.\d+)*\.?\s+[A-Z][\w-]*(?:\s+[a-z][\w-]*)?\s*\n"
)
_NUMERIC = re.compile(r"[(\[]?[-+±]?[\d.,:%/]*\d[\d.,:%/]*[)\]]?")


def _is_prose(text: str) -> bool:
    """A sentence worth asking about: enough words, mostly letters, not a fragment, a table row or
    a page's "enable JavaScript" notice."""
    if len(_words(text)) < 4 or text[0].islower() or text.startswith(("```", "~~~", "|")):
        return False
    if _BOILERPLATE.search(text) or is_metadata_line(text) or _REFERENCE.search(text):
        return False
    tokens = text.split()
    if sum(bool(_NUMERIC.fullmatch(t)) for t in tokens) > 0.25 * len(tokens):
        return False  # a table row or a plot's axis labels run together, not a sentence
    return len(_NOT_LETTER.sub("", text)) >= 0.5 * len(text)


_GLUED_HEADING = re.compile(
    r"(?:\d+(?:\.\d+)*\.?[ \t]+)?[A-Z][\w-]*(?:[ \t]+[A-Za-z][\w-]*){0,3}[ \t]*\n(?=[A-Z])"
)


def _sentences(chunk: Chunk) -> list[_Sentence]:
    """The chunk's prose sentences; code blocks and the overlap with the previous chunk (asked about
    there, and perhaps cut mid-sentence) left out."""
    fenced = [(m.start(), m.end()) for m in _FENCED.finditer(chunk.text)]
    out = []
    for s, e in split_sentences(chunk.text):
        if s < chunk.overlap or any(fs <= s < fe for fs, fe in fenced):
            continue
        glued = _GLUED_HEADING.match(chunk.text, s, e)
        if glued and glued.group(0).split()[-1].lower() not in _STOPWORDS:  # not "Under\nTidewell ..."
            s = glued.end()  # "Acknowledgements\nThis work was ...": a heading line the PDF ran into the text
        sentence = chunk.text[s:e]
        if _is_prose(sentence):
            out.append(_Sentence(s, e, sentence))
    return out


def _fits(sentence: _Sentence) -> bool:
    return MIN_ANSWER_CHARS <= len(sentence.text) <= MAX_ANSWER_CHARS


def _lower_first(phrase: str) -> str:
    """Lower a leading article or determiner ("The tower" -> "the tower"); names keep their case."""
    first, _, rest = phrase.partition(" ")
    if first in ("The", "A", "An", "This", "These", "That", "Those", "Its", "Their", "Our"):
        return first.lower() + (" " + rest if rest else "")
    return phrase


def _clean_topic(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".:;,!?").strip()


# --- rules -------------------------------------------------------------------------------------

_SUBJECT = r"(?P<subj>(?:(?:The|An?)\s+)?[A-Z][\w'’-]*(?:\s+[\w'’-]+){0,5}?)"
_DEFINITION = re.compile(_SUBJECT + r"\s+(?P<verb>is|are|was|were|refers\s+to|means)\s+(?P<rest>\S.*)$", re.S)
_PARTICIPLE = re.compile(
    r"(?:\w+(?:ed|en|ly)|sold|built|made|held|kept|found|run|shown|done|set|put|cut|led|paid|laid|sent|spent"
    r"|told|brought|bought|caught|taught|thought|won|lost|left|met|born|worn|drawn|grown|thrown|known|not"
    r"|also|still|now|often|always|never|usually|generally)\b"
)
_DEFINITION_OBJECT = re.compile(r"(?:an?|the|one|any|also\s+an?|also\s+the)\s", re.I)
_TITLE_WORDS = frozenset(
    "Mr Mrs Ms Dr Prof Professor Sir Dame Lady Lord King Queen Captain Saint Pope President".split()
)
_THING_WORDS = frozenset(
    """Lighthouse Tower Island Islands Isle Harbour Harbor Port Bay River Lake Sea Ocean Mountain
    Mount Street Road Bridge Castle Church Cathedral Hall House Museum Library Park Station Company
    Corporation Council Board Society Association Institute University College School Hospital
    Agency Office Ministry Department Project Programme Program Act Treaty Festival Prize Award
    Service Trust Foundation Group Club Union League Party Centre Center Market Square Valley
    Canal Coast Cape Point Reef Forest Province County State Kingdom Republic Empire City Town
    Village Fleet Line Railway Airport Ridge Fen Cross Side Lane Marsh Hill Wood Green Moor Heath
    Common Gate Quay Wharf End Vault Panel Liaison Coordinator Fund Hub Portal App Centre Desk
    Committee Team Share Library Institute Estate Farm Mill Works Field Fields""".split()
)


def _wh_for(subject: str) -> str:
    """The question word: "Who" for what looks like a person's name ("Anna Roth"), else "What"."""
    words = subject.split()
    if words[0] in _TITLE_WORDS:
        return "Who"
    if words[0] in ("The", "A", "An", "the", "a", "an") or len(words) < 2 or len(words) > 3:
        return "What"
    if words[0].endswith("ing"):
        return "What"  # "Installing Tidewell": an activity, not a person
    if all(w[:1].isupper() for w in words) and not any(w in _THING_WORDS for w in words):
        return "Who"
    return "What"


_QUANTIFIERS = frozenset("All Each Every Most Some Both Many Few Several No Other".split())
_ORDINAL_WORDS = frozenset("first second third fourth last former latter".split())
_CLAUSE_START = frozenset("If When While Although Though Because Unless Once As Where Whether Since".split())


def definitions(sentences: list[_Sentence]) -> Iterator[_Candidate]:
    """Definitions: "X is a Y." -> "What is X?", answered with the sentence."""
    for s in sentences:
        m = _DEFINITION.match(s.text)
        if not m or not _fits(s):
            continue
        subj, verb, rest = m.group("subj"), re.sub(r"\s+", " ", m.group("verb")), m.group("rest")
        if "," in subj or subj.split()[0].lower() in _PRONOUNS or subj.split()[0] in _CLAUSE_START:
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
        topic = _lower_first(subj)
        if verb == "refers to":
            question = f"What does {topic} refer to?"
        elif verb == "means":
            question = f"What does {topic} mean?"
        else:
            # "Who" only when the sentence says the subject is a person ("a botanist", "a person who")
            person = any(w in _PERSON_NOUNS for w in rest.lower().split()[:3])
            question = f"{'Who' if person and _wh_for(subj) == 'Who' else 'What'} {verb} {topic}?"
        yield _Candidate(question, s.start, s.end, "definition")


_MONTHS = (
    "January|February|March|April|May|June|July|August|September|October|November|December|"
    "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
)
_YEAR = r"(?:1[0-9]{3}|20[0-9]{2})"
# a bare year, unless a plural noun follows: "1798 workers" is a count, not a date
_BARE_YEAR = (
    rf"{_YEAR}(?!\s+(?!(?:was|has|is|as|its|this|thus|plus|across|always|perhaps|besides|towards)\b)"
    r"[a-z]{2,}s\b)"
)
_DATE_RE = (
    rf"(?:\d{{1,2}}(?:st|nd|rd|th)?\s+(?:{_MONTHS})\.?,?\s+{_YEAR}"
    rf"|(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+{_YEAR}"
    rf"|(?:{_MONTHS})\s+{_YEAR}"
    rf"|{_YEAR}-\d{{2}}-\d{{2}}"
    rf"|(?:the\s+)?{_YEAR}s"
    rf"|{_BARE_YEAR})"
)
_DATE = re.compile(rf"(?<![\w.,-]){_DATE_RE}(?![\w-])")
_DATE_LEAD = re.compile(rf"(?P<prep>In|On|During|By|Since|Around|From|Until)\s+(?P<date>{_DATE_RE}),?\s+\S")
_DATE_PASSIVE = re.compile(
    r"(?P<subj>(?:(?:The|An?)\s+)?[A-Z][\w'’-]*(?:\s+[\w'’-]+){0,5}?)\s+(?P<aux>was|were)\s+"
    rf"(?P<mid>[a-z][^,;]*?)\s+(?:in|on|during|around|by)\s+(?P<date>{_DATE_RE})(?![\w-])"
)


# a document's byline and date lines ("By Anna Roth", "Published: 12 March 2021"): metadata, not prose
_NAME_LIST = re.compile(
    r"[A-Z][\w'’.-]+(?:\s+[A-Z][\w'’.-]+)+(?:(?:,\s*|,?\s+and\s+)[A-Z][\w'’.-]+(?:\s+[A-Z][\w'’.-]+)+)*"
)
_AUTHOR_LINE = re.compile(
    r"(?i:by|authors?|written\s+by|prepared\s+by|compiled\s+by)\s*[:\-–]?\s*(?P<names>[A-Z].{1,100}?)\s*\.?"
)
_DATE_LINE = re.compile(
    rf"(?:(?P<kind>date|dated|published(?:\s+on)?|updated|last\s+updated|revised|issued)\s*[:\-–]?\s*)?"
    rf"(?P<date>{_DATE_RE})\s*\.?\s*$",
    re.I,
)


def is_metadata_line(text: str) -> bool:
    """Whether a line is a byline or a date line, asked about by the `metadata` strategy only."""
    text = text.strip().strip("*_").strip()
    if m := _AUTHOR_LINE.fullmatch(text):
        return bool(_NAME_LIST.fullmatch(m.group("names").strip()))
    return bool(_DATE_LINE.fullmatch(text))


def dates(sentences: list[_Sentence]) -> Iterator[_Candidate]:
    """Sentences with a date: "When was X built?", or "What happened in 1902?" for a sentence that
    opens with its date."""
    n = 0
    for s in sentences:
        if n >= MAX_PER_RULE or not _fits(s) or not _DATE.search(s.text):
            continue
        question = None
        if m := _DATE_PASSIVE.match(s.text):
            subj = m.group("subj")
            if "," not in subj and subj.split()[0].lower() not in _PRONOUNS:
                question = f"When {m.group('aux')} {_lower_first(subj)} {m.group('mid')}?"
        if question is None and (m := _DATE_LEAD.match(s.text)):
            question = f"What happened {m.group('prep').lower()} {m.group('date')}?"
        if question is None:
            continue  # "What happened in 2022?" about a date deep in a sentence asks about nothing
        n += 1
        yield _Candidate(question, s.start, s.end, "date")


_AUX = r"is|are|was|were|has|have|had|can|could|will|would|may|might|must|should|does|do|did"
_VERB_SUBJECT = re.compile(
    rf"(?P<subj>(?:(?:The|An?)\s+)?[A-Z][\w'’-]*(?:\s+[\w'’-]+){{0,6}}?)\s+(?P<aux>{_AUX})\b"
)
_NUMBER = re.compile(r"(?<![\w.,-])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w-])")
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
        if w in _STOPWORDS:
            break
        words.append(w)
    return " ".join(words)


def numbers(sentences: list[_Sentence]) -> Iterator[_Candidate]:
    """Sentences with a quantity: "How tall is X?", "How many Y does X have?", "Within how many days
    will a crew return?" (see `strategies.number_facts`)."""
    n = 0
    for s in sentences:
        if not _fits(s):  # no cap per chunk: every quantity is a fact worth asking for
            continue
        date_spans = [(m.start(), m.end()) for m in _DATE.finditer(s.text)]
        num = next(
            (m for m in _NUMBER.finditer(s.text) if not any(a <= m.start() < b for a, b in date_spans)), None
        )
        if num is None:
            continue
        question = None
        if (m := _MEASURE.match(s.text)) and "," not in m.group("subj"):
            if m.group("subj").split()[0].lower() not in _PRONOUNS:
                question = f"How {m.group('adj')} {m.group('aux')} {_lower_first(m.group('subj'))}?"
        if question is None and (m := _HAVE.match(s.text)) and "," not in m.group("subj"):
            noun = _trim_noun(m.group("noun"))
            if noun and m.group("subj").split()[0].lower() not in _PRONOUNS:
                question = f"How many {noun} {_DO[m.group('verb')]} {_lower_first(m.group('subj'))} have?"
        if question is None:
            # the fact rules: the quantity asked for in the sentence's own clause, or nothing (a
            # question the clause cannot carry, "How many minutes does the text mention?", teaches noise)
            from services.qagen.strategies import number_facts

            facts = number_facts(s.text)
            if not facts:
                continue
            question = facts[0].question
        n += 1
        yield _Candidate(question, s.start, s.end, "number")


_NAME = re.compile(
    r"(?<![\w'’-])[A-Z][\w'’-]*[a-z][\w'’-]*"
    r"(?:\s+(?:(?:of|the|de|van|von|da|del|la|le|du|and)\s+)*[A-Z][\w'’-]*[a-z][\w'’-]*)+"
)
_NOT_NAME_START = frozenset(
    """The A An In On At By For From To With During After Before Since Until When While This That
    These Those Its It Their His Her Our Each Every Some Many Most All Both If Although But And Or So
    As Of Today Later Then Now There Here What Who Where Why How Visitors Monday Tuesday Wednesday
    Thursday Friday Saturday Sunday""".split()
    + _MONTHS.split("|")
)
_CONNECTORS = frozenset("of the de van von da del la le du and".split())


def _names_in(text: str) -> Iterator[tuple[str, int]]:
    """Capitalised multi-word names in a sentence, leading function words ("In", "The") removed."""
    for m in _NAME.finditer(text):
        words = m.group(0).split()
        skip = 0
        while skip < len(words) and (words[skip] in _NOT_NAME_START or words[skip] in _CONNECTORS):
            skip += 1
        words = words[skip:]
        while words and words[-1] in _CONNECTORS:
            words.pop()
        capitalised = [w for w in words if w not in _CONNECTORS]
        if len(capitalised) >= 2:
            name = " ".join(words)
            yield name, m.start() + m.group(0).index(words[0])


_PERSON_NOUNS = frozenset(
    """person people keeper botanist engineer author writer director founder chair chairman manager
    officer coordinator researcher professor scientist president minister mayor architect captain
    doctor poet painter artist historian teacher student owner designer inventor explorer
    fisherman farmer mason trustee secretary""".split()
)


def _person_evidence(name: str, text: str, at: int) -> bool:
    """Whether the sentence shows `name` is a person: a title ("Dr Anna Roth") or a role before it
    ("the keeper Anna Roth") or after it ("Anna Roth, the keeper")."""
    if name.split()[0] in _TITLE_WORDS:
        return True
    before = text[:at].split()[-1:]
    after = re.match(r",\s+(?:an?|the)\s+(?:[a-z-]+\s+)?([a-z]+)", text[at + len(name) :])
    return bool(
        (before and before[0].lower() in _PERSON_NOUNS) or (after and after.group(1) in _PERSON_NOUNS)
    )


def entities(sentences: list[_Sentence], skip: Iterable[str] = ()) -> Iterator[_Candidate]:
    """People: "Who is Anna Roth?", answered by the first sentence that says who she is. Places and
    things get no question of their own ("What is Quarry Road?" answered by a sentence that only
    mentions it teaches nothing; their facts are asked about by the other rules)."""
    seen = {t.lower() for t in skip if t}
    n = 0
    for s in sentences:
        if not _fits(s):
            continue
        for name, at in _names_in(s.text):
            if n >= MAX_PER_RULE:
                return
            if name.lower() in seen or not _person_evidence(name, s.text, at):
                continue
            seen.add(name.lower())
            n += 1
            yield _Candidate(f"Who is {name}?", s.start, s.end, "entity")


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
    clean remove insert choose enter set stick refill write read replace report book call collected""".split()
)
_OPENING_PHRASE = re.compile(
    rf"(?P<np>[A-Z][a-z][\w-]*(?:\s+[a-z][\w-]*){{0,2}}?)\s+[a-z][\w-]*\s+(?:{'|'.join(sorted(_STOPWORDS))})\b"
)


def _key_phrases(sentence: _Sentence) -> Iterator[tuple[str, list[str], int]]:
    """Candidate topics of a sentence: its subject (words before the first auxiliary verb), then runs
    of up to two content words (a cheap stand-in for noun phrases). The last item is a score bonus."""
    if (m := _VERB_SUBJECT.match(sentence.text)) and "," not in m.group("subj"):
        subj = m.group("subj")
        words = [w.lower() for w in _words(subj) if w.lower() not in _STOPWORDS]
        if words and subj.split()[0].lower() not in _PRONOUNS and len(words) <= 3:
            yield subj, words, 2
    elif opening := _OPENING_PHRASE.match(sentence.text):
        # "Storm petrels nest on ...": the words before the first verb-like word that a function
        # word follows ("nest on", "arrive on") are the sentence's topic
        phrase = opening.group("np")
        first = phrase.split()[0].lower()
        noun_like = phrase.endswith("s") or first in ("the", "a", "an")  # not "Line the kitchen"
        if (
            noun_like
            and phrase.split()[0] not in _NOT_NAME_START
            and first not in _STOPWORDS | _IMPERATIVE_VERBS
        ):
            yield phrase, [w.lower() for w in phrase.split()], 1
    run: list[str] = []
    for w in [*_words(sentence.text), ""]:
        if w and w.lower() not in _STOPWORDS and len(w) >= 3 and w.isalpha() and not _VERBISH.match(w):
            run.append(w)
            continue
        while run:
            yield " ".join(run[:2]), [x.lower() for x in run[:2]], 0
            run = run[2:]


def fallback(chunk: Chunk, sentences: list[_Sentence]) -> Iterator[_Candidate]:
    """The fallback: "What can you tell me about <key phrase>?" for the chunk's most central phrase
    (a noun phrase: never a clause opener, a number or a year)."""
    freq = Counter(w.lower() for s in sentences for w in _words(s.text) if w.lower() not in _STOPWORDS)
    best: tuple[int, int, str, _Sentence] | None = None
    for order, s in enumerate(sentences):
        if len(s.text) < MIN_ANSWER_CHARS:
            continue
        for phrase, words, bonus in _key_phrases(s):
            if (
                not bonus
                or phrase.split()[0] in _CLAUSE_START
                or re.search(r"\b(?:that|which|who)\b", phrase)
            ):
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
        first in _NOT_NAME_START
        or re.search(rf"\b{first.lower()}\b", chunk.text)
        or (first[1:].islower() and (rest[:1].islower() or (not rest and first.endswith("s"))))
    ):
        phrase = (
            _lower_first(phrase)
            if first in ("The", "A", "An")
            else first.lower() + (" " + rest if rest else "")
        )
    end = _clip(chunk.text, s.start, s.end, MAX_ANSWER_CHARS)
    yield _Candidate(f"What can you tell me about {phrase}?", s.start, end, "fallback")


# --- generation and filtering ------------------------------------------------------------------


def has_content(chunk: Chunk) -> bool:
    return len(_words(chunk.text)) >= MIN_CONTENT_WORDS


def prose_words(chunks: Iterable[Chunk]) -> int:
    """Words in the prose sentences of the chunks (code, tables, notices and overlaps left out)."""
    return sum(len(_words(s.text)) for c in chunks for s in _sentences(c))


def generate_pairs(chunk: Chunk, *, doc_title: str | None = None) -> list[QAPair]:
    """Every rule's pairs for one chunk, in a fixed order; unfiltered (see `filter_pairs`)."""
    if not has_content(chunk):
        return []
    sentences = _sentences(chunk)
    if not sentences:
        return []
    # no "What does the document say about <heading>?": a title question answered by a paragraph
    found: list[_Candidate] = [*definitions(sentences), *dates(sentences), *numbers(sentences)]
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
    pairs = []
    for c in found:
        answer = chunk.text[c.start : c.end]
        pairs.append(
            QAPair(
                pair_id=pair_id_for(chunk.chunk_id, c.question, answer),
                question=c.question,
                answer=answer,
                doc_id=chunk.doc_id,
                chunk_id=chunk.chunk_id,
                start=chunk.start,
                end=chunk.end,
                strategy=c.strategy,
            )
        )
    return pairs


def filter_pairs(
    pairs: Iterable[QAPair],
    *,
    min_answer_chars: int = MIN_ANSWER_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    duplicate_jaccard: float = DUPLICATE_JACCARD,
) -> tuple[list[QAPair], dict[str, int]]:
    """Drop empty, too short and too long pairs, and questions too close to an earlier kept one.

    Returns the kept pairs in their order and the number dropped for each reason in `REASONS`.
    Near-duplicates are found by token-set Jaccard similarity (see `quality.filter_pairs`, which
    adds the malformed and grounding checks that `make_pairs` applies too).
    """
    from services.qagen import quality

    kept, counts = quality.filter_pairs(
        pairs,
        min_answer_chars=min_answer_chars,
        max_answer_chars=max_answer_chars,
        min_answer_chars_by_strategy={},
        duplicate_jaccard=duplicate_jaccard,
        check_malformed=False,
    )
    return kept, {r: counts[r] for r in REASONS}


def _nonspace(text: str, start: int, end: int) -> int:
    return end - start - sum(text.count(ws, start, end) for ws in (" ", "\n", "\t", "\r", "\f", "\v"))


def _union(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def chunk_document(
    text: str,
    doc_id: str,
    *,
    max_chars: int | None = None,
    overlap_chars: int | None = None,
    length_fn: LengthFn | None = None,
    max_tokens: int | None = None,
    overlap_tokens: int | None = None,
    pages: Sequence[dict] | None = None,
) -> list[Chunk]:
    """A document's chunks, sized in characters without `length_fn` (default 1200, overlap 150) or
    in its unit, tokens, with it (default `DEFAULT_MAX_TOKENS`/`DEFAULT_OVERLAP_TOKENS`)."""
    if length_fn is None or length_fn is len:
        length_fn, limit, overlap = len, max_chars or 1200, 150 if overlap_chars is None else overlap_chars
    else:
        limit = max_tokens or max_chars or DEFAULT_MAX_TOKENS
        overlap = next((o for o in (overlap_tokens, overlap_chars) if o is not None), None)
        overlap = min(DEFAULT_OVERLAP_TOKENS, limit // 4) if overlap is None else overlap
    # reference lists, author blocks, axis text and page furniture stay in the text but out of chunks
    return chunk_clean(
        text,
        lambda masked: chunk_text(
            masked, doc_id=doc_id, max_chars=limit, overlap_chars=overlap, length_fn=length_fn, pages=pages
        ),
        doc_id=doc_id,
        pages=pages,
    )


def make_pairs(
    text: str,
    doc_id: str,
    title: str | None = None,
    *,
    max_chars: int | None = None,
    overlap_chars: int | None = None,
    length_fn: LengthFn | None = None,
    max_tokens: int | None = None,
    overlap_tokens: int | None = None,
    pages: Sequence[dict] | None = None,
    strategies: Iterable[str] | None = None,
    min_support: float | None = None,
    max_answer_tokens: int | None = None,
    min_words: int = MIN_DOCUMENT_WORDS,
) -> tuple[list[QAPair], list[Chunk], dict]:
    """Chunk one document, generate pairs for every chunk with the extractive strategies and keep
    the ones that pass the quality checks.

    Sizes: without `length_fn`, chunks hold at most `max_chars` characters (default 1200) and
    overlap by `overlap_chars` (150). With `length_fn` (e.g. `chunk.token_length(tokenizer)`) every
    size is in its unit, tokens: `max_tokens`/`overlap_tokens` (default 320/40; `max_chars`/
    `overlap_chars` are read as tokens when given instead), and `max_answer_tokens` bounds answers.
    `pages` is the document's page map, `strategies` a subset of `strategies.ALL_STRATEGIES`
    (default: all of them), `min_support` the grounding threshold (default `quality.MIN_SUPPORT`).

    `stats`: chunks, chunks_with_pairs, chunk_coverage (their share), generated, pairs (kept),
    coverage (the share of the chunked text's non-space characters that lie in a chunk with a kept
    pair), dropped (by reason, see `quality.REASONS`) and by_strategy. A text with fewer than
    `min_words` words of prose gets no pairs and `stats["error"]` ("not enough text to learn
    from: ..."); the caller reports that.
    """
    from services.qagen import quality
    from services.qagen.backends import ExtractiveGenerator, generate_document

    chunks = chunk_document(
        text,
        doc_id,
        max_chars=max_chars,
        overlap_chars=overlap_chars,
        length_fn=length_fn,
        max_tokens=max_tokens,
        overlap_tokens=overlap_tokens,
        pages=pages,
    )
    kept, gen_stats = generate_document(
        ExtractiveGenerator(),
        chunks,
        doc_title=title,
        strategies=strategies,
        min_support=quality.MIN_SUPPORT if min_support is None else min_support,
        length_fn=None if length_fn is len else length_fn,
        max_answer_tokens=max_answer_tokens,
        min_words=min_words,
    )
    with_pairs = {p.chunk_id for p in kept}
    total = sum(_nonspace(text, s, e) for s, e in _union((c.start, c.end) for c in chunks))
    covered = sum(
        _nonspace(text, s, e) for s, e in _union((c.start, c.end) for c in chunks if c.chunk_id in with_pairs)
    )
    stats = {
        "chunks": len(chunks),
        "chunks_with_pairs": gen_stats["chunks_with_pairs"],
        "chunk_coverage": gen_stats["chunk_coverage"],
        "generated": gen_stats["generated"],
        "pairs": len(kept),
        "coverage": covered / total if total else 0.0,
        "dropped": gen_stats["dropped"],
        "by_strategy": gen_stats["by_strategy"],
    }
    if "error" in gen_stats:
        stats["error"] = gen_stats["error"]
    return kept, chunks, stats
