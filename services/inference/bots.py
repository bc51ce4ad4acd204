"""Answering as a bot: which sessions may chat, where an answer comes from (the bot's adapter, its
retrieved passages, or both), the prompt that goes to the engine and the citations that go back.

Invariants: a bot chats while its session is READY, or while it retrains with the adapter of an
earlier round still set (never once CANCELLED); the passage index of a bot is keyed by the version
(ETag) of its stored chunks, so a chat never retrieves from an index built before the session was
given more documents. Knows nothing of gRPC beyond the record and citation messages."""

from __future__ import annotations

from dataclasses import dataclass

from doclora.v1 import inference_pb2, session_pb2
from services.common import access, evidence, keys
from services.common.errors import FailedPrecondition, NotFound
from services.common.options import ANSWER_MODE, ANSWER_MODES, answer_mode_name
from services.common.passages import Hit, read_session_passages, with_passages
from services.common.runtime import Runtime
from services.common.sessions import state_name
from services.inference.adapter_store import adapter_ref
from services.inference.retrieve import Embedder, Index, IndexCache, build_index, default_embedder

S = session_pb2.SessionState
BASE_BOT = "base"
MODES = ANSWER_MODE.names  # AnswerMode value -> "both", "adapter", "retrieval"


def citation(index: int, hit: Hit) -> inference_pb2.Citation:
    """A retrieved passage as cited to the client: its text cut to about 500 chars at a word."""
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


@dataclass
class Turn:
    """What the engine is asked for one answer: the chat as the model sees it, the adapter (None:
    the base model) and the passages retrieved for the question (cited before the answer)."""

    messages: list[dict[str, str]]
    adapter_id: str | None
    hits: list[Hit]
    # the start of the reply, already the last (assistant) message: the quoted evidence (evidence.py)
    opening: str = ""


class Bots:
    """The bots of one inference process: their records, answer modes and passage indexes."""

    def __init__(self, rt: Runtime, embedder: Embedder | None | str = "auto"):
        if rt.settings.answer_mode not in ANSWER_MODES:
            raise ValueError(
                f"DOCLORA_ANSWER_MODE must be one of {', '.join(ANSWER_MODES)}, got {rt.settings.answer_mode!r}"
            )
        self.rt = rt
        # passages ranked by BM25 and, when the embedding model is installed, by meaning too
        if embedder == "auto":
            # DOCLORA_RETRIEVAL_EMBEDDINGS=0 turns the embeddings off (BM25 alone)
            use = rt.settings.retrieval_embeddings
            embedder = default_embedder() if use else None
        self.embedder = embedder
        self.indexes = IndexCache()

    async def find(self, bot_id: str) -> session_pb2.Session | None:
        """The bot's session record (None for the base model alone); it must be able to chat. A
        share link's caller reaches its one bot only (any other, the base model too, is NOT_FOUND)."""
        caller = access.caller_or_none()
        if caller is not None and caller.share is not None and bot_id != caller.share.session_id:
            raise NotFound(f"bot {bot_id!r} not found")
        if bot_id in ("", BASE_BOT):
            return None
        rec = await self.rt.sessions.get(bot_id)
        if not can_chat(rec):
            raise FailedPrecondition(f"bot {bot_id} is not ready to chat yet; it is {state_name(rec.state)}")
        return rec

    async def chatting(self) -> list[session_pb2.Session]:
        """The records of every session that can chat now."""
        return [s for s in await self.rt.sessions.list() if can_chat(s)]

    def mode(self, rec: session_pb2.Session | None, requested: int) -> str:
        """Where the answer comes from: the request's mode, else the session's, else the server's
        default (DOCLORA_ANSWER_MODE); the base model alone has only itself."""
        return MODES.get(requested) or (
            (answer_mode_name(rec.options) or self.rt.settings.answer_mode) if rec else "adapter"
        )

    async def prepare(
        self, bot_id: str, messages: list[dict[str, str]], requested_mode: int, cite: bool = True
    ) -> Turn:
        """The turn for a checked chat whose last message is the user's: the bot's system prompt
        first unless the chat has one, and in the modes that read passages the question with the
        passages retrieved for it and the reply's quoted evidence (cited `[n]` when `cite`)."""
        rec = await self.find(bot_id)
        mode = self.mode(rec, requested_mode)
        adapter_id = (
            adapter_ref(rec.tenant, rec.adapter_id) if rec is not None and mode != "retrieval" else None
        )
        if rec is not None and rec.options.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": rec.options.system_prompt})
        hits: list[Hit] = []
        opening = ""
        if rec is not None and mode in ("both", "retrieval"):
            question = messages[-1]["content"]
            index = await self.index(rec)
            hits = await self.rt.io(index.search, question, k=self.rt.settings.retrieval_top_k)
            messages[-1] = {"role": "user", "content": with_passages(question, hits)}
            quote = self.rt.settings.answer_quote_sentences
            # the index keeps its sentences' vectors: each is embedded once, not on every chat
            known = getattr(index, "sentence_vectors", None)
            picked = await self.rt.io(evidence.pick, question, hits, self.embedder, quote, known)
            opening = evidence.opening(picked, cite)
            if opening:
                messages.append({"role": "assistant", "content": opening})
        return Turn(messages, adapter_id, hits, opening)

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

    async def index(self, rec: session_pb2.Session) -> Index:
        """The bot's passage index, built from its chunks as stored now (cached by their version)."""
        # the chunks as stored now: while a session retrains on more documents, qagen rewrites them
        key = (rec.session_id, await self.rt.io(self._chunks_version, rec))
        index = self.indexes.get(key)
        if index is None:
            index = await self.rt.io(self._load_index, rec)
            self.indexes.put(key, index)
        return index
