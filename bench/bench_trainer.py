"""Training throughput of doclora's LoRA trainer against a plain Hugging Face `Trainer` + peft.

Same model (the configured default, loaded by `load_base_model`), same tokenized examples (built by
doclora's `build_examples`, answers-only labels), same LoRA settings (r 8, alpha 16, no dropout,
all linear layers but the head), same optimiser schedule (AdamW, lr 1e-3, 10% warmup, cosine),
batches of 4 examples. The baseline pads each batch to its longest example
(`DataCollatorForSeq2Seq`, padding="longest"); doclora packs the batch into one row and runs the prompt prefix the examples share once. Both fp32;
doclora's automatic precision is run too when it picks something else on this CPU.

Each trainer runs in its own process, so its peak RSS is its own. Printed per run: real (non-pad)
(data) tokens/s, the same per CPU-second (steadier on a shared machine), model FLOP utilisation against this machine's fp32 (and bf16 where used) torch matmul
peak measured in the same run, and peak RSS.

Model FLOPs per real token = 4 x (weights of every nn.Linear, output head included): 2 for the
forward pass and 2 for the input gradients of the backward pass (the base weights are frozen, so
no weight gradients); LoRA and attention-score FLOPs are left out (small at these lengths). The
same formula for both trainers, so their MFU ratio is their throughput ratio; doclora does less
actual work per data token (no padding, shared prefix run once, output head on answer tokens
only), which is the point.

    .venv/bin/python bench/bench_trainer.py [--steps 10] [--pairs 64] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4
LORA = {"rank": 8, "alpha": 16, "dropout": 0.0, "lr": 1e-3, "warmup_ratio": 0.1, "seed": 1234}

_WORDS = (
    "valve pressure gasket boiler ferry depot crate ledger orchard pump relay sensor cable hatch "
    "quarry mill harbour signal lantern winch bearing rotor filter tank bracket hinge beacon"
).split()


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """QA pairs shaped like extractive ones: short questions, answers of one to four sentences."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        subject = f"{rng.choice(_WORDS)} {rng.randint(10, 99)}"
        sentences = []
        for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
            sentences.append(f"The {subject} " + " ".join(words) + ".")
        pairs.append(
            {
                "pair_id": f"p{i}",
                "chunk_id": f"c{i // 2}",
                "question": f"What does the manual say about the {subject}?",
                "answer": " ".join(sentences),
            }
        )
    return pairs


def linear_weights(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_doclora(steps: int, n_pairs: int, precision: str) -> dict:
    from services.common.config import Settings
    from services.common.model import load_base_model
    from services.trainer.config import LoraTrainConfig
    from services.trainer.loop import train_lora

    model, tok = load_base_model(Settings.from_env(), for_training=True)
    weights = linear_weights(model)
    cfg = LoraTrainConfig(max_steps=steps, batch_size=BATCH, precision=precision, eval_generate=False, **LORA)
    with tempfile.TemporaryDirectory() as tmp:
        cpu = cpu_seconds()
        m = train_lora(model, tok, make_pairs(n_pairs), tmp, cfg)
        cpu = cpu_seconds() - cpu
    return {
        "tokens": m["tokens"],
        "computed_tokens": m["computed_tokens"],
        "cpu_s": cpu,
        "seconds": m["seconds"],
        "losses": m["losses"],
        "precision": m["precision"],
        "linear_weights": weights,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_hf(steps: int, n_pairs: int) -> dict:
    import math

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from services.common.config import Settings
    from services.common.model import load_base_model
    from services.trainer.adapter_io import linear_module_names
    from services.trainer.examples import build_examples

    model, tok = load_base_model(Settings.from_env(), for_training=True)
    weights = linear_weights(model)
    examples = build_examples(tok, make_pairs(n_pairs))
    data = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples]
    padder = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100, return_tensors="pt")
    counted = {"tokens": 0, "padded": 0}

    def collate(features):
        batch = padder(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        counted["padded"] += int(batch["attention_mask"].numel())
        return batch

    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=linear_module_names(model), bias="none", task_type="CAUSAL_LM",
        ),
    )
    losses: list[float] = []
    clock: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["start"] = time.monotonic()

        def on_train_end(self, args, state, control, **kw):
            clock["end"] = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LORA["lr"],
            lr_scheduler_type="cosine", warmup_steps=math.ceil(LORA["warmup_ratio"] * steps),
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
            seed=LORA["seed"], use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=peft_model, args=args, train_dataset=data, data_collator=collate,
                          callbacks=[Timer()])
        torch.manual_seed(LORA["seed"])
        cpu = cpu_seconds()
        trainer.train()
        cpu = cpu_seconds() - cpu
    return {
        "tokens": counted["tokens"],
        "cpu_s": cpu,
        "padded_tokens": counted["padded"],
        "seconds": clock["end"] - clock["start"],
        "losses": losses,
        "precision": "fp32",
        "linear_weights": weights,
        "peak_rss_mb": peak_rss_mb(),
    }


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 8) -> float:
    """Best FLOP/s of an n x n x n torch matmul over `reps` tries."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)  # warm up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def child(mode: str, steps: int, n_pairs: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if mode == "hf":
        result = run_hf(steps, n_pairs)
    else:
        result = run_doclora(steps, n_pairs, mode.removeprefix("doclora-"))
    print("RESULT " + json.dumps(result), flush=True)


def spawn(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--pairs", str(args.pairs),
           "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = time.monotonic() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", default="")
    parser.add_argument("--bf16", action="store_true",
                        help="also train with bf16 autocast even where the CPU has no native bf16 (slow), "
                             "to compare its loss curve with fp32")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.pairs, args.threads)
        return

    import torch

    from services.trainer.config import autocast_dtype, cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    auto_bf16 = autocast_dtype("auto", torch.device("cpu")) is not None
    print(f"{args.steps} steps of {BATCH} examples from {args.pairs} pairs, {args.threads} threads; "
          f"native bf16 on this CPU: {cpu_has_native_bf16()}")
    runs = {"hf-trainer padded fp32": spawn("hf", args), "doclora packed fp32": spawn("doclora-fp32", args)}
    if auto_bf16:
        runs["doclora packed auto (bf16)"] = spawn("doclora-auto", args)
    elif args.bf16:
        runs["doclora packed bf16"] = spawn("doclora-bf16", args)
    peaks = {"fp32": matmul_peak("float32")}
    if auto_bf16 or args.bf16:
        peaks["bf16"] = matmul_peak("bfloat16")

    base = runs["hf-trainer padded fp32"]
    print("\nmatmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    hf_pad = base["padded_tokens"]
    print(f"baseline padding: {hf_pad - base['tokens']} of {hf_pad} tokens ({1 - base['tokens'] / hf_pad:.0%}) were pad")
    print(f"\n{'run':<28} {'tokens/s':>9} {'speed-up':>9} {'MFU':>6} {'peak RSS':>9} {'tokens':>7} {'s':>6} "
          f"{'tok/cpu-s':>9}")
    for name, r in runs.items():
        tps = r["tokens"] / r["seconds"]
        peak = peaks["bf16"] if "bf16" in name else peaks["fp32"]
        mfu = tps * 4 * r["linear_weights"] / peak
        speedup = tps / (base["tokens"] / base["seconds"])
        print(f"{name:<28} {tps:9.0f} {speedup:8.2f}x {mfu:6.1%} {r['peak_rss_mb']:7.0f}MB {r['tokens']:7d} "
              f"{r['seconds']:6.1f} {r['tokens'] / r['cpu_s']:9.1f}")
    for name, r in runs.items():
        if "computed_tokens" in r:
            print(f"{name}: ran {r['computed_tokens']} tokens for {r['tokens']} data tokens (shared prompt prefix)")
    print("\nloss per step (the baseline sees another example order, so only its trend compares):")
    for name, r in runs.items():
        print(f"  {name:<28} " + " ".join(f"{x:.2f}" for x in r["losses"]))
    fp32 = runs["doclora packed fp32"]["losses"]
    for name, r in runs.items():
        if "bf16" in name:  # same data, same order: the curves compare step by step
            gap = max(abs(a - b) for a, b in zip(fp32, r["losses"], strict=False))
            print(f"  largest |fp32 - bf16| loss gap over the steps: {gap:.3f} (fp32 loss {fp32[0]:.2f} -> {fp32[-1]:.2f})")


if __name__ == "__main__":
    main()
