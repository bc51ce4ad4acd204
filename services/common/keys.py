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


def uploads_prefix(tenant: str) -> str:
    """Where a tenant's uploads wait (one folder per upload id)."""
    return f"{tenant}/uploads/"


def adapters_prefix(tenant: str) -> str:
    """Where a tenant's adapters are (one folder per adapter id)."""
    return f"{tenant}/adapters/"


def sessions_prefix(tenant: str) -> str:
    """Where a tenant's sessions are (one folder per session id)."""
    return f"{tenant}/sessions/"


def doc_prefix(tenant: str, sid: str, doc_id: str) -> str:
    """Every object of one document of a session (original, text, pages, its own QA file)."""
    return f"{session_prefix(tenant, sid)}docs/{doc_id}/"


def adapter_id_for(sid: str, round: int) -> str:
    """The id of the adapter a session's `round` trains: the session id for round 0, then
    `{sid}-r{round}`, so a cache keyed by adapter id never serves an older round's weights."""
    return sid if round <= 0 else f"{sid}-r{round}"


def session_of_adapter(adapter_id: str) -> str:
    """The session whose round trained `adapter_id` (the inverse of `adapter_id_for`)."""
    base, sep, round_ = adapter_id.rpartition("-r")
    return base if sep and round_.isdigit() and base else adapter_id


def deleted_subject(sid: str) -> str:
    """The core-NATS subject on which every inference replica hears that session `sid` was deleted
    (no stream keeps it: a replica that was down prunes its adapter cache when it starts)."""
    return f"deleted.{sid}"
