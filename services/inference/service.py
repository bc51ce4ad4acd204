"""InferenceService: streaming chat with a bot (base model + that bot's LoRA adapter), or with the
base model alone. The base model loads once per process; adapters come from the store on demand
(`adapter_store.py`).

The servicer is thin: it checks the chat and the generation options, asks `bots.py` for the turn
(which adapter, which prompt, which passages) and streams what the engine yields as replies. It
records each answer's time to first token and speed (services/common/metrics.py)."""

from __future__ import annotations

import contextlib
import time

from doclora.v1 import inference_pb2, inference_pb2_grpc
from services.common import access, metrics
from services.common.errors import InvalidArgument
from services.common.runtime import Runtime
from services.inference.bots import Bots, citation
from services.inference.retrieve import Embedder

FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
}


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, rt: Runtime, engine, embedder: Embedder | None | str = "auto"):
        self.rt = rt
        self.engine = engine
        self.bots = Bots(rt, embedder)

    async def Chat(self, request, context):
        from services.inference.engine import ChatStats, GenerationParams, check_messages

        started, first = time.perf_counter(), None
        messages = check_messages([{"role": m.role, "content": m.content} for m in request.messages])
        if messages[-1]["role"] != "user":
            raise InvalidArgument("the last message must be the user's")
        opts = request.options
        params = GenerationParams(
            max_new_tokens=opts.max_new_tokens or self.rt.settings.inference_max_new_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p or 1.0,
            stop=tuple(opts.stop),
            seed=opts.seed if opts.HasField("seed") else None,
        )
        share = getattr(access.caller_or_none(), "share", None)
        cite = share is None or share.show_citations  # a share link's owner may hide the citations
        turn = await self.bots.prepare(request.bot_id, messages, request.mode, cite)
        if turn.hits and cite:
            yield inference_pb2.ChatResponse(citations=[citation(i, h) for i, h in enumerate(turn.hits, 1)])
        # the quoted evidence the reply starts with goes out with the model's first words: only a chat
        # the engine took may start answering (a full queue is still refused before any text)
        opening = turn.opening
        stats = ChatStats()
        async with contextlib.aclosing(
            self.engine.astream_chat(turn.messages, turn.adapter_id, params, stats=stats)
        ) as pieces:
            async for piece in pieces:
                if first is None:
                    first = time.perf_counter()
                    metrics.CHAT_FIRST_TOKEN_SECONDS.observe(first - started)
                yield inference_pb2.ChatResponse(delta=opening + piece)
                opening = ""
        if opening:  # the model said nothing after it
            yield inference_pb2.ChatResponse(delta=opening)
        finish = stats.finish_reason or "stop"
        metrics.observe_chat(first, time.perf_counter(), stats.completion_tokens, finish)
        yield inference_pb2.ChatResponse(
            finish_reason=FINISH.get(finish, inference_pb2.FINISH_REASON_STOP),
            completion_tokens=stats.completion_tokens,
            prompt_tokens=stats.prompt_tokens,
        )

    async def ListBots(self, request, context):
        bots = [
            inference_pb2.Bot(bot_id=s.session_id, name=s.name, adapter_id=s.adapter_id)
            for s in await self.bots.chatting()
        ]
        return inference_pb2.ListBotsResponse(bots=bots)
