"""JSON Lines, the format of chunks and QA pairs in the store (and of QA files people hand over)."""

from __future__ import annotations

import json
import re

_LINE_END = re.compile(r"\r\n|\r|\n")


def json_lines(text: str) -> list[str]:
    """The lines of JSON-lines `text`, split at CR LF, CR or LF only: `json.dumps(ensure_ascii=False)`
    leaves other line separators (U+2028, U+0085 ...) inside a string as they are, where
    `str.splitlines` would cut the line."""
    return _LINE_END.split(text)


def to_jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def from_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in json_lines(data.decode("utf-8")) if line.strip()]
