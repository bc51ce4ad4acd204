"""Prometheus metrics of every doclora process: what is measured, in one place, and how it is served.

Each service process serves the default registry at `http://{settings.metrics_addr}/metrics`
(`serve`, started by entry.py); the gateway answers `GET /metrics` on its own HTTP port. The server
is prometheus-client's WSGI server on a daemon thread, so a scrape never waits on the asyncio loop
and the loop never waits on a scrape, except for the work queues: `QueueCollector` reads them from
NATS at scrape time, running that read on the service's loop and waiting (on the server's thread)
at most `QUEUE_READ_TIMEOUT_S` for it.

What is measured (every name starts with `doclora_`):

- work queues, per stage and lane (`normal`, `urgent`): messages not yet done (waiting or being
  worked on) and the age of the oldest. Every service with a bus reports every stage: a stage
  whose workers are all down still shows its queue growing. Dashboards take `max by (stage, lane)`.
- stage runs (`observe_stage`, called by the stage loop): duration by stage and outcome.
- gRPC calls (the error interceptor, server.py): calls by service, method and status code, and
  their duration.
- training: tokens trained on (a counter: its rate is tokens/s over any window) and the running
  job's tokens/s since it started (0 when idle).
- chat: time to the first piece of the answer, generation speed after it, completion tokens and
  answers by finish reason.
- the adapter cache: requests that found their adapter loaded (hit) or had to attach it (miss),
  and evictions.
- the gateway: HTTP requests by method, route template and status, and their latency (to the
  response's headers: the wait a client sees, also for streams).

Labels stay bounded: names of stages, lanes, outcomes, gRPC methods and codes, route templates;
never a session, tenant, key or adapter id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.js.errors
from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.bus import DEAD_STAGE, URGENT_LANE, WORK_STREAM, _work_subject

log = logging.getLogger(__name__)
# no `*_created` series beside each counter and histogram: Prometheus does without them
disable_created_metrics()

# ---------------------------------------------------------------------------------------- stages

STAGE_OUTCOMES = ("ok", "failed", "retried", "skipped")
STAGE_SECONDS = Histogram(
    "doclora_stage_duration_seconds",
    "Time one work item spent in a stage's handler, by stage and outcome (ok: done and handed on; "
    "failed: the session failed for a reason a person can act on; retried: raised, to be "
    "redelivered or dead-lettered; skipped: nothing to do, e.g. a stale round)",
    ["stage", "outcome"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)


def observe_stage(stage: str, seconds: float, outcome: str) -> None:
    """Record one work item of `stage` ("ingest", "qagen", "train") that took `seconds` and ended
    with `outcome`, one of `STAGE_OUTCOMES`; any other outcome is a ValueError (labels stay bounded)."""
    if outcome not in STAGE_OUTCOMES:
        raise ValueError(f"stage outcome must be one of {', '.join(STAGE_OUTCOMES)}, got {outcome!r}")
    STAGE_SECONDS.labels(stage=stage, outcome=outcome).observe(seconds)


# ------------------------------------------------------------------------------------------ gRPC

GRPC_HANDLED = Counter(
    "doclora_grpc_server_handled_total",
    "gRPC calls finished by this server, by service, method and status code (OK included)",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_SECONDS = Histogram(
    "doclora_grpc_server_handling_seconds",
    "Time from a gRPC call's start to its end (the whole stream, for streaming calls)",
    ["grpc_service", "grpc_method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def observe_grpc(full_method: str, code: str, seconds: float) -> None:
    """Record one finished call of `full_method` ("/doclora.v1.QAGenService/ListPairs") with status
    `code` (a grpc.StatusCode name, "NOT_FOUND")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    GRPC_HANDLED.labels(grpc_service=service, grpc_method=method, grpc_code=code).inc()
    GRPC_SECONDS.labels(grpc_service=service, grpc_method=method).observe(seconds)


# -------------------------------------------------------------------------------------- training

TRAIN_TOKENS = Counter(
    "doclora_train_tokens_total", "Tokens of training examples trained on (its rate: training tokens/s)"
)
TRAIN_TOKENS_PER_S = Gauge(
    "doclora_train_tokens_per_second", "Tokens/s of the running training job since it started; 0 when idle"
)

# ------------------------------------------------------------------------------------------ chat

CHAT_FIRST_TOKEN_SECONDS = Histogram(
    "doclora_chat_time_to_first_token_seconds",
    "Time from a chat call's start to the first piece of its answer (queueing, retrieval, prefill)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)
CHAT_TOKENS_PER_S = Histogram(
    "doclora_chat_tokens_per_second",
    "Generation speed of one answer after its first piece: further completion tokens per second",
    buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500),
)
CHAT_TOKENS = Counter(
    "doclora_chat_completion_tokens_total", "Completion tokens of finished chat answers (its rate: tokens/s)"
)
CHAT_ANSWERS = Counter(
    "doclora_chat_answers_total", "Chat answers that finished, by finish reason", ["finish_reason"]
)


def observe_chat(first: float | None, ended: float, tokens: int, finish_reason: str) -> None:
    """Record one finished chat answer of `tokens` completion tokens: `first` (when its first piece
    came; None if none did) and `ended` are `time.perf_counter()` readings."""
    CHAT_TOKENS.inc(tokens)
    CHAT_ANSWERS.labels(finish_reason=finish_reason).inc()
    if first is not None and tokens > 1 and ended > first:
        CHAT_TOKENS_PER_S.observe((tokens - 1) / (ended - first))


# --------------------------------------------------------------------------------- adapter cache

ADAPTER_CACHE = Counter(
    "doclora_adapter_cache_requests_total",
    "Requests for an adapter: found loaded (hit) or attached for it (miss)",
    ["result"],
)
ADAPTER_EVICTIONS = Counter("doclora_adapter_cache_evictions_total", "Adapters evicted to make room")

# ------------------------------------------------------------------------------------------- HTTP

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
HTTP_REQUESTS = Counter(
    "doclora_http_requests_total",
    "Gateway HTTP requests, by method, route template and status",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "doclora_http_request_duration_seconds",
    "Gateway HTTP latency: from the request to the response's headers",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def observe_http(method: str, route: str | None, status: int, seconds: float) -> None:
    """Record one gateway request; `route` is its template ("/api/v1/sessions/{session_id}"), None
    for a path no route matched. Odd methods count as "other"."""
    method = method if method in HTTP_METHODS else "other"
    route = route or UNMATCHED_ROUTE
    HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
    HTTP_SECONDS.labels(method=method, route=route).observe(seconds)


# ------------------------------------------------------------------------------------ work queues

QUEUE_READ_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class QueueState:
    depth: int  # messages not yet done: waiting, or being worked on
    oldest_age_s: float  # of the oldest of them; 0 when there are none


async def read_queues(bus, now: datetime | None = None) -> dict[tuple[str, str], QueueState]:
    """Every (stage, lane) of the work stream, from the stream's per-subject counts (WorkQueue
    retention drops a message when it is acked, so what is left is not done) and, where there is
    one, the timestamp of its first message."""
    from services.common.sessions import STAGE_STATE, stage_name  # (it imports server.py, which imports this)

    now = now or datetime.now(UTC)
    info = await bus.js.stream_info(WORK_STREAM, subjects_filter="work.>")
    counts = info.state.subjects or {}
    out: dict[tuple[str, str], QueueState] = {}
    lanes = {stage_name(s): ("", URGENT_LANE) for s in STAGE_STATE} | {DEAD_STAGE: ("",)}
    for stage, stage_lanes in lanes.items():
        for lane in stage_lanes:
            subject = _work_subject(stage, lane)
            depth = int(counts.get(subject, 0))
            age = 0.0
            if depth:
                with contextlib.suppress(nats.js.errors.NotFoundError):  # acked meanwhile
                    first = await bus.js.get_msg(WORK_STREAM, seq=1, subject=subject, next=True)
                    if first.time is not None:
                        age = max(0.0, (now - first.time).total_seconds())
            out[(stage, lane or "normal")] = QueueState(depth, age)
    return out


class QueueCollector(Collector):
    """`doclora_queue_depth` and `doclora_queue_oldest_age_seconds` per stage and lane, read from
    NATS when scraped: the read runs on `loop` (where `bus` lives) and the scraping thread waits for
    it. A read that fails or is late gives no samples (and a warning), never stale ones."""

    def __init__(self, bus, loop: asyncio.AbstractEventLoop, timeout_s: float = QUEUE_READ_TIMEOUT_S):
        self.bus, self.loop, self.timeout_s = bus, loop, timeout_s

    def describe(self) -> list:
        # names only: the registry must not call `collect` (a NATS read) when this is registered
        return list(self._families({}))

    def collect(self) -> Iterator:
        return iter(self._families(self._read()))

    def _read(self) -> dict[tuple[str, str], QueueState]:
        if self.loop.is_closed():
            return {}
        try:
            if asyncio.get_running_loop() is self.loop:
                log.warning("queue metrics cannot be read from their own event loop's thread")
                return {}
        except RuntimeError:  # no loop in this thread: the usual case (the server's thread)
            pass
        future = asyncio.run_coroutine_threadsafe(read_queues(self.bus), self.loop)
        try:
            return future.result(self.timeout_s)
        except Exception as err:  # NATS away, or a busy loop: no samples this time
            future.cancel()
            log.warning("cannot read the work queues for metrics: %s: %s", type(err).__name__, err)
            return {}

    @staticmethod
    def _families(states: dict[tuple[str, str], QueueState]) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "doclora_queue_depth",
            "Work messages not yet done (waiting or being worked on), by stage and lane",
            labels=["stage", "lane"],
        )
        age = GaugeMetricFamily(
            "doclora_queue_oldest_age_seconds",
            "Age of the oldest work message not yet done, by stage and lane (0 when none)",
            labels=["stage", "lane"],
        )
        for (stage, lane), state in states.items():
            depth.add_metric([stage, lane], state.depth)
            age.add_metric([stage, lane], state.oldest_age_s)
        return depth, age


# ---------------------------------------------------------------------------------------- serving


def split_addr(addr: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6 host]:port"; ValueError naming `addr` otherwise."""
    host, sep, port = addr.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics address must be host:port (e.g. 0.0.0.0:9464), got {addr!r}")
    return host, int(port)


class MetricsServer:
    """The /metrics HTTP server of one process (and its queue collector, if any); `close` stops both."""

    def __init__(self, addr: str, bus=None, loop: asyncio.AbstractEventLoop | None = None):
        host, port = split_addr(addr)
        self._queues: QueueCollector | None = None
        if bus is not None:
            self._queues = QueueCollector(bus, loop or asyncio.get_running_loop())
            REGISTRY.register(self._queues)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host)
        except BaseException:
            self._unregister()
            raise
        self.port = self._httpd.server_address[1]
        self.addr = f"{host}:{self.port}"
        log.info("metrics on http://%s/metrics", self.addr)

    def _unregister(self) -> None:
        if self._queues is not None:
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(self._queues)
            self._queues = None

    async def close(self) -> None:
        """Stop serving; the server's thread stops within half a second, off the event loop."""
        self._unregister()
        await asyncio.to_thread(self._httpd.shutdown)
        self._httpd.server_close()


def serve(addr: str, *, bus=None) -> MetricsServer:
    """Serve this process's metrics at http://`addr`/metrics ("host:port"; port 0 picks a free one,
    see `.port`); with `bus`, the work queues too, read on the calling event loop."""
    return MetricsServer(addr, bus=bus)
