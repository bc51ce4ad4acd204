"""Container health check for the doclora images (Docker HEALTHCHECK and compose).

    python healthcheck.py grpc [HOST:PORT]   # grpc.health.v1 Check(service="") answers SERVING
    python healthcheck.py http URL           # the URL answers 2xx

Exit 0 when healthy, 1 otherwise. With no address, `grpc` checks the port of DOCLORA_LISTEN_ADDR on
loopback. Kubernetes does not need this: it has native `grpc:` and `httpGet:` probes.
"""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_S = 3.0


def local_grpc_addr(listen_addr: str) -> str:
    """'0.0.0.0:50051' or '[::]:50051' -> '127.0.0.1:50051' (the port the service listens on)."""
    port = listen_addr.rsplit(":", 1)[-1] if listen_addr else "50051"
    return f"127.0.0.1:{port}"


def grpc_ok(addr: str, timeout: float = TIMEOUT_S) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(addr) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
    except grpc.RpcError:
        return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str, timeout: float = TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "grpc":
        addr = argv[1] if len(argv) > 1 else local_grpc_addr(os.environ.get("DOCLORA_LISTEN_ADDR", ""))
        return 0 if grpc_ok(addr) else 1
    if len(argv) == 2 and argv[0] == "http":
        return 0 if http_ok(argv[1]) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
