"""Schemathesis against the gateway's own `/openapi.json`: every operation, with inputs generated from
its schema (valid and not), answers without a 5xx and within a deadline. The app runs in-process
(ASGI, its lifespan opening the gRPC channels) over the real servicers of every service (ingest with
sessions and access, qagen, trainer, inference on the bundled base model) on the session's
nats-server and SeaweedFS, served by `running_gateway`. The stage workers are not started: a session
made here stays queued, so nothing trains or generates pairs (minutes on CPU) and every request
answers at once; chat answers are held to the 16 new tokens `running_gateway` sets."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests import test_openai_clients
from tests.test_openai_clients import running_gateway

# seconds one request may take before it counts as a hang (a chat on a busy 2-core CPU included)
REQUEST_TIMEOUT_S = 20
EXAMPLES = 8
STATEFUL_EXAMPLES = 25


def _register_only(module: str):
    """A `SERVICERS` setup that registers `services.<module>`'s servicers as `doclora up` does, without
    its stage worker and background loops."""

    async def setup(rt):
        import importlib

        register, _ = await importlib.import_module(f"services.{module}.__main__").setup(rt)
        return register

    return setup


PARTS = {
    "ingest": ("ingest_addr", _register_only("ingest")),
    "qagen": ("qagen_addr", _register_only("qagen")),
    "trainer": ("trainer_addr", _register_only("trainer")),
}


@pytest.fixture(scope="module")
def gateway_app(nats_server, seaweedfs):
    from gateway.app import create_app

    with pytest.MonkeyPatch.context() as patch:
        for name, part in PARTS.items():
            patch.setitem(test_openai_clients.SERVICERS, name, part)
        # the in-process app is what schemathesis calls; its Host is the test client's "testserver"
        with running_gateway(nats_server, seaweedfs, (*PARTS, "inference"), allowed_hosts="testserver") as (
            _,
            rt,
            _,
        ):
            yield create_app(rt.settings)


@pytest.fixture(scope="module")
def api_schema(gateway_app):
    return schemathesis.openapi.from_asgi("/openapi.json", gateway_app)


# A progress stream of a session that exists runs until the session ends, which here (no workers) is
# never: it is an endless stream by design, not a hang. test_gateway_sse.py covers it.
ENDLESS = {("GET", "/api/v1/sessions/{session_id}/events")}
# Chat generates as many tokens as asked (up to 4096, seconds each on a busy CPU): the test asks for few.
MAX_TOKENS = 4


def _few_tokens(case) -> None:
    if isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > MAX_TOKENS:
                case.body[key] = MAX_TOKENS


def _call(case):
    """The answer to `case`; an AssertionError that names the request if it takes longer than
    REQUEST_TIMEOUT_S or the app raises (in-process, an error the server would answer with a 500)."""
    _few_tokens(case)
    try:
        return case.call(timeout=REQUEST_TIMEOUT_S)
    except requests.Timeout:
        raise AssertionError(f"no answer in {REQUEST_TIMEOUT_S} s: {case.as_curl_command()}") from None
    except Exception as exc:
        raise AssertionError(f"500 ({exc!r}): {case.as_curl_command()}") from exc


def test_no_operation_answers_a_server_error_or_hangs(api_schema):
    """Every operation, with inputs that fit its schema and inputs that do not, answers below 500
    within REQUEST_TIMEOUT_S. (Schemathesis' pytest `from_fixture` does not run on pytest 9, so the
    operations are walked here with each one's Hypothesis strategy.)"""
    failures: list[str] = []
    answered: dict[str, set[int]] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 30
    for op in operations:
        if (op.method.upper(), op.path) in ENDLESS:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                resp = _call(case)
                answered.setdefault(case.operation.label, set()).add(resp.status_code)
                assert resp.status_code < 500, (
                    f"{case.as_curl_command()} -> {resp.status_code} {resp.text[:300]}"
                )

            try:
                check()
            except Unsatisfiable:  # no input can break a schema without parameters or a body
                continue
            except AssertionError as exc:
                failures.append(f"{op.method.upper()} {op.path} ({mode}): {exc}")
    assert not failures, "\n".join(failures)
    # the wiring is real: many operations got through the guard to the services and succeeded
    succeeded = [name for name, codes in answered.items() if any(200 <= c < 300 for c in codes)]
    assert len(succeeded) >= 6, answered


def test_sequences_along_inferred_links_answer_no_server_error(api_schema):
    """Stateful: calls chained along the links schemathesis infers from the schema (a session's id
    from its creation into the routes under it, a key's or share's id into its revocation) answer
    below 500 within REQUEST_TIMEOUT_S; an endless progress stream is not followed."""
    from schemathesis.core.transport import Response

    class Sequences(api_schema.as_state_machine()):
        def call(self, case, **kwargs) -> Response:
            if (case.operation.method.upper(), case.operation.path) in ENDLESS:
                case.path_parameters = {"session_id": "no-such-session"}  # a 404 at once
            return _call(case)

        def validate_response(self, response, case, **kwargs) -> None:
            assert response.status_code < 500, (
                f"{case.as_curl_command()} -> {response.status_code} {response.text[:300]}"
            )

    Sequences.run(
        settings=settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=6,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
    )
