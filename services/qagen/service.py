"""QAGenService: read, edit, export and import a session's QA pairs. Thin: the changes themselves are
in `pairs.py`; here each one is read, applied and written back under a per-session lock, and the
session record's pair count follows."""

from __future__ import annotations

import asyncio
import collections
import contextlib

from doclora.v1 import qagen_pb2, qagen_pb2_grpc, session_pb2
from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.jsonl import to_jsonl
from services.common.runtime import Runtime
from services.common.sessions import state_name
from services.qagen import pairs as pairs_mod
from services.qagen.worker import load_pairs

S = session_pb2.SessionState
# the stage that writes the pairs, or reads them to train, is running
BUSY_STATES = frozenset({S.SESSION_STATE_GENERATING, S.SESSION_STATE_TRAINING})
FORMAT_NAMES = {
    qagen_pb2.PAIR_FORMAT_UNSPECIFIED: "openai",
    qagen_pb2.PAIR_FORMAT_OPENAI: "openai",
    qagen_pb2.PAIR_FORMAT_ALPACA: "alpaca",
    qagen_pb2.PAIR_FORMAT_SHAREGPT: "sharegpt",
}
MAX_IMPORT_BYTES = 3 * 1024 * 1024


def pair_to_pb(p: dict) -> qagen_pb2.QAPair:
    out = qagen_pb2.QAPair(
        **{
            f.name: p[f.name]
            for f in qagen_pb2.QAPair.DESCRIPTOR.fields
            if f.name in p and p[f.name] is not None
        }
    )
    out.support = float(p.get("score") or 0.0)
    return out


class QAGenServicer(qagen_pb2_grpc.QAGenServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt
        # one change at a time per session in this replica (read, change, write back)
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    @contextlib.asynccontextmanager
    async def _editing(self, sid: str):
        """(record, pairs) of a session whose pairs may change now; writes them back on success."""
        async with self._locks[sid]:
            rec = await self.rt.sessions.get(sid)
            if rec.state in BUSY_STATES:
                raise FailedPrecondition(
                    f"pairs cannot change while the session is {state_name(rec.state)}; "
                    "ask for review (options.review) to edit them before training"
                )
            try:
                pairs = await load_pairs(self.rt, rec.tenant, sid)
            except FailedPrecondition:
                if rec.state not in (
                    S.SESSION_STATE_READY,
                    S.SESSION_STATE_FAILED,
                    S.SESSION_STATE_CANCELLED,
                    S.SESSION_STATE_AWAITING_REVIEW,
                ):
                    raise
                pairs = []
            yield rec, pairs
            await self.rt.io(
                self.rt.store.put_bytes,
                keys.qa_pairs(rec.tenant, sid),
                to_jsonl(pairs),
                content_type="application/x-ndjson",
            )

            def count(r):
                r.qa.pairs = len(pairs)
                r.qa.edits += 1

            await self.rt.sessions.update(sid, count)

    async def ListPairs(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        size = request.page_size or 100
        if size < 0 or size > 1000:
            raise InvalidArgument("page_size must be between 1 and 1000")
        try:
            offset = int(request.page_token or "0")
        except ValueError:
            raise InvalidArgument("page_token is not one this server gave out") from None
        pairs = await load_pairs(self.rt, rec.tenant, rec.session_id)
        page = pairs[offset : offset + size]
        nxt = str(offset + size) if offset + size < len(pairs) else ""
        return qagen_pb2.ListPairsResponse(
            pairs=[pair_to_pb(p) for p in page], next_page_token=nxt, total=len(pairs)
        )

    async def AddPair(self, request, context):
        async with self._editing(request.session_id) as (rec, pairs):
            if request.doc_id and request.doc_id not in {d.doc_id for d in rec.documents}:
                raise InvalidArgument(f"document {request.doc_id!r} is not in session {rec.session_id}")
            pair = pairs_mod.add_pair(pairs, request.question, request.answer, request.doc_id)
        return qagen_pb2.AddPairResponse(pair=pair_to_pb(pair))

    async def UpdatePair(self, request, context):
        async with self._editing(request.session_id) as (_rec, pairs):
            pair = pairs_mod.update_pair(
                pairs,
                request.pair_id,
                request.question if request.HasField("question") else None,
                request.answer if request.HasField("answer") else None,
            )
        return qagen_pb2.UpdatePairResponse(pair=pair_to_pb(pair))

    async def DeletePair(self, request, context):
        async with self._editing(request.session_id) as (_rec, pairs):
            pairs_mod.delete_pair(pairs, request.pair_id)
        return qagen_pb2.DeletePairResponse(total=len(pairs))

    async def ExportPairs(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        pairs = await load_pairs(self.rt, rec.tenant, rec.session_id)
        system = rec.options.system_prompt if request.include_system else None
        for piece in pairs_mod.export_pieces(
            pairs, FORMAT_NAMES[request.format], system=system or None, include_meta=request.include_meta
        ):
            yield qagen_pb2.ExportPairsResponse(data=piece)

    async def ImportPairs(self, request, context):
        if len(request.data) > MAX_IMPORT_BYTES:
            raise InvalidArgument(
                f"the file is {len(request.data)} bytes; import at most {MAX_IMPORT_BYTES} bytes here, "
                "or upload a larger QA file as a source of the session"
            )
        try:
            text = request.data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("the QA file is not UTF-8 text") from None
        fmt = None if request.format == qagen_pb2.PAIR_FORMAT_UNSPECIFIED else FORMAT_NAMES[request.format]
        async with self._editing(request.session_id) as (_rec, pairs):
            added, dupes = pairs_mod.import_pairs(pairs, text, fmt, replace=request.replace)
        return qagen_pb2.ImportPairsResponse(imported=added, duplicates=dupes, total=len(pairs))
