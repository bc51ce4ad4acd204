"""QAGenService: read, edit, export and import a session's QA pairs. Thin: the changes themselves are
in `pairs.py`; here each one is applied to the stored pairs by the store's compare-and-swap
(`ArtifactStore.mutate`: a conditional write, re-read and re-applied when another replica wrote in
between, ABORTED if it keeps losing), so no replica overwrites another's edit, and the session
record's pair count follows the last write."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TypeVar

from doclora.v1 import qagen_pb2, qagen_pb2_grpc, session_pb2
from services.common import keys
from services.common.errors import Conflict, FailedPrecondition, InvalidArgument
from services.common.jsonl import from_jsonl, to_jsonl
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
# pairs may be missing (none were generated) in these states, and edits then start from none
NO_PAIRS_OK = frozenset(
    {
        S.SESSION_STATE_READY,
        S.SESSION_STATE_FAILED,
        S.SESSION_STATE_CANCELLED,
        S.SESSION_STATE_AWAITING_REVIEW,
    }
)
# how often an edit that keeps losing the race to other replicas' edits is re-applied
EDIT_ATTEMPTS = 8
T = TypeVar("T")


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
        # one change at a time per session in this replica: they would only race each other; the
        # conditional write is what keeps other replicas' changes
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def _edit(
        self, sid: str, change: Callable[[session_pb2.Session, list[dict]], T]
    ) -> tuple[T, list[dict]]:
        """Apply `change(record, pairs)` (domain code that changes `pairs` in place) to the stored
        pairs by compare-and-swap; returns what it returned and the pairs written."""
        async with self._locks[sid]:
            rec = await self.rt.sessions.get(sid)
            if rec.state in BUSY_STATES:
                raise FailedPrecondition(
                    f"pairs cannot change while the session is {state_name(rec.state)}; "
                    "ask for review (options.review) to edit them before training"
                )
            out: list = []

            def apply(data: bytes | None) -> bytes:
                if data is None and rec.state not in NO_PAIRS_OK:
                    raise FailedPrecondition(f"session {sid} has no question-answer pairs yet")
                pairs = from_jsonl(data) if data is not None else []
                out[:] = [change(rec, pairs), pairs]
                return to_jsonl(pairs)

            key = keys.qa_pairs(rec.tenant, sid)
            try:
                put = await self.rt.io(
                    self.rt.store.mutate,
                    key,
                    apply,
                    content_type="application/x-ndjson",
                    attempts=EDIT_ATTEMPTS,
                )
            except Conflict:
                raise Conflict(
                    f"the pairs of session {sid} were changed meanwhile by other edits, {EDIT_ATTEMPTS} "
                    "times in a row; retry"
                ) from None
            result, pairs = out
            await self._count(rec.tenant, sid, len(pairs), put.etag)
            return result, pairs

    async def _count(self, tenant: str, sid: str, count: int, etag: str) -> None:
        """Count the edit and set the record's pair count to `count`, that of the pairs version
        `etag`; when a later version is stored by then (another replica's edit, whose count may
        have gone in before this one), the record gets that version's count instead."""
        key = keys.qa_pairs(tenant, sid)

        def counted(r: session_pb2.Session) -> None:
            r.qa.pairs = count
            r.qa.edits += 1

        await self.rt.sessions.update(sid, counted)
        for _ in range(EDIT_ATTEMPTS):
            if (await self.rt.io(self.rt.store.stat, key)).etag == etag:
                return
            data, etag = await self.rt.io(self.rt.store.get_with_etag, key)
            count = len(from_jsonl(data))

            def recount(r: session_pb2.Session, count: int = count) -> None:
                r.qa.pairs = count

            await self.rt.sessions.update(sid, recount)

    async def ListPairs(self, request, context):
        rec = await self.rt.sessions.get(request.session_id)
        size = request.page_size or 100
        if size < 0 or size > 1000:
            raise InvalidArgument("page_size must be between 1 and 1000")
        try:
            offset = int(request.page_token or "0")
        except ValueError:
            raise InvalidArgument("page_token is not one this server gave out") from None
        if offset < 0:
            raise InvalidArgument("page_token is not one this server gave out")
        pairs = await load_pairs(self.rt, rec.tenant, rec.session_id)
        page = pairs[offset : offset + size]
        nxt = str(offset + size) if offset + size < len(pairs) else ""
        return qagen_pb2.ListPairsResponse(
            pairs=[pair_to_pb(p) for p in page], next_page_token=nxt, total=len(pairs)
        )

    async def AddPair(self, request, context):
        def add(rec: session_pb2.Session, pairs: list[dict]) -> dict:
            if request.doc_id and request.doc_id not in {d.doc_id for d in rec.documents}:
                raise InvalidArgument(f"document {request.doc_id!r} is not in session {rec.session_id}")
            return pairs_mod.add_pair(pairs, request.question, request.answer, request.doc_id)

        pair, _ = await self._edit(request.session_id, add)
        return qagen_pb2.AddPairResponse(pair=pair_to_pb(pair))

    async def UpdatePair(self, request, context):
        question = request.question if request.HasField("question") else None
        answer = request.answer if request.HasField("answer") else None
        pair, _ = await self._edit(
            request.session_id,
            lambda _rec, pairs: pairs_mod.update_pair(pairs, request.pair_id, question, answer),
        )
        return qagen_pb2.UpdatePairResponse(pair=pair_to_pb(pair))

    async def DeletePair(self, request, context):
        _, pairs = await self._edit(
            request.session_id, lambda _rec, pairs: pairs_mod.delete_pair(pairs, request.pair_id)
        )
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
        (added, dupes), pairs = await self._edit(
            request.session_id,
            lambda _rec, pairs: pairs_mod.import_pairs(pairs, text, fmt, replace=request.replace),
        )
        return qagen_pb2.ImportPairsResponse(imported=added, duplicates=dupes, total=len(pairs))
