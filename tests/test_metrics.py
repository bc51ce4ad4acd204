"""Prometheus metrics (services/common/metrics.py): a service process started with a metrics address
serves them, the work queues read from a real nats-server, gRPC calls counted by their final status,
chat and training figures, and the gateway's /metrics with requests by route template."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from doclora.v1 import inference_pb2, qagen_pb2, qagen_pb2_grpc, session_pb2
from gateway.app import create_app
from services.common import metrics
from services.common.config import Settings, settings_env
from services.stack.ports import free_port
from tests import test_engine
from tests.fixtures.served import served

# the tiny model and its three adapters (test_engine.py's session fixtures)
tokenizer = test_engine.tokenizer
adapter_dirs = test_engine.adapter_dirs
make_engine = test_engine.make_engine

ROOT = Path(__file__).resolve().parents[1]
QAGEN = "doclora.v1.QAGenService"


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` with exactly `labels` in an exposition `text`, None if absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def value(name: str, **labels: str) -> float:
    """This process's current value of a sample (0 before its first observation)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------------------- a service process


@contextlib.contextmanager
def qagen_process(settings: Settings, log_path: Path):
    """`python -m services.qagen` with `settings` as its environment; SIGTERM on the way out."""
    env = {**os.environ, **settings_env(settings), "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.qagen"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def scrape(http: httpx.AsyncClient, url: str, proc: subprocess.Popen, log_path: Path) -> str:
    """The process's /metrics text, waiting (up to 60 s) for it to start answering."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"the service exited: {log_path.read_text()[-3000:]}"
        try:
            resp = await http.get(url)
            assert resp.status_code == 200, resp.text
            assert resp.headers["content-type"].startswith("text/plain")
            return resp.text
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"no /metrics within 60 s: {log_path.read_text()[-3000:]}"
            await asyncio.sleep(0.2)


async def test_a_service_started_with_a_metrics_addr_serves_queues_and_grpc_errors(
    bus, nats_server, s3_settings, tmp_path
):
    """qagen started with DOCLORA_METRICS_ADDR serves /metrics there: every series family is named,
    the queue depth of each stage and lane follows the work published on the real nats-server (with
    the age of the oldest message), and a call that fails counts under its service, method and
    code (one that succeeds under OK). SIGTERM still stops the process cleanly."""
    metrics_addr, grpc_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    settings = s3_settings.replace(
        nats_url=nats_server.url, listen_addr=grpc_addr, metrics_addr=metrics_addr, auth="auto"
    )
    url, log_path = f"http://{metrics_addr}/metrics", tmp_path / "qagen.log"
    with qagen_process(settings, log_path) as proc:
        async with httpx.AsyncClient(timeout=10) as http:
            before = await scrape(http, url, proc, log_path)
            for family in (
                "doclora_queue_depth",
                "doclora_queue_oldest_age_seconds",
                "doclora_stage_duration_seconds",
                "doclora_grpc_server_handled_total",
                "doclora_grpc_server_handling_seconds",
                "doclora_train_tokens_total",
                "doclora_chat_time_to_first_token_seconds",
                "doclora_chat_tokens_per_second",
                "doclora_adapter_cache_requests_total",
            ):
                assert f"# TYPE {family} " in before, family
            for stage, lane in [
                ("ingest", "normal"),
                ("ingest", "urgent"),
                ("train", "normal"),
                ("dead", "normal"),
            ]:
                assert sample(before, "doclora_queue_depth", stage=stage, lane=lane) == 0, (stage, lane)
                assert sample(before, "doclora_queue_oldest_age_seconds", stage=stage, lane=lane) == 0

            # no ingest worker runs: the messages wait in the stream
            await bus.publish_work("ingest", b"a", "m1")
            await bus.publish_work("ingest", b"b", "m2")
            await bus.publish_work("ingest", b"c", "m3", priority=1)
            await asyncio.sleep(0.3)
            after = await scrape(http, url, proc, log_path)
            assert sample(after, "doclora_queue_depth", stage="ingest", lane="normal") == 2
            assert sample(after, "doclora_queue_depth", stage="ingest", lane="urgent") == 1
            assert sample(after, "doclora_queue_depth", stage="train", lane="normal") == 0
            age = sample(after, "doclora_queue_oldest_age_seconds", stage="ingest", lane="normal")
            assert 0.2 <= age < 30, age

            async with grpc.aio.insecure_channel(grpc_addr) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                stub = qagen_pb2_grpc.QAGenServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ListPairs(qagen_pb2.ListPairsRequest(session_id="no-such-session"), timeout=10)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                check = health_pb2_grpc.HealthStub(channel).Check
                assert (await check(health_pb2.HealthCheckRequest(), timeout=10)).status == 1  # SERVING
            text = await scrape(http, url, proc, log_path)
            labels = {"grpc_service": QAGEN, "grpc_method": "ListPairs"}
            assert sample(text, "doclora_grpc_server_handled_total", **labels, grpc_code="NOT_FOUND") == 1
            assert sample(text, "doclora_grpc_server_handling_seconds_count", **labels) == 1
            health = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
            assert sample(text, "doclora_grpc_server_handled_total", **health, grpc_code="OK") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log_path.read_text()[-3000:]


# ------------------------------------------------------------------------------------ in-process parts


async def test_queue_metrics_are_read_per_stage_and_lane_from_another_thread(bus):
    """The collector reads on the bus's loop while the scraping thread waits: depth counts what is
    not done yet, and a message taken and acked by a worker leaves the queue."""
    await bus.publish_work("train", b"x", "t1")
    await bus.publish_work("train", b"y", "t2", priority=1)
    collector = metrics.QueueCollector(bus, asyncio.get_running_loop())
    families = await asyncio.to_thread(lambda: {f.name: f for f in collector.collect()})
    depth = {tuple(s.labels.values()): s.value for s in families["doclora_queue_depth"].samples}
    assert depth[("train", "normal")] == 1 and depth[("train", "urgent")] == 1
    assert depth[("qagen", "normal")] == 0 and depth[("dead", "normal")] == 0
    assert ("dead", "urgent") not in depth  # dead letters have no urgent lane

    stop, done = asyncio.Event(), []

    async def handle(item):
        done.append(item.data)
        if len(done) == 2:
            stop.set()

    await asyncio.wait_for(
        bus.run_worker("train", handle, ack_wait_s=5, max_deliver=2, stop_event=stop, poll_s=0.2), 20
    )
    states = await metrics.read_queues(bus)
    assert states[("train", "normal")] == metrics.QueueState(0, 0.0)
    assert states[("train", "urgent")] == metrics.QueueState(0, 0.0)


async def test_queue_metrics_called_on_their_own_loop_give_no_samples_instead_of_hanging(bus):
    """Reading on the loop's own thread would wait on itself: it answers at once, without samples."""
    collector = metrics.QueueCollector(bus, asyncio.get_running_loop())
    started = time.monotonic()
    families = list(collector.collect())
    assert time.monotonic() - started < 1.0
    assert [f.samples for f in families] == [[], []]


async def test_grpc_calls_are_counted_by_their_final_status(runtime):
    """Calls through the services' own server: a domain error (NOT_FOUND) from a unary and from a
    streaming call, and the auth interceptor's UNAUTHENTICATED, each under its method and code."""
    from services.qagen.service import QAGenServicer

    def register(server):
        qagen_pb2_grpc.add_QAGenServiceServicer_to_server(QAGenServicer(runtime), server)
        return [qagen_pb2.DESCRIPTOR.services_by_name["QAGenService"].full_name]

    def handled(method: str, code: str, service: str = QAGEN) -> float:
        return value(
            "doclora_grpc_server_handled_total", grpc_service=service, grpc_method=method, grpc_code=code
        )

    start = {
        "unary": handled("ListPairs", "NOT_FOUND"),
        "stream": handled("ExportPairs", "NOT_FOUND"),
        "auth": handled("ListPairs", "UNAUTHENTICATED"),
    }
    async with served(runtime, register, qagen_pb2_grpc.QAGenServiceStub, auth="auto") as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListPairs(qagen_pb2.ListPairsRequest(session_id="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.ExportPairs(qagen_pb2.ExportPairsRequest(session_id="nope"), timeout=5):
                pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    async with served(runtime, register, qagen_pb2_grpc.QAGenServiceStub, auth="keys") as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListPairs(qagen_pb2.ListPairsRequest(session_id="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert handled("ListPairs", "NOT_FOUND") == start["unary"] + 1
    assert handled("ExportPairs", "NOT_FOUND") == start["stream"] + 1
    assert handled("ListPairs", "UNAUTHENTICATED") == start["auth"] + 1


def test_stage_durations_take_known_outcomes_only():
    """observe_stage records by stage and outcome, and refuses an outcome outside the fixed set."""
    before = value("doclora_stage_duration_seconds_count", stage="qagen", outcome="ok")
    metrics.observe_stage("qagen", 2.5, "ok")
    assert value("doclora_stage_duration_seconds_count", stage="qagen", outcome="ok") == before + 1
    with pytest.raises(ValueError, match="outcome must be one of ok, failed, retried, skipped"):
        metrics.observe_stage("qagen", 1.0, "session-123")


def test_a_bad_metrics_address_is_refused_with_its_text():
    for bad in ("9464", "host:", ":9464", "host:port", "host:70000"):
        with pytest.raises(ValueError, match="metrics address must be host:port"):
            metrics.split_addr(bad)
    assert metrics.split_addr("[::]:9464") == ("::", 9464)


async def test_a_chat_records_time_to_first_token_and_tokens_per_second():
    """A chat through the inference servicer (the test double engine of test_inference_service)
    observes its first piece's wait, its speed after it and its completion tokens."""
    from services.inference.service import InferenceServicer
    from tests.test_inference_service import FakeRuntime

    class SlowEngine:
        async def astream_chat(self, messages, adapter_id=None, params=None, cancel=None, stats=None):
            await asyncio.sleep(0.05)  # the wait for the first token
            for piece in ("one", " two", " three", " four"):
                yield piece
                await asyncio.sleep(0.02)
            stats.completion_tokens, stats.finish_reason = 4, "length"

    rt = FakeRuntime()
    rt.sessions.add("s1", session_pb2.SESSION_STATE_READY, adapter_id="s1")
    service = InferenceServicer(rt, SlowEngine(), embedder=None)
    ttft = value("doclora_chat_time_to_first_token_seconds_count")
    ttft_sum = value("doclora_chat_time_to_first_token_seconds_sum")
    speed = value("doclora_chat_tokens_per_second_count")
    tokens = value("doclora_chat_completion_tokens_total")
    answers = value("doclora_chat_answers_total", finish_reason="length")
    request = inference_pb2.ChatRequest(
        bot_id="s1",
        messages=[inference_pb2.ChatMessage(role="user", content="hi")],
        mode=inference_pb2.ANSWER_MODE_ADAPTER,
    )
    out = [r async for r in service.Chat(request, None)]
    assert "".join(r.delta for r in out) == "one two three four"
    assert value("doclora_chat_time_to_first_token_seconds_count") == ttft + 1
    assert 0.04 <= value("doclora_chat_time_to_first_token_seconds_sum") - ttft_sum < 5
    assert value("doclora_chat_tokens_per_second_count") == speed + 1
    assert value("doclora_chat_completion_tokens_total") == tokens + 4
    assert value("doclora_chat_answers_total", finish_reason="length") == answers + 1


def test_the_adapter_cache_counts_hits_misses_and_evictions(make_engine):
    """A chat whose adapter is loaded is a hit, one that attaches it a miss; making room evicts."""
    engine, _ = make_engine(capacity=1)
    hits, misses = (value("doclora_adapter_cache_requests_total", result=r) for r in ("hit", "miss"))
    evictions = value("doclora_adapter_cache_evictions_total")
    from services.inference.engine import GenerationParams

    short = GenerationParams(max_new_tokens=2)
    for adapter in ("a", "a", "b", "a"):  # miss, hit, miss (evicts a), miss (evicts b)
        "".join(engine.stream_chat(test_engine.CHAT, adapter, short))
    assert value("doclora_adapter_cache_requests_total", result="hit") == hits + 1
    assert value("doclora_adapter_cache_requests_total", result="miss") == misses + 3
    assert value("doclora_adapter_cache_evictions_total") == evictions + 2


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_training_counts_its_tokens_and_reports_tokens_per_second_while_it_runs(tmp_path):
    """train_lora on a tiny model: the token counter grows by the run's tokens, the tokens/s gauge
    is above 0 while steps run and back to 0 after."""
    from services.trainer.config import LoraTrainConfig
    from services.trainer.loop import train_lora
    from tests.test_lora import FAST, PAIRS
    from tests.test_model import real_tokenizer, tiny_llama

    tokenizer = real_tokenizer()
    seen: list[float] = []
    before = value("doclora_train_tokens_total")
    result = train_lora(
        tiny_llama(len(tokenizer)),
        tokenizer,
        PAIRS,
        tmp_path / "adapter",
        LoraTrainConfig(max_steps=2, progress_interval_s=0.0, **FAST),
        progress=lambda p: seen.append(value("doclora_train_tokens_per_second")),
    )
    assert result["tokens"] > 0
    assert value("doclora_train_tokens_total") == before + result["tokens"]
    assert seen and all(v > 0 for v in seen), seen
    assert value("doclora_train_tokens_per_second") == 0


# ------------------------------------------------------------------------------------------- gateway


async def test_the_gateway_answers_metrics_with_requests_by_route_template():
    """GET /metrics on the gateway's own port: requests counted by method, route template (never the
    raw path) and status, with their latency; a path no route matches counts as "unmatched"."""
    config = uvicorn.Config(create_app(Settings()), host="127.0.0.1", port=0, log_config=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.01)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            assert (await http.get("/healthz")).status_code == 200
            for name in ("nope-1.js", "nope-2.js"):
                assert (await http.get(f"/docs/assets/{name}")).status_code == 404
            assert (await http.get("/no/such/page")).status_code == 404
            resp = await http.get("/metrics")
            openapi = (await http.get("/openapi.json")).json()
        assert "/metrics" not in openapi["paths"]
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        text = resp.text
        assert sample(text, "doclora_http_requests_total", method="GET", route="/healthz", status="200") >= 1
        assets = {"method": "GET", "route": "/docs/assets/{name}"}
        assert sample(text, "doclora_http_requests_total", **assets, status="404") >= 2
        assert sample(text, "doclora_http_request_duration_seconds_count", **assets) >= 2
        assert sample(text, "doclora_http_requests_total", method="GET", route="unmatched", status="404") >= 1
        assert "nope-1" not in text and "/no/such/page" not in text
    finally:
        server.should_exit = True
        await task


# ---------------------------------------------------------------------------------------- deploy/

DEPLOY = ROOT / "deploy"
SERVICE_NAMES = ("ingest", "qagen", "trainer", "inference")


def doclora_families() -> set[str]:
    """The names of every doclora metric family this code defines (queues included)."""
    names = {m.name for m in REGISTRY.collect() if m.name.startswith("doclora_")}
    return names | {f.name for f in metrics.QueueCollector._families({})}


def test_compose_scrapes_each_service_where_it_serves_metrics():
    """compose.yaml gives every service a metrics address, prometheus.yml scrapes each one at that
    port (the gateway at its HTTP port), and the monitoring profile mounts both configs."""
    import yaml

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape["scrape_configs"]}
    assert set(targets) == {*SERVICE_NAMES, "gateway"}
    for name in SERVICE_NAMES:
        host, port = metrics.split_addr(compose[name]["environment"]["DOCLORA_METRICS_ADDR"])
        assert host == "0.0.0.0"
        assert targets[name] == [f"{name}:{port}"]
    assert targets["gateway"] == [f"gateway:{compose['gateway']['environment']['DOCLORA_GATEWAY_PORT']}"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["prometheus"]["volumes"]
    assert any(v.startswith("./grafana/doclora.json:") for v in compose["grafana"]["volumes"])
    assert compose["prometheus"]["profiles"] == compose["grafana"]["profiles"] == ["monitoring"]


def test_kubernetes_pods_expose_metrics_on_the_port_the_scrape_config_keeps():
    """Each service's pod has a `metrics` container port at DOCLORA_METRICS_ADDR's port, and the
    scrape ConfigMap has one job per service keeping that port by name (the gateway: `http`)."""
    import yaml

    docs = [
        d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d
    ]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "doclora-config")
    _, port = metrics.split_addr(config["data"]["DOCLORA_METRICS_ADDR"])
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for name in SERVICE_NAMES:
        pod = deployments[name]["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        assert {"name": "metrics", "containerPort": port} in container["ports"], name
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    scrape_map = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prometheus-doclora"
    )
    jobs = {j["job_name"]: j for j in yaml.safe_load(scrape_map["data"]["prometheus.yml"])["scrape_configs"]}
    assert set(jobs) == {*SERVICE_NAMES, "gateway"}
    for name, job in jobs.items():
        keep = {
            tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"
        }
        assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == name
        assert keep[("__meta_kubernetes_pod_container_port_name",)] == (
            "http" if name == "gateway" else "metrics"
        )


def test_the_grafana_dashboard_has_a_panel_for_every_metric():
    """deploy/grafana/doclora.json is a dashboard whose panels query every doclora metric family,
    through the datasource variable (so it works with any Prometheus)."""
    dashboard = json.loads((DEPLOY / "grafana" / "doclora.json").read_text())
    assert dashboard["uid"] and dashboard["title"] == "doclora"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    missing = {name for name in doclora_families() if name not in exprs}
    assert not missing, missing
