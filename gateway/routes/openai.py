"""The OpenAI-compatible API under `/v1` (the `openai` tag): `GET /v1/models` lists `base` and the
bots, `POST /v1/chat/completions` answers a chat with `model` naming the bot, as one
`chat.completion` or as `chat.completion.chunk` data-only events ending in `data: [DONE]`."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from doclora.v1 import inference_pb2
from gateway.chat import chat_request, collect, open_chat
from gateway.common import ClientsDep, responses, sse
from gateway.schemas import OpenAIChatBody

router = APIRouter(tags=["openai"])


def reason_of(msg: inference_pb2.ChatResponse) -> str:
    return "length" if msg.finish_reason == inference_pb2.FINISH_REASON_LENGTH else "stop"


@router.get("/v1/models")
async def models(c: ClientsDep):
    resp = await c.inference.ListBots(inference_pb2.ListBotsRequest(), timeout=c.timeout)
    data = [{"id": "base", "object": "model", "owned_by": "doclora", "created": 0}]
    data += [
        {"id": b.bot_id, "object": "model", "owned_by": "doclora", "created": 0, "name": b.name}
        for b in resp.bots
    ]
    return {"object": "list", "data": data}


@router.post("/v1/chat/completions")
async def chat_completions(body: OpenAIChatBody, c: ClientsDep):
    """OpenAI-compatible chat; `model` is the bot id."""
    call, first = await open_chat(c, chat_request(body.model, body))
    cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())

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
        return sse(None, obj)

    async def stream():
        yield chunk({"role": "assistant", "content": ""}, None)
        async for msg in responses(call, first):
            if msg.delta:
                yield chunk({"content": msg.delta}, None)
            if msg.finish_reason:
                yield chunk({}, reason_of(msg))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")
