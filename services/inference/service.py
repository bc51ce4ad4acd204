"""InferenceService: streaming chat with a bot (base model + that bot's LoRA adapter), or with the
base model alone. The base model loads once per process; adapters come from the store on demand."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from doclora.v1 import inference_pb2, inference_pb2_grpc, session_pb2
from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.runtime import Runtime
from services.common.sessions import state_name

log = logging.getLogger(__name__)
S = session_pb2.SessionState
BASE_BOT = "base"
FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
}


def adapter_fetcher(rt: Runtime, cache_dir: Path):
    """A `fetch(adapter_id) -> folder` for the adapter cache: download the PEFT folder once."""

    def fetch(adapter_id: str) -> Path:
        if not keys.is_valid_id(adapter_id):
            raise NotFound(f"adapter {adapter_id!r} not found")
        folder = cache_dir / adapter_id
        if not (folder / "adapter_config.json").exists():
            tmp = cache_dir / f".{adapter_id}.partial"
            rt.store.download_dir(keys.adapter_prefix(rt.settings.tenant, adapter_id), tmp)
            if not (tmp / "adapter_config.json").exists():
                raise NotFound(f"adapter {adapter_id!r} not found")
            tmp.replace(folder)
        return folder

    return fetch


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, rt: Runtime, engine):
        self.rt = rt
        self.engine = engine

    async def _bot(self, bot_id: str) -> tuple[str | None, str]:
        """The bot's adapter id (None for the base model) and the system prompt it was trained with."""
        if bot_id in ("", BASE_BOT):
            return None, ""
        rec = await self.rt.sessions.get(bot_id)
        if rec.state != S.SESSION_STATE_READY:
            raise FailedPrecondition(f"bot {bot_id} is not ready to chat yet; it is {state_name(rec.state)}")
        return rec.adapter_id, rec.options.system_prompt

    async def Chat(self, request, context):
        from services.inference.engine import ChatStats, GenerationParams, check_messages

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
        adapter_id, system_prompt = await self._bot(request.bot_id)
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        stats = ChatStats()
        async with contextlib.aclosing(self.engine.astream_chat(messages, adapter_id, params, stats=stats)) as pieces:
            async for piece in pieces:
                yield inference_pb2.ChatResponse(delta=piece)
        yield inference_pb2.ChatResponse(
            finish_reason=FINISH.get(stats.finish_reason or "stop", inference_pb2.FINISH_REASON_STOP),
            completion_tokens=stats.completion_tokens,
            prompt_tokens=stats.prompt_tokens,
        )

    async def ListBots(self, request, context):
        bots = [
            inference_pb2.Bot(bot_id=s.session_id, name=s.name, adapter_id=s.adapter_id)
            for s in await self.rt.sessions.list()
            if s.state == S.SESSION_STATE_READY
        ]
        return inference_pb2.ListBotsResponse(bots=bots)
