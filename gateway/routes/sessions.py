"""A session after its creation: listing and reading sessions, cancelling, approving reviewed pairs,
training again, deleting it with everything of it, and watching its progress as Server-Sent Events."""

from __future__ import annotations

import grpc
from fastapi import APIRouter, Query, Request

from doclora.v1 import session_service_pb2
from gateway.common import ClientsDep, error, event_stream, responses, sse, sse_error, to_json
from gateway.schemas import INT32_MAX, RetrainBody

router = APIRouter(tags=["sessions"])


@router.get("/api/v1/sessions")
async def list_sessions(
    c: ClientsDep, limit: int = Query(100, ge=1, le=INT32_MAX, description="At most this many sessions.")
):
    resp = await c.sessions.ListSessions(
        session_service_pb2.ListSessionsRequest(limit=limit), timeout=c.timeout
    )
    return {"sessions": [to_json(s) for s in resp.sessions]}


@router.get("/api/v1/sessions/{session_id}")
async def get_session(session_id: str, c: ClientsDep):
    resp = await c.sessions.GetSession(
        session_service_pb2.GetSessionRequest(session_id=session_id), timeout=c.timeout
    )
    return to_json(resp.session)


@router.delete("/api/v1/sessions/{session_id}")
async def delete_session(session_id: str, c: ClientsDep):
    """Delete a session/bot: its record, documents, pairs, checkpoints, adapters and uploads; running
    work for it stops and chat replicas drop its adapter."""
    resp = await c.sessions.DeleteSession(
        session_service_pb2.DeleteSessionRequest(session_id=session_id), timeout=c.timeout
    )
    return {"session_id": session_id, "objects_deleted": resp.objects_deleted}


@router.post("/api/v1/sessions/{session_id}/cancel")
async def cancel_session(session_id: str, c: ClientsDep):
    resp = await c.sessions.CancelSession(
        session_service_pb2.CancelSessionRequest(session_id=session_id), timeout=c.timeout
    )
    return to_json(resp.session)


@router.post("/api/v1/sessions/{session_id}/approve")
async def approve_session(session_id: str, c: ClientsDep):
    """Approve the reviewed QA pairs of a session awaiting review; training starts."""
    resp = await c.sessions.ApproveSession(
        session_service_pb2.ApproveSessionRequest(session_id=session_id), timeout=c.timeout
    )
    return to_json(resp.session)


@router.post("/api/v1/sessions/{session_id}/retrain")
async def retrain_session(session_id: str, c: ClientsDep, body: RetrainBody | None = None):
    """Train a finished session again from its stored pairs (a ready bot continues from its
    adapter unless `from_scratch`)."""
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


@router.get("/api/v1/sessions/{session_id}/events")
async def session_events(session_id: str, request: Request, c: ClientsDep):
    """Server-Sent Events: each event's kind (state, progress, finished, failed) with the session."""
    call = c.sessions.WatchSession(session_service_pb2.WatchSessionRequest(session_id=session_id))
    # Read the first message before answering, so an unknown session is a 404, not an empty stream.
    first = await call.read()
    if first is grpc.aio.EOF:
        return error(404, "NOT_FOUND", f"session {session_id!r} has no events")

    async def stream():
        try:
            async for msg in responses(call, first):
                kind = msg.event.WhichOneof("kind") or "state"
                yield sse(kind, {"event": to_json(msg.event), "session": to_json(msg.session)})
        except grpc.aio.AioRpcError as exc:
            yield sse_error(exc)

    return event_stream(request, stream())
