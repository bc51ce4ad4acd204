"""The request bodies of the gateway's JSON routes, as pydantic models. Their names and fields are the
schemas of the OpenAPI document (`components.schemas`), so renaming one changes the public API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from services.common.options import ANSWER_MODES, QA_BACKENDS

# the lowercase names of the JSON API ("" = the server's default); sessions carry them as enum values
AnswerModeName = Literal["", *ANSWER_MODES]
QaBackendName = Literal["", *QA_BACKENDS]


class SessionCreate(BaseModel):
    text: str | None = Field(None, description="Pasted text to learn from.")
    urls: list[str] = Field(
        default_factory=list, max_length=100, description="Links to PDF, DOCX, HTML or text."
    )
    upload_ids: list[str] = Field(
        default_factory=list, max_length=100, description="Ids from POST /api/v1/uploads."
    )
    name: str = Field("", description="Name of the bot; defaults to the source name.")
    system_prompt: str = Field("", description="System prompt used in training and chat.")
    max_steps: int | None = Field(
        None, ge=1, le=100_000, description="Training steps; default from data size."
    )
    answer_mode: AnswerModeName = Field(
        "",
        description="Where chat answers come from by default (see the chat `mode`); empty = the "
        "server's default (DOCLORA_ANSWER_MODE).",
    )
    qagen_backend: QaBackendName = Field("", description="QA generator; empty = the server's default.")
    strategies: list[str] = Field(
        default_factory=list, max_length=32, description="QA strategies; empty = all."
    )
    review: bool = Field(False, description="Wait in AWAITING_REVIEW after generation until approved.")
    allow_partial: bool = Field(False, description="Train even when some chunks failed generation.")
    priority: int = Field(0, ge=-100, le=100, description="Training queue priority; higher goes first.")


class RetrainBody(BaseModel):
    from_scratch: bool = Field(False, description="Start from the base model, not the bot's adapter.")
    max_steps: int | None = Field(None, ge=1, le=100_000)
    priority: int | None = Field(None, ge=-100, le=100)


class SourceBody(BaseModel):
    text: str | None = None
    url: str | None = None
    upload_id: str | None = None
    name: str = ""
    password: str = ""


class PairBody(BaseModel):
    question: str = Field(max_length=2000)
    answer: str = Field(max_length=20_000)
    doc_id: str = ""


class PairPatch(BaseModel):
    question: str | None = Field(None, max_length=2000)
    answer: str | None = Field(None, max_length=20_000)


class ChatMessage(BaseModel):
    role: str = "user"
    content: str


class ChatBody(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = True
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] | str | None = None
    seed: int | None = None
    mode: Literal["both", "adapter", "retrieval"] | None = Field(
        None,
        description="Answer from the adapter reading retrieved passages (both), the adapter alone, "
        "or the base model reading passages (retrieval); default: the bot's setting.",
    )


class ContentPart(BaseModel):
    """A part of an OpenAI message's content; only `text` parts are answered (others are refused)."""

    type: str
    text: str | None = None


class OpenAIMessage(BaseModel):
    role: str = "user"
    content: str | list[ContentPart] | None = Field(
        None, description="Text, or a list of content parts whose `text` parts are joined."
    )


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="End the stream with a chunk carrying the usage.")


class ResponseFormat(BaseModel):
    type: str = Field("text", description="Only `text` is answered.")


class OpenAIChatBody(ChatBody):
    """OpenAI's chat completion request; fields doclora does not know are ignored, as OpenAI does."""

    model: str = Field(description="The bot id, or 'base' for the base model alone.")
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(
        None, ge=1, le=4096, description="Replaces `max_tokens` (which is still read)."
    )
    temperature: float | None = Field(0.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, description="Answers per request; only 1.")
    response_format: ResponseFormat | None = None


class KeyLimitsBody(BaseModel):
    max_sessions_in_flight: int = Field(0, ge=0, le=10_000, description="0 = the server's default.")
    max_steps: int = Field(0, ge=0, le=1_000_000, description="0 = the server's default.")
    chat_per_minute: int = Field(0, ge=0, le=1_000_000, description="0 = the server's default.")


class KeyCreate(BaseModel):
    tenant: str = Field("", max_length=64, description="The key's tenant; the caller's when empty.")
    role: Literal["member", "admin"] = Field("member", description="member: its tenant's bots; admin: also keys.")
    name: str = Field("", max_length=200, description="A label for people.")
    limits: KeyLimitsBody = Field(default_factory=KeyLimitsBody)


class ShareCreate(BaseModel):
    show_citations: bool = Field(False, description="Answers through the link carry document names and passages.")
    name: str = Field("", max_length=200, description="A label for the owner.")


class CloneBody(BaseModel):
    share_token: str = Field(..., max_length=200, description="The share token (dls_...) of the bot to copy.")
    pairs_only: bool = Field(False, description="Copy the pairs only and train a new adapter from them.")
    name: str = Field("", max_length=200, description="Name of the new bot; the shared bot's when empty.")
