"""The vLLM back end (services/inference/vllm.py) against tests/fixtures/fake_vllm.py over a real
socket: streaming and its stats, adapters registered once and unregistered least recently used
(never while a chat uses them), a vLLM restart, its errors as doclora's, an early close that aborts
the request on the server, bad settings at start; and a chat through the real InferenceServicer
over gRPC (real NATS and SeaweedFS) with DOCLORA_INFERENCE_BACKEND=vllm, then the session's
deletion unregistering its adapter."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.common.config import Settings, SettingsError
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, TooManyRequests, Unavailable
from services.inference.engine import ChatStats, GenerationParams
from services.inference.vllm import VllmEngine, backend_of, error_message, ref_of, served_name
from services.stack.ports import free_port
from tests.fixtures.fake_vllm import FakeVllm

CHAT = [{"role": "user", "content": "where are the pears?"}]
A, B, C, D = (f"default/bot{i}-r1" for i in "abcd")


@pytest.fixture
def fake():
    server = FakeVllm()
    yield server
    server.close()


class Fetcher:
    """The adapter cache's `fetch` as the engine sees it: a PEFT folder per known ref (made here,
    as adapter_store.py leaves one), counting calls. The store-backed fetch runs in the gRPC test."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, ref: str) -> Path:
        with self.lock:
            self.calls.append(ref)
        if "unknown" in ref:
            raise NotFound(f"adapter {ref!r} not found")
        folder = self.root / ref
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        return folder


@pytest.fixture
def fetch(tmp_path):
    return Fetcher(tmp_path / "store-cache")


def make_engine(fake: FakeVllm, tmp_path: Path, fetch, **settings) -> VllmEngine:
    values = {"inference_backend": "vllm", "vllm_url": fake.url, "state_dir": str(tmp_path / "state"),
              "vllm_adapter_dir": str(tmp_path / "shared"), "vllm_timeout_s": 30.0, **settings}  # fmt: skip
    return VllmEngine(Settings(**values), fetch)


@pytest.fixture
async def engine(fake, tmp_path, fetch):
    eng = make_engine(fake, tmp_path, fetch)
    yield eng
    await eng.close()


async def answer(engine, adapter=None, params=None, stats=None, messages=CHAT) -> str:
    return "".join([p async for p in engine.astream_chat(messages, adapter, params, stats=stats)])


async def until(condition, timeout_s: float = 5.0) -> None:
    """Wait for `condition()` (something the server or a background task does)."""
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    assert condition()


# ---------------------------------------------------------------------------------------- chats


async def test_a_chat_streams_the_base_models_answer_and_fills_its_stats(fake, engine):
    """The base model's name comes from /v1/models; the request carries every generation
    parameter; the pieces are vLLM's deltas and the stats its usage and finish reason."""
    stats = ChatStats()
    params = GenerationParams(max_new_tokens=50, temperature=0.7, top_p=0.9, stop=("ZZZ",), seed=7)
    pieces = [p async for p in engine.astream_chat(CHAT, None, params, stats=stats)]
    assert "".join(pieces) == fake.answer("base-model", CHAT) == "base-model heard: where are the pears?"
    assert len(pieces) == 6
    assert (stats.prompt_tokens, stats.completion_tokens, stats.finish_reason) == (4, 6, "stop")
    sent = fake.chats[0]
    assert sent["model"] == "base-model" and sent["messages"] == CHAT
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (50, 0.7, 0.9)
    assert (sent["stop"], sent["seed"]) == (["ZZZ"], 7)


async def test_a_chat_ending_with_the_assistants_words_asks_vllm_to_go_on_from_them(fake, engine):
    """The quoted evidence a reply starts with (common/evidence.py) is sent as the last,
    assistant, message with vLLM's continue_final_message; a plain chat sends neither flag."""
    primed = [*CHAT, {"role": "assistant", "content": 'The document says: "Pears ripen in May." [1]\n\n'}]
    pieces = [p async for p in engine.astream_chat(primed, None, GenerationParams(max_new_tokens=20))]
    assert "".join(pieces) == fake.answer("base-model", primed)
    sent = fake.chats[-1]
    assert sent["messages"] == primed
    assert (sent["continue_final_message"], sent["add_generation_prompt"]) == (True, False)
    [p async for p in engine.astream_chat(CHAT, None, GenerationParams(max_new_tokens=20))]
    assert "continue_final_message" not in fake.chats[-1] and "add_generation_prompt" not in fake.chats[-1]


async def test_an_answer_cut_at_max_new_tokens_finishes_with_length(fake, engine):
    stats = ChatStats()
    text = await answer(engine, params=GenerationParams(max_new_tokens=2), stats=stats)
    assert text == "base-model heard:"
    assert (stats.completion_tokens, stats.finish_reason) == (2, "length")


async def test_bad_messages_and_params_are_refused_before_anything_is_sent(fake, engine):
    with pytest.raises(InvalidArgument, match="role"):
        await answer(engine, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(InvalidArgument, match="params must be GenerationParams"):
        await answer(engine, params={"max_new_tokens": 3})
    assert fake.chats == []


# -------------------------------------------------------------------------------------- adapters


async def test_concurrent_first_chats_copy_and_register_an_adapter_once(fake, engine, fetch, tmp_path):
    """Five chats for a cold adapter: one fetch, one copy into the shared folder, one load; each
    answer is the adapter's (vLLM's name for it), none the base model's."""
    fake.load_delay_s = 0.3
    texts = await asyncio.gather(*(answer(engine, A) for _ in range(5)))
    name = served_name(A)
    assert name == "default.bota-r1" and ref_of(name) == A
    assert texts == [fake.answer(name, CHAT)] * 5
    assert fetch.calls == [A] and fake.loads == [name]
    assert fake.adapters == {name: str(tmp_path / "shared" / name)}
    assert (tmp_path / "shared" / name / "adapter_model.safetensors").read_bytes() == b"weights"
    assert not [p for p in (tmp_path / "shared").iterdir() if p.name.startswith(".")]  # no temp folder left
    assert engine.adapters.pinned() == {}


async def test_a_chat_that_leaves_while_its_adapter_registers_does_not_stop_it_for_others(fake, engine):
    fake.load_delay_s = 0.4
    first = asyncio.create_task(answer(engine, A))
    await until(lambda: engine.adapters.pinned() == {A: 1})
    second = asyncio.create_task(answer(engine, A))
    await until(lambda: engine.adapters.pinned() == {A: 2})
    first.cancel()
    assert await second == fake.answer(served_name(A), CHAT)
    assert first.cancelled() and fake.loads == [served_name(A)] and engine.adapters.pinned() == {}


async def test_past_max_loras_the_least_recently_used_idle_adapter_is_unloaded(fake, tmp_path, fetch):
    """With room for 2: A answers slowly (in use) while B and C load; B is unloaded (A is older but
    pinned) and its folder deleted. Once A ends, D's load unloads A."""
    engine = make_engine(fake, tmp_path, fetch, vllm_max_loras=2)
    names = {ref: served_name(ref) for ref in (A, B, C, D)}
    shared = tmp_path / "shared"
    try:
        fake.token_delay_s = 0.05
        held = engine.astream_chat(CHAT, A)
        assert await anext(held)  # A is answering
        fake.token_delay_s = 0.0
        await answer(engine, B)
        await answer(engine, C)
        await engine.adapters.settle()
        assert engine.adapters.loaded() == [A, C] and engine.adapters.pinned() == {A: 1}
        assert set(fake.adapters) == {names[A], names[C]} and fake.unloads == [names[B]]
        assert sorted(p.name for p in shared.iterdir()) == [names[A], names[C]]
        await held.aclose()
        await answer(engine, D)
        await engine.adapters.settle()
        assert engine.adapters.loaded() == [C, D]
        assert fake.unloads == [names[B], names[A]] and set(fake.adapters) == {names[C], names[D]}
        assert sorted(p.name for p in shared.iterdir()) == [names[C], names[D]]
    finally:
        await engine.close()


async def test_after_a_vllm_restart_the_adapter_is_registered_again_and_answers(fake, engine, fetch):
    """vLLM lost its adapters: the chat's 404 registers the adapter again (from the folder already
    in place, no new fetch) and the chat is retried once."""
    name = served_name(A)
    await answer(engine, A)
    fake.restart()
    assert await answer(engine, A) == fake.answer(name, CHAT)
    assert fake.loads == [name, name] and fetch.calls == [A]
    assert [c["model"] for c in fake.chats] == [name, name, name]


async def test_a_restarted_doclora_adopts_the_adapters_vllm_still_has(fake, tmp_path, fetch):
    """A new engine (doclora restarted, vLLM didn't) counts vLLM's adapters from its folder as
    registered: the next chat loads nothing, and they stay forgettable."""
    first = make_engine(fake, tmp_path, fetch)
    await answer(first, A)
    await first.close()
    second = make_engine(fake, tmp_path, fetch)
    try:
        assert await answer(second) == fake.answer("base-model", CHAT)
        assert second.adapters.loaded() == [A]
        assert await answer(second, A) == fake.answer(served_name(A), CHAT)
        assert fake.loads == [served_name(A)]
    finally:
        await second.close()


async def test_an_unknown_adapter_is_not_found_and_registers_nothing(fake, engine):
    for ref in ("default/unknown-r1", "bad tenant/x", "default/../../etc"):
        with pytest.raises(NotFound):
            await answer(engine, ref)
    assert fake.loads == [] and engine.adapters.loaded() == []


async def test_an_adapter_folder_vllm_cannot_see_is_a_failed_precondition(fake, tmp_path, fetch):
    """DOCLORA_VLLM_ADAPTER_PATH naming a folder vLLM doesn't have: its 404 names the setting, and
    the next chat tries again."""
    engine = make_engine(fake, tmp_path, fetch, vllm_adapter_path="/nowhere")
    try:
        for _ in range(2):
            with pytest.raises(FailedPrecondition, match="DOCLORA_VLLM_ADAPTER_PATH"):
                await answer(engine, A)
        assert engine.adapters.loaded() == [] and fake.loads == []
    finally:
        await engine.close()


async def test_a_vllm_without_runtime_lora_updating_is_named(fake, engine):
    fake.runtime_lora = False
    with pytest.raises(Unavailable, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        await answer(engine, A)


async def test_forgetting_a_deleted_sessions_adapters_unregisters_them_from_vllm(fake, engine, tmp_path):
    """forget.py's `forget_session`, on its worker thread as the forget job runs it, evicts the
    session's adapters from vLLM and deletes their folders; another session's stay. An adapter
    in use is unregistered when its chat ends."""
    from services.inference.forget import forget_session

    mine, other = "default/s1-r1", "default/s2-r1"
    await answer(engine, mine)
    await answer(engine, other)
    gone = await asyncio.to_thread(forget_session, engine.adapters, tmp_path / "store-cache", "default", "s1")
    assert mine in gone and engine.adapters.loaded() == [other]
    assert set(fake.adapters) == {served_name(other)}
    assert not (tmp_path / "shared" / served_name(mine)).exists()

    fake.token_delay_s = 0.05
    held = engine.astream_chat(CHAT, other)
    assert await anext(held)
    assert await engine.forget(other) is True
    assert served_name(other) in fake.adapters  # still answering
    await held.aclose()
    await engine.adapters.settle()
    assert fake.adapters == {} and engine.adapters.loaded() == []
    assert await engine.forget(other) is False


# ---------------------------------------------------------------------------------------- errors


async def test_a_busy_vllm_is_too_many_requests_with_its_retry_after(fake, engine):
    fake.max_concurrent, fake.token_delay_s = 1, 0.05
    held = engine.astream_chat(CHAT)
    assert await anext(held)
    with pytest.raises(TooManyRequests) as caught:
        await answer(engine)
    assert caught.value.retry_after_s == fake.retry_after
    await held.aclose()


async def test_a_server_that_is_down_is_unavailable_naming_it(tmp_path, fetch):
    url = f"http://127.0.0.1:{free_port()}"
    engine = VllmEngine(Settings(inference_backend="vllm", vllm_url=url, state_dir=str(tmp_path)), fetch)
    try:
        with pytest.raises(Unavailable, match=f"the vLLM server at {url} is unavailable"):
            await answer(engine)
    finally:
        await engine.close()


async def test_a_prompt_too_long_is_invalid_with_vllms_message(fake, engine):
    long_chat = [{"role": "user", "content": "word " * 2100}]
    with pytest.raises(InvalidArgument, match="maximum context length is 2048 tokens"):
        await answer(engine, messages=long_chat)


async def test_an_error_in_the_stream_raises_after_the_pieces_before_it(fake, engine):
    fake.fail_after = 2
    got = []
    with pytest.raises(Unavailable, match="EngineCore encountered an issue"):
        async for piece in engine.astream_chat(CHAT):
            got.append(piece)
    assert got == ["base-model", " heard:"]


async def test_the_api_key_is_sent_and_a_wrong_one_is_named(tmp_path, fetch):
    server = FakeVllm(api_key="s3cret")
    good = make_engine(server, tmp_path, fetch, vllm_api_key="s3cret")
    bad = make_engine(server, tmp_path, fetch, vllm_api_key="wrong")
    try:
        assert await answer(good) == server.answer("base-model", CHAT)
        with pytest.raises(Unavailable, match="DOCLORA_VLLM_API_KEY"):
            await answer(bad)
    finally:
        await good.close()
        await bad.close()
        server.close()


def test_error_messages_are_read_from_every_shape_vllm_has_used():
    assert error_message({"error": {"message": "new", "code": 400}}) == "new"
    assert error_message({"object": "error", "message": "old", "code": 400}) == "old"
    assert error_message({"detail": "Not Found"}) == "Not Found"
    assert error_message({"error": "Unauthorized"}) == "Unauthorized"
    assert error_message("Internal Server Error") == "Internal Server Error"


# -------------------------------------------------------------------------------------- cancelling


async def test_closing_the_stream_early_aborts_the_request_on_the_server(fake, engine):
    """The consumer leaves after one piece: the HTTP stream closes at once, the server sees its
    client gone before the answer's end, the adapter is unpinned and the stats say cancelled."""
    fake.token_delay_s = 0.2
    stats = ChatStats()
    pieces = engine.astream_chat(CHAT, A, stats=stats)
    assert await anext(pieces) == served_name(A)
    await pieces.aclose()
    assert stats.finish_reason == "cancelled"
    await until(lambda: fake.aborted == [served_name(A)] and fake.active == 0, timeout_s=2)
    assert engine.adapters.pinned() == {}


async def test_setting_cancel_ends_the_answer_and_the_request(fake, engine):
    fake.token_delay_s = 0.05
    cancel, stats = threading.Event(), ChatStats()
    got = []
    async for piece in engine.astream_chat(CHAT, None, None, cancel, stats):
        got.append(piece)
        cancel.set()
    assert got == ["base-model"] and stats.finish_reason == "cancelled"
    await until(lambda: fake.aborted == ["base-model"])


# -------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"inference_backend": "gpu"}, "DOCLORA_INFERENCE_BACKEND='gpu': expected one of local, vllm"),
        ({"inference_backend": "vllm"}, "needs DOCLORA_VLLM_URL"),
        ({"inference_backend": "vllm", "vllm_url": "vllm:8000"}, "expected an http:// or https:// URL"),
        (
            {"inference_backend": "vllm", "vllm_url": "http://v", "vllm_max_loras": 0},
            "DOCLORA_VLLM_MAX_LORAS=0",
        ),
        (
            {"inference_backend": "vllm", "vllm_url": "http://v", "vllm_timeout_s": 0.0},
            "DOCLORA_VLLM_TIMEOUT_S",
        ),
    ],
)
async def test_bad_backend_settings_stop_the_service_at_start(changes, message):
    """`setup` refuses them before touching the store or loading any model."""
    from services.inference.__main__ import setup

    with pytest.raises(SettingsError, match=message):
        await setup(SimpleNamespace(settings=Settings(**changes)))


def test_the_default_backend_is_local_and_vllm_is_recognised_in_any_case():
    assert backend_of(Settings()) == "local"
    assert backend_of(Settings(inference_backend=" VLLM ", vllm_url="https://vllm:8000")) == "vllm"


# ------------------------------------------------------------------------------- through gRPC


async def test_a_bot_chats_through_the_inference_service_in_front_of_vllm(runtime, fake, tmp_path):
    """`python -m services.inference`'s setup with DOCLORA_INFERENCE_BACKEND=vllm, served over gRPC
    on real NATS and SeaweedFS: a bot's chat cites its passages, then streams its adapter's answer
    from vLLM (fetched from the store, copied, registered); deleting the session unregisters it."""
    from doclora.v1 import inference_pb2, inference_pb2_grpc
    from services.inference.__main__ import setup
    from services.ingest.deletion import delete_session
    from tests.fixtures.served import served
    from tests.test_deletion import make_session

    settings = runtime.settings.replace(
        inference_backend="vllm", vllm_url=fake.url + "/v1", state_dir=str(tmp_path / "state"),
        vllm_adapter_dir=str(tmp_path / "shared"), retrieval_embeddings=False, vllm_timeout_s=30.0,
    )  # fmt: skip
    rt = dataclasses.replace(runtime, settings=settings)
    rec = await make_session(rt, "default", docs=("d1",), rounds=1)
    name = served_name(f"default/{rec.adapter_id}")
    register, background = await setup(rt)
    stop = asyncio.Event()
    jobs = [asyncio.create_task(job(stop)) for job in background]
    try:
        async with served(rt, register, inference_pb2_grpc.InferenceServiceStub, auth="auto") as stub:
            request = inference_pb2.ChatRequest(
                bot_id=rec.session_id,
                messages=[inference_pb2.ChatMessage(role="user", content="what is chunk 1 of d1?")],
                mode=inference_pb2.ANSWER_MODE_BOTH,
            )
            replies = [r async for r in stub.Chat(request, timeout=30)]
        assert replies[0].citations and replies[0].citations[0].doc_id == "d1"
        text = "".join(r.delta for r in replies)
        # the quoted evidence first (evidence.py), then vLLM's words going on from it
        quoted = 'The document says: "chunk 1 of d1" [1] "chunk 0 of d1" [2]\n\n'
        assert text.startswith(quoted + f"{name} heard:") and "chunk 1 of d1" in text[len(quoted) :]
        assert fake.chats[-1]["continue_final_message"] is True
        last = replies[-1]
        assert last.finish_reason == inference_pb2.FINISH_REASON_STOP
        assert last.completion_tokens == len(text[len(quoted) :].split()) and last.prompt_tokens > 0
        assert fake.loads == [name] and (tmp_path / "shared" / name / "adapter_config.json").is_file()

        await delete_session(rt, rec.session_id)
        await until(lambda: name not in fake.adapters, timeout_s=10)
        assert not (tmp_path / "shared" / name).exists()
    finally:
        stop.set()
        for job in jobs:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(job, 10)


# ----------------------------------------------------------------------------- deploy/k8s/vllm

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"


def _objects(folder: Path) -> dict[tuple[str, str], dict]:
    import yaml

    objs = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            objs |= {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text()) if d}
    return objs


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_the_vllm_component_runs_a_pinned_vllm_with_runtime_lora_on_a_gpu_node():
    objs = _objects(K8S / "vllm")
    vllm = objs[("Deployment", "vllm")]
    spec = vllm["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", container["image"])
    args = " ".join(container["args"])
    for flag in ("--model=", "--enable-lora", "--max-loras=", "--max-lora-rank=64"):
        assert flag in args
    assert _env(container)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert vllm["spec"]["replicas"] == 1  # runtime-registered adapters live in one server
    assert objs[("Service", "vllm")]["spec"]["ports"][0]["port"] == 8000
    pvc = objs[("PersistentVolumeClaim", "vllm-adapters")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
    assert claims["adapters"] == "vllm-adapters" and mounts["adapters"] == "/adapters"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize)")
def test_the_vllm_component_turns_the_inference_deployment_into_a_vllm_client(tmp_path):
    """deploy/k8s with `components: [vllm]`, rendered by kustomize: the inference pods read valid
    vLLM settings, mount the adapters volume where DOCLORA_VLLM_ADAPTER_DIR says, need no GPU, and
    the new pods keep the namespace's restricted Pod Security settings."""
    import yaml

    base = tmp_path / "k8s"
    shutil.copytree(K8S, base)
    with (base / "kustomization.yaml").open("a") as f:
        f.write("components:\n  - vllm\n")
    out = subprocess.run(["kubectl", "kustomize", str(base)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    inference = objs[("Deployment", "inference")]["spec"]["template"]["spec"]
    (container,) = inference["containers"]
    config = objs[("ConfigMap", "doclora-config")]["data"]
    env = {**config, **_env(container)}
    settings = Settings(
        **{k.removeprefix("DOCLORA_").lower(): v for k, v in env.items() if k.startswith("DOCLORA_")}
    )
    assert backend_of(settings) == "vllm" and settings.vllm_url == "http://vllm:8000"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["adapters"] == settings.vllm_adapter_dir and "model-cache" not in mounts
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in inference["volumes"]}
    assert claims["adapters"] == "vllm-adapters" and "model-cache" not in claims
    resources = container["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]
    assert "nodeSelector" not in inference and "tolerations" not in inference
    for key in [("Deployment", "vllm"), ("Service", "vllm"), ("PersistentVolumeClaim", "vllm-adapters")]:
        assert objs[key]["metadata"]["namespace"] == "doclora"
    pod = objs[("Deployment", "vllm")]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]
    (vllm,) = pod["containers"]
    assert vllm["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert vllm["securityContext"]["allowPrivilegeEscalation"] is False
