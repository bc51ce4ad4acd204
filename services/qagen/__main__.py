"""`python -m services.qagen`: QAGenService and the qagen worker."""

from services.common.entry import run_service


async def setup(rt):
    from doclora.v1 import qagen_pb2, qagen_pb2_grpc, session_pb2
    from services.common.stage import StageWorker
    from services.qagen.service import QAGenServicer
    from services.qagen.worker import generate_session

    def register(server):
        qagen_pb2_grpc.add_QAGenServiceServicer_to_server(QAGenServicer(rt), server)
        return [qagen_pb2.DESCRIPTOR.services_by_name["QAGenService"].full_name]

    worker = StageWorker(rt, session_pb2.STAGE_QAGEN, lambda item, rec: generate_session(rt, item, rec))
    return register, [worker.run]


if __name__ == "__main__":
    run_service("qagen", lambda s: s.qagen_addr, setup)
