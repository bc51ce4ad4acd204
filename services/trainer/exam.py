"""The bot's exam: does it know what it was taught?

A held-out split by chunk asks about facts the adapter never saw, so "adapter < base" there says
nothing about learning. The exam asks instead:

- reworded questions: rewordings of trained facts that qagen kept out of training
  (`split: "exam"`, see qagen's `quality.mark_exam`), closed-book (base, adapter) and with the
  passages chat would retrieve for them (base reading = the `retrieval` mode, adapter reading =
  `both`), the reply starting with the sentences chat quotes first (`answer_quote_sentences`),
  scored by token-F1 against the pair's answer (quote included, as the user reads it);
- out-of-document questions (general-knowledge questions that share no word with the documents),
  with retrieved passages as chat asks them: the right answer declines (`common.declines`).

`exam_sets` makes the sets the training run answers (its `extra_evals`), `exam_stats` turns the
run's metrics into the session's `Exam`, with the reworded questions the bot still gets wrong in
its own answer mode.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from doclora.v1 import session_pb2
from services.common.declines import DECLINE_ANSWER, declines
from services.common.passages import Passage, tokens
from services.trainer.evaluate import token_f1, token_recall
from services.trainer.passages import retrieved_pairs

# Questions no document a user brings is likely to answer; those sharing a word with the session's
# passages are skipped, and at most ABSENT_MAX are asked.
ABSENT_QUESTIONS = (
    "Who painted the ceiling of the Sistine Chapel?",
    "Which country won the 1986 football World Cup?",
    "How many moons does Neptune have?",
    "Who wrote the novel War and Peace?",
    "What is the boiling point of ethanol at sea level?",
    "In which year did the Berlin Wall fall?",
    "What is the capital city of Mongolia?",
    "Which composer wrote The Magic Flute?",
    "How tall is Mount Kilimanjaro?",
    "Who discovered penicillin?",
)
ABSENT_MAX = 6
# a reworded question is answered when the answer holds every number of the expected answer and
# either scores at least this token-F1 against it (a short answer) or holds at least ANSWER_RECALL
# of its words (a long one: chat's replies with passages quote whole sentences, then go on); else
# it is listed as a miss
MISS_F1 = 0.3
ANSWER_RECALL = 0.6
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
MISSES_SHOWN = 10
# the sets a run answers for the exam (names in the run's extra_evals; metrics eval_{name}_*)
CLOSED, OPEN, ABSENT = "exam", "exam_passages", "exam_absent"


def exam_pairs(pairs: Sequence[Mapping[str, Any]]) -> list[dict]:
    return [dict(p) for p in pairs if p.get("split") == "exam"]


def absent_questions(passages: Sequence[Passage], limit: int = ABSENT_MAX) -> list[str]:
    """Up to `limit` of ABSENT_QUESTIONS that share no content word with the passages."""
    words: set[str] = set()
    for p in passages:
        words.update(tokens(p.text))
    return [q for q in ABSENT_QUESTIONS if not set(tokens(q)) & words][:limit]


def exam_sets(
    pairs: Sequence[Mapping[str, Any]], passages: Sequence[Passage], *, k: int, quote: int = 0
) -> dict[str, list[dict]]:
    """{set name: pairs} for the exam to answer: the reworded questions closed-book and, when the
    session has passages, with the passages retrieval finds (the reply starting with up to `quote`
    of their sentences quoted, as chat's does), and the out-of-document ones (answer:
    DECLINE_ANSWER) the same way. Empty when qagen marked no exam pairs."""
    exam = exam_pairs(pairs)
    if not exam:
        return {}
    sets = {CLOSED: exam}
    if passages:
        sets[OPEN] = retrieved_pairs(exam, passages, k=k, quote=quote)
        absent = [{"question": q, "answer": DECLINE_ANSWER} for q in absent_questions(passages)]
        if absent:
            sets[ABSENT] = retrieved_pairs(absent, passages, k=k, quote=quote)
    return sets


def pending_exam(sets: Mapping[str, Sequence[Mapping[str, Any]]], max_pairs: int) -> session_pb2.Exam:
    """The session's Exam while the exam of `sets` (exam_sets) is being taken: how many reworded
    questions it asks (at most `max_pairs`, as answered), pending. Empty (nothing to wait for)
    when there are none."""
    closed = min(len(sets.get(CLOSED) or []), max_pairs)
    return session_pb2.Exam(reworded=closed, pending=True) if closed else session_pb2.Exam()


def answered(answer: str, expected: str) -> bool:
    """Does `answer` carry the fact of `expected` (see MISS_F1)? Numbers must all be there: a
    close wording with another figure is wrong, whatever its overlap."""
    if not set(_NUMBER.findall(expected)) <= set(_NUMBER.findall(answer)):
        return False
    return token_f1(answer, expected) >= MISS_F1 or token_recall(answer, expected) >= ANSWER_RECALL


def _set_f1(metrics: Mapping[str, Any], name: str, who: str) -> float | None:
    value = metrics.get(f"eval_{name}_{who}_f1")
    return float(value) if value is not None and value == value else None


def exam_stats(metrics: Mapping[str, Any], pairs: Sequence[Mapping[str, Any]], mode: str) -> session_pb2.Exam:
    """The session's Exam from a run's metrics (eval_exam*_ keys) and the pairs it was made from.
    `mode` is the bot's answer mode ("retrieval", "both" or "adapter"); the misses are its
    answers (closed-book adapter answers when the run had no passages to read)."""
    exam = session_pb2.Exam()
    closed = metrics.get(f"eval_{CLOSED}_answers") or []
    if not closed:
        return exam
    exam.reworded = len(closed)
    fields = {
        "base_f1": (CLOSED, "base"), "adapter_f1": (CLOSED, "adapter"),
        "retrieval_f1": (OPEN, "base"), "both_f1": (OPEN, "adapter"),
    }  # fmt: skip
    for field, (name, who) in fields.items():
        value = _set_f1(metrics, name, who)
        if value is not None:
            setattr(exam, field, value)
    absent = metrics.get(f"eval_{ABSENT}_answers") or []
    if absent:
        exam.absent = len(absent)
        exam.retrieval_declined = sum(declines(a["base"]) for a in absent) / len(absent)
        exam.both_declined = sum(declines(a["adapter"]) for a in absent) / len(absent)
    opened = metrics.get(f"eval_{OPEN}_answers") or []
    if mode in ("retrieval", "both") and opened:
        replies, who = opened, "base" if mode == "retrieval" else "adapter"
    else:
        mode, replies, who = "adapter", closed, "adapter"
    exam.mode = mode
    question_of = {str(p.get("pair_id") or ""): str(p.get("question") or "") for p in pairs}
    for a in replies:
        if answered(a[who], a["reference"]):
            continue
        exam.missed += 1
        if len(exam.misses) < MISSES_SHOWN:
            exam.misses.add(
                question=question_of.get(a["pair_id"]) or a["question"],
                expected=a["reference"],
                answer=a[who],
            )
    return exam
