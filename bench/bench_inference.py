"""Chat engine figures on the real default model: latency, decode speed, adapters, batching.

Everything runs in one process on the default base model (`load_base_model(Settings.from_env())`,
SmolLM2-135M-Instruct unless DOCLORA_BASE_MODEL says otherwise). Random-init LoRA adapters of
rank 8 on every linear layer, saved to a temp folder, stand in for trained ones. Run:

    .venv/bin/python bench/bench_inference.py [--tokens 64] [--threads N] [--chats 8] [--adapters 4]
        [--formats fp32,fp32-mkl,int8] [--device cuda --random-weights MODEL_DIR]

On a shared machine pass `--threads 1`: with more torch threads than idle cores, MKL's threaded
GEMMs stall on each other and the figures mean little.

It prints:
- time to first token (TTFT) and decode tokens/s of one chat through the engine, against plain
  transformers `generate` on the same prompt with the adapter merged (`merge_and_unload`);
- the memory-bandwidth limit: bytes of weights read per decoded token against a read bandwidth
  measured in the same run (summing a large tensor), as tokens/s;
- cold adapter load time: the first adapter (which wraps the base in PEFT under the model lock),
  then later ones split into the part prepared off the lock (read, PEFT on a meta skeleton) and
  the part under it (moving the LoRA modules in: the only pause running chats see), and memory
  added per cached adapter (its LoRA tensors, and RSS);
- decode through the model's own forward as well as the lean step of fastpath.py, to compare;
- aggregate decode tokens/s with `--chats` concurrent chats over `--adapters` adapters vs one chat,
  and how many of those answers are identical to the same chat run alone;
- all of it for each weight format: fp32 packed for oneDNN (the default on a CPU, packed.py), fp32
  with the model's own weights (MKL, `ChatEngine(pack=False)`) and int8 (`ChatEngine(int8=True)`).

On a GPU machine without the weights, `--device cuda --random-weights FOLDER` builds the model from
FOLDER's config.json and tokenizer with random bf16 weights: speed figures only.

End tokens are ignored in every run (the engine's and `generate`'s), so each one decodes exactly
`--tokens` tokens. The issue's targets: decode >= 2x `generate`, TTFT <= 1.1x, aggregate >= 4x.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from services.common.config import Settings  # noqa: E402
from services.common.model import load_base_model  # noqa: E402
from services.inference.engine import AdapterCache, ChatEngine, ChatStats, GenerationParams  # noqa: E402

CHAT = [
    {"role": "system", "content": "You answer questions about the employee handbook."},
    {"role": "user", "content": "What does the handbook say about working from home on Fridays?"},
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def best_of(runs: int, fn) -> float:
    return min(fn() for _ in range(runs))


def read_bandwidth(mib: int = 512, runs: int = 5, device: str = "cpu") -> float:
    """Bytes per second that summing a large fp32 tensor reads (memory-bound, all torch threads)."""
    x = torch.ones(mib * 2**20 // 4, device=device)
    float(x.sum())

    def once() -> float:
        started = time.perf_counter()
        float(x.sum())  # on a GPU, waits for the sum
        return time.perf_counter() - started

    return mib * 2**20 / best_of(runs, once)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter once (a tied embedding is read as the
    output head; its input use reads one row)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def make_adapters(model: torch.nn.Module, folder: Path, count: int) -> list[Path]:
    """`count` random rank-8 LoRA adapters on all linear layers of (a copy of the config of) `model`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    for i in range(count):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        peft = get_peft_model(skeleton, config)
        # the adapter's own weights are the only real tensors; give them values and save them alone
        state = {n: torch.randn(p.shape) * 0.02 for n, p in peft.named_parameters() if "lora_" in n}
        peft.load_state_dict(state, strict=False, assign=True)
        out = folder / f"adapter-{i}"
        peft.save_pretrained(out)
        dirs.append(out)
        skeleton = peft.unload()
    return dirs


def prompt_ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def bench_generate(model, ids: torch.Tensor, tokens: int, runs: int) -> tuple[float, float]:
    """(TTFT s, decode tokens/s) of transformers `generate`, greedy, end tokens ignored."""

    def timed(n: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, eos_token_id=None,
            )  # fmt: skip
        assert out.shape[1] - ids.shape[1] == n
        return time.perf_counter() - started

    timed(2)  # warm up
    ttft = best_of(runs, lambda: timed(1))
    total = best_of(runs, lambda: timed(tokens))
    return ttft, (tokens - 1) / (total - ttft)


def engine_chat(engine: ChatEngine, adapter: str | None, tokens: int) -> tuple[float, float, str]:
    """(TTFT s, decode tokens/s, text) of one chat through the engine."""
    stats, pieces = ChatStats(), []
    started = time.perf_counter()
    first = None
    for piece in engine.stream_chat(CHAT, adapter, GenerationParams(max_new_tokens=tokens), stats=stats):
        if first is None:
            first = time.perf_counter()
        pieces.append(piece)
    end = time.perf_counter()
    assert stats.completion_tokens == tokens, stats
    return first - started, (tokens - 1) / (end - first), "".join(pieces)


def bench_engine(engine: ChatEngine, adapter: str | None, tokens: int, runs: int) -> tuple[float, float, str]:
    """Best TTFT and decode rate of `runs` chats (after a short warm-up one), and the answer."""
    engine_chat(engine, adapter, 4)
    results = [engine_chat(engine, adapter, tokens) for _ in range(runs)]
    return min(r[0] for r in results), max(r[1] for r in results), results[0][2]


def bench_concurrent(
    engine: ChatEngine, adapters: list[str], chats: int, tokens: int
) -> tuple[float, list[str]]:
    """Aggregate decoded tokens/s of `chats` chats started together over `adapters`, and their answers."""
    done: list[int] = [0] * chats
    texts: list[str] = [""] * chats
    barrier = threading.Barrier(chats + 1)

    def chat(i: int) -> None:
        stats = ChatStats()
        barrier.wait()
        params = GenerationParams(max_new_tokens=tokens)
        texts[i] = "".join(engine.stream_chat(CHAT, adapters[i % len(adapters)], params, stats=stats))
        done[i] = stats.completion_tokens

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(chats)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    assert sum(done) == chats * tokens, done
    return sum(done) / wall, texts


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run_engine(args, model, tokenizer, folders: dict[str, Path], label: str, limit: float, gen) -> dict:
    """All engine figures for one weight format (FORMATS); prints them as it goes."""
    names = list(folders)
    cache = AdapterCache(folders.__getitem__, capacity=len(names))
    engine = ChatEngine(
        model, tokenizer, cache, args.device, max_batch=max(args.chats, 1), **FORMATS.get(label, {})
    )
    packed = (
        f"{engine.packed_bytes / 1e6:.0f} MB of oneDNN-packed weights"
        if engine.packed_bytes
        else "not packed"
    )
    print(f"[{label}] engine on {args.device}, {next(model.parameters()).dtype}, {packed}")
    engine.scheduler.eos_ids = frozenset()  # fixed-length answers, like min_new_tokens for generate
    try:
        # the first adapter wraps the base in PEFT (a load under the model lock, once per process)
        t0 = time.perf_counter()
        cache.unpin(cache.pin(names[0], folders[names[0]]))
        first = time.perf_counter() - t0
        stage, attach, sizes = [], [], []
        for name in names[1:]:
            gc.collect()
            before = rss_bytes()
            t0 = time.perf_counter()
            staged = cache.prefetch(name).result()  # loader thread: read + PEFT on a meta skeleton
            t1 = time.perf_counter()
            cache.unpin(cache.pin(name, staged))  # under the model lock: move the LoRA modules in
            stage.append(t1 - t0)
            attach.append(time.perf_counter() - t1)
            gc.collect()
            sizes.append(rss_bytes() - before)
        lora_bytes = cache.nbytes(names[1])
        print(f"[{label}] cold adapter load: first adapter (wraps the base in PEFT, under the lock) "
              f"{first * 1e3:.0f} ms; later ones {statistics.median(stage) * 1e3:.0f} ms prepared off the lock "
              f"+ {statistics.median(attach) * 1e3:.1f} ms under the lock (the only pause for running chats; "
              f"medians of {len(stage)}, local folder); memory per cached adapter {lora_bytes / 1e6:.1f} MB "
              f"of LoRA tensors, RSS +{statistics.median(sizes) / 1e6:.1f} MB (median)")  # fmt: skip

        ttft, tps, text = bench_engine(engine, names[1], args.tokens, args.runs)
        print(f"[{label}] one chat + adapter   TTFT {ttft * 1e3:6.1f} ms  decode {tps:6.1f} tokens/s  "
              f"= {tps / gen[1]:.2f}x generate, {tps / limit:.0%} of the fp32 bandwidth limit; "
              f"TTFT {ttft / gen[0]:.2f}x generate")  # fmt: skip
        cache.fast_decode = False  # the model's own forward for decode steps, to compare
        _, own_tps, _ = bench_engine(engine, names[1], args.tokens, args.runs)
        cache.fast_decode = True
        print(f"[{label}] one chat + adapter, decode through the model's own forward (not fastpath.py): "
              f"{own_tps:6.1f} tokens/s = {own_tps / gen[1]:.2f}x generate")  # fmt: skip
        b_ttft, b_tps, _ = bench_engine(engine, None, args.tokens, 1)
        print(f"[{label}] one chat, base only  TTFT {b_ttft * 1e3:6.1f} ms  decode {b_tps:6.1f} tokens/s")

        used = names[1 : 1 + args.adapters]
        alone = {a: engine_chat(engine, a, args.tokens) for a in used}
        one = max(r[1] for r in alone.values())
        agg, texts = bench_concurrent(engine, used, args.chats, args.tokens)
        same = sum(texts[i] == alone[used[i % len(used)]][2] for i in range(args.chats))
        print(f"[{label}] {args.chats} concurrent chats over {len(used)} adapters: {agg:6.1f} tokens/s "
              f"vs one chat {one:6.1f} = {agg / one:.2f}x; {same}/{args.chats} answers identical to the same "
              f"chat alone; largest batch {engine.scheduler.max_rows_seen}")  # fmt: skip
        return {"text": text, "tps": tps}
    finally:
        engine.close()


# --formats: the engine's weights. fp32 packs them for oneDNN on a CPU (services/inference/packed.py);
# fp32-mkl keeps the model's own (torch's default MKL matmuls); int8 quantizes them (int8.py).
FORMATS = {"fp32": {}, "fp32-mkl": {"pack": False}, "int8": {"int8": True}}


def random_model(folder: Path, device: str) -> tuple[torch.nn.Module, object]:
    """A random-init model of `folder`'s config (and its tokenizer), for a device whose machine has
    no copy of the weights; speed figures only, the text means nothing."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model = (
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype).to(device).eval()
    )
    return model, AutoTokenizer.from_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per chat")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--chats", type=int, default=8, help="concurrent chats for the aggregate figure")
    parser.add_argument("--adapters", type=int, default=4, help="adapters the concurrent chats use")
    parser.add_argument(
        "--runs", type=int, default=2, help="repeats of the single-chat figures; the best is kept"
    )
    parser.add_argument(
        "--formats",
        default="fp32,fp32-mkl,int8",
        help=f"weight formats to run the engine with: {', '.join(FORMATS)}",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (then the model's bf16 only)")
    parser.add_argument(
        "--random-weights", type=Path, metavar="MODEL_DIR",
        help="random-init model from this folder's config.json and tokenizer (a machine without the weights)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.device != "cpu":
        args.formats = "bf16"
    torch.set_num_threads(args.threads)
    settings = Settings.from_env()
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs")  # fmt: skip

    started = time.perf_counter()

    def load() -> tuple[torch.nn.Module, object]:
        if args.random_weights:
            return random_model(args.random_weights, args.device)
        return load_base_model(settings)

    model, tokenizer = load()
    print(f"base model {settings.base_model or 'smollm2'} loaded in {time.perf_counter() - started:.1f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, {next(model.parameters()).dtype}")  # fmt: skip
    ids = prompt_ids(tokenizer).to(args.device)
    tmp = tempfile.TemporaryDirectory(prefix="doclora-bench-")
    dirs = make_adapters(model, Path(tmp.name), max(args.adapters, 1) + 1)
    folders = {f"bot-{i}": d for i, d in enumerate(dirs)}

    bandwidth = read_bandwidth(device=args.device)
    per_token = weight_bytes_per_token(model)
    limit = bandwidth / per_token
    print(f"prompt {ids.shape[1]} tokens, {args.tokens} new tokens per chat")
    print(f"memory read bandwidth {bandwidth / 1e9:.2f} GB/s (sum of a 512 MiB fp32 tensor); weights read per "
          f"token {per_token / 1e6:.0f} MB -> limit {limit:.1f} tokens/s "
          f"(int8 layers: ~{per_token / 4e6:.0f} MB -> ~{4 * limit:.0f} tokens/s)")  # fmt: skip

    # plain generate on a second copy of the base, with the first adapter merged into it
    from peft import PeftModel

    merged, _ = load()
    merged = PeftModel.from_pretrained(merged, str(dirs[0])).merge_and_unload().eval()
    gen = bench_generate(merged, ids, args.tokens, args.runs)
    del merged
    gc.collect()
    print(f"generate, adapter merged   TTFT {gen[0] * 1e3:6.1f} ms  decode {gen[1]:6.1f} tokens/s")

    results = {}
    for fmt in args.formats.split(","):
        results[fmt] = run_engine(args, model, tokenizer, folders, fmt, limit, gen)
    for other in ("fp32-mkl", "int8"):
        if {"fp32", other} <= results.keys():
            a, b = results["fp32"]["text"], results[other]["text"]
            print(f"{other} vs fp32 greedy answer: first {common_prefix(a, b)} of {len(a)} characters agree")
            print(f"  fp32: {a[:160]!r}\n  {other}: {b[:160]!r}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
