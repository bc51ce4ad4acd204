"""Export and import QA pairs as JSON lines in the three formats fine-tuning tools read.

- `openai`: `{"messages": [{"role": "system"?}, {"role": "user"}, {"role": "assistant"}]}` — the
  OpenAI chat fine-tuning format (also read by axolotl, TRL, Unsloth);
- `alpaca`: `{"instruction", "input", "output"}`;
- `sharegpt`: `{"conversations": [{"from": "system"?}, {"from": "human"}, {"from": "gpt"}]}`.

With `include_meta=True` each line also carries a `"doclora"` object with the pair's id, source and
strategy, so an export edited by a person imports back onto the same chunks. Import reads any of
the three (detected per line unless `fmt` is given) and reports every malformed line by number.
A conversation with several turns becomes one pair per user turn that has an answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import fields, replace

from services.common.errors import InvalidArgument
from services.common.jsonl import json_lines
from services.common.qapair import QAPair, loose_pair, pair_id_for

FORMATS = ("openai", "alpaca", "sharegpt")
META_KEY = "doclora"
MAX_ERRORS_SHOWN = 10
_META_FIELDS = tuple(f.name for f in fields(QAPair) if f.name not in ("question", "answer"))


class FormatError(InvalidArgument):
    """A file that is not valid JSON lines of the expected format; `errors` lists (line, message)."""

    def __init__(self, errors: list[tuple[int, str]]):
        self.errors = errors
        shown = "; ".join(f"line {n}: {m}" for n, m in errors[:MAX_ERRORS_SHOWN])
        more = len(errors) - MAX_ERRORS_SHOWN
        super().__init__(f"the QA file has errors: {shown}{f'; and {more} more' if more > 0 else ''}")


def to_record(pair: QAPair, fmt: str, *, system: str | None = None, include_meta: bool = False) -> dict:
    """One pair as one line's object in `fmt`."""
    if fmt == "openai":
        messages = [{"role": "system", "content": system}] if system else []
        messages += [
            {"role": "user", "content": pair.question},
            {"role": "assistant", "content": pair.answer},
        ]
        record: dict = {"messages": messages}
    elif fmt == "alpaca":
        record = {"instruction": pair.question, "input": "", "output": pair.answer}
        if system:
            record["system"] = system
    elif fmt == "sharegpt":
        turns = [{"from": "system", "value": system}] if system else []
        turns += [{"from": "human", "value": pair.question}, {"from": "gpt", "value": pair.answer}]
        record = {"conversations": turns}
    else:
        raise InvalidArgument(f"unknown QA format {fmt!r}; use one of {', '.join(FORMATS)}")
    if include_meta:
        data = pair.to_dict()
        record[META_KEY] = {k: data[k] for k in _META_FIELDS}
    return record


def export_jsonl(
    pairs: Iterable[QAPair], fmt: str = "openai", *, system: str | None = None, include_meta: bool = False
) -> str:
    """Pairs as JSON lines in `fmt` (one pair per line, UTF-8 text, newline-terminated)."""
    return "".join(
        json.dumps(to_record(p, fmt, system=system, include_meta=include_meta), ensure_ascii=False) + "\n"
        for p in pairs
    )


def detect_format(record: dict) -> str | None:
    """The format one line's object is in, by its keys; None when it is none of them."""
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def _text(value: object) -> str | None:
    return value.strip() if isinstance(value, str) else None


def _from_turns(
    turns: object, role_key: str, text_key: str, user: str, assistant: str
) -> list[tuple[str, str]]:
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"expected a list of {{{role_key!r}, {text_key!r}}} objects")
    out: list[tuple[str, str]] = []
    question: str | None = None
    for t in turns:
        role, text = t.get(role_key), _text(t.get(text_key))
        if text is None and role in (user, assistant):
            raise ValueError(f"a {role!r} turn has no text in {text_key!r}")
        if role == user:
            question = text
        elif role == assistant and question:
            if text:
                out.append((question, text))
            question = None
    if not out:
        raise ValueError(f"no {user!r} turn followed by an {assistant!r} answer")
    return out


def _pairs_in(record: dict, fmt: str) -> list[tuple[str, str]]:
    if fmt == "openai":
        return _from_turns(record.get("messages"), "role", "content", "user", "assistant")
    if fmt == "sharegpt":
        return _from_turns(record.get("conversations"), "from", "value", "human", "gpt")
    instruction, extra, output = (_text(record.get(k)) for k in ("instruction", "input", "output"))
    if instruction is None or output is None or ("input" in record and extra is None):
        raise ValueError("'instruction', 'input' and 'output' must be strings")
    question = f"{instruction}\n\n{extra}" if extra else instruction
    if not question or not output:
        raise ValueError("empty instruction or output")
    return [(question, output)]


def _pair_from(question: str, answer: str, meta: object, doc_id: str) -> QAPair:
    if isinstance(meta, dict):
        try:
            data = {**meta, "question": question, "answer": answer}
            pair = QAPair.from_dict(data)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{META_KEY!r} is not a pair's metadata") from None
        # an edited question or answer is a new pair from the same source
        return pair if pair.pair_id == pair_id_for(pair.chunk_id, question, answer) else _renamed(pair)
    return loose_pair(
        pair_id_for(f"{doc_id}:imported", question, answer), question, answer, doc_id, "imported"
    )


def _renamed(pair: QAPair) -> QAPair:
    return replace(pair, pair_id=pair_id_for(pair.chunk_id, pair.question, pair.answer), score=0.0)


def import_jsonl(text: str, fmt: str | None = None, *, doc_id: str = "") -> list[QAPair]:
    """Pairs from JSON lines in `fmt` (or, for None, whichever format each line is in).

    Blank lines are skipped. Every bad line is reported with its number in one `FormatError`, and
    nothing is returned then: a training set that silently lost some lines is worse than an error.
    Lines without doclora metadata become pairs of `doc_id` with strategy "imported" and no chunk.
    """
    if fmt is not None and fmt not in FORMATS:
        raise InvalidArgument(f"unknown QA format {fmt!r}; use one of {', '.join(FORMATS)}")
    pairs: list[QAPair] = []
    errors: list[tuple[int, str]] = []
    for number, line in enumerate(json_lines(text.lstrip("\ufeff")), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append((number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            errors.append((number, f"expected a JSON object, got {type(record).__name__}"))
            continue
        line_fmt = fmt or detect_format(record)
        if line_fmt is None:
            errors.append(
                (number, "not a known format (needs 'messages', 'conversations' or 'instruction'/'output')")
            )
            continue
        try:
            found = _pairs_in(record, line_fmt)
            meta = record.get(META_KEY) if len(found) == 1 else None
            pairs += [_pair_from(q, a, meta, doc_id) for q, a in found]
        except ValueError as exc:
            errors.append((number, f"{line_fmt}: {exc}"))
    if errors:
        raise FormatError(errors)
    return pairs
