"""Durability and credentials of the embedded servers, on real processes: a nats-server killed with
SIGKILL comes back on its store with the work, session records and events it acknowledged, syncing
every write as the settings choose; NATS and SeaweedFS refuse wrong credentials and take the
right ones, which the services read from settings."""

from __future__ import annotations

import contextlib
import json
import signal
import urllib.error
import urllib.parse
import urllib.request

import pytest

from doclora.v1 import events_pb2, session_pb2
from services.common import errors, events, keys
from services.common.bus import Bus
from services.common.config import Settings
from services.common.sessions import SessionRepo
from services.common.store import ArtifactStore
from services.stack.natsd import start_nats_server
from tests.fixtures.s3 import ACCESS_KEY, SECRET_KEY

USER = "doclora-svc"
PASSWORD = "p@ss:/w0rd%"  # characters a URL must percent-encode


@pytest.fixture
def no_nats_env(monkeypatch):
    for name in ("DOCLORA_NATS_USER", "DOCLORA_NATS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def test_a_killed_nats_server_comes_back_with_its_work_sessions_and_events(tmp_path):
    """SIGKILL right after the acks, restart on the same folder: the work message, the session
    record and the events are all there; the server syncs every write (the stack's setting)."""
    settings = Settings()
    server = start_nats_server(tmp_path, sync_interval=settings.nats_sync_interval).wait_ready(20)
    varz = json.load(urllib.request.urlopen(f"{server.monitor_url}/varz", timeout=5))
    assert varz["jetstream"]["config"]["sync_always"] is (settings.nats_sync_interval == "always")
    port, sid = server.port, keys.new_id("s")
    bus = await Bus.connect(server.url, name="before-kill")
    try:
        await bus.ensure_streams()
        await bus.publish_work("ingest", b"work-1", f"{sid}:ingest:0", session_id=sid)
        await SessionRepo(bus).create(session_pb2.Session(session_id=sid, tenant="t1", name="durable"))
        for done in (1, 2):
            progress = events_pb2.Progress(done=done, total=2)
            await events.publish(bus, "t1", sid, events_pb2.Event(progress=progress))
        server.proc.send_signal(signal.SIGKILL)
        assert server.proc.wait(10) == -signal.SIGKILL
    finally:
        with contextlib.suppress(Exception):
            await bus.nc.close()
        server.stop()

    again = start_nats_server(tmp_path, port=port, sync_interval=settings.nats_sync_interval).wait_ready(20)
    try:
        bus = await Bus.connect(again.url, name="after-kill")
        try:
            assert await bus.work_sessions() == {sid}
            assert await bus.pending_work("ingest") == 1
            record = await SessionRepo(bus).get(sid)
            assert (record.tenant, record.name) == ("t1", "durable")
            seen = []
            async with contextlib.aclosing(bus.watch_events("t1", sid)) as stream:
                async for _kind, data in stream:
                    seen.append(events.parse(data).progress.done)
                    if len(seen) == 2:
                        break
            assert seen == [1, 2]
        finally:
            await bus.close()
    finally:
        again.stop()


@pytest.fixture(scope="module")
def nats_with_password(tmp_path_factory):
    server = start_nats_server(tmp_path_factory.mktemp("nats-auth"), user=USER, password=PASSWORD)
    try:
        yield server.wait_ready(20)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "credentials",
    [
        {"user": USER, "password": "wrong"},
        {"user": "", "password": ""},
        {"user": "nobody", "password": PASSWORD},
    ],
    ids=["wrong-password", "none", "wrong-user"],
)
async def test_nats_refuses_wrong_or_missing_credentials(nats_with_password, credentials):
    with pytest.raises(errors.Unauthenticated, match="refused the credentials.*DOCLORA_NATS_USER"):
        await Bus.connect(nats_with_password.url, name="intruder", connect_timeout_s=1.0, **credentials)


async def test_nats_takes_the_credentials_from_the_settings_or_the_url(nats_with_password, no_nats_env):
    """What the services do: `Bus.connect(settings.nats_url)` with DOCLORA_NATS_USER/PASSWORD set;
    or user:password (percent-encoded) in the URL; the password never reaches the log or an error."""
    no_nats_env.setenv("DOCLORA_NATS_USER", USER)
    no_nats_env.setenv("DOCLORA_NATS_PASSWORD", PASSWORD)
    async with await Bus.connect(nats_with_password.url, name="from-settings") as bus:
        await bus.ensure_streams()
    no_nats_env.delenv("DOCLORA_NATS_USER")
    no_nats_env.delenv("DOCLORA_NATS_PASSWORD")
    encoded = urllib.parse.quote(PASSWORD, safe="")
    url = f"nats://{USER}:{encoded}@127.0.0.1:{nats_with_password.port}"
    async with await Bus.connect(url, name="from-url") as bus:
        await bus.ensure_streams()
    wrong = f"nats://{USER}:not-{encoded}@127.0.0.1:{nats_with_password.port}"
    with pytest.raises(errors.Unauthenticated) as err:
        await Bus.connect(wrong, name="wrong-url", connect_timeout_s=1.0)
    assert encoded not in str(err.value) and PASSWORD not in str(err.value)


def test_the_nats_config_file_is_for_its_owner_only(nats_with_password):
    conf = nats_with_password.data_dir / "nats-server.conf"
    assert conf.stat().st_mode & 0o077 == 0


def test_seaweedfs_refuses_a_wrong_secret_and_takes_the_right_one(store, seaweedfs):
    """The embedded S3 server trusts only the identities file s3d.py writes from the settings."""
    store.put_bytes("probe.txt", b"kept")
    wrong = ArtifactStore(
        seaweedfs.endpoint, ACCESS_KEY, SECRET_KEY + "-wrong", bucket=store.bucket, retries=0
    )
    stranger = ArtifactStore(seaweedfs.endpoint, "stranger", SECRET_KEY, bucket=store.bucket, retries=0)
    try:
        for intruder in (wrong, stranger):
            with pytest.raises(errors.Unauthenticated, match="rejected our credentials"):
                intruder.get_bytes("probe.txt")
            with pytest.raises(errors.Unauthenticated):
                intruder.put_bytes("intruder.txt", b"x")
    finally:
        wrong.close()
        stranger.close()
    # no signature at all: refused too
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"http://{seaweedfs.endpoint}/{store.bucket}/probe.txt", timeout=5)
    assert anonymous.value.code == 403
    assert store.get_bytes("probe.txt") == b"kept" and not store.exists("intruder.txt")
