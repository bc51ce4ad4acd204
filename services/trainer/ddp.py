"""One training job over several processes (GPUs) with torch distributed data parallel.

    torchrun --standalone --nproc-per-node 4 -m services.trainer.ddp \
        --pairs pairs.jsonl --out adapter/ [--base-model ID_OR_PATH] [--max-steps N] ...

Every process loads the base model on its own device (CUDA: `cuda:{LOCAL_RANK}`, backend NCCL;
CPU: backend gloo) and runs `lora.train_lora` on the same pairs: each step's batch is
`--batch-size` examples per process, the gradients are all-reduced, and rank 0 evaluates the
held-out pairs and writes the PEFT folder and metrics.json to `--out`. Without torchrun it runs as
one process. Settings not given as flags come from the `DOCLORA_*` environment, as in the service.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("services.trainer.ddp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.trainer.ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", required=True, type=Path, help="QA pairs: JSON lines with question and answer, or an OpenAI/Alpaca/ShareGPT export")
    p.add_argument("--out", required=True, type=Path, help="folder for the adapter (written by rank 0)")
    p.add_argument("--eval-pairs", type=Path, help="held-out pairs; default: the pairs marked split=eval")
    p.add_argument("--base-model", help="HF id or local folder (default: DOCLORA_BASE_MODEL)")
    p.add_argument("--init-adapter", type=Path, help="a PEFT LoRA folder to continue training from")
    p.add_argument("--max-steps", type=int, help="exact number of steps (default: from epochs and data)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, help="examples per process per step (default 4)")
    p.add_argument("--lr", type=float)
    p.add_argument("--rank", type=int, help="LoRA rank (default: scaled to the data)")
    p.add_argument("--alpha", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--system-prompt")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"))
    p.add_argument("--no-eval", action="store_true", help="skip the base vs adapter answer evaluation")
    return p.parse_args(argv)


def _read_jsonl(path: Path) -> list[dict]:
    """Pairs as stored by doclora (`question`/`answer`), or an export in the OpenAI, Alpaca or
    ShareGPT format (`doclora qa SID --export openai`)."""
    text = path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if rows and all("question" in r and "answer" in r for r in rows):
        return rows
    from services.qagen.formats import import_jsonl

    return [p.to_dict() for p in import_jsonl(text)]


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as dist

    from services.common.config import Settings
    from services.trainer.lora import LoraTrainConfig, read_adapter, train_lora
    from services.trainer.quant import load_training_model
    from services.trainer.worker import split_for_eval

    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    settings = Settings.from_env()
    if args.base_model:
        settings = dataclasses.replace(settings, base_model=args.base_model)
    cuda = torch.cuda.is_available() and settings.device.strip().lower() != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
        settings = dataclasses.replace(settings, device=f"cuda:{local_rank}")
    else:
        settings = dataclasses.replace(settings, device="cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        pairs = _read_jsonl(args.pairs)
        if args.eval_pairs:
            train_pairs, eval_pairs = pairs, _read_jsonl(args.eval_pairs)
        else:
            train_pairs, eval_pairs = split_for_eval(pairs, settings.train_seed)
        flags = {
            "max_steps": args.max_steps,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "rank": args.rank,
            "alpha": args.alpha,
            "dropout": args.dropout,
            "max_seq_len": args.max_seq_len,
            "seed": args.seed,
            "system_prompt": args.system_prompt,
            "precision": args.precision,
            "gradient_checkpointing": args.gradient_checkpointing,
        }
        overrides = {k: v for k, v in flags.items() if v is not None}
        if args.no_eval:
            overrides["eval_generate"] = False
        cfg = LoraTrainConfig.from_settings(settings, **overrides)
        model, tokenizer = load_training_model(settings)
        init = read_adapter(args.init_adapter) if args.init_adapter else None

        def progress(p: dict) -> None:
            log.info(
                "step %d/%d loss %.4f lr %.2e %.0f tokens/s",
                p["step"],
                p["total_steps"],
                p["loss"],
                p["lr"],
                p["tokens_per_s"],
            )

        metrics = train_lora(
            model,
            tokenizer,
            train_pairs,
            args.out,
            cfg,
            progress=progress,
            eval_pairs=eval_pairs or None,
            init_adapter=init,
        )
        if rank == 0:
            log.info(
                "adapter in %s: %d steps on %d processes, loss %.4f -> %.4f",
                args.out,
                metrics["steps"],
                world,
                metrics["losses"][0],
                metrics["losses"][-1],
            )
    finally:
        # rank 0 may still be evaluating: no collective is left, so the others need not wait
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
