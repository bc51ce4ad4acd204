"""Scoring answers against a question's key facts.

- `carries(text, key)`: the text carries the key fact when, for every key group, one of its
  alternatives occurs in it (case-insensitive, whitespace normalised). An alternative that starts
  or ends with a digit must not run on into more digits there: "20" is not in "120" or "2011",
  "8.6" is not in "8.65".
- `declines(text)`: the answer says the documents do not tell / it does not know (the phrases in
  services/common/declines.py); the right answer to a `kind: absent` question (`key: []`).
- `token_f1(text, key)`: SQuAD-style token F1 against the key strings joined, one alternative per
  group, best over the combinations.
- `score(row)`: all of these for one answer (and recall: the key fact in the passages it read).
- `summarise(rows)`: key-fact rate, F1, recall@3 and decline rate of a list of scored answers.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

from services.common.declines import declines
from services.common.declines import normalized as norm


def occurs(alt: str, text: str) -> bool:
    """`alt` in the normalised `text`, a number not cut out of a longer one."""
    a = norm(alt)
    lead = r"(?<!\d)(?<!\d[.,])" if a[:1].isdigit() else ""
    trail = r"(?!\d)(?![.,]\d)" if a[-1:].isdigit() else ""
    return bool(a) and re.search(lead + re.escape(a) + trail, text) is not None


def carries(text: str, key: list[list[str]]) -> bool:
    """Every key group has an alternative in `text`; an empty key is never carried."""
    t = norm(text)
    return bool(key) and all(any(occurs(alt, t) for alt in group) for group in key)


def tokens(text: str) -> list[str]:
    return re.findall(r"\w+(?:[.,]\w+)*", text.lower())


def _f1(pred: list[str], ref: list[str]) -> float:
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def token_f1(text: str, key: list[list[str]], limit: int = 256) -> float | None:
    """Token F1 against the key strings joined (best alternative per group); None for no key."""
    if not key:
        return None
    pred = tokens(text)
    combos = itertools.islice(itertools.product(*key), limit)
    return max(_f1(pred, tokens(" ".join(c))) for c in combos)


def score(row: dict) -> dict:
    """The scores of one answer (`row`: the question's fields, "answer", maybe "passages")."""
    answer, key = row["answer"], row["key"]
    if row["kind"] == "absent" or not key:
        return {"declined": declines(answer)}
    out = {"key_fact": carries(answer, key), "f1": token_f1(answer, key)}
    if row.get("passages") is not None:
        out["recall"] = carries(" ".join(row["passages"]), key)
    return out


def _mean(xs: list) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(rows: list[dict]) -> dict:
    """Rates over scored answers (each a dict with the fields of `score`, maybe `recall`)."""
    answerable = [r for r in rows if "key_fact" in r]
    absent = [r for r in rows if "declined" in r]
    return {
        "n": len(answerable),
        "n_absent": len(absent),
        "key_fact": _mean([r["key_fact"] for r in answerable]),
        "f1": _mean([r["f1"] for r in answerable]),
        "recall": _mean([r.get("recall") for r in answerable]),
        "declined": _mean([r["declined"] for r in absent]),
    }
