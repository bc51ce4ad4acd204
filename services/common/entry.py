"""Process entry point shared by every service: settings, logging, runtime, the Prometheus metrics
server (at DOCLORA_METRICS_ADDR, when set), then `server.serve`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import grpc

from services.common.config import Settings
from services.common.logging import setup_logging

log = logging.getLogger(__name__)

# setup(runtime) -> (register(server) -> service names, background jobs)
Setup = Callable[..., tuple[Callable[[grpc.aio.Server], Iterable[str]], list]]


def run_service(name: str, addr_of: Callable[[Settings], str], setup: Setup) -> None:
    settings = Settings.from_env()
    setup_logging(name, level=settings.log_level, json_lines=settings.log_json)

    async def main() -> None:
        from services.common import metrics
        from services.common.access import AccessStore, AuthInterceptor, Gate
        from services.common.runtime import Runtime  # after logging: it imports the heavy parts
        from services.common.server import serve

        rt = await Runtime.connect(settings, name)
        # before `setup`, which may take a while (a model to load): the queues are watched meanwhile
        exporter = metrics.serve(settings.metrics_addr, bus=rt.bus) if settings.metrics_addr else None

        async def stop() -> None:
            if exporter is not None:
                await exporter.close()
            await rt.close()

        register, background = await setup(rt)
        addr = settings.listen_addr or addr_of(settings)
        await serve(
            name=name,
            addr=addr,
            interceptors=[AuthInterceptor(Gate(AccessStore(rt.bus), settings, addr))],
            register=register,
            background=background,
            grace_s=settings.grpc_grace_s,
            on_stop=stop,
        )

    asyncio.run(main())
