"""The ingest service's gRPC servicers, thin: each RPC parses its request, calls the domain code and
builds the response; nothing else happens here.

SessionService is the front door. Creating a session stores each source's original bytes first, so
nothing a person handed over is lost, then writes the record and queues ingest (the rules are in
`session_rules.py`, the source intake in `sources.py`). IngestService takes uploads (`uploads.py`),
adds a document to a session and reads documents back. Every record sent out goes through
`redact`. Deleting sessions and documents is in `deletion.py`, cloning a shared bot in `clone.py`."""

from __future__ import annotations

import contextlib

from doclora.v1 import ingest_pb2, ingest_pb2_grpc, session_service_pb2, session_service_pb2_grpc
from services.common.runtime import Runtime
from services.ingest import session_rules as rules
from services.ingest.clone import clone_shared_bot
from services.ingest.deletion import delete_document, delete_session
from services.ingest.session_rules import redact
from services.ingest.uploads import receive_upload


class SessionServicer(session_service_pb2_grpc.SessionServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    async def CreateSession(self, request, context):
        session = await rules.create_session(self.rt, request.name, request.sources, request.options)
        return session_service_pb2.CreateSessionResponse(session=redact(session))

    async def GetSession(self, request, context):
        rec = await rules.get_session(self.rt, request.session_id)
        return session_service_pb2.GetSessionResponse(session=redact(rec))

    async def ListSessions(self, request, context):
        sessions = await rules.list_sessions(self.rt, request.limit or 100)
        return session_service_pb2.ListSessionsResponse(sessions=[redact(s) for s in sessions])

    async def WatchSession(self, request, context):
        # closed with the call, so the bus subscription inside ends when the client goes
        async with contextlib.aclosing(rules.watch_session(self.rt, request.session_id)) as updates:
            async for ev, rec in updates:
                yield session_service_pb2.WatchSessionResponse(event=ev, session=redact(rec))

    async def CancelSession(self, request, context):
        rec = await rules.cancel_session(self.rt, request.session_id)
        return session_service_pb2.CancelSessionResponse(session=redact(rec))

    async def ApproveSession(self, request, context):
        rec = await rules.approve_session(self.rt, request.session_id)
        return session_service_pb2.ApproveSessionResponse(session=redact(rec))

    async def RetrainSession(self, request, context):
        override = request.options if request.HasField("options") else None
        rec = await rules.retrain_session(self.rt, request.session_id, override, request.from_scratch)
        return session_service_pb2.RetrainSessionResponse(session=redact(rec))

    async def DeleteSession(self, request, context):
        removed = await delete_session(self.rt, request.session_id)
        return session_service_pb2.DeleteSessionResponse(objects_deleted=removed)

    async def DeleteDocument(self, request, context):
        rec, removed = await delete_document(self.rt, request.session_id, request.doc_id)
        return session_service_pb2.DeleteDocumentResponse(session=redact(rec), objects_deleted=removed)

    async def CloneSharedBot(self, request, context):
        rec = await clone_shared_bot(self.rt, request.share_token, request.pairs_only, request.name)
        return session_service_pb2.CloneSharedBotResponse(session=redact(rec))


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    async def Upload(self, request_iterator, context):
        return await receive_upload(self.rt, request_iterator)

    async def AddSource(self, request, context):
        doc = await rules.add_document(self.rt, request.session_id, request.source)
        return ingest_pb2.AddSourceResponse(document=doc)

    async def ListDocuments(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        return ingest_pb2.ListDocumentsResponse(documents=rec.documents)

    async def GetDocumentText(self, request, context):
        text = await rules.document_text(self.rt, request.session_id, request.doc_id)
        return ingest_pb2.GetDocumentTextResponse(text=text)
