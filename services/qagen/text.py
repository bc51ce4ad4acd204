"""The text helpers every QA rule shares: a chunk's prose sentences and the words, names, dates and
numbers in them.

Rules read a chunk through `prose_sentences` (code blocks, tables, notices, references and the
overlap with the previous chunk left out) and ask only about sentences that `fits` the answer bounds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from services.qagen.chunk import Chunk, split_sentences

# Answers outside these bounds make poor training targets (fragments, or whole pages).
MIN_ANSWER_CHARS = 20
MAX_ANSWER_CHARS = 800
# A chunk with fewer words than this has no real content and yields no pairs.
MIN_CONTENT_WORDS = 8
# A document with fewer words of prose than this is "not enough text to learn from": no pairs at all.
MIN_DOCUMENT_WORDS = 30


_WORD = re.compile(r"[^\W_][\w'’-]*")
_NOT_LETTER = re.compile(r"[\W\d_]+")
# a code block closed within the chunk (an unclosed fence's lines are left to `_is_prose`)
_FENCED = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers him his how i if in into is it its itself just may me might
    more most much must my no nor not now of off on once only or other our ours out over own same she
    should so some such than that the their theirs them then there these they this those through to
    too under until up very was we were what when where which while who whom why will with would you
    your yours one two many several every each its new""".split()
)
PRONOUNS = frozenset("it this that these those there he she they we i you here which who what".split())
# a passive participle or an adverb after "is"/"are": "sold on board", "kept for 31 days", "not refunded"
PARTICIPLE = re.compile(
    r"(?:\w+(?:ed|en|ly)|sold|built|made|held|kept|found|run|shown|done|set|put|cut|led|paid|laid|sent|spent"
    r"|told|brought|bought|caught|taught|thought|won|lost|left|met|born|worn|drawn|grown|thrown|known|meant"
    r"|lit|read|heard|hung|shut|split|spread|struck|dug|fed|hit|hurt|let|not|also|still|now|often|always"
    r"|never|usually|generally)\b"
)


@dataclass(frozen=True, slots=True)
class Sentence:
    """A prose sentence of a chunk and its offsets into `chunk.text`."""

    start: int  # offsets into chunk.text
    end: int
    text: str


def words_of(text: str) -> list[str]:
    """The words of a text (letters, digits and inner apostrophes or hyphens)."""
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
    if len(words_of(text)) < 4 or text[0].islower() or text.startswith(("```", "~~~", "|")):
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


def prose_sentences(chunk: Chunk) -> list[Sentence]:
    """The chunk's prose sentences; code blocks and the overlap with the previous chunk (asked about
    there, and perhaps cut mid-sentence) left out."""
    fenced = [(m.start(), m.end()) for m in _FENCED.finditer(chunk.text)]
    out = []
    for s, e in split_sentences(chunk.text):
        if s < chunk.overlap or any(fs <= s < fe for fs, fe in fenced):
            continue
        glued = _GLUED_HEADING.match(chunk.text, s, e)
        if glued and glued.group(0).split()[-1].lower() not in STOPWORDS:  # not "Under\nTidewell ..."
            s = glued.end()  # "Acknowledgements\nThis work was ...": a heading line the PDF ran into the text
        sentence = chunk.text[s:e]
        if _is_prose(sentence):
            out.append(Sentence(s, e, sentence))
    return out


# a sentence that opens with a reference to what came before it cannot stand alone as an answer:
# "Its footage is kept ...", "In other words, ...", "No: plastic bags ...", "It collects readings ..."
CONTEXT_OPENING = re.compile(
    r"^(?:(?:It|Its|They|Their|Them|This|These|Those|That|Such|He|She|His|Her|Also|In other words"
    r"|However|Therefore|Instead|Otherwise)\b(?!-)|(?:No|Yes)\s*[:,])"
)
_LIST_MARKER = re.compile(r"[ \t]*(?:[-*•]|\d+[.)])\s")


def list_position(chunk: Chunk, sentence: Sentence) -> int:
    """0 for a sentence of a paragraph, 1 for the first sentence of a list item, 2 for a later one
    (which has lost its item's label: "- Warning: amber LED. A reading is outside ...")."""
    line_start = chunk.text.rfind("\n", 0, sentence.start) + 1
    marker = _LIST_MARKER.match(chunk.text, line_start)
    if not marker:
        return 0
    return 1 if chunk.text[marker.end() : sentence.start].strip() == "" else 2


def named_in(phrase: str, text: str) -> bool:
    """Whether every content word of `phrase` (singular or plural) is in `text`: a question about
    the subject of "Appeals are heard by the Appeals Panel" that names the panel gives it away."""
    def norm(w: str) -> str:
        return w.lower().removesuffix("s")

    words = {norm(w) for w in words_of(phrase) if w.lower() not in STOPWORDS}
    return bool(words) and words <= {norm(w) for w in words_of(text)}


def fits(sentence: Sentence) -> bool:
    """Whether a sentence is long enough and short enough to be an answer."""
    return MIN_ANSWER_CHARS <= len(sentence.text) <= MAX_ANSWER_CHARS


def lower_first(phrase: str) -> str:
    """Lower a leading article or determiner ("The tower" -> "the tower"); names keep their case."""
    first, _, rest = phrase.partition(" ")
    if first in ("The", "A", "An", "This", "These", "That", "Those", "Its", "Their", "Our"):
        return first.lower() + (" " + rest if rest else "")
    return phrase


TITLE_WORDS = frozenset(
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


def wh_for(subject: str) -> str:
    """The question word: "Who" for what looks like a person's name ("Anna Roth"), else "What"."""
    words = subject.split()
    if words[0] in TITLE_WORDS:
        return "Who"
    if words[0] in ("The", "A", "An", "the", "a", "an") or len(words) < 2 or len(words) > 3:
        return "What"
    if words[0].endswith("ing"):
        return "What"  # "Installing Tidewell": an activity, not a person
    if all(w[:1].isupper() for w in words) and not any(w in _THING_WORDS for w in words):
        return "Who"
    return "What"


CLAUSE_START = frozenset("If When While Although Though Because Unless Once As Where Whether Since".split())


MONTHS = (
    "January|February|March|April|May|June|July|August|September|October|November|December|"
    "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
)
_YEAR = r"(?:1[0-9]{3}|20[0-9]{2})"
# a bare year, unless a plural noun follows: "1798 workers" is a count, not a date
_BARE_YEAR = (
    rf"{_YEAR}(?!\s+(?!(?:was|has|is|as|its|this|thus|plus|across|always|perhaps|besides|towards)\b)"
    r"[a-z]{2,}s\b)"
)
DATE_RE = (
    rf"(?:\d{{1,2}}(?:st|nd|rd|th)?\s+(?:{MONTHS})\.?,?\s+{_YEAR}"
    rf"|(?:{MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+{_YEAR}"
    rf"|(?:{MONTHS})\s+{_YEAR}"
    rf"|{_YEAR}-\d{{2}}-\d{{2}}"
    rf"|(?:the\s+)?{_YEAR}s"
    rf"|{_BARE_YEAR})"
)
DATE = re.compile(rf"(?<![\w.,-]){DATE_RE}(?![\w-])")


DATE_PASSIVE = re.compile(
    r"(?P<subj>(?:(?:The|An?)\s+)?[A-Z][\w'’-]*(?:\s+[\w'’-]+){0,5}?)\s+(?P<aux>was|were)\s+"
    rf"(?P<mid>[a-z][^,;]*?)\s+(?:in|on|during|around|by)\s+(?P<date>{DATE_RE})(?![\w-])"
)


# a document's byline and date lines ("By Anna Roth", "Published: 12 March 2021"): metadata, not prose
NAME_LIST = re.compile(
    r"[A-Z][\w'’.-]+(?:\s+[A-Z][\w'’.-]+)+(?:(?:,\s*|,?\s+and\s+)[A-Z][\w'’.-]+(?:\s+[A-Z][\w'’.-]+)+)*"
)
AUTHOR_LINE = re.compile(
    r"(?i:by|authors?|written\s+by|prepared\s+by|compiled\s+by)\s*[:\-–]?\s*(?P<names>[A-Z].{1,100}?)\s*\.?"
)
DATE_LINE = re.compile(
    rf"(?:(?P<kind>date|dated|published(?:\s+on)?|updated|last\s+updated|revised|issued)\s*[:\-–]?\s*)?"
    rf"(?P<date>{DATE_RE})\s*\.?\s*$",
    re.I,
)


def is_metadata_line(text: str) -> bool:
    """Whether a line is a byline or a date line, asked about by the `metadata` strategy only."""
    text = text.strip().strip("*_").strip()
    if m := AUTHOR_LINE.fullmatch(text):
        return bool(NAME_LIST.fullmatch(m.group("names").strip()))
    return bool(DATE_LINE.fullmatch(text))


NUMBER = re.compile(r"(?<![\w.,-])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w-])")


_NAME = re.compile(
    r"(?<![\w'’-])[A-Z][\w'’-]*[a-z][\w'’-]*"
    r"(?:\s+(?:(?:of|the|de|van|von|da|del|la|le|du|and)\s+)*[A-Z][\w'’-]*[a-z][\w'’-]*)+"
)
NOT_NAME_START = frozenset(
    """The A An In On At By For From To With During After Before Since Until When While This That
    These Those Its It Their His Her Our Each Every Some Many Most All Both If Although But And Or So
    As Of Today Later Then Now There Here What Who Where Why How Visitors Monday Tuesday Wednesday
    Thursday Friday Saturday Sunday""".split()
    + MONTHS.split("|")
)
_CONNECTORS = frozenset("of the de van von da del la le du and".split())


def names_in(text: str) -> Iterator[tuple[str, int]]:
    """Capitalised multi-word names in a sentence, leading function words ("In", "The") removed."""
    for m in _NAME.finditer(text):
        words = m.group(0).split()
        skip = 0
        while skip < len(words) and (words[skip] in NOT_NAME_START or words[skip] in _CONNECTORS):
            skip += 1
        words = words[skip:]
        while words and words[-1] in _CONNECTORS:
            words.pop()
        capitalised = [w for w in words if w not in _CONNECTORS]
        if len(capitalised) >= 2:
            name = " ".join(words)
            yield name, m.start() + m.group(0).index(words[0])


PERSON_NOUNS = frozenset(
    """person people keeper botanist engineer author writer director founder chair chairman manager
    officer coordinator researcher professor scientist president minister mayor architect captain
    doctor poet painter artist historian teacher student owner designer inventor explorer
    fisherman farmer mason trustee secretary""".split()
)


def has_content(chunk: Chunk) -> bool:
    """Whether a chunk has enough words to be asked about."""
    return len(words_of(chunk.text)) >= MIN_CONTENT_WORDS


def prose_words(chunks: Iterable[Chunk]) -> int:
    """Words in the prose sentences of the chunks (code, tables, notices and overlaps left out)."""
    return sum(len(words_of(s.text)) for c in chunks for s in prose_sentences(c))
