"""The HTTP gateway: REST under /api/v1, Server-Sent Events for progress and chat, an
OpenAI-compatible /v1/chat/completions, and the web UI. It holds no business logic: every route maps
to one gRPC call."""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import grpc
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from doclora.v1 import (
    inference_pb2,
    ingest_pb2,
    qagen_pb2,
    session_pb2,
    session_service_pb2,
    trainer_pb2,
)
from gateway.clients import Clients, http_status
from services.common.config import Settings

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
# Pasted text travels as JSON; refuse bodies far over the text limit before reading them.
BODY_SLACK = 64 * 1024
UPLOAD_CHUNK = 1024 * 1024
UPLOAD_TIMEOUT_S = 3600.0


def to_json(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class SessionCreate(BaseModel):
    text: str | None = Field(None, description="Pasted text to learn from.")
    urls: list[str] = Field(
        default_factory=list, max_length=100, description="Links to PDF, DOCX, HTML or text."
    )
    upload_ids: list[str] = Field(
        default_factory=list, max_length=100, description="Ids from POST /api/v1/uploads."
    )
    name: str = Field("", description="Name of the bot; defaults to the source name.")
    system_prompt: str = Field("", description="System prompt used in training and chat.")
    max_steps: int | None = Field(
        None, ge=1, le=100_000, description="Training steps; default from data size."
    )
    answer_mode: Literal["", "both", "adapter", "retrieval"] = Field(
        "",
        description="Where chat answers come from by default (see the chat `mode`); empty = the "
        "server's default (DOCLORA_ANSWER_MODE).",
    )
    qagen_backend: Literal["", "extractive", "local", "openai"] = Field(
        "", description="QA generator; empty = the server's default."
    )
    strategies: list[str] = Field(
        default_factory=list, max_length=32, description="QA strategies; empty = all."
    )
    review: bool = Field(False, description="Wait in AWAITING_REVIEW after generation until approved.")
    allow_partial: bool = Field(False, description="Train even when some chunks failed generation.")
    priority: int = Field(0, ge=-100, le=100, description="Training queue priority; higher goes first.")


class RetrainBody(BaseModel):
    from_scratch: bool = Field(False, description="Start from the base model, not the bot's adapter.")
    max_steps: int | None = Field(None, ge=1, le=100_000)
    priority: int | None = Field(None, ge=-100, le=100)


class PairBody(BaseModel):
    question: str = Field(max_length=2000)
    answer: str = Field(max_length=20_000)
    doc_id: str = ""


class PairPatch(BaseModel):
    question: str | None = Field(None, max_length=2000)
    answer: str | None = Field(None, max_length=20_000)


PAIR_FORMATS = {
    "openai": qagen_pb2.PAIR_FORMAT_OPENAI,
    "alpaca": qagen_pb2.PAIR_FORMAT_ALPACA,
    "sharegpt": qagen_pb2.PAIR_FORMAT_SHAREGPT,
}
MAX_IMPORT_BYTES = 3 * 1024 * 1024


class SourceBody(BaseModel):
    text: str | None = None
    url: str | None = None
    upload_id: str | None = None
    name: str = ""
    password: str = ""


class ChatMessage(BaseModel):
    role: str = "user"
    content: str


class ChatBody(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = True
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] | str | None = None
    seed: int | None = None
    mode: Literal["both", "adapter", "retrieval"] | None = Field(
        None,
        description="Answer from the adapter reading retrieved passages (both), the adapter alone, "
        "or the base model reading passages (retrieval); default: the bot's setting.",
    )


class OpenAIChatBody(ChatBody):
    model: str = Field(description="The bot id, or 'base' for the base model alone.")
    stream: bool = False


ANSWER_MODES = {
    None: inference_pb2.ANSWER_MODE_UNSPECIFIED,
    "both": inference_pb2.ANSWER_MODE_BOTH,
    "adapter": inference_pb2.ANSWER_MODE_ADAPTER,
    "retrieval": inference_pb2.ANSWER_MODE_RETRIEVAL,
}


def session_options(
    system_prompt: str, max_steps: int | None, answer_mode: str = "", **more
) -> session_pb2.SessionOptions:
    opts = session_pb2.SessionOptions(system_prompt=system_prompt, answer_mode=answer_mode, **more)
    if max_steps is not None:
        opts.max_steps = max_steps
    return opts


def chat_request(bot_id: str, body: ChatBody) -> inference_pb2.ChatRequest:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    opts = inference_pb2.GenerationOptions(
        max_new_tokens=body.max_tokens or 0, temperature=body.temperature, top_p=body.top_p, stop=stop
    )
    if body.seed is not None:
        opts.seed = body.seed
    return inference_pb2.ChatRequest(
        bot_id=bot_id,
        messages=[inference_pb2.ChatMessage(role=m.role, content=m.content) for m in body.messages],
        options=opts,
        mode=ANSWER_MODES[body.mode],
    )


async def responses(call, first):
    """The messages of a chat stream whose first message was already read; cancels it when left."""
    msg = first
    try:
        while msg is not grpc.aio.EOF:
            yield msg
            msg = await call.read()
    finally:
        call.cancel()


async def collect(call, first) -> tuple[str, inference_pb2.ChatResponse | None, list[dict]]:
    """A whole answer: its text, the closing message (finish reason, usage) and the citations."""
    text, last, cites = [], None, []
    async for msg in responses(call, first):
        text.append(msg.delta)
        cites += [to_json(ci) for ci in msg.citations]
        if msg.finish_reason:
            last = msg
    return "".join(text), last, cites


def finish_name(msg: inference_pb2.ChatResponse | None) -> str:
    if msg is None:
        return "stop"
    return inference_pb2.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower()


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.clients = Clients.connect(settings)
        yield
        await app.state.clients.close()

    app = FastAPI(
        title="doclora",
        version="0.1.0",
        description="Turn documents into a chat bot that knows them.",
        lifespan=lifespan,
    )

    def clients(request: Request) -> Clients:
        return request.app.state.clients

    @app.exception_handler(grpc.aio.AioRpcError)
    async def rpc_error(request: Request, exc: grpc.aio.AioRpcError):
        return error(http_status(exc.code()), exc.code().name, exc.details() or exc.code().name)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in exc.errors()]
        return error(400, "INVALID_ARGUMENT", "; ".join(parts) or "malformed request")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, "INTERNAL", "internal error; see the gateway log")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED"}
        return error(exc.status_code, codes.get(exc.status_code, "INVALID_ARGUMENT"), str(exc.detail))

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        limit = settings.max_text_bytes * 2 + BODY_SLACK
        if request.headers.get("content-type", "").startswith("multipart/"):
            limit = settings.max_upload_bytes + BODY_SLACK  # files stream on; ingest checks each
        if length and length.isdigit() and int(length) > limit:
            return error(413, "RESOURCE_EXHAUSTED", f"request body of {length} bytes is too large")
        return await call_next(request)

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        return {"status": "ok"}

    @app.post("/api/v1/sessions", status_code=201, tags=["sessions"])
    async def create_session(body: SessionCreate, request: Request):
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
        resp = await clients(request).sessions.CreateSession(req, timeout=clients(request).timeout)
        return to_json(resp.session)

    async def upload(c: Clients, f: UploadFile) -> ingest_pb2.UploadResponse:
        """Stream one multipart file to IngestService.Upload in 1 MiB chunks."""

        async def parts():
            yield ingest_pb2.UploadRequest(
                header=ingest_pb2.UploadHeader(
                    filename=f.filename or "upload", content_type=f.content_type or ""
                )
            )
            while chunk := await f.read(UPLOAD_CHUNK):
                yield ingest_pb2.UploadRequest(chunk=chunk)

        return await c.ingest.Upload(parts(), timeout=UPLOAD_TIMEOUT_S)

    @app.post("/api/v1/uploads", status_code=201, tags=["sessions"])
    async def upload_file(request: Request, file: UploadFile = File(...)):
        """Upload one file (PDF, DOCX, HTML, TXT, MD, or QA pairs as JSONL/CSV); name its
        `upload_id` in `upload_ids` when creating a session."""
        return to_json(await upload(clients(request), file))

    @app.post("/api/v1/sessions/upload", status_code=201, tags=["sessions"])
    async def create_session_from_files(
        request: Request,
        files: list[UploadFile] = File(default_factory=list),
        text: str | None = Form(None),
        urls: list[str] = Form(default_factory=list),
        name: str = Form(""),
        password: str = Form("", description="Password of encrypted PDFs among the files."),
        max_steps: int | None = Form(None, ge=1, le=100_000),
        system_prompt: str = Form(""),
        review: bool = Form(False, description="Wait for approval of the QA pairs before training."),
        qagen_backend: Literal["", "extractive", "local", "openai"] = Form(""),
    ):
        """Create a session from uploaded files, text and links in one multipart form."""
        c = clients(request)
        sources = [session_service_pb2.Source(text=text)] if text else []
        sources += [session_service_pb2.Source(url=u) for u in urls if u.strip()]
        for f in files:
            up = await upload(c, f)
            sources.append(session_service_pb2.Source(upload_id=up.upload_id, password=password))
        opts = session_options(system_prompt, max_steps, review=review, qagen_backend=qagen_backend)
        req = session_service_pb2.CreateSessionRequest(name=name, sources=sources, options=opts)
        resp = await c.sessions.CreateSession(req, timeout=c.timeout)
        return to_json(resp.session)

    @app.post("/api/v1/sessions/{session_id}/sources", status_code=201, tags=["sessions"])
    async def add_source(session_id: str, body: SourceBody, request: Request):
        """Add a source to a session before it trains, or to a ready bot (it trains again,
        continuing from its adapter)."""
        c = clients(request)
        src = session_service_pb2.Source(name=body.name, password=body.password)
        given = [k for k in ("text", "url", "upload_id") if getattr(body, k) is not None]
        if len(given) != 1:
            return error(400, "INVALID_ARGUMENT", "give exactly one of text, url, upload_id")
        setattr(src, given[0], getattr(body, given[0]))
        resp = await c.ingest.AddSource(
            ingest_pb2.AddSourceRequest(session_id=session_id, source=src), timeout=c.timeout
        )
        return to_json(resp.document)

    @app.get("/api/v1/sessions", tags=["sessions"])
    async def list_sessions(request: Request, limit: int = 100):
        c = clients(request)
        resp = await c.sessions.ListSessions(
            session_service_pb2.ListSessionsRequest(limit=limit), timeout=c.timeout
        )
        return {"sessions": [to_json(s) for s in resp.sessions]}

    @app.get("/api/v1/sessions/{session_id}", tags=["sessions"])
    async def get_session(session_id: str, request: Request):
        c = clients(request)
        resp = await c.sessions.GetSession(
            session_service_pb2.GetSessionRequest(session_id=session_id), timeout=c.timeout
        )
        return to_json(resp.session)

    @app.post("/api/v1/sessions/{session_id}/cancel", tags=["sessions"])
    async def cancel_session(session_id: str, request: Request):
        c = clients(request)
        resp = await c.sessions.CancelSession(
            session_service_pb2.CancelSessionRequest(session_id=session_id), timeout=c.timeout
        )
        return to_json(resp.session)

    @app.post("/api/v1/sessions/{session_id}/approve", tags=["sessions"])
    async def approve_session(session_id: str, request: Request):
        """Approve the reviewed QA pairs of a session awaiting review; training starts."""
        c = clients(request)
        resp = await c.sessions.ApproveSession(
            session_service_pb2.ApproveSessionRequest(session_id=session_id), timeout=c.timeout
        )
        return to_json(resp.session)

    @app.post("/api/v1/sessions/{session_id}/retrain", tags=["sessions"])
    async def retrain_session(session_id: str, request: Request, body: RetrainBody | None = None):
        """Train a finished session again from its stored pairs (a ready bot continues from its
        adapter unless `from_scratch`)."""
        c = clients(request)
        body = body or RetrainBody()
        req = session_service_pb2.RetrainSessionRequest(session_id=session_id, from_scratch=body.from_scratch)
        if body.max_steps is not None or body.priority is not None:
            req.options.SetInParent()
            if body.max_steps is not None:
                req.options.max_steps = body.max_steps
            if body.priority is not None:
                req.options.priority = body.priority
        resp = await c.sessions.RetrainSession(req, timeout=c.timeout)
        return to_json(resp.session)

    @app.get("/api/v1/sessions/{session_id}/events", tags=["sessions"])
    async def session_events(session_id: str, request: Request):
        """Server-Sent Events: each event's kind (state, progress, finished, failed) with the session."""
        c = clients(request)
        call = c.sessions.WatchSession(session_service_pb2.WatchSessionRequest(session_id=session_id))
        # Read the first message before answering, so an unknown session is a 404, not an empty stream.
        first = await call.read()
        if first is grpc.aio.EOF:
            return error(404, "NOT_FOUND", f"session {session_id!r} has no events")

        async def stream():
            msg = first
            try:
                while msg is not grpc.aio.EOF:
                    ev = to_json(msg.event)
                    kind = msg.event.WhichOneof("kind") or "state"
                    yield sse(kind, {"event": ev, "session": to_json(msg.session)})
                    msg = await call.read()
            except grpc.aio.AioRpcError as exc:
                yield sse("error", {"error": {"code": exc.code().name, "message": exc.details()}})
            finally:
                call.cancel()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/api/v1/sessions/{session_id}/documents", tags=["sessions"])
    async def list_documents(session_id: str, request: Request):
        c = clients(request)
        resp = await c.ingest.ListDocuments(
            ingest_pb2.ListDocumentsRequest(session_id=session_id), timeout=c.timeout
        )
        return {"documents": [to_json(d) for d in resp.documents]}

    @app.get("/api/v1/sessions/{session_id}/documents/{doc_id}/text", tags=["sessions"])
    async def document_text(session_id: str, doc_id: str, request: Request):
        """The text extracted from one document (Markdown), as the QA generator reads it."""
        c = clients(request)
        resp = await c.ingest.GetDocumentText(
            ingest_pb2.GetDocumentTextRequest(session_id=session_id, doc_id=doc_id), timeout=c.timeout
        )
        return {"doc_id": doc_id, "text": resp.text}

    @app.get("/api/v1/sessions/{session_id}/qa", tags=["qa"])
    async def list_pairs(session_id: str, request: Request, page_size: int = 100, page_token: str = ""):
        c = clients(request)
        resp = await c.qagen.ListPairs(
            qagen_pb2.ListPairsRequest(session_id=session_id, page_size=page_size, page_token=page_token),
            timeout=c.timeout,
        )
        return {
            "pairs": [to_json(p) for p in resp.pairs],
            "next_page_token": resp.next_page_token,
            "total": resp.total,
        }

    @app.post("/api/v1/sessions/{session_id}/qa", status_code=201, tags=["qa"])
    async def add_pair(session_id: str, body: PairBody, request: Request):
        """Add a question-answer pair written by a person."""
        c = clients(request)
        resp = await c.qagen.AddPair(
            qagen_pb2.AddPairRequest(
                session_id=session_id, question=body.question, answer=body.answer, doc_id=body.doc_id
            ),
            timeout=c.timeout,
        )
        return to_json(resp.pair)

    @app.patch("/api/v1/sessions/{session_id}/qa/{pair_id}", tags=["qa"])
    async def update_pair(session_id: str, pair_id: str, body: PairPatch, request: Request):
        """Change a pair's question and/or answer."""
        c = clients(request)
        req = qagen_pb2.UpdatePairRequest(session_id=session_id, pair_id=pair_id)
        if body.question is not None:
            req.question = body.question
        if body.answer is not None:
            req.answer = body.answer
        resp = await c.qagen.UpdatePair(req, timeout=c.timeout)
        return to_json(resp.pair)

    @app.delete("/api/v1/sessions/{session_id}/qa/{pair_id}", tags=["qa"])
    async def delete_pair(session_id: str, pair_id: str, request: Request):
        c = clients(request)
        resp = await c.qagen.DeletePair(
            qagen_pb2.DeletePairRequest(session_id=session_id, pair_id=pair_id), timeout=c.timeout
        )
        return {"total": resp.total}

    @app.get("/api/v1/sessions/{session_id}/qa/export", tags=["qa"])
    async def export_pairs(
        session_id: str,
        request: Request,
        format: Literal["openai", "alpaca", "sharegpt"] = "openai",
        include_meta: bool = False,
        include_system: bool = False,
    ):
        """The pairs as a JSON-lines file in the OpenAI chat, Alpaca or ShareGPT format."""
        c = clients(request)
        call = c.qagen.ExportPairs(
            qagen_pb2.ExportPairsRequest(
                session_id=session_id,
                format=PAIR_FORMATS[format],
                include_meta=include_meta,
                include_system=include_system,
            ),
            timeout=c.timeout,
        )
        first = await call.read()  # errors (unknown session, no pairs) become HTTP statuses here

        async def body():
            msg = first
            try:
                while msg is not grpc.aio.EOF:
                    yield msg.data
                    msg = await call.read()
            finally:
                call.cancel()

        name = f"{session_id}-{format}.jsonl"
        return StreamingResponse(
            body(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @app.post("/api/v1/sessions/{session_id}/qa/import", tags=["qa"])
    async def import_pairs(
        session_id: str,
        request: Request,
        file: UploadFile = File(...),
        format: Literal["", "openai", "alpaca", "sharegpt"] = Form(
            "", description="Empty: detected per line."
        ),
        replace: bool = Form(False, description="Replace all pairs instead of adding to them."),
    ):
        """Import pairs from a JSON-lines file in any of the export formats (at most 3 MiB)."""
        data = await file.read(MAX_IMPORT_BYTES + 1)
        if len(data) > MAX_IMPORT_BYTES:
            return error(
                413,
                "RESOURCE_EXHAUSTED",
                f"import files are limited to {MAX_IMPORT_BYTES} bytes; "
                "upload larger QA files as a session source",
            )
        c = clients(request)
        resp = await c.qagen.ImportPairs(
            qagen_pb2.ImportPairsRequest(
                session_id=session_id,
                data=data,
                replace=replace,
                format=PAIR_FORMATS.get(format, qagen_pb2.PAIR_FORMAT_UNSPECIFIED),
            ),
            timeout=c.timeout,
        )
        return {"imported": resp.imported, "duplicates": resp.duplicates, "total": resp.total}

    @app.get("/api/v1/adapters/{adapter_id}", tags=["bots"])
    async def get_adapter(adapter_id: str, request: Request):
        c = clients(request)
        resp = await c.trainer.GetAdapter(
            trainer_pb2.GetAdapterRequest(adapter_id=adapter_id), timeout=c.timeout
        )
        out = to_json(resp.adapter)
        out["metrics"] = json.loads(out.pop("metrics_json") or "{}")
        return out

    async def open_chat(c: Clients, req: inference_pb2.ChatRequest):
        """Start a chat stream and read its first message, so errors become HTTP statuses."""
        call = c.inference.Chat(req)
        first = await call.read()
        return call, first

    @app.post("/api/v1/bots/{bot_id}/chat", tags=["bots"])
    async def chat(bot_id: str, body: ChatBody, request: Request):
        """Chat with a bot; `stream: true` (default) answers with Server-Sent Events `delta` and `done`."""
        c = clients(request)
        call, first = await open_chat(c, chat_request(bot_id, body))
        if not body.stream:
            text, last, cites = await collect(call, first)
            return {"bot_id": bot_id, "content": text, "finish_reason": finish_name(last), "citations": cites}

        async def stream():
            try:
                async for msg in responses(call, first):
                    if msg.citations:
                        yield sse("citations", {"citations": [to_json(ci) for ci in msg.citations]})
                    if msg.delta:
                        yield sse("delta", {"delta": msg.delta})
                    if msg.finish_reason:
                        yield sse(
                            "done",
                            {"finish_reason": finish_name(msg), "completion_tokens": msg.completion_tokens},
                        )
            except grpc.aio.AioRpcError as exc:
                yield sse("error", {"error": {"code": exc.code().name, "message": exc.details()}})

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/v1/models", tags=["openai"])
    async def models(request: Request):
        c = clients(request)
        resp = await c.inference.ListBots(inference_pb2.ListBotsRequest(), timeout=c.timeout)
        data = [{"id": "base", "object": "model", "owned_by": "doclora", "created": 0}]
        data += [
            {"id": b.bot_id, "object": "model", "owned_by": "doclora", "created": 0, "name": b.name}
            for b in resp.bots
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: OpenAIChatBody, request: Request):
        """OpenAI-compatible chat; `model` is the bot id."""
        c = clients(request)
        call, first = await open_chat(c, chat_request(body.model, body))
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())

        def reason_of(msg) -> str:
            return "length" if msg.finish_reason == inference_pb2.FINISH_REASON_LENGTH else "stop"

        if not body.stream:
            text, last, cites = await collect(call, first)
            prompt, completion = (last.prompt_tokens, last.completion_tokens) if last else (0, 0)
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reason_of(last) if last else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
                "citations": cites,
            }

        def chunk(delta: dict, reason: str | None) -> bytes:
            obj = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            }
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

        async def stream():
            yield chunk({"role": "assistant", "content": ""}, None)
            async for msg in responses(call, first):
                if msg.delta:
                    yield chunk({"content": msg.delta}, None)
                if msg.finish_reason:
                    yield chunk({}, reason_of(msg))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    return app
