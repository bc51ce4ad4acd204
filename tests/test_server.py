"""The shared gRPC bootstrap on a real grpc.aio server on port 0: domain errors become their status
codes (unary and streaming), anything else is INTERNAL, health and reflection answer, and a stop
request shuts the server down with health NOT_SERVING first."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from doclora.v1 import ingest_pb2, ingest_pb2_grpc, qagen_pb2, qagen_pb2_grpc
from services.common import errors
from services.common.server import serve
from services.stack.ports import free_port


class Ingest(ingest_pb2_grpc.IngestServiceServicer):
    async def ListDocuments(self, request, context):
        if request.session_id == "missing":
            raise errors.NotFound("session 'missing' not found")
        if request.session_id == "bad":
            raise errors.InvalidArgument("bad input")
        if request.session_id == "big":
            raise errors.ResourceExhausted("too large")
        if request.session_id == "state":
            raise errors.FailedPrecondition("not ready")
        raise RuntimeError("a bug with a secret detail")


class QAGen(qagen_pb2_grpc.QAGenServiceServicer):
    async def ListPairs(self, request, context):
        return qagen_pb2.ListPairsResponse(total=7)


@contextlib.asynccontextmanager
async def running(background=()):
    addr = f"127.0.0.1:{free_port()}"
    stop = asyncio.Event()

    def register(server):
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(Ingest(), server)
        qagen_pb2_grpc.add_QAGenServiceServicer_to_server(QAGen(), server)
        return ["doclora.v1.IngestService", "doclora.v1.QAGenService"]

    task = asyncio.create_task(serve(name="t", addr=addr, register=register, background=background,
                                     grace_s=1, stop_event=stop))
    async with grpc.aio.insecure_channel(addr) as ch:
        await asyncio.wait_for(ch.channel_ready(), 10)
        yield ch, stop, task
    stop.set()
    await asyncio.wait_for(task, 10)


@pytest.mark.parametrize(
    ("sid", "code"),
    [
        ("missing", grpc.StatusCode.NOT_FOUND),
        ("bad", grpc.StatusCode.INVALID_ARGUMENT),
        ("big", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("state", grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_domain_errors_map_to_their_status_codes(sid, code):
    """Each domain error reaches the client as its own status code with its message."""
    async with running() as (ch, _, _):
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListDocuments(ingest_pb2.ListDocumentsRequest(session_id=sid), timeout=5)
        assert info.value.code() == code
        assert info.value.details()


async def test_unexpected_errors_are_internal_without_their_details():
    """A bug is INTERNAL and its message (which may hold secrets) stays in the server log."""
    async with running() as (ch, _, _):
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListDocuments(ingest_pb2.ListDocumentsRequest(session_id="boom"), timeout=5)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in info.value.details()


async def test_health_and_reflection_answer_for_every_service():
    """grpc.health.v1 says SERVING for the server and each registered service; reflection lists them."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with running() as (ch, _, _):
        health = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "doclora.v1.IngestService", "doclora.v1.QAGenService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = refl.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        resp = await call.read()
        await call.done_writing()
        names = {s.name for s in resp.list_services_response.service}
        assert {"doclora.v1.IngestService", "grpc.health.v1.Health"} <= names


async def test_stop_waits_for_background_work_then_closes():
    """Setting the stop event lets a background job finish before the server stops."""
    finished = asyncio.Event()

    async def job(stop: asyncio.Event):
        await stop.wait()
        await asyncio.sleep(0.2)
        finished.set()

    async with running(background=[job]) as (ch, stop, task):
        stub = qagen_pb2_grpc.QAGenServiceStub(ch)
        assert (await stub.ListPairs(qagen_pb2.ListPairsRequest(), timeout=5)).total == 7
        stop.set()
        await asyncio.wait_for(task, 10)
        assert finished.is_set()
