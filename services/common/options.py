"""The names a session's options may use, and the check that refuses options no stage could follow
before anything is stored. The front door (ingest) checks; the stages that act on a name (qagen:
backend, strategies; inference and the trainer's exam: answer mode) take their vocabulary from here,
so a name is valid in one place.

`SessionOptions` (session.proto) carries each of the three choices twice: as an enum field (`mode`,
`qa_backend`, `qa_strategies`) and, for old clients for one release, as the deprecated string field
(`answer_mode`, `qagen_backend`, `strategies`). `answer_mode_name`, `qa_backend_name` and
`strategy_names` read a choice (the enum field when set, else the string) and `set_choices` writes
the enum fields from names: every reader and writer goes through them, so the mapping between an
enum value (`QA_BACKEND_OPENAI`) and its name ("openai") lives here alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from doclora.v1 import inference_pb2, session_pb2
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


@dataclass(frozen=True)
class Choice:
    """One session choice: its enum field, the deprecated string field it replaces, and the lowercase
    name of each enum value (the value's name without the enum's prefix)."""

    field: str
    old_field: str
    names: dict[int, str]

    @classmethod
    def of(cls, field: str, old_field: str, enum, prefix: str) -> Choice:
        names = {v.number: v.name.removeprefix(prefix).lower() for v in enum.DESCRIPTOR.values if v.number}
        return cls(field, old_field, names)

    def numbers(self, names: Iterable[str]) -> list[int]:
        """The enum values of `names` (lowercase, as the JSON API and the string fields spell them)."""
        by_name = {name: number for number, name in self.names.items()}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise InvalidArgument(f"unknown {self.field} {unknown[0]!r}; use one of {', '.join(by_name)}")
        return [by_name[n] for n in names]

    def read(self, options) -> list[str]:
        """The names the options choose: from the enum field when set, else from the string field;
        INVALID_ARGUMENT for an enum value this server does not know or the two fields disagreeing."""
        numbers, old = _as_list(getattr(options, self.field)), _as_list(getattr(options, self.old_field))
        unknown = [n for n in numbers if n not in self.names]
        if unknown:
            raise InvalidArgument(
                f"unknown SessionOptions.{self.field} value {unknown[0]} (this server knows "
                + ", ".join(f"{n} = {name}" for n, name in self.names.items())
                + ")"
            )
        names = [self.names[n] for n in numbers]
        if names and old and set(names) != {o.strip().lower() for o in old}:
            raise InvalidArgument(
                f"SessionOptions.{self.field} ({', '.join(names)}) and the deprecated "
                f"{self.old_field} ({', '.join(old)}) disagree; set only {self.field}"
            )
        return names or old


def _as_list(value) -> list:
    """A scalar field's value as a list of none (unset) or one; a repeated field's as a list."""
    if isinstance(value, int | str):
        return [value] if value else []
    return list(value)


ANSWER_MODE = Choice.of("mode", "answer_mode", inference_pb2.AnswerMode, "ANSWER_MODE_")
QA_BACKEND = Choice.of("qa_backend", "qagen_backend", session_pb2.QaBackend, "QA_BACKEND_")
QA_STRATEGY = Choice.of("qa_strategies", "strategies", session_pb2.QaStrategy, "QA_STRATEGY_")
CHOICES = (ANSWER_MODE, QA_BACKEND, QA_STRATEGY)


def merge_options(options, override) -> None:
    """`override` merged into `options` (both `SessionOptions`, proto merge rules), except that a
    choice the override sets in one form drops the other form from `options`: an old client's
    string never contradicts a newer enum (or the reverse) in the merged record."""
    for choice in CHOICES:
        for given, other in ((choice.field, choice.old_field), (choice.old_field, choice.field)):
            if _as_list(getattr(override, given)):
                options.ClearField(other)
    options.MergeFrom(override)


def answer_mode_name(options) -> str:
    """The session's answer mode ("both", "adapter", "retrieval"); "" = the server's default."""
    return "".join(ANSWER_MODE.read(options))


def qa_backend_name(options) -> str:
    """The session's QA backend ("extractive", "local", "openai"); "" = the server's default. The
    deprecated string is taken trimmed and in lower case, as the backend factory reads it."""
    return "".join(QA_BACKEND.read(options)).strip().lower()


def strategy_names(options) -> list[str]:
    """The QA strategies the session names, as given; [] = the defaults."""
    return QA_STRATEGY.read(options)


def set_choices(
    options, *, answer_mode: str = "", qa_backend: str = "", strategies: Sequence[str] = ()
) -> None:
    """Set the enum fields of `options` (a `SessionOptions`) from names; "" and [] leave a field
    unset. An unknown name is INVALID_ARGUMENT (for strategies with `resolve_strategies`' message)."""
    if answer_mode:
        options.mode = ANSWER_MODE.numbers([answer_mode])[0]
    if qa_backend:
        options.qa_backend = QA_BACKEND.numbers([qa_backend])[0]
    check_strategies(strategies)
    options.qa_strategies[:] = QA_STRATEGY.numbers(strategies)


def choice_names(options) -> dict:
    """The choices as the JSON API shows them, under the names of the deprecated string fields."""
    return {
        ANSWER_MODE.old_field: answer_mode_name(options),
        QA_BACKEND.old_field: qa_backend_name(options),
        QA_STRATEGY.old_field: strategy_names(options),
    }


def check_qa_options(backend: str, strategies: Iterable[str]) -> None:
    """INVALID_ARGUMENT for a session that names an unknown backend or strategy."""
    if backend and backend.strip().lower() not in QA_BACKENDS:
        raise InvalidArgument(f"unknown QA backend {backend!r}; use one of {', '.join(QA_BACKENDS)}")
    check_strategies(strategies)


def check_strategies(strategies: Iterable[str]) -> None:
    """INVALID_ARGUMENT, with `resolve_strategies`' message, for an unknown strategy name."""
    try:
        resolve_strategies(list(strategies) or None)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def check_session_options(options) -> None:
    """INVALID_ARGUMENT for options (a `SessionOptions`) no stage could follow."""
    check_qa_options(qa_backend_name(options), strategy_names(options))
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
    if answer_mode_name(options) not in ("", *ANSWER_MODES):
        raise InvalidArgument(f"answer_mode must be one of {', '.join(ANSWER_MODES)}")
