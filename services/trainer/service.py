"""TrainerService over gRPC: requests mapped to the adapter store, nothing more. Training itself
is the train stage's (worker.py), started by work items, not by an RPC; the download of an adapter
as a zip is built in `export.py`."""

from __future__ import annotations

from doclora.v1 import trainer_pb2, trainer_pb2_grpc
from services.common import access, keys
from services.common.errors import NotFound
from services.common.runtime import Runtime
from services.trainer.export import export_adapter


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    async def GetAdapter(self, request, context):
        if not keys.is_valid_id(request.adapter_id):
            raise NotFound(f"adapter {request.adapter_id!r} not found")
        prefix = keys.adapter_prefix(access.acting(self.rt.settings).tenant, request.adapter_id)
        try:
            meta = await self.rt.io(self.rt.store.get_json, prefix + "doclora.json")
            metrics = await self.rt.io(self.rt.store.get_bytes, prefix + "metrics.json")
        except NotFound:
            raise NotFound(f"adapter {request.adapter_id!r} not found") from None
        return trainer_pb2.GetAdapterResponse(
            adapter=trainer_pb2.AdapterInfo(
                adapter_id=request.adapter_id,
                session_id=meta.get("session_id", ""),
                base_model=meta.get("base_model", ""),
                metrics_json=metrics.decode("utf-8"),
            )
        )

    async def ExportAdapter(self, request, context):
        async for filename, chunk in export_adapter(self.rt, request.session_id):
            yield trainer_pb2.ExportAdapterResponse(filename=filename, chunk=chunk)
