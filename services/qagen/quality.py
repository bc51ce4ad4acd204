"""Quality of generated pairs: the grounding check, filters with reasons, a held-out split, coverage.

Whatever made a pair (rules, a local model, a remote endpoint), the same gate decides whether it is
kept, and every pair it drops is counted under one reason in `REASONS`, so a session can say why
its training set is the size it is:

- `empty`, `too_short`, `too_long`: the answer (or question) is missing, a fragment, or a page;
- `malformed`: not a clean question and answer (chat-template tokens, JSON left in the text,
  control characters, no question at all, an answer that repeats the question);
- `malformed_question`: not a question a person would ask: a fragment built from a clause opener
  ("What is meant by If you?", "When did In 2023 the ...?"), a dangling end ("... between 9 March
  and?", "... throw away 41?"), a broken verb group ("does event loan must be booked");
- `wrong_question_word`: "Who is ...?" about a place, a body or a thing ("Who is Quarry Road?");
- `context_bound`: a question that only makes sense with context it does not give: a discourse
  reference ("the difference", "the second", "the condition", "the intervals below", "the
  largest allowed offset"), a connective pasted from its sentence ("in other words",
  "respectively"), the authors' "our" or a pronoun with nothing to refer to ("What delivered
  99.1% of their alarms?", "What should I do if nothing happens?"), a bare activity ("How long
  does installing take?"); or an answer that opens with a
  reference to an earlier sentence ("Its footage is kept ...", "In other words, ...");
- `reference_question`: a question about the document rather than its content: section numbers
  ("... about 12. Troubleshooting?"), "What does the text say about ...?", "How many minutes does
  the section on ... mention?", figure and table references, a bare year or number as the topic;
- `ungrounded`: too few of the answer's content words appear in its source chunk, so the answer
  says something the document does not (the token-overlap grounding check);
- `duplicate_question`: the question's token set is nearly that of a question kept earlier.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING

from services.qagen.chunk import Chunk
from services.qagen.text import CONTEXT_OPENING, MAX_ANSWER_CHARS, MIN_ANSWER_CHARS, STOPWORDS

if TYPE_CHECKING:
    from services.common.qapair import QAPair

REASONS = (
    "empty",
    "too_short",
    "too_long",
    "malformed",
    "malformed_question",
    "context_bound",
    "wrong_question_word",
    "reference_question",
    "ungrounded",
    "duplicate_question",
)

# Share of an answer's content tokens that must occur in the source chunk. Extractive answers score
# 1.0; a model's answer that rewords the text keeps most of its content words, one that adds facts
# does not.
MIN_SUPPORT = 0.7
# Questions whose normalised token sets overlap this much are the same question.
DUPLICATE_JACCARD = 0.9
MAX_QUESTION_CHARS = 300
# Some strategies answer with a name or a date: the usual minimum answer length would drop them.
MIN_ANSWER_CHARS_BY_STRATEGY: Mapping[str, int] = {"metadata": 3}
# Questions may also be requests ("Summarize the section on X."), when they start with one of these.
IMPERATIVES = frozenset(
    "summarize summarise describe explain list give tell name define outline compare state".split()
)

_WORD = re.compile(r"[^\W_][\w'’-]*")
_TOKEN = re.compile(r"[^\W_]+")
_TEMPLATE_LEFTOVERS = re.compile(
    r"<\|[^|<>]{1,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|^\s*(?:Q|A|Question|Answer)\s*\d*\s*[:：]", re.I
)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
_JSON_LEFTOVERS = re.compile(r"""["'](?:question|answer)["']\s*:|^\s*[\[{]""", re.I)


# --- tokens and grounding ----------------------------------------------------------------------


@lru_cache(maxsize=1 << 16)
def _stem(token: str) -> str:
    """A crude suffix strip, applied to answer and source alike, so "installed" meets "install"."""
    if len(token) > 4 and token.endswith("ies"):
        return token[:-3] + "y"
    for suffix, keep in (("ing", 4), ("ed", 3), ("es", 3), ("s", 3)):
        if token.endswith(suffix) and len(token) - len(suffix) >= keep and not token.endswith("ss"):
            return token[: -len(suffix)]
    return token


def content_tokens(text: str) -> set[str]:
    """Lower-cased, stemmed word and number tokens of `text`, function words left out."""
    return {
        _stem(t)
        for t in _TOKEN.findall(text.lower().replace("’s", "").replace("'s", ""))
        if t not in STOPWORDS
    }


def source_text(chunk: Chunk) -> str:
    """What a pair from `chunk` may draw on: its text and the heading it sits under."""
    return f"{chunk.heading}\n{chunk.text}" if chunk.heading else chunk.text


def support(answer: str, source: str | set[str]) -> float:
    """The share of the answer's content tokens found in `source` (1.0 for a quote); `source` is a
    text or its `content_tokens`."""
    tokens = content_tokens(answer)
    if not tokens:
        tokens = {_stem(t) for t in _TOKEN.findall(answer.lower())}
        if not tokens:
            return 0.0
    known = content_tokens(source) if isinstance(source, str) else source
    return len(tokens & known) / len(tokens)


def pair_support(
    pair: QAPair, chunks: Mapping[str, Chunk], cache: dict[tuple[str, ...], set[str]] | None = None
) -> float:
    """`support` of a pair's answer against its source chunk and any further source chunks (their
    token sets kept in `cache`, when given, across the pairs of one document)."""
    ids = tuple(i for i in (pair.chunk_id, *getattr(pair, "sources", ())) if i in chunks)
    if not ids:
        return 0.0
    cache = {} if cache is None else cache
    if ids not in cache:
        cache[ids] = content_tokens("\n".join(source_text(chunks[i]) for i in ids))
    return support(pair.answer, cache[ids])


# --- filters -----------------------------------------------------------------------------------


def malformed_reason(question: str, answer: str) -> str | None:
    """Why a pair is not a clean question and answer, or None when it is."""
    for text in (question, answer):
        if _CONTROL.search(text):
            return "control characters"
        if _TEMPLATE_LEFTOVERS.search(text):
            return "chat-template tokens or Q/A labels in the text"
        if _JSON_LEFTOVERS.search(text):
            return "JSON left in the text"
    if "\n" in question.strip():
        return "the question spans several lines"
    if len(question) > MAX_QUESTION_CHARS:
        return "the question is too long"
    words = _WORD.findall(question)
    if len(words) < 2:
        return "the question has fewer than two words"
    if sum(c.isalpha() for c in question) < 0.5 * len(question.strip()):
        return "the question is mostly not letters"
    if not question.rstrip().endswith("?") and words[0].lower() not in IMPERATIVES:
        return "not a question"
    if _norm(question) == _norm(answer):
        return "the answer repeats the question"
    if _DANGLING_ANSWER.search(answer):
        return "the answer stops mid-sentence"
    return None


# an answer cut off mid-sentence (at a page break): "... is roughly proportional to the"
_DANGLING_ANSWER = re.compile(r"\b(?:the|a|an|of|to|and|or|with|for|by|in|on|at|than|that|is|are)\s*$", re.I)


_SECTION_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)*\.\s+[A-Z]|(?<![\w.])\d+\.\d+(?:\.\d+)*\s+[A-Z][a-z]")
_ABOUT_THE_TEXT = re.compile(
    r"\b(?:does|do|did)\s+the\s+(?:text|document|section|passage|article|paper)\b(?:\s+on\s+.+?)?"
    r"\s+(?:say|mention|give|state)\b|\b(?:Figure|Fig\.|Table|Section|Appendix|Equation)\s+\d",
)
_BARE_TOPIC = re.compile(
    r"^(?:What can you tell me about|What do you know about|What is known about|What should I know about"
    r"|Tell me about)\s+(?:the\s+)?[\d.,%]+\??$|about\s+(?:the\s+)?\d[\d.,]*\?$"
)
# a sentence's opening clause carried into the question: "meant by If you", "did In 2023 the"
_CLAUSE_FRAGMENT = re.compile(
    r"(?<=\s)(?:If|When|In|On|At|Under|Although|Because|While|Unless|Since|During|Otherwise)\s+"
    r"(?:you|your|the|a|an|\d+|it|we|they|nobody|there)\b"
)
_DANGLING_END = re.compile(
    r"\b(?:and|or|the|a|an|of|to|between|that|which|than|with|from|at|in|into|if|is|are|was|were)\?$"
    r"|(?<![\d,.])\d{1,3}\?$"
)
_BROKEN_VERBS = re.compile(
    r"\b(?:does|do|did)\s+(?:[\w'’-]+\s+){1,3}?(?:must|may|can|will|should|shall|might|could)\b"
    r"|\bI\s+(?:are|is|were)\b|^Which thing\b|^What (?:is|was) it that\b|^What\s+\w+ed\s+by\b"
)
_THINGS = re.compile(
    r"\b(?:Road|Street|Lane|Cross|Side|Ridge|Fen|Harbour|Harbor|Bay|River|Hill|Moor|Marsh|Wharf|Quay|Park"
    r"|Station|Centre|Center|Council|Committee|Panel|Board|Fund|Trust|Company|Hub|Vault|Portal|App|Library"
    r"|Institute|University|Society|Share|Depot|Liaison|Coordinator|Desk|Analysis|Cost|Summary)\b"
)


# a clause of the sentence pasted in whole ("What is free; it needs a Quillfen Vault account?")
_PASTED_CLAUSE = re.compile(r"[;:]\s")
# nouns that, after "the" and without an "of ..." to say which, point back at something the text
# described earlier: "the difference", "the condition", "the changes", "the switch"
_REFERENCE_NOUN = (
    r"(?:difference|condition|situation|problem|issue|case|result|change|changes|switch|remedy|other|others"
    r"|rest|former|latter|above|below|previous)\b(?!\s+(?:of|in|between|for)\b)"
)
# an answer whose subject is such a reference: "The changes were approved by ...", "The switch happened ..."
_REFERENCE_ANSWER = re.compile(rf"^The\s+{_REFERENCE_NOUN}")
# words that point back into the text the question was lifted from
_DISCOURSE_REFERENCE = re.compile(
    r"\b(?:in other words|for example|for instance|respectively|as above|as below|the following)\b"
    r"|\b(?:our|ours|us|we)\b"
    r"|\b(?:this|these|those)\s+(?!is\b|are\b|was\b|were\b)[a-z]|\bsuch\s+(?!as\b)[a-z]"
    rf"|\bthe\s+{_REFERENCE_NOUN}"
    r"|\bthe\s+(?:first|second|third|fourth|last|final|other)\s*(?:\?|\b(?:is|are|was|were|one|ones)\b)"
    r"|\b(?:the|an?)\s+(?:[a-z-]+\s+){0,2}?[a-z-]+s?\s+(?:below|above)\b(?!\s+(?:the|an?|its|their|\d))"
    r"|\bthe\s+(?!(?:interest|request|test|west|forest|guest|nest|chest|protest|contest|harvest|rest|arrest"
    r"|quest|digest)\b)[a-z]{2,}est\b(?!\s+(?:[\w-]+\s+){0,2}?(?:of|in|for|on|at|among|between)\b)"
    r"|\b(?:nothing|anything|something|everything)\s+(?:is|are|was|happens|happened|goes|went|works)\b"
    r"|\b(?:does|do|did)\s+[a-z]+ing\s+(?:take|last|cost|need|require|save|silence)\b"
    r"|^(?:What|Who)\s+(?:is|are|was|were|has|have|had|[a-z]+ed)\s+(?:[\w'’.,%-]+\s+){0,10}?(?:their|its|they|them|it)\b"
    r"|^(?:What|Who|How|Why|When|Where)\s+(?:\w+\s+){0,2}?(?:it|they|this|these|he|she)\s"
    r"|^What\s+(?:has|have)\s+been\b|\b(?:has|have)\s+an?\s+[\w-]+\s+been\b",
    re.I,
)
def question_problem(question: str, answer: str = "") -> str | None:
    """Which of `malformed_question`, `context_bound`, `wrong_question_word` and
    `reference_question` a question (with its answer, when given) fails, or None for a question a
    person would ask about the document's content."""
    q = " ".join(question.split())
    if _SECTION_NUMBER.search(q) or _ABOUT_THE_TEXT.search(q) or _BARE_TOPIC.search(q):
        return "reference_question"
    if m := re.match(r"Who (?:is|was|are|were) (?P<x>[^?]+)\?$", q):
        if _THINGS.search(m.group("x")) or m.group("x").split()[0] in ("a", "an"):
            return "wrong_question_word"
    if _CLAUSE_FRAGMENT.search(q) or _DANGLING_END.search(q) or _BROKEN_VERBS.search(q) or _PASTED_CLAUSE.search(q):
        return "malformed_question"
    a = answer.lstrip()
    if _DISCOURSE_REFERENCE.search(q) or CONTEXT_OPENING.match(a) or _REFERENCE_ANSWER.match(a):
        return "context_bound"
    return None


def _norm(text: str) -> str:
    return " ".join(w.lower() for w in _WORD.findall(text))


def question_tokens(question: str) -> frozenset[str]:
    return frozenset(w.lower() for w in _WORD.findall(question))


def filter_pairs(
    pairs: Iterable[QAPair],
    *,
    chunks: Mapping[str, Chunk] | Sequence[Chunk] | None = None,
    min_support: float = MIN_SUPPORT,
    min_answer_chars: int = MIN_ANSWER_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    min_answer_chars_by_strategy: Mapping[str, int] = MIN_ANSWER_CHARS_BY_STRATEGY,
    length_fn: Callable[[str], int] | None = None,
    max_answer_tokens: int | None = None,
    duplicate_jaccard: float = DUPLICATE_JACCARD,
    check_malformed: bool = True,
) -> tuple[list[QAPair], dict[str, int]]:
    """Keep the pairs that pass every check, in order; count the dropped ones by reason.

    With `chunks` each pair is also grounded (its answer's `support` in its source chunks must
    reach `min_support`; a pair naming an unknown chunk cannot be checked and is dropped), and the
    kept pairs carry their support as `score`. With `length_fn` and `max_answer_tokens` an answer
    is also too long when it has more tokens than that. Near-duplicate questions are compared last,
    so a dropped pair never hides a good one that repeats its question.
    """
    by_id = _by_id(chunks)
    sources: dict[tuple[str, ...], set[str]] = {}
    counts = dict.fromkeys(REASONS, 0)
    candidates: list[tuple[QAPair, frozenset[str]]] = []
    for p in pairs:
        answer = p.answer.strip()
        tokens = question_tokens(p.question)
        min_chars = min_answer_chars_by_strategy.get(p.strategy, min_answer_chars)
        if not answer or not tokens:
            counts["empty"] += 1
        elif len(answer) < min_chars:
            counts["too_short"] += 1
        elif len(answer) > max_answer_chars or (
            length_fn is not None and max_answer_tokens is not None and length_fn(answer) > max_answer_tokens
        ):
            counts["too_long"] += 1
        elif check_malformed and malformed_reason(p.question, p.answer) is not None:
            counts["malformed"] += 1
        elif check_malformed and (problem := question_problem(p.question, answer)) is not None:
            counts[problem] += 1
        elif by_id is not None and (score := pair_support(p, by_id, sources)) < min_support:
            counts["ungrounded"] += 1
        else:
            if by_id is not None and hasattr(p, "score"):
                p = replace(p, score=round(score, 4))
            candidates.append((p, tokens))
    kept, duplicates = _drop_near_duplicates(candidates, duplicate_jaccard)
    counts["duplicate_question"] = duplicates
    return kept, counts


def _by_id(chunks: Mapping[str, Chunk] | Sequence[Chunk] | None) -> Mapping[str, Chunk] | None:
    if chunks is None or isinstance(chunks, Mapping):
        return chunks
    return {c.chunk_id: c for c in chunks}


def _drop_near_duplicates(
    candidates: list[tuple[QAPair, frozenset[str]]], threshold: float
) -> tuple[list[QAPair], int]:
    """Drop each question whose token set has Jaccard similarity >= `threshold` with a kept one.

    Prefix filtering keeps the cost near linear: two sets this similar must share a token among
    their rarest few, so only kept sets indexed under those tokens are compared.
    """
    df = Counter(t for _, tokens in candidates for t in tokens)
    index: dict[str, list[int]] = {}
    kept_tokens: list[frozenset[str]] = []
    kept: list[QAPair] = []
    dropped = 0
    for p, tokens in candidates:
        ordered = sorted(tokens, key=lambda t: (df[t], t))
        # a set within Jaccard >= t of this one shares a token among its first |s| - ceil(t*|s|) + 1
        prefix = ordered[: len(ordered) - _ceil(threshold * len(ordered)) + 1]
        seen: set[int] = set()
        duplicate = False
        for t in prefix:
            for k in index.get(t, ()):
                if k in seen:
                    continue
                seen.add(k)
                other = kept_tokens[k]
                if not threshold * len(other) <= len(tokens) <= len(other) / threshold:
                    continue
                if len(tokens & other) >= threshold * len(tokens | other):
                    duplicate = True
                    break
            if duplicate:
                break
        if duplicate:
            dropped += 1
            continue
        for t in prefix:
            index.setdefault(t, []).append(len(kept))
        kept_tokens.append(tokens)
        kept.append(p)
    return kept, dropped


def _ceil(x: float) -> int:
    # tolerate float noise so that 0.9 * 10 counts as 9, not 10
    return math.ceil(round(x, 9))


# --- held-out split ----------------------------------------------------------------------------


def split_pairs(
    pairs: Sequence[QAPair], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[QAPair], list[QAPair]]:
    """Split pairs into (train, eval) by source chunk, deterministically for a given `seed`.

    All pairs of one chunk go to one side, so paraphrases of a fact (which share its chunk) are never
    on both. Chunks that share an answer (the same sentence asked about from two overlapping
    chunks) are one group, and the chunks a multi-chunk answer (a summary) draws on stay in train,
    since that answer repeats their facts. Groups go to eval in a seeded hash order until about
    `eval_fraction` of the pairs are there; train is never left empty.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError("eval_fraction must be at least 0 and less than 1")
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    by_pair_id = {p.pair_id: p for p in pairs}
    first_by_answer: dict[str, str] = {}
    pinned: set[str] = set()

    def key(p: QAPair) -> str:
        if p.chunk_id:
            return "chunk:" + p.chunk_id
        # imported pairs have no chunk: a fact and its paraphrases are grouped by the original
        original = by_pair_id.get(getattr(p, "variant_of", "") or "", p)
        return "pair:" + original.pair_id

    # a summary of a few chunks repeats their facts, so they stay in train; one of most of the
    # document (the whole-document summary) would pin every chunk and leave nothing to hold out
    pin_limit = max(3, len({p.chunk_id for p in pairs if p.chunk_id}) // 4)
    for p in pairs:
        k = find(key(p))
        original = by_pair_id.get(getattr(p, "variant_of", "") or "")
        if original is not None:
            union(k, key(original))
        answer = _norm(p.answer)
        if answer:
            union(k, first_by_answer.setdefault(answer, k))
        if getattr(p, "sources", ()) and len(p.sources) < pin_limit:
            pinned.add(k)
            pinned.update("chunk:" + c for c in p.sources)

    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(find(key(p)), []).append(i)
    pinned_roots = {find(k) for k in pinned}
    candidates = sorted(
        (g for g in groups if g not in pinned_roots),
        key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest(),
    )
    target = eval_fraction * len(pairs)
    eval_idx: set[int] = set()
    for g in candidates:
        if len(eval_idx) >= target or len(eval_idx) + len(groups[g]) >= len(pairs):
            break
        if len(eval_idx) + len(groups[g]) > max(target * 1.5, 1) and eval_idx:
            continue  # a big group would overshoot; a smaller one later may fit
        eval_idx.update(groups[g])
    train = [p for i, p in enumerate(pairs) if i not in eval_idx]
    held_out = [p for i, p in enumerate(pairs) if i in eval_idx]
    return train, held_out


def mark_split(pairs: list[dict], eval_fraction: float, seed: int, min_pairs: int) -> int:
    """Set `"split"` ("train" or "eval") on stored pairs (dicts), holding out whole chunks with
    `split_pairs`; fewer than `min_pairs` pairs are all "train" (every fact is needed). Returns
    the number held out."""
    from services.common.qapair import QAPair

    for p in pairs:
        p["split"] = "train"
    if len(pairs) < min_pairs or eval_fraction <= 0:
        return 0
    views = [
        QAPair.from_dict({"start": 0, "end": 0, "strategy": "", "chunk_id": "", "doc_id": "", **p})
        for p in pairs
    ]
    _, held = split_pairs(views, eval_fraction, seed)
    held_ids = {v.pair_id for v in held}
    for p in pairs:
        if p["pair_id"] in held_ids:
            p["split"] = "eval"
    return sum(1 for p in pairs if p["split"] == "eval")


def mark_exam(pairs: list[dict], limit: int, seed: int) -> int:
    """Mark up to `limit` rewordings of trained facts `split: "exam"`: the bot's exam asks them
    after training, in words it was not trained on, about facts it was. One rewording per fact
    (a question generated as a paraphrase, `variant_of` its original), and only where the original
    trains too, so every fact is still learned; facts are chosen in a seeded hash order. Returns
    the number of pairs marked "exam" (those already marked count: a person's edits keep marks)."""
    training = {p["pair_id"]: p for p in pairs if p.get("split", "train") == "train"}
    rewordings: dict[str, list[dict]] = {}
    for p in training.values():
        original = p.get("variant_of") or ""
        if original in training:
            rewordings.setdefault(original, []).append(p)
    already = sum(1 for p in pairs if p.get("split") == "exam")
    order = sorted(rewordings, key=lambda o: hashlib.sha1(f"{seed}:exam:{o}".encode()).hexdigest())
    for original in order[: max(0, limit - already)]:
        chosen = min(rewordings[original], key=lambda p: hashlib.sha1(f"{seed}:{p['pair_id']}".encode()).hexdigest())
        chosen["split"] = "exam"
    return sum(1 for p in pairs if p.get("split") == "exam")


# --- coverage ----------------------------------------------------------------------------------


def coverage_report(pairs: Iterable[QAPair], chunks: Sequence[Chunk]) -> dict:
    """How much of the document the kept pairs reach: the share of chunks that are the source of at
    least one pair, and which chunks are not (to show a person, or to retry)."""
    with_pairs = Counter(p.chunk_id for p in pairs)
    uncovered = [c.chunk_id for c in chunks if with_pairs[c.chunk_id] == 0]
    n = len(chunks)
    return {
        "chunks": n,
        "chunks_with_pairs": n - len(uncovered),
        "coverage": (n - len(uncovered)) / n if n else 0.0,
        "pairs_per_chunk": sum(with_pairs[c.chunk_id] for c in chunks) / n if n else 0.0,
        "uncovered": uncovered,
    }
