"""Downloading a session's adapter (services/trainer/export.py) on a real nats-server and SeaweedFS:
an adapter the train stage stored comes out as a zip that `peft.PeftModel.from_pretrained` loads
onto the base model, with the stored weights, its metrics.json and a model card naming the base
model, the LoRA shape, the training figures, the session and its documents; over a real
TrainerService with API keys the zip comes in chunks (the first names the file), another tenant's
session and a session without an adapter are NOT_FOUND."""

from __future__ import annotations

import io
import json
import zipfile

import grpc
import pytest
import torch

from doclora.v1 import events_pb2, session_pb2, trainer_pb2, trainer_pb2_grpc
from services.common import keys
from services.common.errors import NotFound
from services.common.jsonl import to_jsonl
from services.trainer.export import export_adapter, slug
from services.trainer.service import TrainerServicer
from tests.fixtures.served import served
from tests.test_deletion import TENANT_A, TENANT_B, add_key, as_caller, bearer, train_rt  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
S = session_pb2.SessionState
PAIRS = [
    {"pair_id": f"p{i}", "chunk_id": f"c{i // 2}", "doc_id": "d1", "question": f"What is the code of crate {i}?",
     "answer": f"Crate {i} has the code {1000 + 37 * i}."}
    for i in range(8)
]  # fmt: skip


async def unzip(rt, sid: str, folder) -> tuple[str, dict[str, bytes]]:
    """Export the session's adapter, unzip it into `folder`; (file name, {member: bytes})."""
    names, data = [], b""
    async for name, chunk in export_adapter(rt, sid):
        names.append(name)
        data += chunk
    assert names[0] and not any(names[1:])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.extractall(folder)
        return names[0], {n: zf.read(n) for n in zf.namelist()}


async def test_an_exported_adapter_loads_with_peft_and_its_card_names_the_base_model(train_rt, tmp_path):  # noqa: F811
    """The train stage trains 4 steps on tenant a's pairs; the export unzips into a folder that
    PeftModel.from_pretrained loads onto the tiny base with the stored weights; the card says the
    base model, rank and targets, the steps and losses, the bot's and documents' names, and how to
    load it."""
    from peft import PeftModel
    from safetensors.torch import load as load_safetensors

    from services.trainer import worker
    from tests.test_model import real_tokenizer, tiny_llama

    rt = train_rt
    sid = keys.new_id()
    rt.store.put_bytes(keys.qa_pairs(TENANT_A, sid), to_jsonl(PAIRS))
    await rt.sessions.create(
        session_pb2.Session(
            session_id=sid, tenant=TENANT_A, name="Crate codes (2026)", state=S.SESSION_STATE_TRAINING,
            options=session_pb2.SessionOptions(max_steps=4, lora_rank=4),
            documents=[session_pb2.DocumentInfo(doc_id="d1", name="crates.pdf", pages=3,
                                                status=session_pb2.DOCUMENT_STATUS_READY)],
        )
    )  # fmt: skip
    rec = await rt.sessions.get(sid)
    item = events_pb2.WorkItem(session_id=sid, tenant=TENANT_A, stage=session_pb2.STAGE_TRAIN)
    await worker.train_session(rt, item, rec)
    as_caller(TENANT_A)
    rec = await rt.sessions.get(sid)
    assert rec.state == S.SESSION_STATE_READY and rec.adapter_id == sid

    filename, members = await unzip(rt, sid, tmp_path / "adapter")
    assert filename == f"crate-codes-2026-{sid}.zip"
    assert sorted(members) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
    ]
    stored = load_safetensors(
        rt.store.get_bytes(keys.adapter_prefix(TENANT_A, sid) + "adapter_model.safetensors")
    )
    model = PeftModel.from_pretrained(tiny_llama(len(real_tokenizer())), tmp_path / "adapter")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(stored) > 0
    for key, tensor in stored.items():
        match = [
            v
            for k, v in loaded.items()
            if k.replace(".default", "").endswith(key.removeprefix("base_model.model."))
        ]
        assert len(match) == 1 and torch.equal(match[0], tensor), key

    card = members["README.md"].decode()
    config = json.loads(members["adapter_config.json"])
    metrics = json.loads(members["metrics.json"])
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "`smollm2`" in card
    assert f"- rank (r): {config['r']}" in card and config["r"] == 4
    assert ", ".join(sorted(config["target_modules"])) in card
    assert f"- steps: {metrics['steps']} of {metrics['total_steps']}" in card and metrics["steps"] == 4
    assert "at the first step" in card and "| eval_" in card
    assert "# Crate codes (2026)" in card and "- crates.pdf (3 pages)" in card
    assert 'PeftModel.from_pretrained(base, "path/to/this/folder")' in card


def trainer_stub(rt):
    """A real TrainerService on a port behind the auth interceptor (API keys required)."""

    def register(server):
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(rt), server)
        return ["doclora.v1.TrainerService"]

    return served(rt, register, trainer_pb2_grpc.TrainerServiceStub)


async def test_export_over_grpc_streams_chunks_and_hides_other_tenants(runtime, tmp_path, monkeypatch):
    """Tenant a's key downloads the zip in chunks named in the first; tenant b's key gets NOT_FOUND
    for the same session; a session without an adapter is NOT_FOUND."""
    from peft import LoraConfig, get_peft_model

    from services.trainer import export
    from tests.test_model import tiny_llama

    rt = runtime
    sid, bare = keys.new_id(), keys.new_id()
    folder = tmp_path / "peft"
    get_peft_model(tiny_llama(128), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    (folder / "metrics.json").write_text(
        json.dumps({"steps": 3, "total_steps": 3, "losses": [2.0, 1.5, 1.0]})
    )
    rt.store.upload_dir(keys.adapter_prefix(TENANT_A, sid), folder)
    for s, adapter in ((sid, sid), (bare, "")):
        await rt.sessions.create(
            session_pb2.Session(
                session_id=s, tenant=TENANT_A, name="Tiny", state=S.SESSION_STATE_READY, adapter_id=adapter
            )
        )
    key_a, key_b = await add_key(rt.bus, TENANT_A), await add_key(rt.bus, TENANT_B)
    monkeypatch.setattr(export, "CHUNK", 512)  # several chunks for a tiny adapter
    async with trainer_stub(rt) as stub:
        replies = [
            r async for r in stub.ExportAdapter(
                trainer_pb2.ExportAdapterRequest(session_id=sid), metadata=bearer(key_a), timeout=30
            )
        ]  # fmt: skip
        for session_id, key in ((sid, key_b), (bare, key_a)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.ExportAdapter(
                    trainer_pb2.ExportAdapterRequest(session_id=session_id), metadata=bearer(key), timeout=30
                ):
                    pass
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(replies) > 1 and replies[0].filename == f"tiny-{sid}.zip"
    assert not any(r.filename for r in replies[1:])
    with zipfile.ZipFile(io.BytesIO(b"".join(r.chunk for r in replies))) as zf:
        assert "adapter_model.safetensors" in zf.namelist()
        assert "- loss: 2 at the first step, 1 at the last" in zf.read("README.md").decode()
    as_caller(TENANT_B)
    with pytest.raises(NotFound):
        await anext(export_adapter(rt, sid))


def test_a_bot_name_becomes_a_safe_file_name():
    """Lower-case words joined by '-', "bot" when nothing is left."""
    assert slug("Orchard notes (v2)!") == "orchard-notes-v2"
    assert slug("../../etc/passwd") == "etc-passwd"
    assert slug("???") == "bot"
