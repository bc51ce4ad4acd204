"""`python -m gateway`: the HTTP gateway on DOCLORA_GATEWAY_HOST:DOCLORA_GATEWAY_PORT, served by
uvicorn with uvloop and httptools when they are installed (`uvicorn[standard]`), asyncio and h11
otherwise."""

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

    uvicorn.Server(server_config(settings, create_app(settings))).run()


if __name__ == "__main__":
    main()
