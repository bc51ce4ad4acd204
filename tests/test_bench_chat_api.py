"""bench/bench_chat_api.py: its figures (percentile, level summary, targets), its prompts padded to a
token count with the real SmolLM2 tokenizer, and its streamed clients against the real gateway and
InferenceService (the bundled base model, `running_gateway`), both endpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import pytest

from bench.bench_chat_api import (
    Answer,
    ask_rest,
    ask_v1,
    p90,
    padded_prompt,
    run_level,
    summarize,
    targets,
    users_list,
)
from tests.test_model import real_tokenizer
from tests.test_openai_clients import TIMEOUT, running_gateway

POLICY = Path(__file__).resolve().parents[1] / "bench" / "knowledge" / "docs" / "policy" / "policy.md"
QUESTION = "How much is the late fee for a power tool?"


def test_p90_is_the_nearest_rank_value():
    """Ten values: the ninth smallest; fewer than ten: the largest."""
    assert p90([float(x) for x in range(10, 0, -1)]) == 9.0
    assert p90([3.0, 1.0, 2.0]) == 3.0
    assert p90([5.0]) == 5.0


def test_p90_of_no_values_is_an_error():
    with pytest.raises(ValueError, match="no values"):
        p90([])


def test_summarize_gives_means_p90s_rate_and_prompt_size():
    """Tokens/s is every answer's tokens over the level's wall time; prompts the API did not report
    are left out of the mean."""
    answers = [Answer(0.5, 2.0, 10, 700), Answer(1.5, 4.0, 30, None), Answer(1.0, 3.0, 20, 900)]
    got = summarize(answers, wall_s=5.0)
    assert got["answers"] == 3
    assert got["first_token_mean_s"] == pytest.approx(1.0) and got["first_token_p90_s"] == 1.5
    assert got["answer_mean_s"] == pytest.approx(3.0) and got["answer_p90_s"] == 4.0
    assert got["tokens_per_s"] == pytest.approx(12.0)
    assert got["prompt_tokens_mean"] == 800 and got["prompt_tokens_range"] == [700, 900]


def test_summarize_without_prompt_counts_says_none():
    got = summarize([Answer(0.5, 2.0, 10, None)], wall_s=2.0)
    assert got["prompt_tokens_mean"] is None and got["prompt_tokens_range"] is None


@pytest.mark.parametrize(
    ("answers", "wall", "message"), [([], 1.0, "no answers"), ([Answer(0.1, 1.0, 1, 1)], 0.0, "positive")]
)
def test_summarize_refuses_no_answers_and_a_wall_time_of_zero(answers, wall, message):
    with pytest.raises(ValueError, match=message):
        summarize(answers, wall)


def test_targets_are_judged_on_one_user_first_token_and_four_users_answer_time():
    """Met at or under the target, not met above it, not run when the level is missing."""
    levels = {1: {"first_token_mean_s": 1.0}, 4: {"answer_mean_s": 8.5}}
    assert [(t[1], t[3]) for t in targets(levels)] == [(1.0, True), (8.5, False)]
    assert [(t[1], t[3]) for t in targets({8: {}})] == [(None, None), (None, None)]


@pytest.mark.parametrize("bad", ["", "0", "1,-4", "one,4", "1.5"])
def test_users_flag_refuses_what_is_not_positive_integers(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        users_list(bad)


def test_users_flag_reads_comma_separated_counts():
    assert users_list("1,4,8") == [1, 4, 8]


@pytest.fixture(scope="module")
def tokenizer():
    return real_tokenizer()


@pytest.mark.parametrize("target", [128, 512, 1024])
def test_padded_prompt_has_exactly_the_target_length_with_the_chat_template(tokenizer, target):
    """The prompt ids are the chat template applied to the returned messages, `target` of them; the
    question ends the user turn after the document text, as a retrieval prompt has it."""
    messages, ids = padded_prompt(tokenizer, QUESTION, POLICY.read_text(), target)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == ids
    assert len(ids) == target
    content = messages[-1]["content"]
    assert content.startswith("Passages from the documents:") and content.endswith(f"Question: {QUESTION}")


def test_padded_prompt_refuses_a_text_too_short_and_a_target_below_the_question(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        padded_prompt(tokenizer, QUESTION, "A short text.", 512)
    with pytest.raises(ValueError, match="question alone"):
        padded_prompt(tokenizer, QUESTION, POLICY.read_text(), 8)


@pytest.fixture(scope="module")
def gateway(nats_server, seaweedfs):
    with running_gateway(nats_server, seaweedfs, ("inference",), sse_ping_s=0.2) as (url, _, _):
        yield url


@pytest.fixture
def http(gateway):
    with httpx.Client(base_url=gateway, timeout=TIMEOUT) as c:
        yield c


def test_the_v1_client_times_a_streamed_answer_and_reads_its_usage(http):
    """The base model answers 4 tokens at most; the engine's prompt count comes from the usage chunk."""
    got = ask_v1(http, "base", QUESTION, 4)
    assert 0 < got.first_token_s <= got.seconds
    assert 1 <= got.tokens <= 4
    assert got.prompt_tokens and got.prompt_tokens > 10


def test_the_rest_client_times_a_streamed_answer_without_a_prompt_count(http):
    got = ask_rest(http, "base", QUESTION, 4)
    assert 0 < got.first_token_s <= got.seconds
    assert 1 <= got.tokens <= 4
    assert got.prompt_tokens is None


@pytest.mark.parametrize("ask", [ask_v1, ask_rest])
def test_an_unknown_bot_is_an_error_naming_the_status(http, ask):
    with pytest.raises(RuntimeError, match="404"):
        ask(http, "no-such-bot", QUESTION, 4)


def test_a_level_gives_every_user_every_round(gateway):
    """2 users x 2 rounds: 4 answers, and a wall time no shorter than the slowest answer."""
    answers, wall = run_level(gateway, "base", [QUESTION, "Who may join?"], 2, 2, ask_v1, 2)
    assert len(answers) == 4
    assert wall >= max(a.seconds for a in answers)


def test_a_level_raises_the_first_error_of_a_user(gateway):
    with pytest.raises(RuntimeError, match="404"):
        run_level(gateway, "no-such-bot", [QUESTION], 2, 1, ask_v1, 2)
