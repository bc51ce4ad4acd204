"""A session's adapter as a download: a zip of its PEFT folder (adapter_config.json and
adapter_model.safetensors, what `PeftModel.from_pretrained` loads), its metrics.json, and a model
card (README.md) naming the base model, the LoRA shape, the training figures, the session and its
documents, and how to load it.

The zip is built in a temporary file on a thread and sent in chunks, so memory stays flat whatever
the adapter's size."""

from __future__ import annotations

import json
import re
import tempfile
import zipfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from doclora.v1 import session_pb2
from services.common import keys
from services.common.errors import NotFound
from services.common.model import BUNDLED_DIR, BUNDLED_GGUF, BUNDLED_NAME
from services.common.runtime import Runtime

CHUNK = 1024 * 1024
# the files of the adapter folder that go into the zip (doclora.json is the service's own)
ZIPPED = ("adapter_config.json", "adapter_model.safetensors", "metrics.json")
# the Hugging Face model the bundled base model was converted from
BUNDLED_HF_ID = f"HuggingFaceTB/{BUNDLED_DIR}"


def slug(name: str) -> str:
    """A file-name-safe form of a bot's name: "Orchard notes (v2)" -> "orchard-notes-v2"."""
    return "-".join(re.findall(r"[a-z0-9]+", name.lower()))[:60].strip("-") or "bot"


def export_filename(rec: session_pb2.Session) -> str:
    return f"{slug(rec.name)}-{rec.adapter_id}.zip"


def _base_model_lines(base: str) -> tuple[str, list[str]]:
    """(the id to load the base model by, lines describing it)."""
    if base in ("", BUNDLED_NAME):
        return BUNDLED_HF_ID, [
            f"`{BUNDLED_HF_ID}`: doclora's bundled base model (`{BUNDLED_NAME}`), trained from its "
            f"GGUF build `{BUNDLED_GGUF}` dequantized to fp32. The Hugging Face weights are the "
            "same model before quantization, so answers may differ slightly from doclora's.",
        ]
    return base, [f"`{base}`"]


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(
    rec: session_pb2.Session, config: Mapping[str, Any], metrics: Mapping[str, Any], meta: Mapping[str, Any]
) -> str:
    """The README.md of an exported adapter (a Hugging Face model card, with its YAML header)."""
    base_id, base_lines = _base_model_lines(str(meta.get("base_model") or ""))
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    losses = metrics.get("losses") or []
    lines = [
        "---",
        f"base_model: {base_id}",
        "library_name: peft",
        "tags: [lora, peft, doclora]",
        "---",
        "",
        f"# {rec.name or rec.session_id}",
        "",
        f'A LoRA adapter trained by doclora on the documents of the session "{rec.name}" '
        f"(`{rec.session_id}`), adapter `{rec.adapter_id}`"
        + (f", round {meta['round']}" if meta.get("round") else "")
        + ".",
        "",
        "## Base model",
        "",
        *base_lines,
        "",
        "## LoRA",
        "",
        f"- rank (r): {config.get('r')}",
        f"- alpha: {config.get('lora_alpha')}",
        f"- dropout: {config.get('lora_dropout')}",
        f"- target modules: {', '.join(targets) or 'unknown'}",
        f"- trainable parameters: {metrics.get('trainable_params', 'unknown')}",
        "",
        "## Training",
        "",
        f"- steps: {metrics.get('steps', rec.train.steps)} of {metrics.get('total_steps', rec.train.total_steps)}"
        + (f", {_figure(metrics['epochs'])} epochs" if "epochs" in metrics else ""),
        f"- examples: {metrics.get('examples', 'unknown')}, tokens: {metrics.get('tokens', rec.train.tokens)}",
    ]
    if losses:
        lines.append(f"- loss: {_figure(losses[0])} at the first step, {_figure(losses[-1])} at the last")
    if "final_epoch_loss" in metrics:
        lines.append(f"- mean loss of the last epoch: {_figure(metrics['final_epoch_loss'])}")
    lines += [
        f"- seconds: {_figure(metrics.get('seconds', rec.train.seconds))}",
        f"- device: {metrics.get('device', rec.train.device)}, precision: {metrics.get('precision', rec.train.precision)}",
    ]
    if meta.get("started_from"):
        lines.append(f"- continued from the adapter `{meta['started_from']}`")
    evals = {k: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    if evals or rec.qa.pairs:
        lines += ["", "## Evaluation", ""]
        if rec.qa.pairs:
            lines.append(
                f"Trained on the session's {rec.qa.pairs} question-answer pairs "
                f"({rec.qa.eval_pairs} held out for evaluation, {rec.qa.exam_pairs} kept for the exam)."
            )
            lines.append("")
        if evals:
            lines += ["| figure | value |", "| --- | --- |"]
            lines += [f"| {k} | {_figure(v)} |" for k, v in sorted(evals.items())]
            lines += [
                "",
                "`eval_*_f1` / `eval_*_em`: token-F1 / exact match of greedy answers against the pairs' "
                "answers, base model alone and base + adapter; `eval_exam_*`: reworded questions of "
                "trained facts (`exam_passages`: with retrieved passages); `eval_loss`: loss on the "
                "held-out pairs.",
            ]
    lines += ["", "## Documents", ""]
    lines += [f"- {d.name}" + (f" ({d.pages} pages)" if d.pages else "") for d in rec.documents] or [
        "- (none)"
    ]
    system = rec.options.system_prompt
    lines += [
        "",
        "## How to load it",
        "",
        "Unzip this file into a folder, then:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{base_id}")',
        f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
        "",
        "It answers in the base model's chat template"
        + (f", with the system prompt it was trained with: {json.dumps(system)}" if system else "")
        + ". `metrics.json` holds every figure of the run.",
        "",
    ]
    return "\n".join(lines)


def _build_zip(store, rec: session_pb2.Session, folder: Path) -> Path:
    """Blocking: download the adapter into `folder` and zip it with its model card; the zip's path."""
    prefix = keys.adapter_prefix(rec.tenant, rec.adapter_id)
    src = folder / "adapter"
    store.download_dir(prefix, src)
    if not (src / "adapter_config.json").is_file() or not (src / "adapter_model.safetensors").is_file():
        raise NotFound(f"the adapter of session {rec.session_id} is not in the store")
    config = json.loads((src / "adapter_config.json").read_text())
    metrics = json.loads((src / "metrics.json").read_text()) if (src / "metrics.json").is_file() else {}
    meta = json.loads((src / "doclora.json").read_text()) if (src / "doclora.json").is_file() else {}
    out = folder / "export.zip"
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ZIPPED:
            if (src / name).is_file():
                zf.write(src / name, name)
        zf.writestr("README.md", model_card(rec, config, metrics, meta))
    return out


async def export_adapter(rt: Runtime, sid: str) -> AsyncIterator[tuple[str, bytes]]:
    """(file name, chunk) pairs of the zip of the session's current adapter, the name in the first
    only. NOT_FOUND for an unknown session, another tenant's, or one without an adapter."""
    rec = await rt.sessions.get(sid)
    if not rec.adapter_id or not keys.is_valid_id(rec.adapter_id):
        raise NotFound(f"session {rec.session_id} has no adapter yet")
    with tempfile.TemporaryDirectory(prefix="doclora-export-") as tmp:
        path = await rt.io(_build_zip, rt.store, rec, Path(tmp))
        name = export_filename(rec)
        with open(path, "rb") as f:
            while chunk := await rt.io(f.read, CHUNK):
                yield name, chunk
                name = ""
