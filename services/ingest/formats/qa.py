"""A person's own question-answer pairs: they skip generation and go straight to training.

JSON lines with `question`/`answer` (or `prompt`/`completion`) or OpenAI chat format
(`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`), a JSON array of such
objects, or CSV with a header naming a question and an answer column. Any bad line fails the
file with line-numbered errors (the first few), because training on a silently partial file is
worse than asking for a fixed one.
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata

from services.common.errors import InvalidArgument
from services.common.jsonl import json_lines
from services.ingest.extract import Extracted, single_page
from services.ingest.formats.text import decode_text

MAX_ERRORS_SHOWN = 5
MAX_FIELD_CHARS = 100_000
_QUESTION_KEYS = ("question", "prompt")
_ANSWER_KEYS = ("answer", "completion")


class _Errors:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = "; ".join(self.items[:MAX_ERRORS_SHOWN])
        more = len(self.items) - MAX_ERRORS_SHOWN
        suffix = f"; and {more} more" if more > 0 else ""
        raise InvalidArgument(f"the question-answer {self.kind} has errors: {shown}{suffix}")


def _clean(value) -> str:
    return unicodedata.normalize("NFC", value).strip() if isinstance(value, str) else ""


def _content(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return _clean(content)


def _pairs_of(obj, where: str, errors: _Errors) -> list[dict]:
    if not isinstance(obj, dict):
        errors.add(where, f"expected a JSON object, got {type(obj).__name__}")
        return []
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            errors.add(where, '\'messages\' must be a list of {"role", "content"} objects')
            return []
        pairs, question = [], None
        for message in messages:
            role = message.get("role")
            if role == "user":
                question = _content(message)
            elif role == "assistant" and question:
                answer = _content(message)
                if answer:
                    pairs.append({"question": question, "answer": answer})
                question = None
        if not pairs:
            errors.add(where, "'messages' has no user message followed by an assistant answer")
        return pairs
    question = next((obj[k] for k in _QUESTION_KEYS if k in obj), None)
    answer = next((obj[k] for k in _ANSWER_KEYS if k in obj), None)
    return _pair(question, answer, where, errors)


def _pair(question, answer, where: str, errors: _Errors) -> list[dict]:
    q, a = _clean(question), _clean(answer)
    if question is None and answer is None:
        errors.add(where, "needs 'question' and 'answer' (or 'messages')")
    elif not q:
        errors.add(where, "'question' is missing or empty")
    elif not a:
        errors.add(where, "'answer' is missing or empty")
    elif len(q) > MAX_FIELD_CHARS or len(a) > MAX_FIELD_CHARS:
        errors.add(where, f"a question or answer is longer than {MAX_FIELD_CHARS} characters")
    else:
        return [{"question": q, "answer": a}]
    return []


def _result(pairs: list[dict]) -> Extracted:
    if not pairs:
        raise InvalidArgument("the question-answer file has no pairs")
    # the text form lets the pairs be read, chunked and cited like any document
    text = "\n\n".join(f"Q: {p['question']}\nA: {p['answer']}" for p in pairs)
    return single_page(text, qa_pairs=pairs)


def extract_jsonl(data: bytes) -> Extracted:
    """JSON lines (or one JSON array) of pairs."""
    text = decode_text(data)
    errors = _Errors("file")
    pairs: list[dict] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(
                f"the question-answer file is not valid JSON: line {exc.lineno}: {exc.msg}"
            ) from None
        if not isinstance(items, list):
            raise InvalidArgument("the question-answer file must be a JSON array or JSON lines")
        for number, item in enumerate(items, start=1):
            pairs += _pairs_of(item, f"item {number}", errors)
    else:
        for number, line in enumerate(json_lines(text), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.add(f"line {number}", f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            pairs += _pairs_of(obj, f"line {number}", errors)
    errors.raise_if_any()
    return _result(pairs)


def extract_csv(data: bytes) -> Extracted:
    """CSV whose header names a question and an answer column (comma, semicolon or tab separated)."""
    text = decode_text(data)
    first = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = max((",", ";", "\t"), key=first.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    errors = _Errors("CSV")
    pairs: list[dict] = []
    columns: tuple[int, int] | None = None
    last_line = 0
    try:
        for row in reader:
            start, last_line = last_line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if columns is None:
                header = [cell.strip().strip("\ufeff").lower() for cell in row]
                q = next((header.index(k) for k in _QUESTION_KEYS if k in header), None)
                a = next((header.index(k) for k in _ANSWER_KEYS if k in header), None)
                if q is None or a is None:
                    raise InvalidArgument(
                        f"the question-answer CSV needs a header row with 'question' and 'answer' columns "
                        f"(line {start} has {', '.join(repr(h) for h in header[:6])})"
                    )
                columns = (q, a)
                continue
            if max(columns) >= len(row):
                errors.add(f"line {start}", f"has {len(row)} columns; expected at least {max(columns) + 1}")
                continue
            pairs += _pair(row[columns[0]], row[columns[1]], f"line {start}", errors)
    except csv.Error as exc:
        errors.add(f"line {reader.line_num}", f"not valid CSV ({exc})")
    errors.raise_if_any()
    return _result(pairs)
