"""`python -m gateway`: the HTTP gateway on DOCLORA_GATEWAY_HOST:DOCLORA_GATEWAY_PORT."""

import uvicorn

from services.common.config import Settings
from services.common.logging import setup_logging


def main() -> None:
    settings = Settings.from_env()
    setup_logging("gateway", level=settings.log_level, json_lines=settings.log_json)
    from gateway.app import create_app

    uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port, log_config=None)


if __name__ == "__main__":
    main()
