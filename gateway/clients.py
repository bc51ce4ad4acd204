"""gRPC clients of the gateway: one channel per service and the deadline of every unary call
(`timeout`). The lifespan of `gateway.app` opens them on `app.state.clients`; routes take them
through `gateway.common.ClientsDep`."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from doclora.v1 import (
    access_pb2_grpc,
    inference_pb2_grpc,
    ingest_pb2_grpc,
    qagen_pb2_grpc,
    session_service_pb2_grpc,
    trainer_pb2_grpc,
)
from services.common.config import Settings
from services.common.server import GRPC_OPTIONS


@dataclass
class Clients:
    sessions: session_service_pb2_grpc.SessionServiceStub
    ingest: ingest_pb2_grpc.IngestServiceStub
    qagen: qagen_pb2_grpc.QAGenServiceStub
    trainer: trainer_pb2_grpc.TrainerServiceStub
    inference: inference_pb2_grpc.InferenceServiceStub
    access: access_pb2_grpc.AccessServiceStub
    channels: list
    timeout: float

    @classmethod
    def connect(cls, settings: Settings) -> Clients:
        from gateway.auth import forward_credentials  # every call carries the caller's credentials

        def chan(addr: str) -> grpc.aio.Channel:
            return grpc.aio.insecure_channel(addr, options=GRPC_OPTIONS, interceptors=forward_credentials())

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
            access=access_pb2_grpc.AccessServiceStub(ingest),
            channels=[ingest, qagen, trainer, inference],
            timeout=settings.rpc_timeout_s,
        )

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
