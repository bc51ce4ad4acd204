"""Export and import of QA pairs as JSON lines: OpenAI chat messages, Alpaca and ShareGPT."""

from __future__ import annotations

import json

import pytest

from services.common.errors import InvalidArgument
from services.common.pair_formats import FORMATS, FormatError, detect_format, export_jsonl, import_jsonl
from services.common.qapair import QAPair
from services.qagen.extractive import make_pairs

DOC = """# Tarn Island

Tarn Island has 312 permanent residents, most of whom work in fishing or in the small ferry
service. The lighthouse was first lit in 1847 by the Tarn Harbour Board. In 1902, the keeper
Anna Roth installed a new Fresnel lens that doubled the range of the beam.
"""


@pytest.fixture(scope="module")
def pairs() -> list[QAPair]:
    got, _, _ = make_pairs(DOC, "d1", strategies=["quiz", "definition", "summary", "paraphrase"])
    assert len(got) >= 5
    return got


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips_question_and_answer(pairs, fmt):
    """Export then import gives the same questions and answers, in order, one pair per line."""
    text = export_jsonl(pairs, fmt)
    assert text.endswith("\n") and len(text.splitlines()) == len(pairs)
    back = import_jsonl(text, fmt, doc_id="d1")
    assert [(p.question, p.answer) for p in back] == [(p.question, p.answer) for p in pairs]
    assert {p.strategy for p in back} == {"imported"} and all(p.doc_id == "d1" for p in back)
    assert import_jsonl(text, doc_id="d1") == back  # the format is detected per line


@pytest.mark.parametrize("fmt", FORMATS)
def test_with_metadata_a_round_trip_restores_the_pairs_exactly(pairs, fmt):
    """include_meta carries ids, source chunk, strategy and score: the imported pairs equal the originals."""
    back = import_jsonl(export_jsonl(pairs, fmt, include_meta=True))
    assert back == pairs


def test_the_openai_format_is_chat_messages_with_an_optional_system_prompt(pairs):
    """Each line is {"messages": [system?, user, assistant]}, the OpenAI fine-tuning shape."""
    line = json.loads(
        export_jsonl(pairs[:1], "openai", system="You answer questions about Tarn Island.").splitlines()[0]
    )
    assert line == {
        "messages": [
            {"role": "system", "content": "You answer questions about Tarn Island."},
            {"role": "user", "content": pairs[0].question},
            {"role": "assistant", "content": pairs[0].answer},
        ]
    }


def test_the_alpaca_and_sharegpt_shapes():
    """Alpaca has instruction/input/output; ShareGPT has conversations of from/value turns."""
    p = QAPair("id", "How tall is the tower?", "The tower is 42 metres tall.", "d", "c", 0, 1, "number")
    assert json.loads(export_jsonl([p], "alpaca")) == {
        "instruction": "How tall is the tower?",
        "input": "",
        "output": "The tower is 42 metres tall.",
    }
    assert json.loads(export_jsonl([p], "sharegpt", system="Be brief.")) == {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "How tall is the tower?"},
            {"from": "gpt", "value": "The tower is 42 metres tall."},
        ]
    }
    with pytest.raises(InvalidArgument, match="unknown QA format"):
        export_jsonl([p], "csv")


def test_an_edited_export_imports_as_a_new_pair_from_the_same_source(pairs):
    """Changing an answer in an exported file keeps the chunk and strategy but gives a new id."""
    record = json.loads(export_jsonl(pairs[:1], "openai", include_meta=True))
    record["messages"][1]["content"] = "The island has 312 permanent residents, most of them in fishing."
    (edited,) = import_jsonl(json.dumps(record))
    assert (edited.chunk_id, edited.strategy) == (pairs[0].chunk_id, pairs[0].strategy)
    assert edited.pair_id != pairs[0].pair_id and edited.answer.startswith("The island has 312")


def test_multi_turn_conversations_give_one_pair_per_answered_user_turn():
    """A conversation of two exchanges imports as two pairs; alpaca input joins the instruction."""
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who installed the lens?"},
            {"role": "assistant", "content": "Anna Roth."},
            {"role": "user", "content": "When?"},
            {"role": "assistant", "content": "In 1902."},
        ]
    }
    alpaca = {
        "instruction": "Answer from the log.",
        "input": "When was the lighthouse lit?",
        "output": "In 1847.",
    }
    got = import_jsonl(json.dumps(chat) + "\n\n" + json.dumps(alpaca) + "\n")
    assert [(p.question, p.answer) for p in got] == [
        ("Who installed the lens?", "Anna Roth."),
        ("When?", "In 1902."),
        ("Answer from the log.\n\nWhen was the lighthouse lit?", "In 1847."),
    ]
    assert detect_format(chat) == "openai" and detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"question": "Q?"}) is None


def test_malformed_lines_are_reported_with_their_line_numbers():
    """Every bad line is named by number in one error, and nothing is imported from the file."""
    good = json.dumps({"instruction": "What is it?", "input": "", "output": "A lighthouse."})
    lines = [
        good,
        "{not json",
        "[1, 2]",
        json.dumps({"prompt": "What?", "completion": "That."}),
        json.dumps({"messages": [{"role": "user", "content": "Unanswered?"}]}),
        "",
        json.dumps({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": 7}]}),
        json.dumps({"instruction": "What?", "input": None, "output": "That."}),
        good,
    ]
    with pytest.raises(FormatError) as info:
        import_jsonl("\n".join(lines))
    assert [n for n, _ in info.value.errors] == [2, 3, 4, 5, 7, 8]
    message = str(info.value)
    assert "line 2: not valid JSON" in message and "line 3: expected a JSON object" in message
    assert "line 5: openai: no 'user' turn followed by an 'assistant' answer" in message
    assert info.value.code == "INVALID_ARGUMENT"


def test_a_line_in_another_format_than_the_one_asked_for_is_an_error():
    """With fmt given, a line of another format is reported rather than guessed."""
    line = json.dumps({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]})
    with pytest.raises(FormatError, match="line 1: openai"):
        import_jsonl(line, "openai")
    assert import_jsonl("\ufeff" + line, "sharegpt")[0].answer == "A."
