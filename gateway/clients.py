"""gRPC clients of the gateway: one channel per service, a deadline on every unary call, and the
mapping of gRPC status codes to HTTP statuses."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from doclora.v1 import (
    inference_pb2_grpc,
    ingest_pb2_grpc,
    qagen_pb2_grpc,
    session_service_pb2_grpc,
    trainer_pb2_grpc,
)
from services.common.config import Settings
from services.common.server import GRPC_OPTIONS

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


@dataclass
class Clients:
    sessions: session_service_pb2_grpc.SessionServiceStub
    ingest: ingest_pb2_grpc.IngestServiceStub
    qagen: qagen_pb2_grpc.QAGenServiceStub
    trainer: trainer_pb2_grpc.TrainerServiceStub
    inference: inference_pb2_grpc.InferenceServiceStub
    channels: list
    timeout: float

    @classmethod
    def connect(cls, settings: Settings) -> Clients:
        def chan(addr: str) -> grpc.aio.Channel:
            return grpc.aio.insecure_channel(addr, options=GRPC_OPTIONS)

        ingest = chan(settings.ingest_addr)
        qagen = chan(settings.qagen_addr)
        trainer = chan(settings.trainer_addr)
        inference = chan(settings.inference_addr)
        return cls(
            sessions=session_service_pb2_grpc.SessionServiceStub(ingest),
            ingest=ingest_pb2_grpc.IngestServiceStub(ingest),
            qagen=qagen_pb2_grpc.QAGenServiceStub(qagen),
            trainer=trainer_pb2_grpc.TrainerServiceStub(trainer),
            inference=inference_pb2_grpc.InferenceServiceStub(inference),
            channels=[ingest, qagen, trainer, inference],
            timeout=settings.rpc_timeout_s,
        )

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
