"""One gRPC bootstrap for every service: grpc.aio server, the error interceptor, health, reflection,
background workers, and graceful shutdown (SIGTERM -> NOT_SERVING -> stop workers -> stop(grace)).
The error interceptor also counts every call by its final status code (services/common/metrics.py)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import metrics
from services.common.errors import DocloraError, TooManyRequests

log = logging.getLogger(__name__)

# gRPC messages stay small: large data goes through the object store or a client stream in chunks.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # a port in use is an error, not shared (gRPC sets SO_REUSEPORT on Linux by default): a second
    # stack's service must fail to bind rather than take half of another's calls
    ("grpc.so_reuseport", 0),
]


def status_code(err: DocloraError) -> grpc.StatusCode:
    """The gRPC status for a domain error (its `code` names a StatusCode member)."""
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)


def wrap_handler(handler, unary, stream):
    """`handler` with its behaviour wrapped: `unary(inner)` wraps a call that returns one response
    (unary or client-streaming), `stream(inner)` one that yields responses (server or
    bidirectional streaming); each returns the new `async def call(request, context)`."""
    kw = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kw)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **kw)


def _final_code(context) -> str:
    """The name of the status a finished call ends with (OK when nothing set another)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc.aio keeps the raw number
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "OK"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to their status codes, and anything unexpected to INTERNAL with a log line;
    records every call's status code and duration (`metrics.observe_grpc`)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        async def fail(context, exc: BaseException):
            if isinstance(exc, TooManyRequests):
                context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
            if isinstance(exc, DocloraError):
                await context.abort(status_code(exc), exc.message)
            log.exception("unexpected error in %s", method, exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

        def observe(context, started: float, cancelled: bool) -> None:
            code = "CANCELLED" if cancelled else _final_code(context)
            metrics.observe_grpc(method, code, time.perf_counter() - started)

        def wrap_unary(inner):
            async def call(request, context):
                started, cancelled = time.perf_counter(), False
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except asyncio.CancelledError:  # the client went away or the server is stopping
                    cancelled = True
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
                    await fail(context, exc)
                finally:
                    observe(context, started, cancelled)

            return call

        def wrap_stream(inner):
            async def call(request, context):
                started, cancelled = time.perf_counter(), False
                try:
                    async for item in inner(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    cancelled = True
                    raise
                except Exception as exc:  # noqa: BLE001
                    await fail(context, exc)
                finally:
                    observe(context, started, cancelled)

            return call

        return wrap_handler(handler, wrap_unary, wrap_stream)


Background = Callable[[asyncio.Event], Awaitable[None]]


async def serve(
    *,
    name: str,
    addr: str,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    background: Iterable[Background] = (),
    grace_s: float = 5.0,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    stop_event: asyncio.Event | None = None,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> None:
    """Run a service until SIGTERM/SIGINT (or `stop_event`), then shut down gracefully.

    `register` adds the servicers and returns their full service names (for health and reflection);
    each `background` coroutine gets the stop event and must return soon after it is set;
    `interceptors` run inside the error interceptor (so their domain errors become statuses).
    """
    server = grpc.aio.server(interceptors=[ErrorInterceptor(), *interceptors], options=GRPC_OPTIONS)
    names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(addr)
    if port == 0:
        raise RuntimeError(f"{name}: cannot listen on {addr}")
    await server.start()

    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass

    tasks = [asyncio.create_task(job(stop), name=f"{name}-bg-{i}") for i, job in enumerate(background)]
    for svc in ["", *names]:
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving on %s", name, addr)

    stop_wait = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        if t is not stop_wait and t.exception() is not None:
            log.error("%s: background task died", name, exc_info=t.exception())
    stop.set()

    log.info("%s shutting down", name)
    for svc in ["", *names]:
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    await server.stop(grace_s)
    if on_stop is not None:
        await on_stop()
    log.info("%s stopped", name)
