"""The OpenAI-compatible API under `/v1` (the `openai` tag): `GET /v1/models` lists `base` and the
bots, `POST /v1/chat/completions` answers a chat with `model` naming the bot, as one
`chat.completion` or as `chat.completion.chunk` data-only events ending in `data: [DONE]`.

It takes what current SDKs send: `content` as a list of parts (text parts joined, others refused),
the `developer` role (as `system`), `max_completion_tokens`, `stream_options.include_usage` (a last
chunk with the usage and no choices), `n` 1 and `response_format` text; other fields are ignored, as
OpenAI does. Errors have OpenAI's shape (see `gateway.app`); an unknown model is a 404
`model_not_found`, and a stream that fails after it began sends an error chunk, then `[DONE]`."""

from __future__ import annotations

import time
import uuid

import grpc
from fastapi import APIRouter, Request

from doclora.v1 import inference_pb2
from gateway.chat import chat_request, collect, open_chat
from gateway.common import ClientsDep, OpenAIError, event_stream, sse, sse_error
from gateway.schemas import ChatBody, ChatMessage, OpenAIChatBody, OpenAIMessage

router = APIRouter(tags=["openai"])
ROLES = {"developer": "system"}


def reason_of(msg: inference_pb2.ChatResponse) -> str:
    return "length" if msg.finish_reason == inference_pb2.FINISH_REASON_LENGTH else "stop"


def usage_of(msg: inference_pb2.ChatResponse | None) -> dict:
    prompt, completion = (msg.prompt_tokens, msg.completion_tokens) if msg else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def unsupported(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", code="unsupported_value", param=param)


def text_of(i: int, msg: OpenAIMessage) -> str:
    """A message's content as one text: its text parts joined; other parts are refused."""
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or ""
    for j, part in enumerate(msg.content):
        if part.type != "text":
            raise unsupported(
                f"messages[{i}].content[{j}].type",
                f"content parts of type {part.type!r} are not supported; only 'text' parts are",
            )
    return "\n".join(part.text or "" for part in msg.content)


def chat_body(body: OpenAIChatBody) -> ChatBody:
    """The doclora chat of an OpenAI request, or an OpenAIError for what doclora does not answer."""
    if (body.n or 1) != 1:
        raise unsupported("n", f"one choice per request is answered, not {body.n}")
    if body.response_format and body.response_format.type != "text":
        raise unsupported(
            "response_format.type", f"{body.response_format.type!r} is not supported; only 'text' is"
        )
    return ChatBody(
        messages=[
            ChatMessage(role=ROLES.get(m.role, m.role), content=text_of(i, m))
            for i, m in enumerate(body.messages)
        ],
        stream=bool(body.stream),
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=0.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop,
        seed=body.seed,
        mode=body.mode,
    )


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
async def chat_completions(body: OpenAIChatBody, request: Request, c: ClientsDep):
    """OpenAI-compatible chat; `model` is the bot id."""
    chat = chat_body(body)
    try:
        messages = await open_chat(c, chat_request(body.model, chat))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        raise OpenAIError(
            404,
            f"The model {body.model!r} does not exist: {exc.details()}",
            code="model_not_found",
            param="model",
        ) from exc
    cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
    head = {"id": cid, "created": created, "model": body.model}

    if not chat.stream:
        text, last, cites = await collect(messages)
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason_of(last) if last else "stop",
                }
            ],
            "usage": usage_of(last),
            "citations": cites,
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # with include_usage, every chunk carries `usage`: null but the last, as OpenAI's do
    tail = {"usage": None} if include_usage else {}

    def chunk(delta: dict, reason: str | None):
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        return sse(None, {**head, "object": "chat.completion.chunk", "choices": [choice], **tail})

    async def stream():
        last = None
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            async for msg in messages:
                if msg.delta:
                    yield chunk({"content": msg.delta}, None)
                if msg.finish_reason:
                    last = msg
                    yield chunk({}, reason_of(msg))
            if include_usage:
                yield sse(
                    None, {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(last)}
                )
        except Exception as exc:  # noqa: BLE001 - told to the client as OpenAI does (and logged)
            yield sse_error(exc, openai=True)
        yield sse(None, "[DONE]")

    return event_stream(request, stream())
