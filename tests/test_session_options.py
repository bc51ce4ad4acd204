"""The session choices as enums (`SessionOptions.mode`, `qa_backend`, `qa_strategies`) next to the
deprecated strings old clients still send (`answer_mode`, `qagen_backend`, `strategies`): through a
real SessionService on a gRPC port, a new client and an old one get the same session, the same QA
generation and the same answers; both forms set and disagreeing, or an enum value the server does
not know, is INVALID_ARGUMENT; the gateway writes the enums and shows the lowercase names."""

from __future__ import annotations

import asyncio
import contextlib
import re

import grpc
import pytest

from doclora.v1 import inference_pb2, session_pb2, session_service_pb2, session_service_pb2_grpc
from gateway.common import to_json
from gateway.routes.sources import session_options
from services.common import keys
from services.common.errors import InvalidArgument
from services.common.options import (
    ANSWER_MODE,
    ANSWER_MODES,
    QA_BACKEND,
    QA_BACKENDS,
    QA_STRATEGIES,
    QA_STRATEGY,
    answer_mode_name,
    merge_options,
    qa_backend_name,
    strategy_names,
)
from services.common.server import serve
from services.ingest.__main__ import setup as ingest_setup
from services.stack.ports import free_port
from tests.test_inference_service import answer_source
from tests.test_qagen_backends import sectioned_doc
from tests.test_qagen_worker import (
    _pairs,
    _run,
    rt,  # noqa: F401  (the qagen worker's runtime fixture)
)
from tests.test_qagen_worker import _session as _qagen_session

Opts = session_pb2.SessionOptions
S = session_pb2.SessionState
NEW = Opts(
    mode=inference_pb2.ANSWER_MODE_ADAPTER,
    qa_backend=session_pb2.QA_BACKEND_EXTRACTIVE,
    qa_strategies=[session_pb2.QA_STRATEGY_QUIZ, session_pb2.QA_STRATEGY_PARAPHRASE],
)
OLD = Opts(answer_mode="adapter", qagen_backend="extractive", strategies=["quiz", "paraphrase"])
TEXT = "The Lumen Orchard was founded in 1987 by the botanist Ilse Marrow on the river bank."


@contextlib.asynccontextmanager
async def session_service(rt):  # noqa: F811
    """SessionService as `python -m services.ingest` registers it, on a real port."""
    addr = f"127.0.0.1:{free_port()}"
    stop = asyncio.Event()
    register, _ = await ingest_setup(rt)
    task = asyncio.create_task(serve(name="t", addr=addr, register=register, grace_s=1, stop_event=stop))
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            await asyncio.wait_for(ch.channel_ready(), 10)
            yield session_service_pb2_grpc.SessionServiceStub(ch)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def create(stub, options: session_pb2.SessionOptions) -> session_pb2.Session:
    req = session_service_pb2.CreateSessionRequest(
        sources=[session_service_pb2.Source(text=TEXT, name="a.txt")], options=options
    )
    return (await stub.CreateSession(req, timeout=10)).session


def copy(options: session_pb2.SessionOptions, **more) -> session_pb2.SessionOptions:
    out = Opts(**more)
    out.MergeFrom(options)
    return out


def test_the_enums_name_the_same_choices_as_the_vocabulary():
    """Each enum's values are the names of `services.common.options`, no more and no fewer."""
    assert tuple(ANSWER_MODE.names.values()) == ANSWER_MODES
    assert tuple(QA_BACKEND.names.values()) == QA_BACKENDS
    assert tuple(QA_STRATEGY.names.values()) == QA_STRATEGIES


async def test_old_and_new_clients_create_the_same_session_over_grpc(rt):  # noqa: F811
    """A client setting the enum fields and one setting only the strings are both accepted, and the
    stored sessions choose the same things; the gateway shows both by the same lowercase names."""
    async with session_service(rt) as stub:
        made = [await create(stub, opts) for opts in (NEW, OLD)]
    stored = [await rt.sessions.get(s.session_id) for s in made]
    for rec in (*made, *stored):
        assert answer_mode_name(rec.options) == "adapter"
        assert qa_backend_name(rec.options) == "extractive"
        assert strategy_names(rec.options) == ["quiz", "paraphrase"]
    shown = [to_json(rec)["options"] for rec in made]
    assert shown[0] == shown[1]
    assert {k: shown[0][k] for k in ("answer_mode", "qagen_backend", "strategies")} == {
        "answer_mode": "adapter",
        "qagen_backend": "extractive",
        "strategies": ["quiz", "paraphrase"],
    }
    assert not {"mode", "qa_backend", "qa_strategies"} & set(shown[0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (Opts(mode=inference_pb2.ANSWER_MODE_BOTH, answer_mode="retrieval"), "mode .* disagree"),
        (Opts(qa_backend=session_pb2.QA_BACKEND_LOCAL, qagen_backend="openai"), "qa_backend .* disagree"),
        (Opts(qa_strategies=[session_pb2.QA_STRATEGY_WH], strategies=["quiz"]), "qa_strategies .* disagree"),
        (Opts(mode=99), "unknown SessionOptions.mode value 99"),
        (Opts(qa_backend=42), "unknown SessionOptions.qa_backend value 42"),
        (
            Opts(qa_strategies=[session_pb2.QA_STRATEGY_QUIZ, 77]),
            "unknown SessionOptions.qa_strategies value 77",
        ),
    ],
    ids=[
        "modes-disagree",
        "backends-disagree",
        "strategies-disagree",
        "mode-99",
        "backend-42",
        "strategy-77",
    ],
)
async def test_disagreeing_forms_and_unknown_enum_values_are_invalid_arguments(rt, options, message):  # noqa: F811
    """Both forms set and naming different things, or a number this server has no name for, is
    refused before anything is stored, saying which field is wrong."""
    async with session_service(rt) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await create(stub, options)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, info.value.details())


async def test_both_forms_naming_the_same_choices_are_accepted(rt):  # noqa: F811
    """A client in transition may send both; agreeing (strategies in any order, the backend in any
    case) is fine."""
    both = copy(NEW, answer_mode="adapter", qagen_backend=" Extractive", strategies=["paraphrase", "quiz"])
    async with session_service(rt) as stub:
        rec = await create(stub, both)
    assert (answer_mode_name(rec.options), qa_backend_name(rec.options)) == ("adapter", "extractive")


async def test_qa_generation_follows_either_form_alike(rt):  # noqa: F811
    """The qagen stage reads the backend and strategies from the enum fields or the strings: the
    same pairs either way, fewer than with the default strategies."""
    made = {}
    for name, options in (("enum", NEW), ("string", OLD), ("default", Opts())):
        rec = await _qagen_session(rt, {"d1": sectioned_doc()})
        rec = await rt.sessions.update(rec.session_id, lambda r, o=options: r.options.CopyFrom(o))
        after = await _run(rt, rec)
        assert after.qa.backend == "extractive" and after.state == S.SESSION_STATE_TRAINING
        made[name] = sorted((p["strategy"], p["question"]) for p in _pairs(rt, rec.session_id))
    assert made["enum"] == made["string"] and len(made["enum"]) < len(made["default"])


@pytest.mark.parametrize(
    ("options", "adapter_used", "passages_read"),
    [
        (Opts(mode=inference_pb2.ANSWER_MODE_ADAPTER), "default/s1", False),  # the tenant's adapter
        (Opts(answer_mode="adapter"), "default/s1", False),
        (Opts(mode=inference_pb2.ANSWER_MODE_RETRIEVAL), None, True),
        (Opts(answer_mode="retrieval"), None, True),
    ],
    ids=["adapter-enum", "adapter-string", "retrieval-enum", "retrieval-string"],
)
async def test_a_bot_answers_in_the_mode_of_either_form(options, adapter_used, passages_read):
    """The inference service takes a bot's answer mode from the enum or the old string alike."""
    assert await answer_source(options) == (adapter_used, passages_read)


def test_a_retrain_override_in_one_form_replaces_the_other_form():
    """Merging a retrain's options never leaves an old string contradicting a newer enum."""
    rec = copy(OLD)
    merge_options(rec, Opts(mode=inference_pb2.ANSWER_MODE_BOTH))
    assert (rec.answer_mode, answer_mode_name(rec)) == ("", "both")
    merge_options(rec, Opts(qagen_backend="openai"))
    assert (rec.qa_backend, qa_backend_name(rec), strategy_names(rec)) == (
        0,
        "openai",
        ["quiz", "paraphrase"],
    )


def test_the_gateway_sends_enums_and_refuses_names_without_one():
    """The JSON API's lowercase names go out as the enum fields only; an unknown strategy is
    INVALID_ARGUMENT with the message the services give."""
    opts = session_options("", None, "retrieval", qagen_backend="local", strategies=["wh", "quiz"])
    assert (opts.answer_mode, opts.qagen_backend, list(opts.strategies)) == ("", "", [])
    assert (
        opts.mode == inference_pb2.ANSWER_MODE_RETRIEVAL and opts.qa_backend == session_pb2.QA_BACKEND_LOCAL
    )
    assert strategy_names(opts) == ["wh", "quiz"]
    with pytest.raises(InvalidArgument, match="unknown QA strategies: quizz"):
        session_options("", None, strategies=["quizz"])
    rec = session_pb2.Session(session_id=keys.new_id(), options=opts)
    assert to_json(rec)["options"]["answer_mode"] == "retrieval"
    assert "options" not in to_json(session_pb2.Session(session_id="no-options"))
