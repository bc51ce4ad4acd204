"""`python -m gateway`: the HTTP gateway on DOCLORA_GATEWAY_HOST:DOCLORA_GATEWAY_PORT, served by
uvicorn with uvloop and httptools when they are installed (`uvicorn[standard]`), asyncio and h11
otherwise. Beyond loopback it refuses to start until an API key exists (`gateway.auth`)."""

import asyncio
import sys

import uvicorn

from services.common.config import Settings
from services.common.logging import setup_logging


def server_config(settings: Settings, app) -> uvicorn.Config:
    # "auto" picks uvloop and httptools when importable
    return uvicorn.Config(
        app, host=settings.gateway_host, port=settings.gateway_port, loop="auto", http="auto", log_config=None
    )


def main() -> None:
    settings = Settings.from_env()
    setup_logging("gateway", level=settings.log_level, json_lines=settings.log_json)
    from gateway.app import create_app
    from gateway.auth import refusal_to_start

    if why := asyncio.run(refusal_to_start(settings)):
        print(f"doclora gateway: {why}", file=sys.stderr)
        sys.exit(2)
    uvicorn.Server(server_config(settings, create_app(settings))).run()


if __name__ == "__main__":
    main()
