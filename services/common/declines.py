"""Answers that decline: the bot says the documents do not tell, or that it does not know. That is
the right answer to a question the documents do not cover; the bot's exam (trainer) and the
knowledge harness (bench/knowledge) both count declines with `declines`.
"""

from __future__ import annotations

# What a bot is taught to say when the passages do not hold the answer.
DECLINE_ANSWER = "The documents do not say."

# An answer that contains one of these declines to answer (matched on the normalised text).
DECLINE_PHRASES = (
    "not mentioned",
    "not mention",
    "no mention",
    "does not say",
    "doesn't say",
    "do not say",
    "does not state",
    "doesn't state",
    "not stated",
    "not specified",
    "does not specify",
    "doesn't specify",
    "not provided",
    "does not provide",
    "doesn't provide",
    "no information",
    "not enough information",
    "does not contain",
    "doesn't contain",
    "not included",
    "not covered",
    "not in the document",
    "not in the passage",
    "not found in",
    "cannot find",
    "can't find",
    "could not find",
    "couldn't find",
    "cannot answer",
    "can't answer",
    "unable to answer",
    "unable to find",
    "unable to determine",
    "cannot be determined",
    "do not know",
    "don't know",
    "i'm not sure",
    "i am not sure",
    "not available",
    "no data",
    "there is no information",
)


def normalized(text: str) -> str:
    """Lower case, whitespace collapsed, curly apostrophes straightened."""
    return " ".join(text.lower().replace("\u2019", "'").split())


def declines(text: str) -> bool:
    """The answer contains a decline phrase (after `normalized`)."""
    t = normalized(text)
    return any(p in t for p in DECLINE_PHRASES)
