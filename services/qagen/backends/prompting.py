"""Prompting a language model for pairs and reading its reply: what the two model backends share.

`build_messages` writes one chat prompt per strategy (`PROMPTS`, chosen for a chunk by
`prompt_strategies`); `parse_pairs` reads the reply strictly: a JSON array of
`{"question", "answer"}` objects and nothing else, or `MalformedOutput`. `ModelGenerator` ties them
together for a backend that only has to `complete` a prompt: a malformed reply is asked again up to
`format_retries` times, then the chunk fails (`ChunkFailed`), so a broken generation is never passed
off as a complete one.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

from services.common.options import resolve_strategies
from services.common.qapair import QAPair
from services.qagen import strategies as strategy_rules
from services.qagen.backends.base import ChunkFailed, MalformedOutput
from services.qagen.chunk import Chunk
from services.qagen.rules.base import pair_for

log = logging.getLogger(__name__)

MAX_PAIRS_PER_REPLY = 20

# --- strict parsing ----------------------------------------------------------------------------

_FENCE = re.compile(r"\A```(?:json|JSON)?[ \t]*\n(?P<body>.*?)\n?```\Z", re.S)
_THINK = re.compile(r"\A\s*<think>.*?</think>", re.S)


def parse_pairs(text: str, *, max_pairs: int = MAX_PAIRS_PER_REPLY) -> list[tuple[str, str]]:
    """(question, answer) pairs from a model's reply, or `MalformedOutput`.

    Accepted: exactly one JSON array of objects, each with non-empty string `question` and `answer`
    (other keys ignored); optionally wrapped as `{"pairs": [...]}` (for JSON-object modes), in one
    Markdown code fence, or after a leading `<think>...</think>` block. Anything else — prose around
    the JSON, a cut-off reply, an item without an answer, an empty list — is malformed: a partial
    parse would keep half a reply and pass off a broken generation as a complete one.
    """
    body = _THINK.sub("", text, count=1).strip()
    if m := _FENCE.match(body):
        body = m.group("body").strip()
    if not body:
        raise MalformedOutput("empty reply")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise MalformedOutput(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if isinstance(data, dict) and set(data) == {"pairs"}:
        data = data["pairs"]
    if not isinstance(data, list):
        raise MalformedOutput(f"expected a JSON array, got {type(data).__name__}")
    if not data:
        raise MalformedOutput("an empty list")
    out = []
    for i, item in enumerate(data[:max_pairs]):
        if not isinstance(item, dict):
            raise MalformedOutput(f"item {i} is not an object")
        q, a = item.get("question"), item.get("answer")
        if not isinstance(q, str) or not isinstance(a, str):
            raise MalformedOutput(f"item {i} needs string 'question' and 'answer'")
        if not q.strip() or not a.strip():
            raise MalformedOutput(f"item {i} has an empty question or answer")
        out.append((q.strip(), a.strip()))
    return out


# --- prompts -----------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You write question-answer pairs that teach a chat assistant the content of a document. "
    "Use only facts stated in the given text, in its own words where you can; never add outside "
    'knowledge. Reply with only a JSON array of objects with the keys "question" and "answer", '
    'like [{"question": "...?", "answer": "..."}], and nothing before or after it.'
)
PROMPTS: dict[str, str] = {
    "quiz": "Write up to 5 factual quiz questions about the text, each answered by a fact the text states.",
    "definition": (
        'For each term the text defines or explains, write the question "What is <term>?" '
        "answered with the text's explanation. If it defines nothing, ask about its main subject."
    ),
    "wh": (
        "For the most important facts in the text, write who, what, when, where, why and how questions "
        "(only those the text answers), each answered in one or two sentences."
    ),
    "summary": "Write one question asking what this passage says, answered with a short summary of it.",
    "section_summary": 'Write one question asking for a summary of the section "{heading}", answered from the text.',
    "metadata": (
        "If the text states the document's title, authors or date, write one question for each, "
        "answered with exactly what the text states."
    ),
    "vague": (
        'Write 3 short, general questions a person who knows only the title "{title}" would ask, '
        "each answered from the text."
    ),
}
# Strategies a model is asked about once per document (in its first chunk), not for every chunk.
FIRST_CHUNK_ONLY = frozenset({"metadata", "vague"})


def prompt_strategies(chunk: Chunk, selected: Sequence[str], first: bool) -> list[str]:
    """The strategies to prompt for on `chunk` (paraphrases are made by rule afterwards)."""
    return [
        s
        for s in selected
        if s in PROMPTS
        and (first or s not in FIRST_CHUNK_ONLY)
        and (s != "section_summary" or (chunk.heading and chunk.part == 0))
    ]


def build_messages(chunk: Chunk, strategy: str, doc_title: str | None) -> list[dict[str, str]]:
    """The chat messages for one strategy on one chunk."""
    title = strategy_rules.clean_title(doc_title) or "this document"
    instruction = PROMPTS[strategy].format(heading=chunk.heading or "", title=title)
    where = f"Document: {title}\n" + (f"Section: {chunk.heading}\n" if chunk.heading else "")
    user = f'{instruction}\n\n{where}\nText:\n"""\n{chunk.text}\n"""'
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def pairs_from_reply(chunk: Chunk, strategy: str, reply: str) -> list[QAPair]:
    """Strictly parse a model's reply to a strategy's prompt into pairs from `chunk`."""
    return [pair_for(chunk, q, a, strategy) for q, a in parse_pairs(reply)]


class ModelGenerator:
    """What the two model backends share: a prompt per strategy, strict parsing, format retries."""

    format_retries = 2

    def complete(self, messages: list[dict[str, str]], attempt: int) -> str:
        raise NotImplementedError

    def generate(
        self, chunk: Chunk, *, doc_title: str | None = None, strategies: Sequence[str] | None = None
    ) -> list[QAPair]:
        selected = resolve_strategies(strategies)
        first = chunk.part == 0 and chunk.start < 600
        pairs: list[QAPair] = []
        for strategy in prompt_strategies(chunk, selected, first):
            messages = build_messages(chunk, strategy, doc_title)
            problem = ""
            for attempt in range(1 + self.format_retries):
                reply = self.complete(messages, attempt)
                try:
                    pairs += pairs_from_reply(chunk, strategy, reply)
                    break
                except MalformedOutput as exc:
                    problem = str(exc)
                    log.info(
                        "malformed %s reply for chunk %s (try %d): %s",
                        strategy,
                        chunk.chunk_id,
                        attempt + 1,
                        exc,
                    )
            else:
                raise ChunkFailed(
                    f"the model's {strategy} reply was malformed {1 + self.format_retries} times: {problem}"
                )
        return pairs
