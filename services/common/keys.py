"""Object-store keys. Every key is built here from server-generated ids, never from user input."""

from __future__ import annotations

import re
import secrets

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{2,63}$")


def new_id(prefix: str = "") -> str:
    """A fresh random id safe for keys and NATS subjects."""
    return prefix + secrets.token_hex(8)


def is_valid_id(value: str) -> bool:
    return bool(_ID.match(value or ""))


def session_prefix(tenant: str, sid: str) -> str:
    return f"{tenant}/sessions/{sid}/"


def doc_original(tenant: str, sid: str, doc_id: str) -> str:
    return f"{session_prefix(tenant, sid)}docs/{doc_id}/original"


def doc_text(tenant: str, sid: str, doc_id: str) -> str:
    return f"{session_prefix(tenant, sid)}docs/{doc_id}/text.md"


def doc_pages(tenant: str, sid: str, doc_id: str) -> str:
    return f"{session_prefix(tenant, sid)}docs/{doc_id}/pages.json"


def chunks(tenant: str, sid: str) -> str:
    return f"{session_prefix(tenant, sid)}chunks.jsonl"


def qa_pairs(tenant: str, sid: str) -> str:
    return f"{session_prefix(tenant, sid)}qa/pairs.jsonl"


def qa_state(tenant: str, sid: str) -> str:
    """Which documents generation has done, and which of their chunks failed."""
    return f"{session_prefix(tenant, sid)}qa/state.json"


def upload(tenant: str, upload_id: str) -> str:
    """Where an upload waits until a session takes it."""
    return f"{tenant}/uploads/{upload_id}/original"


def doc_qa(tenant: str, sid: str, doc_id: str) -> str:
    """QA pairs a person handed over as a file: they skip generation."""
    return f"{session_prefix(tenant, sid)}docs/{doc_id}/qa.jsonl"


def checkpoints(tenant: str, sid: str) -> str:
    return f"{session_prefix(tenant, sid)}train/checkpoints/"


def adapter_prefix(tenant: str, adapter_id: str) -> str:
    return f"{tenant}/adapters/{adapter_id}/"
