"""One logging setup for every process: plain or JSON lines, each carrying the session id of the job
that wrote it (set with `session_context`)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time

_session_id: contextvars.ContextVar[str] = contextvars.ContextVar("doclora_session_id", default="-")


@contextlib.contextmanager
def session_context(session_id: str):
    """Tag every log line written inside the block (and in tasks it starts) with `session_id`."""
    token = _session_id.set(session_id)
    try:
        yield
    finally:
        _session_id.reset(token)


class _SessionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session"):
            record.session = _session_id.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "session": getattr(record, "session", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(service: str, *, level: str = "INFO", json_lines: bool = False) -> None:
    """Configure the root logger once; call before heavy imports so their logs are formatted too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_SessionFilter())
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {service} [%(session)s] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("nats", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
