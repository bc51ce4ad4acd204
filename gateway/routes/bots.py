"""A trained bot (the `bots` tag): its adapter record with metrics, its adapter as a zip to download,
and chat with it, answered as one JSON object or as Server-Sent Events (`citations`, `delta`,
`done`, and `error` when it fails after it began)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from doclora.v1 import trainer_pb2
from gateway.chat import chat_request, collect, finish_name, open_chat
from gateway.common import ClientsDep, event_stream, responses, sse, sse_error, to_json
from gateway.schemas import ChatBody

router = APIRouter(tags=["bots"])


@router.get("/api/v1/adapters/{adapter_id}")
async def get_adapter(adapter_id: str, c: ClientsDep):
    resp = await c.trainer.GetAdapter(trainer_pb2.GetAdapterRequest(adapter_id=adapter_id), timeout=c.timeout)
    out = to_json(resp.adapter)
    out["metrics"] = json.loads(out.pop("metrics_json") or "{}")
    return out


@router.get("/api/v1/sessions/{session_id}/adapter.zip")
async def download_adapter(session_id: str, c: ClientsDep):
    """The bot's adapter: a zip of the PEFT folder (`PeftModel.from_pretrained` loads it) with a
    model card naming the base model and the training figures."""
    call = c.trainer.ExportAdapter(trainer_pb2.ExportAdapterRequest(session_id=session_id), timeout=c.timeout)
    first = await call.read()  # errors (unknown session, no adapter yet) become HTTP statuses here
    name = getattr(first, "filename", "") or f"{session_id}-adapter.zip"

    async def body():
        async for msg in responses(call, first):
            yield msg.chunk

    return StreamingResponse(
        body(),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.post("/api/v1/bots/{bot_id}/chat")
async def chat(bot_id: str, body: ChatBody, request: Request, c: ClientsDep):
    """Chat with a bot; `stream: true` (default) answers with Server-Sent Events `delta` and `done`
    (`citations` first when it answers from passages), or a last `error` when it fails midway."""
    messages = await open_chat(c, chat_request(bot_id, body))
    if not body.stream:
        text, last, cites = await collect(messages)
        return {"bot_id": bot_id, "content": text, "finish_reason": finish_name(last), "citations": cites}

    async def stream():
        try:
            async for msg in messages:
                if msg.citations:
                    yield sse("citations", {"citations": [to_json(ci) for ci in msg.citations]})
                if msg.delta:
                    yield sse("delta", {"delta": msg.delta})
                if msg.finish_reason:
                    yield sse(
                        "done",
                        {"finish_reason": finish_name(msg), "completion_tokens": msg.completion_tokens},
                    )
        except Exception as exc:  # noqa: BLE001 - told to the client in the stream's last event
            yield sse_error(exc)

    return event_stream(request, stream())
