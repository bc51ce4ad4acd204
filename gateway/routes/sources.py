"""How documents get into a session: creating one from JSON (pasted text, links, upload ids) or from
one multipart form, uploading a file on its own, and adding a source to an existing session. Files
stream on to IngestService.Upload in 1 MiB chunks; ingest checks each file's size and type."""

from __future__ import annotations

import re

from fastapi import APIRouter, File, Form, UploadFile

from doclora.v1 import ingest_pb2, session_pb2, session_service_pb2
from gateway.clients import Clients
from gateway.common import ClientsDep, error, to_json
from gateway.schemas import QaBackendName, SessionCreate, SourceBody, Text
from services.common.options import set_choices

UPLOAD_CHUNK = 1024 * 1024
UPLOAD_TIMEOUT_S = 3600.0

router = APIRouter(tags=["sessions"])


def session_options(
    system_prompt: str,
    max_steps: int | None,
    answer_mode: str = "",
    *,
    qagen_backend: str = "",
    strategies: list[str] | None = None,
    **more,
) -> session_pb2.SessionOptions:
    """The options of a new session; the JSON API's lowercase names go in as the enum fields."""
    opts = session_pb2.SessionOptions(system_prompt=system_prompt, **more)
    set_choices(opts, answer_mode=answer_mode, qa_backend=qagen_backend, strategies=strategies or ())
    if max_steps is not None:
        opts.max_steps = max_steps
    return opts


# the HTML form encoding escapes only these three in a multipart part's filename (WHATWG); the
# multipart parser leaves them escaped
_FORM_ESCAPES = re.compile(r"%(22|0[ADad])")


def form_filename(name: str) -> str:
    """A multipart file name as the person typed it: `my %22notes%22.txt` is `my "notes".txt`."""
    return _FORM_ESCAPES.sub(lambda m: chr(int(m[1], 16)), name)


async def upload(c: Clients, f: UploadFile) -> ingest_pb2.UploadResponse:
    """Stream one multipart file to IngestService.Upload in 1 MiB chunks."""

    async def parts():
        name = form_filename(f.filename or "") or "upload"
        yield ingest_pb2.UploadRequest(
            header=ingest_pb2.UploadHeader(filename=name, content_type=f.content_type or "")
        )
        while chunk := await f.read(UPLOAD_CHUNK):
            yield ingest_pb2.UploadRequest(chunk=chunk)

    return await c.ingest.Upload(parts(), timeout=UPLOAD_TIMEOUT_S)


@router.post("/api/v1/sessions", status_code=201)
async def create_session(body: SessionCreate, c: ClientsDep):
    """Create a session (a bot being learned) from pasted text."""
    opts = session_options(
        body.system_prompt,
        body.max_steps,
        body.answer_mode,
        qagen_backend=body.qagen_backend,
        strategies=body.strategies,
        review=body.review,
        allow_partial=body.allow_partial,
        priority=body.priority,
    )
    sources = [session_service_pb2.Source(text=body.text)] if body.text is not None else []
    sources += [session_service_pb2.Source(url=u) for u in body.urls]
    sources += [session_service_pb2.Source(upload_id=u) for u in body.upload_ids]
    req = session_service_pb2.CreateSessionRequest(name=body.name, sources=sources, options=opts)
    resp = await c.sessions.CreateSession(req, timeout=c.timeout)
    return to_json(resp.session)


@router.post("/api/v1/uploads", status_code=201)
async def upload_file(c: ClientsDep, file: UploadFile = File(...)):
    """Upload one file (PDF, DOCX, HTML, TXT, MD, or QA pairs as JSONL/CSV); name its
    `upload_id` in `upload_ids` when creating a session."""
    return to_json(await upload(c, file))


@router.post("/api/v1/sessions/upload", status_code=201)
async def create_session_from_files(
    c: ClientsDep,
    files: list[UploadFile] = File(default_factory=list),
    text: Text | None = Form(None),
    urls: list[Text] = Form(default_factory=list),
    name: Text = Form(""),
    password: Text = Form("", description="Password of encrypted PDFs among the files."),
    max_steps: int | None = Form(None, ge=1, le=100_000),
    system_prompt: Text = Form(""),
    review: bool = Form(False, description="Wait for approval of the QA pairs before training."),
    qagen_backend: QaBackendName = Form(""),
):
    """Create a session from uploaded files, text and links in one multipart form."""
    sources = [session_service_pb2.Source(text=text)] if text else []
    sources += [session_service_pb2.Source(url=u) for u in urls if u.strip()]
    for f in files:
        up = await upload(c, f)
        sources.append(session_service_pb2.Source(upload_id=up.upload_id, password=password))
    opts = session_options(system_prompt, max_steps, review=review, qagen_backend=qagen_backend)
    req = session_service_pb2.CreateSessionRequest(name=name, sources=sources, options=opts)
    resp = await c.sessions.CreateSession(req, timeout=c.timeout)
    return to_json(resp.session)


@router.post("/api/v1/sessions/{session_id}/sources", status_code=201)
async def add_source(session_id: str, body: SourceBody, c: ClientsDep):
    """Add a source to a session before it trains, or to a ready bot (it trains again,
    continuing from its adapter)."""
    src = session_service_pb2.Source(name=body.name, password=body.password)
    given = [k for k in ("text", "url", "upload_id") if getattr(body, k) is not None]
    if len(given) != 1:
        return error(400, "INVALID_ARGUMENT", "give exactly one of text, url, upload_id")
    setattr(src, given[0], getattr(body, given[0]))
    resp = await c.ingest.AddSource(
        ingest_pb2.AddSourceRequest(session_id=session_id, source=src), timeout=c.timeout
    )
    return to_json(resp.document)
