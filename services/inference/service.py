"""InferenceService: streaming chat with a bot (base model + that bot's LoRA adapter), or with the
base model alone. The base model loads once per process; adapters come from the store on demand."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from doclora.v1 import inference_pb2, inference_pb2_grpc, session_pb2
from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.options import ANSWER_MODES
from services.common.passages import Hit, read_session_passages, with_passages
from services.common.runtime import Runtime
from services.common.sessions import state_name
from services.inference.retrieve import Embedder, Index, IndexCache, build_index, default_embedder

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


MODES = {
    inference_pb2.ANSWER_MODE_BOTH: "both",
    inference_pb2.ANSWER_MODE_ADAPTER: "adapter",
    inference_pb2.ANSWER_MODE_RETRIEVAL: "retrieval",
}
MODE_BY_NAME = {name: name for name in ANSWER_MODES}


def citation(index: int, hit: Hit) -> inference_pb2.Citation:
    p = hit.passage
    text = p.text if len(p.text) <= 500 else p.text[:500].rsplit(" ", 1)[0] + " …"
    return inference_pb2.Citation(
        index=index,
        doc_id=p.doc_id,
        doc_name=p.doc_name,
        page=p.page,
        start=p.start,
        end=p.end,
        text=text,
        score=hit.score,
    )


def can_chat(rec: session_pb2.Session) -> bool:
    """READY, or retraining (any state but CANCELLED) with the adapter of an earlier round still set:
    a bot keeps chatting with its last adapter until the next one is READY."""
    return rec.state == S.SESSION_STATE_READY or (
        bool(rec.adapter_id) and rec.state != S.SESSION_STATE_CANCELLED
    )


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, rt: Runtime, engine, embedder: Embedder | None | str = "auto"):
        if rt.settings.answer_mode not in ANSWER_MODES:
            raise ValueError(
                f"DOCLORA_ANSWER_MODE must be one of {', '.join(ANSWER_MODES)}, got {rt.settings.answer_mode!r}"
            )
        self.rt = rt
        self.engine = engine
        # passages ranked by BM25 and, when the embedding model is installed, by meaning too
        if embedder == "auto":
            # DOCLORA_RETRIEVAL_EMBEDDINGS=0 turns the embeddings off (BM25 alone)
            use = rt.settings.retrieval_embeddings
            embedder = default_embedder() if use else None
        self.embedder = embedder
        self.indexes = IndexCache()

    async def _bot(self, bot_id: str) -> session_pb2.Session | None:
        """The bot's session record (None for the base model alone); it must be able to chat."""
        if bot_id in ("", BASE_BOT):
            return None
        rec = await self.rt.sessions.get(bot_id)
        if not can_chat(rec):
            raise FailedPrecondition(f"bot {bot_id} is not ready to chat yet; it is {state_name(rec.state)}")
        return rec

    def _chunks_version(self, rec: session_pb2.Session) -> str:
        """Blocking: the ETag of the bot's chunks.jsonl ("" when it has none), so an index built from
        an older copy (the session was given more documents since) is not used."""
        try:
            return self.rt.store.stat(keys.chunks(rec.tenant, rec.session_id)).etag
        except NotFound:
            return ""

    def _load_index(self, rec: session_pb2.Session) -> Index:
        """Blocking: the bot's passages from the store, indexed."""
        return build_index(read_session_passages(self.rt.store, rec), self.embedder)

    async def _retrieve(self, rec: session_pb2.Session, question: str) -> list[Hit]:
        # the chunks as stored now: while a session retrains on more documents, qagen rewrites them
        key = (rec.session_id, await self.rt.io(self._chunks_version, rec))
        index = self.indexes.get(key)
        if index is None:
            index = await self.rt.io(self._load_index, rec)
            self.indexes.put(key, index)
        return await self.rt.io(index.search, question, k=self.rt.settings.retrieval_top_k)

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
        rec = await self._bot(request.bot_id)
        mode = MODES.get(request.mode) or (
            (MODE_BY_NAME.get(rec.options.answer_mode) or self.rt.settings.answer_mode) if rec else "adapter"
        )
        adapter_id = rec.adapter_id if rec is not None and mode != "retrieval" else None
        if rec is not None and rec.options.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": rec.options.system_prompt})
        hits: list[Hit] = []
        if rec is not None and mode in ("both", "retrieval"):
            hits = await self._retrieve(rec, messages[-1]["content"])
            messages[-1] = {"role": "user", "content": with_passages(messages[-1]["content"], hits)}
            if hits:
                yield inference_pb2.ChatResponse(citations=[citation(i, h) for i, h in enumerate(hits, 1)])
        stats = ChatStats()
        async with contextlib.aclosing(
            self.engine.astream_chat(messages, adapter_id, params, stats=stats)
        ) as pieces:
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
            if can_chat(s)
        ]
        return inference_pb2.ListBotsResponse(bots=bots)
