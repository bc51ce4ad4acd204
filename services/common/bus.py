"""The bus: NATS JetStream work queues, session events and the sessions KV bucket (nats-py, asyncio).

- Work: stream `WORK` (WorkQueue retention) with subjects `work.{stage}`; one durable pull consumer
  per stage (`work-{stage}`) shared by every replica of that stage. `run_worker` fetches one message
  at a time, keeps it alive with `in_progress()` while the handler runs, acks on success, naks with
  a delay on failure, and after the last attempt (or a `PermanentError`) moves it to `work.dead`.
  Work published with a priority above 0 goes to `work.{stage}.urgent` instead, a lane with its own
  durable consumer (`work-{stage}-urgent`) that workers poll before the normal one: urgent work
  jumps the queue (first come, first served among urgent work).
- Events: stream `EVENTS` (limits retention, bounded age), subjects `events.{tenant}.{session}.{kind}`;
  `watch_events` replays a session's history, then follows it live.
- Sessions: KV bucket `sessions`, written only by compare-and-swap on the revision.

Transport failures (no server, timeouts) surface as `errors.Unavailable` so callers can retry.
Credentials: `Bus.connect` sends `user:password` from the URL (nats://user:password@host:port,
percent-encoded) or else DOCLORA_NATS_USER / DOCLORA_NATS_PASSWORD; a server that refuses them
raises `errors.Unauthenticated` (retrying cannot help). URLs are logged without their password.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from services.common import errors
from services.common.config import Settings
from services.common.logging import session_context

log = logging.getLogger(__name__)

WORK_STREAM = "WORK"
EVENTS_STREAM = "EVENTS"
SESSIONS_BUCKET = "sessions"
# API keys and share links (services.common.access)
ACCESS_BUCKET = "access"
KV_BUCKETS = (SESSIONS_BUCKET, ACCESS_BUCKET)
DEAD_STAGE = "dead"
URGENT_LANE = "urgent"
# how long a worker waits on the urgent lane before it asks the normal one (both in one poll)
URGENT_POLL_S = 0.05

HDR_MSG_ID = "Nats-Msg-Id"
HDR_SESSION = "Doclora-Session"
HDR_STAGE = "Doclora-Stage"
HDR_ERROR = "Doclora-Error"
HDR_ATTEMPTS = "Doclora-Attempts"

# One subject token: no dots, no wildcards, no whitespace.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# JetStream error code for "stream name already in use with a different configuration".
_ERR_STREAM_NAME_IN_USE = 10058

# Failures of the connection or the server, rather than of the request: worth a retry.
_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    OSError,
)


class PermanentError(Exception):
    """Raised by a work handler when retrying cannot help (bad input): the message goes to `work.dead` now."""


class WorkerLost(Exception):
    """The worker holding a message's last attempt died before it finished (set as `on_dead`'s error)."""


@dataclass(frozen=True)
class WorkItem:
    """One delivery of a work message, as a handler sees it."""

    stage: str
    data: bytes
    attempt: int  # 1 on first delivery
    max_attempts: int
    msg_id: str  # the Nats-Msg-Id it was published with, "" if none
    session_id: str  # from the Doclora-Session header, "" if none


Handler = Callable[[WorkItem], Awaitable[None]]
OnDead = Callable[[bytes, BaseException], Awaitable[None]]


def _token(kind: str, value: str) -> str:
    if not _TOKEN_RE.match(value):
        raise errors.InvalidArgument(f"{kind} must be letters, digits, '-' or '_', got {value!r}")
    return value


def event_prefix(tenant: str, session_id: str) -> str:
    """`events.{tenant}.{session_id}.`: every event subject of a session starts so (under its tenant)."""
    return f"events.{_token('tenant', tenant)}.{_token('session id', session_id)}."


def _work_subject(stage: str, lane: str = "") -> str:
    return f"work.{stage}.{lane}" if lane else f"work.{stage}"


def _work_durable(stage: str, lane: str = "") -> str:
    return f"work-{stage}-{lane}" if lane else f"work-{stage}"


def _header_value(text: str, limit: int = 1000) -> str:
    # header values must not contain CR/LF; keep them short
    return " ".join(text.split())[:limit]


@contextlib.contextmanager
def _unavailable_on_transport_errors(what: str):
    try:
        yield
    except _TRANSIENT as err:
        raise errors.Unavailable(f"NATS unavailable during {what}: {type(err).__name__}: {err}") from err


async def sleep_unless(stop_event: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop_event` is set meanwhile."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop_event.wait(), seconds)


class Bus:
    """A NATS connection with JetStream; build with `await Bus.connect(url, name=...)`."""

    def __init__(self, nc: NatsClient, js: JetStreamContext, name: str):
        self._nc = nc
        self._js = js
        self.name = name
        self._kv: dict[str, object] = {}

    @property
    def nc(self) -> NatsClient:
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self._js

    # ------------------------------------------------------------------ connection

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        user: str | None = None,
        password: str | None = None,
        connect_timeout_s: float = 5.0,
        reconnect_wait_s: float = 1.0,
        max_reconnect_attempts: int = -1,
        request_timeout_s: float = 10.0,
        drain_timeout_s: float = 10.0,
    ) -> Bus:
        """Connect (raising `errors.Unavailable` if no server answers within `connect_timeout_s`,
        `errors.Unauthenticated` if it refuses the credentials).

        Credentials: those in `url` if it has any, else `user` / `password`, which default to the
        `nats_user` / `nats_password` settings (DOCLORA_NATS_USER / DOCLORA_NATS_PASSWORD); a
        server that asks for none ignores them. Once connected, the client reconnects on its own
        (forever by default) and every connection event is logged.
        """
        parts = urlsplit(url)
        shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))  # no credentials
        if parts.password is not None:  # user:password in the URL, percent-decoded (nats-py would not)
            user, password, url = unquote(parts.username or ""), unquote(parts.password), shown
        elif parts.username is not None:  # a token in the URL: nats-py sends it
            user = password = ""
        elif user is None and password is None:
            settings = Settings.from_env()
            user, password = settings.nats_user, settings.nats_password.get_secret_value()
        credentials = {"user": user, "password": password} if user or password else {}
        refused: list[Exception] = []
        connecting: asyncio.Future | None = None

        async def on_error(err: Exception) -> None:
            if "authorization violation" in str(err).lower() and connecting and not connecting.done():
                refused.append(err)
                connecting.cancel()  # trying again cannot help: fail now, not at the timeout
            log.warning("nats[%s] error: %s: %s", name, type(err).__name__, err)

        async def on_disconnected() -> None:
            log.warning("nats[%s] disconnected", name)

        async def on_reconnected() -> None:
            log.info("nats[%s] reconnected to %s", name, nc.connected_url.netloc if nc.connected_url else "?")

        async def on_closed() -> None:
            log.info("nats[%s] connection closed", name)

        nc = NatsClient()
        connecting = asyncio.ensure_future(
            nc.connect(
                servers=[url],
                name=name,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                closed_cb=on_closed,
                connect_timeout=connect_timeout_s,
                allow_reconnect=True,
                reconnect_time_wait=reconnect_wait_s,
                max_reconnect_attempts=max_reconnect_attempts,
                drain_timeout=drain_timeout_s,
                **credentials,
            )
        )
        try:
            await asyncio.wait_for(connecting, timeout=connect_timeout_s + 1.0)
        except (TimeoutError, asyncio.CancelledError, nats.errors.Error, OSError) as err:
            with contextlib.suppress(Exception):
                await nc.close()
            if refused:
                given = f"user {user!r}" if user else "no credentials"
                raise errors.Unauthenticated(
                    f"NATS at {shown} refused the credentials ({given}): set DOCLORA_NATS_USER and "
                    "DOCLORA_NATS_PASSWORD, or user:password in DOCLORA_NATS_URL, to what the server expects"
                ) from err
            if isinstance(err, asyncio.CancelledError):  # our caller was cancelled
                raise
            raise errors.Unavailable(
                f"cannot connect to NATS at {shown}: {type(err).__name__}: {err}"
            ) from err
        log.info("nats[%s] connected to %s", name, shown)
        return cls(nc, nc.jetstream(timeout=request_timeout_s), name)

    async def close(self) -> None:
        """Drain (let in-flight messages and publishes finish), then close; safe to call twice."""
        if self._nc.is_closed:
            return
        try:
            await self._nc.drain()
        except Exception as err:  # draining a broken connection: closing is all that is left
            log.warning("nats[%s] drain failed (%s); closing", self.name, err)
            await self._nc.close()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ streams

    async def _ensure_stream(self, config: js_api.StreamConfig) -> None:
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError as err:
            if err.err_code != _ERR_STREAM_NAME_IN_USE:
                raise
            # exists with other settings (e.g. a changed max_age): bring it to ours
            await self._js.update_stream(config)

    async def ensure_streams(
        self,
        *,
        events_max_age_s: float = 7 * 24 * 3600.0,
        duplicate_window_s: float = 120.0,
        kv_history: int = 1,
    ) -> None:
        """Create (or update) streams `WORK` and `EVENTS` and the KV buckets `sessions` and `access`.

        Idempotent: the server accepts re-creating a stream with the same settings, so replicas
        starting together do not race.
        """
        with _unavailable_on_transport_errors("ensure_streams"):
            await self._ensure_stream(
                js_api.StreamConfig(
                    name=WORK_STREAM,
                    description="doclora work queues, one subject per stage",
                    subjects=["work.>"],
                    retention=js_api.RetentionPolicy.WORK_QUEUE,
                    storage=js_api.StorageType.FILE,
                    duplicate_window=duplicate_window_s,
                )
            )
            await self._ensure_stream(
                js_api.StreamConfig(
                    name=EVENTS_STREAM,
                    description="doclora session events",
                    subjects=["events.>"],
                    retention=js_api.RetentionPolicy.LIMITS,
                    storage=js_api.StorageType.FILE,
                    max_age=events_max_age_s,
                    # the server refuses a duplicate window longer than max_age
                    duplicate_window=min(duplicate_window_s, events_max_age_s),
                )
            )
            for bucket in KV_BUCKETS:
                try:
                    self._kv[bucket] = await self._js.create_key_value(bucket=bucket, history=kv_history)
                except nats.js.errors.BadRequestError as err:
                    if err.err_code != _ERR_STREAM_NAME_IN_USE:
                        raise
                    self._kv[bucket] = await self._js.key_value(bucket)

    # ------------------------------------------------------------------ work

    async def publish_work(
        self, stage: str, data: bytes, msg_id: str, *, session_id: str | None = None, priority: int = 0
    ) -> bool:
        """Publish to `work.{stage}` (`work.{stage}.urgent` when `priority` > 0) with
        `Nats-Msg-Id: msg_id`; True if the server dropped it as a duplicate."""
        headers = {HDR_MSG_ID: msg_id}
        if session_id:
            headers[HDR_SESSION] = session_id
        subject = _work_subject(_token("stage", stage), URGENT_LANE if priority > 0 else "")
        with _unavailable_on_transport_errors(f"publish to {subject}"):
            ack = await self._js.publish(subject, data, headers=headers)
        return bool(ack.duplicate)

    async def _work_consumer(
        self, stage: str, ack_wait_s: float, max_deliver: int, lane: str = ""
    ) -> JetStreamContext.PullSubscription:
        durable = _work_durable(stage, lane)
        # Creating with the same config is a no-op; with another (e.g. a new ack_wait) it updates it.
        await self._js.add_consumer(
            WORK_STREAM,
            js_api.ConsumerConfig(
                name=durable,
                durable_name=durable,
                filter_subject=_work_subject(stage, lane),
                ack_policy=js_api.AckPolicy.EXPLICIT,
                deliver_policy=js_api.DeliverPolicy.ALL,
                ack_wait=ack_wait_s,
                # one delivery more than the handler may use: if a worker dies on the last attempt,
                # that extra delivery lets another replica dead-letter the message
                max_deliver=max_deliver + 1,
            ),
        )
        return await self._js.pull_subscribe_bind(durable=durable, stream=WORK_STREAM)

    async def run_worker(
        self,
        stage: str,
        handler: Handler,
        *,
        ack_wait_s: float,
        max_deliver: int,
        stop_event: asyncio.Event,
        on_dead: OnDead | None = None,
        retry_delay_s: float = 2.0,
        poll_s: float = 1.0,
    ) -> None:
        """Process `work.{stage}` messages one at a time until `stop_event` is set.

        `handler(item)` gets up to `max_deliver` attempts. When it raises, the message is nak'ed
        for redelivery after `retry_delay_s * attempt`; on the last attempt or a `PermanentError`
        it is published to `work.dead` (headers: stage, error, attempts, session), `on_dead(data,
        error)` is awaited and the message is terminated. Setting `stop_event` stops fetching
        (within `poll_s`) and lets the current handler finish.
        """
        _token("stage", stage)
        # urgent lane first: each round asks it briefly, then waits on the normal one
        lanes = (URGENT_LANE, "") if stage != DEAD_STAGE else ("",)
        subs: dict[str, JetStreamContext.PullSubscription] = {}
        try:
            while not stop_event.is_set():
                if len(subs) < len(lanes):
                    try:
                        for lane in lanes:
                            if lane not in subs:
                                subs[lane] = await self._work_consumer(stage, ack_wait_s, max_deliver, lane)
                    except (nats.errors.Error, OSError) as err:
                        log.warning("worker %s: cannot bind consumer: %s: %s", stage, type(err).__name__, err)
                        await sleep_unless(stop_event, 1.0)
                        continue
                msgs: list[Msg] = []
                for lane in lanes:
                    wait = min(URGENT_POLL_S, poll_s) if lane == URGENT_LANE else poll_s
                    try:
                        msgs = await subs[lane].fetch(1, timeout=wait)
                    except nats.errors.TimeoutError:
                        continue
                    except nats.errors.ConnectionClosedError:
                        log.info("worker %s: connection closed, stopping", stage)
                        return
                    except (nats.errors.Error, OSError) as err:
                        # e.g. the consumer or stream was deleted: bind again after a pause
                        log.warning("worker %s: fetch failed: %s: %s", stage, type(err).__name__, err)
                        with contextlib.suppress(Exception):
                            await subs.pop(lane).unsubscribe()
                        await sleep_unless(stop_event, 1.0)
                        break
                    break  # got work: do it, then ask the urgent lane again
                for msg in msgs:
                    await self._process(stage, msg, handler, ack_wait_s, max_deliver, on_dead, retry_delay_s)
        finally:
            if not self._nc.is_closed:
                for sub in subs.values():
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def _process(
        self,
        stage: str,
        msg: Msg,
        handler: Handler,
        ack_wait_s: float,
        max_deliver: int,
        on_dead: OnDead | None,
        retry_delay_s: float,
    ) -> None:
        headers = msg.headers or {}
        item = WorkItem(
            stage=stage,
            data=msg.data,
            attempt=msg.metadata.num_delivered,
            max_attempts=max_deliver,
            msg_id=headers.get(HDR_MSG_ID, ""),
            session_id=headers.get(HDR_SESSION, ""),
        )
        with session_context(item.session_id or "-"):
            if item.attempt > max_deliver:
                err = WorkerLost(f"worker died during attempt {max_deliver} of {max_deliver}")
                log.error("work.%s: %s", stage, err)
                await self._dead_letter(msg, item, err, on_dead)
                return
            heartbeat = asyncio.create_task(self._keep_alive(msg, stage, max(ack_wait_s / 3.0, 0.05)))
            try:
                await handler(item)
            except asyncio.CancelledError:
                # hard stop: hand the message back now rather than after ack_wait
                await self._stop_heartbeat(heartbeat)
                with contextlib.suppress(Exception):
                    await msg.nak()
                raise
            except Exception as err:
                await self._stop_heartbeat(heartbeat)
                if isinstance(err, PermanentError) or item.attempt >= max_deliver:
                    log.error(
                        "work.%s attempt %d/%d failed for good: %s", stage, item.attempt, max_deliver, err
                    )
                    await self._dead_letter(msg, item, err, on_dead)
                else:
                    log.warning(
                        "work.%s attempt %d/%d failed, retrying: %s: %s",
                        stage,
                        item.attempt,
                        max_deliver,
                        type(err).__name__,
                        err,
                    )
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=retry_delay_s * item.attempt)
            else:
                await self._stop_heartbeat(heartbeat)
                try:
                    await msg.ack_sync(timeout=5.0)
                except Exception as err:  # redelivered later; stages are idempotent
                    log.warning("work.%s: ack not confirmed (%s); it may be redelivered", stage, err)

    async def _keep_alive(self, msg: Msg, stage: str, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await msg.in_progress()
            except Exception as err:
                log.warning("work.%s: in_progress failed: %s", stage, err)

    @staticmethod
    async def _stop_heartbeat(task: asyncio.Task) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _dead_letter(
        self, msg: Msg, item: WorkItem, err: BaseException, on_dead: OnDead | None
    ) -> None:
        if item.stage != DEAD_STAGE:
            headers = {
                # the same message dead-lettered twice (a crash in between) is stored once
                HDR_MSG_ID: f"dead:{item.stage}:{msg.metadata.sequence.stream}",
                HDR_STAGE: item.stage,
                HDR_ERROR: _header_value(f"{type(err).__name__}: {err}"),
                HDR_ATTEMPTS: str(min(item.attempt, item.max_attempts)),
            }
            if item.session_id:
                headers[HDR_SESSION] = item.session_id
            try:
                await self._js.publish(f"work.{DEAD_STAGE}", item.data, headers=headers)
            except Exception as pub_err:
                # leave the message un-acked: it comes back after ack_wait and we try again
                log.error("work.%s: cannot publish to work.dead: %s", item.stage, pub_err)
                return
        if on_dead is not None:
            try:
                await on_dead(item.data, err)
            except Exception:
                log.exception("work.%s: on_dead failed", item.stage)
        try:
            # as a request, so the server has applied it (and dropped the message) when we return
            await self._nc.request(msg.reply, b"+TERM", timeout=5.0)
        except Exception as term_err:
            log.warning("work.%s: term not confirmed (%s)", item.stage, term_err)

    async def pending_work(self, stage: str) -> int:
        """Messages of `work.{stage}` and its urgent lane not yet done: waiting plus being worked
        on (consumer lag)."""
        _token("stage", stage)
        total = 0
        with _unavailable_on_transport_errors(f"pending_work({stage})"):
            for lane in (URGENT_LANE, ""):
                try:
                    info = await self._js.consumer_info(WORK_STREAM, _work_durable(stage, lane))
                except nats.js.errors.NotFoundError:
                    # no worker has bound yet: everything in the stream on that subject is waiting
                    si = await self._js.stream_info(WORK_STREAM, subjects_filter=_work_subject(stage, lane))
                    total += sum((si.state.subjects or {}).values())
                    continue
                total += (info.num_pending or 0) + (info.num_ack_pending or 0)
        return total

    async def work_sessions(self) -> set[str]:
        """The sessions that have a work message in the stream, waiting or being worked on (dead
        letters aside): the work queue keeps a message until it is acked, so a session missing here
        has no work in flight. One request per message: the queue is short."""
        found: set[str] = set()
        dead = _work_subject(DEAD_STAGE)
        seq = 1
        with _unavailable_on_transport_errors("work_sessions"):
            while True:
                try:
                    msg = await self._js.get_msg(WORK_STREAM, seq=seq, subject="work.>", next=True)
                except nats.js.errors.NotFoundError:
                    return found
                if msg.subject != dead and msg.headers and msg.headers.get(HDR_SESSION):
                    found.add(msg.headers[HDR_SESSION])
                seq = msg.seq + 1

    # ------------------------------------------------------------------ events

    async def publish_event(self, tenant: str, session_id: str, kind: str, data: bytes) -> int:
        """Publish on `events.{tenant}.{session_id}.{kind}`; returns the stream sequence."""
        subject = f"{event_prefix(tenant, session_id)}{_token('event kind', kind)}"
        with _unavailable_on_transport_errors(f"publish to {subject}"):
            ack = await self._js.publish(subject, data)
        return ack.seq

    async def watch_events(
        self, tenant: str, session_id: str, *, from_start: bool = True
    ) -> AsyncIterator[tuple[str, bytes]]:
        """Yield `(kind, data)` for a session: its history first (if `from_start`), then live events.

        Uses an ordered ephemeral consumer, removed when iteration stops (break, cancel, aclose).
        Close it promptly with `contextlib.aclosing(bus.watch_events(...))`.
        """
        subject = event_prefix(tenant, session_id) + ">"
        with _unavailable_on_transport_errors(f"watch {subject}"):
            sub = await self._js.subscribe(
                subject,
                stream=EVENTS_STREAM,
                ordered_consumer=True,
                deliver_policy=js_api.DeliverPolicy.ALL if from_start else js_api.DeliverPolicy.NEW,
                # if we vanish without unsubscribing, the server drops the consumer soon anyway
                inactive_threshold=30.0,
            )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=None)
                except nats.errors.ConnectionClosedError as err:
                    raise errors.Unavailable(f"NATS connection closed while watching {subject}") from err
                yield msg.subject.split(".", 3)[3], msg.data
        finally:
            await self._close_watch(sub)

    async def _close_watch(self, sub: JetStreamContext.PushSubscription) -> None:
        if self._nc.is_closed:
            return
        consumer = None
        with contextlib.suppress(Exception):
            consumer = (await asyncio.wait_for(sub.consumer_info(), 2.0)).name
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if consumer:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._js.delete_consumer(EVENTS_STREAM, consumer), 2.0)

    # ------------------------------------------------------------------ sessions KV

    async def _bucket(self, bucket: str = SESSIONS_BUCKET):
        if bucket not in self._kv:
            try:
                self._kv[bucket] = await self._js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError as err:
                raise errors.Unavailable(f"KV bucket {bucket!r} does not exist (ensure_streams)") from err
        return self._kv[bucket]

    async def kv_get(self, key: str, *, bucket: str = SESSIONS_BUCKET) -> tuple[bytes, int]:
        """The value and revision of `key`; raises `errors.NotFound`."""
        with _unavailable_on_transport_errors(f"kv_get({key})"):
            kv = await self._bucket(bucket)
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError as err:  # also deleted keys
                raise errors.NotFound(f"{bucket}/{key} not found") from err
            except nats.js.errors.InvalidKeyError as err:
                raise errors.InvalidArgument(f"invalid key {key!r}") from err
        return entry.value or b"", entry.revision

    async def kv_create(self, key: str, value: bytes, *, bucket: str = SESSIONS_BUCKET) -> int:
        """Create `key`; returns its revision; raises `errors.AlreadyExists`."""
        with _unavailable_on_transport_errors(f"kv_create({key})"):
            kv = await self._bucket(bucket)
            try:
                return await kv.create(key, value)
            except nats.js.errors.KeyWrongLastSequenceError as err:
                raise errors.AlreadyExists(f"{bucket}/{key} already exists") from err
            except nats.js.errors.InvalidKeyError as err:
                raise errors.InvalidArgument(f"invalid key {key!r}") from err

    async def kv_update(self, key: str, value: bytes, revision: int, *, bucket: str = SESSIONS_BUCKET) -> int:
        """Write `key` only if its revision is still `revision`; returns the new one; raises `errors.Conflict`."""
        with _unavailable_on_transport_errors(f"kv_update({key})"):
            kv = await self._bucket(bucket)
            try:
                return await kv.update(key, value, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError as err:
                raise errors.Conflict(f"{bucket}/{key} changed since revision {revision}") from err
            except nats.js.errors.InvalidKeyError as err:
                raise errors.InvalidArgument(f"invalid key {key!r}") from err

    async def kv_mutate(
        self,
        key: str,
        fn: Callable[[bytes], bytes | Awaitable[bytes]],
        *,
        retries: int = 20,
        bucket: str = SESSIONS_BUCKET,
    ) -> tuple[bytes, int]:
        """Read `key`, write `fn(value)` by compare-and-swap, re-read and retry on a lost race.

        `fn` may raise to refuse the change (e.g. a wrong state); it is called again on every
        retry, so it must be pure. Returns the value written and its revision (no write if
        `fn` returned the value unchanged). Raises `errors.Conflict` after `retries` lost races.
        """
        for attempt in range(retries + 1):
            value, revision = await self.kv_get(key, bucket=bucket)
            new = fn(value)
            if inspect.isawaitable(new):
                new = await new
            if new == value:
                return value, revision
            try:
                return new, await self.kv_update(key, new, revision, bucket=bucket)
            except errors.Conflict:
                if attempt == retries:
                    raise
                # jitter so writers that collided do not collide again in lockstep
                await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
        raise AssertionError("unreachable")

    async def kv_keys(self, *, bucket: str = SESSIONS_BUCKET) -> list[str]:
        """All live keys, sorted (an empty bucket gives [])."""
        with _unavailable_on_transport_errors("kv_keys"):
            kv = await self._bucket(bucket)
            try:
                return sorted(await kv.keys())
            except nats.js.errors.NoKeysError:
                return []

    async def kv_delete(self, key: str, *, bucket: str = SESSIONS_BUCKET) -> None:
        """Remove `key` and its history (a missing key is not an error)."""
        with _unavailable_on_transport_errors(f"kv_delete({key})"):
            kv = await self._bucket(bucket)
            try:
                await kv.purge(key)
            except nats.js.errors.InvalidKeyError as err:
                raise errors.InvalidArgument(f"invalid key {key!r}") from err
