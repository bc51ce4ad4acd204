"""The subject and verb of a sentence, found by word lists and verb forms, so that rules can turn
a statement into a question ("The tower was built in 1902." -> "When was the tower built?")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.qagen.rules.verbs import AUXILIARIES, PARTICIPLES, lemma, past_verb, present_base
from services.qagen.text import DATE_RE, PRONOUNS, STOPWORDS, TITLE_WORDS, lower_first, names_in, wh_for


@dataclass(frozen=True, slots=True)
class Clause:
    """A sentence split into an optional intro, its subject, its verb and the rest."""

    intro: str  # a leading "In 1902" (without its comma), or ""
    subject: str
    verb: str
    rest: str  # after the verb, final punctuation removed

    @property
    def aux(self) -> bool:
        return self.verb.lower() in AUXILIARIES and not self.perfect_main_verb

    @property
    def perfect_main_verb(self) -> bool:
        """ "had" as the main verb ("The island had 300 residents"), not an auxiliary."""
        if self.verb.lower() not in ("has", "have", "had"):
            return False
        nxt = self.rest.split()[0].lower() if self.rest else ""
        return not (past_verb(nxt) or nxt in PARTICIPLES)

    @property
    def person(self) -> bool:
        return any(wh_for(name) == "Who" for name, _ in names_in(self.subject))


_INTRO = re.compile(
    r"(?P<intro>(?:In|On|At|During|By|Since|After|Before|Around|From|Until|Between)\s+[^,]{1,60}?),\s+"
)
DETERMINERS = frozenset("the a an this that these those its their our his her".split())


def parse_clause(sentence: str) -> Clause | None:
    """Split "[In 1902, ]<subject> <verb> <rest>." where the verb is a form of be/have or a past
    tense; None when the sentence does not start that way (or its subject is a pronoun)."""
    text = sentence.strip().rstrip(".!?;:").strip()
    intro = ""
    if m := _INTRO.match(text):
        intro, text = m.group("intro"), text[m.end() :]
    words = text.split()
    if len(words) < 3 or not (words[0][:1].isupper() or (intro and words[0] in DETERMINERS)):
        return None
    if words[0].lower() in PRONOUNS or words[0].lower() in CLAUSE_OPENERS | PREPOSITIONS:
        return None  # "In 2023 the households ...", "Under Tidewell the gateway ...": no subject first
    for i in range(1, min(len(words) - 1, 8)):
        prev = words[i - 1]
        if prev.endswith((",", ";", ":")) or '"' in prev or "(" in prev:
            return None
        w = words[i]
        if w.lower() in MODALS or w.lower() in ("does", "do", "did") or w.lower() in RELATIVES:
            return None  # a modal verb group or a relative clause: `parse_finite` reads those
        if w.lower() in AUXILIARIES or (past_verb(w) and w.islower()):
            subject = words[:i]
            if all(x.lower() in DETERMINERS for x in subject):
                continue  # "The automated station": an adjective, the verb comes later
            if subject[-1].lower() in ORDINALS or subject[0] in ("Each", "All", "Most", "Some", "Both"):
                return None  # "The first is ...", "Each had ...": the subject is elsewhere
            if any(x in PREPOSITIONS - {"of", "from"} for x in subject[1:]):
                return None  # "Drill the holes with a 6 mm bit": an imperative, "bit" is no verb here
            later = " ".join(words[i + 1 :]).split(",")[0].split()
            if w.lower() not in AUXILIARIES and any(x.lower() in MODALS | AUXILIARIES for x in later):
                return None  # "Containers left outside ... may be removed": a reduced relative
            return Clause(intro, " ".join(subject), w, " ".join(words[i + 1 :]))
        if not re.fullmatch(r"[\w'’-]+", w):
            return None
    return None


def shorten(rest: str, max_words: int = 16) -> str | None:
    """The verb phrase up to the first comma or semicolon (what follows is often another clause:
    ", and the keeper left", ", most of whom ..."); None when that is longer than `max_words`."""
    cut = re.search(r"[,;(](?!\d)|:\s", rest)  # not the comma of "41,800" or the colon of "07:00"
    if cut and len(rest[: cut.start()].split()) >= 2:
        rest = rest[: cut.start()]
    rest = rest.strip()
    return rest if len(rest.split()) <= max_words else None


def intro_tail(intro: str) -> str:
    """A leading adverbial ("In 1902") as it reads at the end of a question (" in 1902")."""
    return f" {intro[0].lower()}{intro[1:]}" if intro else ""


def subject_phrase(subject: str) -> str:
    """The subject as it reads mid-sentence: "The tower" -> "the tower", "Engineers" -> "engineers"
    (a capitalised plural is a common noun that opened the sentence); names keep their capitals."""
    first, _, rest = subject.partition(" ")
    # "Event loans", "Installing": a common word capitalised only because it opens the sentence
    if first[1:].islower() and (first.endswith("ing") or (rest and rest.split()[0].islower())):
        if first not in TITLE_WORDS and first.lower() not in DETERMINERS:
            return first.lower() + (" " + rest if rest else "")
    if len(first) > 3 and first.endswith("s") and not first.endswith("ss") and first[1:].islower():
        if not (rest and wh_for(f"{first} {rest.split()[0]}") == "Who" and rest.split()[0][:1].isupper()):
            return first.lower() + (" " + rest if rest else "")
    return lower_first(subject)


MODALS = frozenset("can could will would may might must shall should".split())
FINITE_AUX = frozenset("is are was were has have had does do did".split())
# a sentence opening with one of these starts with a subordinate clause, not its subject
CLAUSE_OPENERS = frozenset(
    """if when whenever although though because while unless as once after before since until where
    whether so and but or yet to for with without unlike like otherwise however also then instead
    meanwhile therefore thus""".split()
)
RELATIVES = frozenset("that which who whom whose where when if".split())
PREPOSITIONS = frozenset("in on at under over across from since until during by with for of".split())
POSSESSIVES = frozenset("its their his her our".split())
ORDINALS = frozenset("first second third last next previous further final".split())


@dataclass(frozen=True, slots=True)
class Finite:
    """A declarative sentence's subject and finite verb group, ready to invert into a question."""

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
# verbs that follow a plural subject in their base form and are seldom nouns after one ("Tickets
# cost 4 euros", "Guided tours start at 11:00"); read as verbs only before a figure or _PRESENT_NEXT
_PLURAL_PRESENT = frozenset(
    """cost start begin end finish open close last run leave depart arrive take need pay earn charge
    weigh hold measure""".split()
)
_DATE_INTRO = re.compile(rf"(?P<intro>(?:In|On|During|By|Since|Until)\s+{DATE_RE})\s+(?=[a-z])")


def parse_finite(sentence: str) -> Finite | None:
    """The subject and finite verb group of a declarative sentence, ready to invert into a question;
    None for imperatives, sentences that open with a subordinate clause, pronoun subjects and
    subjects with a relative clause or participle ("Containers left outside ... may be removed")."""
    text = sentence.rstrip().rstrip(".!?;:")
    offset, intro = 0, ""
    if m := _INTRO.match(text) or _DATE_INTRO.match(text):
        offset, intro = m.end(), m.group("intro")
    spans = [(w.start() + offset, w.end() + offset, w.group(0)) for w in re.finditer(r"\S+", text[offset:])]
    words = [w for _, _, w in spans]
    if len(words) < 3 or words[0].lower() in CLAUSE_OPENERS | PRONOUNS | PREPOSITIONS | POSSESSIVES:
        return None  # "Its footage is kept ...": whose, the question could not say
    if not (words[0][:1].isupper() or (intro and words[0].lower() in DETERMINERS)):
        return None
    for i in range(1, min(len(words) - 1, 9)):
        prev, w = words[i - 1], words[i]
        lw = w.lower()
        if not re.fullmatch(r"[\w'’-]+", prev) or lw in RELATIVES:
            return None
        subject = subject_phrase(" ".join(words[:i]))
        if all(x.lower() in DETERMINERS for x in words[:i]):
            continue
        if lw in MODALS or lw in FINITE_AUX:
            j = i + 1
            group = [lw]
            while j < len(words) and words[j].lower() in ("not", "be", "been", "have", "being", "also"):
                group.append(words[j].lower())
                j += 1
            nxt = words[j].lower().rstrip(",") if j < len(words) else ""
            if nxt.isalpha() and (
                past_verb(nxt)
                or nxt in PARTICIPLES
                or (lw in MODALS and group[-1] == lw and nxt not in STOPWORDS and not nxt.endswith("ly"))
            ):
                group.append(nxt)
                j += 1
            if lw in ("has", "have", "had") and len(group) == 1:
                aux, verb = {"has": "does", "have": "do", "had": "did"}[lw], "have"
            else:
                aux, verb = lw, " ".join(group[1:])
            start = spans[j][0] if j < len(spans) else len(text)
            return Finite(intro, subject, aux, verb, " ".join(group), start, text[start:])
        if w.islower() and w.isalpha():
            base = lemma(w) if past_verb(w) else None
            aux = "did"
            if base is None and lw in _PLURAL_PRESENT and prev.lower().endswith("s") and i < 4:
                base, aux = lw, "do"  # "Tickets cost 4 euros": checked like "costs" below
            elif base is None and (base := present_base(w)) is not None:
                aux = "does"
            if aux != "did":
                # "writes 8,640", "takes about": a plural noun ("Event loans must") is followed by a verb
                if not (re.match(r"[£€$\d]", words[i + 1]) or words[i + 1].lower() in _PRESENT_NEXT):
                    continue
            if base is None:
                continue
            # a participle that opens a reduced relative: the sentence's verb comes after it
            clause = text[spans[i][1] :].split(",")[0].split()
            if aux == "did" and any(x.lower() in MODALS or x.lower() in FINITE_AUX for x in clause):
                return None
            start = spans[i + 1][0]
            return Finite(intro, subject, aux, base, w, start, text[start:])
        if not re.fullmatch(r"[\w'’-]+", w):
            return None
    return None
