"""The request bodies of the gateway's JSON routes, as pydantic models. Their names and fields are the
schemas of the OpenAPI document (`components.schemas`), so renaming one changes the public API.

Every field is held here to what its gRPC message can carry, so that bad input is a 400 naming the
field and never reaches protobuf (which raises, a 500): integers within their proto type (`INT32_MAX`,
`INT64_MAX`; the routes' `Query(...)` bounds use the same constants), and text as `Text`, which
refuses what cannot be encoded as UTF-8 (a lone surrogate, which JSON can spell as `"\\ud800"`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from services.common.options import ANSWER_MODES, QA_BACKENDS

# the lowercase names of the JSON API ("" = the server's default); sessions carry them as enum values
AnswerModeName = Literal["", *ANSWER_MODES]
QaBackendName = Literal["", *QA_BACKENDS]
# the largest values of the proto integer types the JSON fields go into
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def utf8_text(value: Any) -> Any:
    """`value` if it is not a str or is one that UTF-8 can encode; a ValueError naming the first
    character it cannot (a lone surrogate) otherwise. Runs before pydantic's own str checks, whose
    message for such text ("unable to parse raw data") says nothing of why."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start]
            raise ValueError(
                f"text must be valid UTF-8: the lone surrogate U+{ord(bad):04X} at position {exc.start} "
                "cannot be encoded"
            ) from None
    return value


# Text a person types (pasted text, names, prompts, chat messages, pairs): any str UTF-8 can encode
Text = Annotated[str, BeforeValidator(utf8_text)]


class SessionCreate(BaseModel):
    text: Text | None = Field(None, description="Pasted text to learn from.")
    urls: list[Text] = Field(
        default_factory=list, max_length=100, description="Links to PDF, DOCX, HTML or text."
    )
    upload_ids: list[Text] = Field(
        default_factory=list, max_length=100, description="Ids from POST /api/v1/uploads."
    )
    name: Text = Field("", description="Name of the bot; defaults to the source name.")
    system_prompt: Text = Field("", description="System prompt used in training and chat.")
    max_steps: int | None = Field(
        None, ge=1, le=100_000, description="Training steps; default from data size."
    )
    answer_mode: AnswerModeName = Field(
        "",
        description="Where chat answers come from by default (see the chat `mode`); empty = the "
        "server's default (DOCLORA_ANSWER_MODE).",
    )
    qagen_backend: QaBackendName = Field("", description="QA generator; empty = the server's default.")
    strategies: list[Text] = Field(
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
    text: Text | None = None
    url: Text | None = None
    upload_id: Text | None = None
    name: Text = ""
    password: Text = ""


class PairBody(BaseModel):
    question: Text = Field(max_length=2000)
    answer: Text = Field(max_length=20_000)
    doc_id: Text = ""


class PairPatch(BaseModel):
    question: Text | None = Field(None, max_length=2000)
    answer: Text | None = Field(None, max_length=20_000)


class ChatMessage(BaseModel):
    role: Text = "user"
    content: Text


class ChatBody(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = True
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[Text] | Text | None = None
    seed: int | None = Field(None, ge=0, le=INT64_MAX, description="Sampling seed, in [0, 2**63).")
    mode: Literal["both", "adapter", "retrieval"] | None = Field(
        None,
        description="Answer from the adapter reading retrieved passages (both), the adapter alone, "
        "or the base model reading passages (retrieval); default: the bot's setting.",
    )


class ContentPart(BaseModel):
    """A part of an OpenAI message's content; only `text` parts are answered (others are refused)."""

    type: Text
    text: Text | None = None


class OpenAIMessage(BaseModel):
    role: Text = "user"
    content: Text | list[ContentPart] | None = Field(
        None, description="Text, or a list of content parts whose `text` parts are joined."
    )


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="End the stream with a chunk carrying the usage.")


class ResponseFormat(BaseModel):
    type: Text = Field("text", description="Only `text` is answered.")


class OpenAIChatBody(ChatBody):
    """OpenAI's chat completion request; fields doclora does not know are ignored, as OpenAI does."""

    model: Text = Field(description="The bot id, or 'base' for the base model alone.")
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
    tenant: Text = Field("", max_length=64, description="The key's tenant; the caller's when empty.")
    role: Literal["member", "admin"] = Field(
        "member", description="member: its tenant's bots; admin: also keys."
    )
    name: Text = Field("", max_length=200, description="A label for people.")
    limits: KeyLimitsBody = Field(default_factory=KeyLimitsBody)


class ShareCreate(BaseModel):
    show_citations: bool = Field(
        False, description="Answers through the link carry document names and passages."
    )
    name: Text = Field("", max_length=200, description="A label for the owner.")


class CloneBody(BaseModel):
    share_token: Text = Field(
        ..., max_length=200, description="The share token (dls_...) of the bot to copy."
    )
    pairs_only: bool = Field(False, description="Copy the pairs only and train a new adapter from them.")
    name: Text = Field("", max_length=200, description="Name of the new bot; the shared bot's when empty.")
