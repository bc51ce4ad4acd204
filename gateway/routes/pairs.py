"""A session's question-answer pairs (the `qa` tag): listing, adding, changing and deleting them,
and exporting or importing them as JSON lines in the OpenAI chat, Alpaca or ShareGPT format."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from doclora.v1 import qagen_pb2
from gateway.common import ClientsDep, error, responses, to_json
from gateway.schemas import PairBody, PairPatch, Text

PAIR_FORMATS = {
    "openai": qagen_pb2.PAIR_FORMAT_OPENAI,
    "alpaca": qagen_pb2.PAIR_FORMAT_ALPACA,
    "sharegpt": qagen_pb2.PAIR_FORMAT_SHAREGPT,
}
MAX_IMPORT_BYTES = 3 * 1024 * 1024
MAX_PAGE_SIZE = 1000  # QAGenService.ListPairs refuses larger pages

router = APIRouter(tags=["qa"])


@router.get("/api/v1/sessions/{session_id}/qa")
async def list_pairs(
    session_id: str,
    c: ClientsDep,
    page_size: int = Query(100, ge=1, le=MAX_PAGE_SIZE, description="At most this many pairs."),
    page_token: Text = Query("", description="From a previous response; empty = the first page."),
):
    resp = await c.qagen.ListPairs(
        qagen_pb2.ListPairsRequest(session_id=session_id, page_size=page_size, page_token=page_token),
        timeout=c.timeout,
    )
    return {
        "pairs": [to_json(p) for p in resp.pairs],
        "next_page_token": resp.next_page_token,
        "total": resp.total,
    }


@router.post("/api/v1/sessions/{session_id}/qa", status_code=201)
async def add_pair(session_id: str, body: PairBody, c: ClientsDep):
    """Add a question-answer pair written by a person."""
    resp = await c.qagen.AddPair(
        qagen_pb2.AddPairRequest(
            session_id=session_id, question=body.question, answer=body.answer, doc_id=body.doc_id
        ),
        timeout=c.timeout,
    )
    return to_json(resp.pair)


@router.patch("/api/v1/sessions/{session_id}/qa/{pair_id}")
async def update_pair(session_id: str, pair_id: str, body: PairPatch, c: ClientsDep):
    """Change a pair's question and/or answer."""
    req = qagen_pb2.UpdatePairRequest(session_id=session_id, pair_id=pair_id)
    if body.question is not None:
        req.question = body.question
    if body.answer is not None:
        req.answer = body.answer
    resp = await c.qagen.UpdatePair(req, timeout=c.timeout)
    return to_json(resp.pair)


@router.delete("/api/v1/sessions/{session_id}/qa/{pair_id}")
async def delete_pair(session_id: str, pair_id: str, c: ClientsDep):
    resp = await c.qagen.DeletePair(
        qagen_pb2.DeletePairRequest(session_id=session_id, pair_id=pair_id), timeout=c.timeout
    )
    return {"total": resp.total}


@router.get("/api/v1/sessions/{session_id}/qa/export")
async def export_pairs(
    session_id: str,
    c: ClientsDep,
    format: Literal["openai", "alpaca", "sharegpt"] = "openai",
    include_meta: bool = False,
    include_system: bool = False,
):
    """The pairs as a JSON-lines file in the OpenAI chat, Alpaca or ShareGPT format."""
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
        async for msg in responses(call, first):
            yield msg.data

    name = f"{session_id}-{format}.jsonl"
    return StreamingResponse(
        body(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.post("/api/v1/sessions/{session_id}/qa/import")
async def import_pairs(
    session_id: str,
    c: ClientsDep,
    file: UploadFile = File(...),
    format: Literal["", "openai", "alpaca", "sharegpt"] = Form("", description="Empty: detected per line."),
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
