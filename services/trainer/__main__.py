"""`python -m services.trainer`: TrainerService and the train worker."""

from services.common.entry import run_service


async def setup(rt):
    import asyncio
    import logging

    from doclora.v1 import session_pb2, trainer_pb2, trainer_pb2_grpc
    from services.common.model import resolve_base_model
    from services.common.stage import StageWorker
    from services.trainer.launch import process_count
    from services.trainer.service import TrainerServicer
    from services.trainer.worker import resume_exam, train_session

    # A bad DOCLORA_TRAIN_PROCESSES stops the service here rather than failing every session.
    processes = await asyncio.to_thread(process_count, rt.settings)
    if processes > 1:
        logging.getLogger("services.trainer").info("training jobs run as %d processes (torchrun)", processes)
    # Convert/locate the base model before taking work, so the first job does not pay for it.
    await asyncio.to_thread(resolve_base_model, rt.settings)

    def register(server):
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(rt), server)
        return [trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name]

    worker = StageWorker(
        rt,
        session_pb2.STAGE_TRAIN,
        lambda item, rec: train_session(rt, item, rec),
        after_ready=lambda item, rec: resume_exam(rt, item, rec),
    )
    return register, [worker.run]


if __name__ == "__main__":
    run_service("trainer", lambda s: s.trainer_addr, setup)
