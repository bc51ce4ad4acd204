"""`python -m services.ingest`: SessionService + IngestService + AccessService, and the ingest worker."""

from services.common.entry import run_service


async def setup(rt):
    from doclora.v1 import (
        access_pb2,
        access_pb2_grpc,
        ingest_pb2,
        ingest_pb2_grpc,
        session_pb2,
        session_service_pb2,
        session_service_pb2_grpc,
    )
    from services.common.stage import StageWorker
    from services.ingest.access_service import AccessServicer
    from services.ingest.deletion import sweep_orphans_forever
    from services.ingest.reconcile import reconcile_forever
    from services.ingest.service import IngestServicer, SessionServicer
    from services.ingest.uploads import expire_uploads_forever
    from services.ingest.worker import ingest_session

    def register(server):
        session_service_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(rt), server)
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(IngestServicer(rt), server)
        access_pb2_grpc.add_AccessServiceServicer_to_server(AccessServicer(rt), server)
        return [
            access_pb2.DESCRIPTOR.services_by_name["AccessService"].full_name,
            session_service_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
            ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
        ]

    worker = StageWorker(rt, session_pb2.STAGE_INGEST, lambda item, rec: ingest_session(rt, item, rec))
    # uploads no session took expire; objects written for a session after it was deleted are swept;
    # sessions whose work message was lost are queued again
    return register, [
        worker.run,
        lambda stop: expire_uploads_forever(rt, stop),
        lambda stop: sweep_orphans_forever(rt, stop),
        lambda stop: reconcile_forever(rt, stop),
    ]


if __name__ == "__main__":
    run_service("ingest", lambda s: s.ingest_addr, setup)
