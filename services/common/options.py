"""The names a session's options may use (`SessionOptions` in session.proto carries them as strings),
and the check that refuses options no stage could follow before anything is stored. The front door
(ingest) checks; the stages that act on a name (qagen: backend, strategies; inference: answer mode)
take their vocabulary from here, so a name is valid in one place.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.common.errors import InvalidArgument

ANSWER_MODES = ("both", "adapter", "retrieval")
QA_BACKENDS = ("extractive", "local", "openai")
# qagen's rules by the scope they read: one chunk, a whole document, or the other pairs
QA_CHUNK_STRATEGIES = ("quiz", "definition", "wh")
QA_DOCUMENT_STRATEGIES = ("summary", "section_summary", "metadata", "vague")
QA_STRATEGIES = (*QA_CHUNK_STRATEGIES, *QA_DOCUMENT_STRATEGIES, "paraphrase")
# what a session that names no strategies gets: all but the whole-document `summary` and `vague`,
# whose answers (a few central sentences of the whole document) were mostly wrong when labelled
# by hand (10% and 25% ok); a session may still ask for them by name
QA_OPT_IN_STRATEGIES = ("summary", "vague")
QA_DEFAULT_STRATEGIES = tuple(s for s in QA_STRATEGIES if s not in QA_OPT_IN_STRATEGIES)


def resolve_strategies(strategies: Iterable[str] | None) -> tuple[str, ...]:
    """The named strategies in canonical order (`QA_DEFAULT_STRATEGIES` for None); unknown names are
    an error."""
    if strategies is None:
        return QA_DEFAULT_STRATEGIES
    names = set(strategies)
    unknown = sorted(names - set(QA_STRATEGIES))
    if unknown:
        raise ValueError(f"unknown QA strategies: {', '.join(unknown)} (known: {', '.join(QA_STRATEGIES)})")
    return tuple(s for s in QA_STRATEGIES if s in names)


def check_qa_options(backend: str, strategies: Iterable[str]) -> None:
    """INVALID_ARGUMENT for a session that names an unknown backend or strategy."""
    if backend and backend.strip().lower() not in QA_BACKENDS:
        raise InvalidArgument(f"unknown QA backend {backend!r}; use one of {', '.join(QA_BACKENDS)}")
    try:
        resolve_strategies(list(strategies) or None)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def check_session_options(options) -> None:
    """INVALID_ARGUMENT for options (a `SessionOptions`) no stage could follow."""
    check_qa_options(options.qagen_backend, list(options.strategies))
    if options.HasField("max_steps") and not 0 < options.max_steps <= 1_000_000:
        raise InvalidArgument("max_steps must be between 1 and 1000000")
    if options.HasField("lora_rank") and not 1 <= options.lora_rank <= 1024:
        raise InvalidArgument("lora_rank must be between 1 and 1024")
    if options.HasField("lora_dropout") and not 0 <= options.lora_dropout < 1:
        raise InvalidArgument("lora_dropout must be at least 0 and less than 1")
    if options.HasField("learning_rate") and not 0 < options.learning_rate < 1:
        raise InvalidArgument("learning_rate must be between 0 and 1")
    if options.HasField("epochs") and not 0 < options.epochs <= 1000:
        raise InvalidArgument("epochs must be between 1 and 1000")
    if options.answer_mode not in ("", *ANSWER_MODES):
        raise InvalidArgument(f"answer_mode must be one of {', '.join(ANSWER_MODES)}")
