"""InferenceService.Chat as the chat routes use it (the bot chat and the OpenAI-compatible one):
building the ChatRequest from a `ChatBody`, opening the stream so that what fails before the answer
begins (a full queue too) becomes an HTTP status, reading a whole answer, and naming its finish
reason."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from doclora.v1 import inference_pb2
from gateway.clients import Clients
from gateway.common import responses, to_json
from gateway.schemas import ChatBody
from services.common.options import ANSWER_MODE


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
        mode=ANSWER_MODE.numbers([body.mode])[0] if body.mode else inference_pb2.ANSWER_MODE_UNSPECIFIED,
    )


async def open_chat(c: Clients, req: inference_pb2.ChatRequest) -> AsyncIterator[inference_pb2.ChatResponse]:
    """Start a chat stream and read it up to its first text (or its end), so that what fails before
    the answer begins becomes an HTTP status: an unknown bot, a prompt too long, and a full queue
    (429), which the engine only sees after the passages it cites (the first messages of a bot
    answering from them). Returns every message of the stream, those read here first."""
    call = c.inference.Chat(req)
    read = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        read.append(msg)
        if msg.delta or msg.finish_reason:
            break
    return responses(call, *read)


async def collect(
    messages: AsyncIterator[inference_pb2.ChatResponse],
) -> tuple[str, inference_pb2.ChatResponse | None, list[dict]]:
    """A whole answer: its text, the closing message (finish reason, usage) and the citations."""
    text, last, cites = [], None, []
    async for msg in messages:
        text.append(msg.delta)
        cites += [to_json(ci) for ci in msg.citations]
        if msg.finish_reason:
            last = msg
    return "".join(text), last, cites


def finish_name(msg: inference_pb2.ChatResponse | None) -> str:
    if msg is None:
        return "stop"
    return inference_pb2.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower()
