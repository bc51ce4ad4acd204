"""Chat speed through the public API with retrieval, and the engine's first token by prompt length.

Part 1 starts the whole stack here (bench/knowledge/stack.py `LocalStack`: `doclora up --detach`
on free ports, default settings, so the default model SmolLM2-135M-Instruct) and gives it one
evaluation document (bench/knowledge/docs/<doc>/, `policy` by default: a Markdown upload) as one
bot, trained for the fewest steps the API allows (`max_steps` 1: a session only chats once READY,
and training time is not what is measured here), with no exam after training
(`DOCLORA_QAGEN_EXAM_PAIRS=0`; every other setting is the default). The bot answers in the default
answer mode, retrieval: the base model reading the top passages of the document, so prompts are
~600-900 tokens.
Every hand-written question of the document (all splits) is then asked, streamed, greedy, with
`--max-tokens` new tokens, by 1, 4 and 8 users at once (`--users`), each user asking back to back
for `--rounds` rounds (default: about 20 answers per level). Part 2 stops the stack and loads the
model in this process (`load_base_model`, `AdapterCache`, `ChatEngine`, as bench/bench_inference.py
does) to time the first token of prompts of 128 / 512 / 1024 tokens. Run:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_chat_api.py [--doc policy] [--users 1,4,8]
        [--rounds N] [--max-tokens 64] [--api v1|rest] [--threads N] [--no-api] [--no-engine]
        [--json PATH]

The whole run takes 7-8 minutes on 2 CPU cores (a bot READY in 15-45 s of it). It prints:
- setup: the stack's start time, and the bot's time from creation to READY (upload, ingest, QA
  generation, one training step, its evaluation); neither is part of the chat figures;
- the first answer of the bot (cold: its passage index is built and the embedder loaded), apart;
- per number of users: mean and p90 time to first token (request sent -> first chunk carrying
  text; with `--api rest`, the first `delta` event, not the `citations` one before it), mean and
  p90 answer time (request sent -> stream ended), aggregate tokens/s (completion tokens of every
  answer of the level / the level's wall time), and the mean prompt tokens the engine reports
  (`usage.prompt_tokens` of the OpenAI-compatible stream with `stream_options.include_usage`; the
  REST chat does not report it). `--api v1` (default) asks `POST /v1/chat/completions`, `--api
  rest` `POST /api/v1/bots/{id}/chat`; both answer through the same inference service;
- the issue's targets: one user, first token <= 1 s (mean); 4 users, answer time <= 8 s (mean);
- engine TTFT by prompt length: the question with document text as one passage (the shape of a
  retrieval prompt), padded to 128 / 512 / 1024 tokens counted with the chat template applied,
  best of 3, through `ChatEngine.stream_chat` (time to its first piece) and through transformers
  `generate` (one new token) on the same prompt ids, and their ratio.

The machine's load average is printed before and after: on a shared machine the figures are slower
than on an idle one. `--threads` sets torch threads for part 2 only (the stack's services choose
their own).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.knowledge.run import give, load_docs  # noqa: E402
from bench.knowledge.stack import Api, LocalStack  # noqa: E402
from services.common.passages import Hit, Passage, with_passages  # noqa: E402
from services.stack.client import _sse  # noqa: E402

DOCS = Path(__file__).resolve().parent / "knowledge" / "docs"
TARGET_FIRST_TOKEN_S = 1.0  # one user, mean
TARGET_ANSWER_S = 8.0  # four users, mean
ANSWERS_PER_LEVEL = 20
ENGINE_LENGTHS = (128, 512, 1024)


@dataclass
class Answer:
    """One streamed answer as the client saw it."""

    first_token_s: float
    seconds: float
    tokens: int
    prompt_tokens: int | None  # None: the API did not say


# ---------------------------------------------------------------- the figures


def p90(values: Sequence[float]) -> float:
    """The 90th percentile by nearest rank (the largest value for fewer than 10)."""
    if not values:
        raise ValueError("p90 of no values")
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def summarize(answers: Sequence[Answer], wall_s: float) -> dict:
    """The level's figures: first token and answer time (mean, p90), aggregate tokens/s, prompt size."""
    if not answers:
        raise ValueError("no answers to summarize")
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    first = [a.first_token_s for a in answers]
    total = [a.seconds for a in answers]
    prompts = [a.prompt_tokens for a in answers if a.prompt_tokens is not None]
    return {
        "answers": len(answers),
        "first_token_mean_s": statistics.fmean(first),
        "first_token_p90_s": p90(first),
        "answer_mean_s": statistics.fmean(total),
        "answer_p90_s": p90(total),
        "tokens_per_s": sum(a.tokens for a in answers) / wall_s,
        "tokens_mean": statistics.fmean(a.tokens for a in answers),
        "prompt_tokens_mean": statistics.fmean(prompts) if prompts else None,
        "prompt_tokens_range": [min(prompts), max(prompts)] if prompts else None,
        "wall_s": wall_s,
    }


def targets(levels: dict[int, dict]) -> list[tuple[str, float | None, float, bool | None]]:
    """(what, measured, target, met) of the issue's two targets; None where the level was not run."""
    out = []
    for what, users, key, target in (
        ("1 user: first token, mean", 1, "first_token_mean_s", TARGET_FIRST_TOKEN_S),
        ("4 users: answer time, mean", 4, "answer_mean_s", TARGET_ANSWER_S),
    ):
        got = levels[users][key] if users in levels else None
        out.append((what, got, target, None if got is None else got <= target))
    return out


# ---------------------------------------------------------------- part 1: through the API


def ask_v1(c: httpx.Client, bot: str, question: str, max_tokens: int) -> Answer:
    """A streamed greedy answer from the OpenAI-compatible endpoint, with its usage."""
    body = {
        "model": bot,
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "seed": 0,
        "max_tokens": max_tokens,
    }
    started, first, usage = time.perf_counter(), None, None
    with c.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"/v1/chat/completions: {resp.status_code} {resp.read().decode()}")
        # the stream ends `data: [DONE]` (not JSON) right after the usage chunk: stop at that one
        for _, chunk in _sse(resp):
            if "error" in chunk:
                raise RuntimeError(f"/v1/chat/completions failed midway: {chunk['error']}")
            choices = chunk.get("choices") or []
            if first is None and choices and choices[0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
                break
    end = time.perf_counter()
    if usage is None:
        raise RuntimeError("/v1/chat/completions: the stream ended without its usage chunk")
    return Answer((first or end) - started, end - started, usage["completion_tokens"], usage["prompt_tokens"])


def ask_rest(c: httpx.Client, bot: str, question: str, max_tokens: int) -> Answer:
    """A streamed greedy answer from the bot chat route (`citations`, `delta`..., `done`)."""
    body = {
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "temperature": 0.0,
        "seed": 0,
        "max_tokens": max_tokens,
    }
    started, first, done = time.perf_counter(), None, None
    with c.stream("POST", f"/api/v1/bots/{bot}/chat", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"/api/v1/bots/{bot}/chat: {resp.status_code} {resp.read().decode()}")
        for event, data in _sse(resp):
            if event == "error":
                raise RuntimeError(f"/api/v1/bots/{bot}/chat failed midway: {data['error']}")
            if event == "delta" and first is None and data["delta"]:
                first = time.perf_counter()
            elif event == "done":
                done = data
    end = time.perf_counter()
    if done is None:
        raise RuntimeError(f"/api/v1/bots/{bot}/chat: the stream ended without its done event")
    return Answer((first or end) - started, end - started, done["completion_tokens"], None)


ASKERS = {"v1": ask_v1, "rest": ask_rest}


def run_level(
    url: str, bot: str, questions: Sequence[str], users: int, rounds: int, ask: Callable, max_tokens: int
) -> tuple[list[Answer], float]:
    """`users` clients started together, each asking `rounds` questions back to back (user u asks
    question u + r * users of round r, so a level asks distinct questions while they last); the
    answers and the level's wall time. The first error of any user is raised."""
    answers: list[Answer] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(users + 1)

    def user(u: int) -> None:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, read=600.0)) as c:
            barrier.wait()
            try:
                for r in range(rounds):
                    got = ask(c, bot, questions[(u + r * users) % len(questions)], max_tokens)
                    with lock:
                        answers.append(got)
            except Exception as exc:  # noqa: BLE001 - raised in the main thread below
                errors.append(exc)

    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(users)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return answers, wall


def make_bot(api: Api, doc: str, max_steps: int, ready_timeout: float) -> tuple[str, list[str], float, str]:
    """(bot id, the document's questions, seconds from creation to READY, the text doclora
    extracted) of one new session."""
    [(name, src, questions)] = load_docs(DOCS, [doc])
    started = time.perf_counter()
    sid, given_as = give(api, None, name, src, max_steps)
    print(f"bot {sid}: {src.name} given as {given_as}, max_steps {max_steps}", flush=True)
    try:
        sess = api.wait_ready(sid, ready_timeout)
    except Exception:
        api.cancel(sid)
        raise
    ready = time.perf_counter() - started
    return sid, [q["question"] for q in questions], ready, api.text(sid, sess["documents"][0]["doc_id"])


def api_part(args) -> dict:
    """Start the stack, make the bot, run every level; the stack is stopped whatever happens."""
    ask = ASKERS[args.api]
    out: dict = {"api": args.api, "doc": args.doc, "max_tokens": args.max_tokens, "levels": {}}
    # no exam after training (it answers 3 x 16 questions twice: minutes on 2 cores); chat settings
    # stay the defaults
    stack = LocalStack(DOCLORA_QAGEN_EXAM_PAIRS="0")
    started = time.perf_counter()
    stack.up()
    out["stack_up_s"] = time.perf_counter() - started
    try:
        api = Api(stack.url)
        sid, questions, out["bot_ready_s"], out["text"] = make_bot(
            api, args.doc, args.max_steps, args.ready_timeout
        )
        print(f"bot READY in {out['bot_ready_s']:.1f} s; {len(questions)} questions", flush=True)
        with httpx.Client(base_url=stack.url, timeout=httpx.Timeout(30.0, read=600.0)) as c:
            out["cold"] = asdict(ask(c, sid, questions[-1], args.max_tokens))
        print(f"first answer (cold): {out['cold']['seconds']:.2f} s", flush=True)
        for users in args.users:
            rounds = args.rounds or math.ceil(ANSWERS_PER_LEVEL / users)
            answers, wall = run_level(stack.url, sid, questions, users, rounds, ask, args.max_tokens)
            level = out["levels"][users] = {"rounds": rounds, **summarize(answers, wall)}
            print(f"{users} users x {rounds} rounds: {level['answers']} answers in {wall:.1f} s", flush=True)
        api.close()
    finally:
        stack.down()
    return out


# ---------------------------------------------------------------- part 2: the engine in this process


def padded_prompt(tokenizer, question: str, text: str, target: int) -> tuple[list[dict], list[int]]:
    """The chat whose prompt (chat template applied) is the longest of at most `target` tokens: the
    question with the start of `text` as one passage, as a retrieval prompt shows it. Returns the
    messages and the prompt ids."""
    text = " ".join(text.split())

    def build(k: int) -> tuple[list[dict], list[int]]:
        passage = Passage("c0", "d0", "document", 1, 0, k, text[:k])
        messages = [{"role": "user", "content": with_passages(question, [Hit(passage, 1.0)], 10**9)}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return messages, tokenizer(rendered, add_special_tokens=False)["input_ids"]

    if len(build(1)[1]) > target:
        raise ValueError(f"the question alone is longer than {target} tokens")
    if len(build(len(text))[1]) < target:
        raise ValueError(f"the text is too short to pad a prompt to {target} tokens")
    # characters of text: build(lo) fits, build(hi) reaches the target; find the longest that fits
    lo, hi = 1, len(text)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(build(mid)[1]) <= target else (lo, mid)
    return build(hi) if len(build(hi)[1]) == target else build(lo)


def best_of(runs: int, fn: Callable[..., float], *args) -> float:
    return min(fn(*args) for _ in range(runs))


def engine_first_token(engine, messages: list[dict]) -> float:
    """Seconds from the call to the engine's first piece of text (or its end)."""
    from services.inference.engine import GenerationParams

    started = time.perf_counter()
    stream = engine.stream_chat(messages, None, GenerationParams(max_new_tokens=8))
    next(stream, None)
    took = time.perf_counter() - started
    stream.close()
    return took


def generate_first_token(model, ids: list[int]) -> float:
    """Seconds of transformers `generate` for one new token (greedy) on the same prompt ids."""
    import torch

    x = torch.tensor([ids])
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False)
    return time.perf_counter() - started


def engine_part(args, text: str, question: str) -> dict:
    """Engine and `generate` TTFT (best of `args.runs`) for each prompt length."""
    import torch

    from services.common.config import Settings
    from services.common.model import load_base_model
    from services.inference.engine import AdapterCache, ChatEngine

    torch.set_num_threads(args.threads)
    settings = Settings.from_env()
    started = time.perf_counter()
    model, tokenizer = load_base_model(settings)
    print(
        f"base model loaded in {time.perf_counter() - started:.1f} s; {args.threads} torch threads",
        flush=True,
    )
    prompts = {n: padded_prompt(tokenizer, question, text, n) for n in ENGINE_LENGTHS}
    rows = {}
    # `generate` first, on the model as loaded: the engine takes the model over until it is closed
    generate_first_token(model, prompts[ENGINE_LENGTHS[0]][1])  # warm up
    for n, (_, ids) in prompts.items():
        rows[n] = {
            "prompt_tokens": len(ids),
            "generate_s": best_of(args.runs, generate_first_token, model, ids),
        }

    def no_adapters(name: str) -> Path:
        raise KeyError(f"no adapters in this benchmark, asked for {name!r}")

    engine = ChatEngine(model, tokenizer, AdapterCache(no_adapters), "cpu", int8=settings.inference_int8)
    try:
        engine_first_token(engine, prompts[ENGINE_LENGTHS[0]][0])  # warm up
        for n, (messages, _) in prompts.items():
            rows[n]["engine_s"] = best_of(args.runs, engine_first_token, engine, messages)
            rows[n]["ratio"] = rows[n]["engine_s"] / rows[n]["generate_s"]
    finally:
        engine.close()
    return {"threads": args.threads, "runs": args.runs, "int8": settings.inference_int8, "lengths": rows}


# ---------------------------------------------------------------- printing


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def api_lines(api: dict) -> list[str]:
    cold = api["cold"]
    lines = [
        f"stack up {api['stack_up_s']:.1f} s; bot ({api['doc']}) created -> READY {api['bot_ready_s']:.1f} s "
        "(not part of the chat figures)",
        f"first answer (cold): first token {cold['first_token_s']:.2f} s, answer {cold['seconds']:.2f} s",
        "",
        f"through the API ({api['api']}), retrieval mode, streamed, greedy, "
        f"max {api['max_tokens']} new tokens:",
        f"{'users':>5} {'answers':>7} {'first tok mean':>14} {'p90':>6} {'answer mean':>11} {'p90':>6} "
        f"{'tokens/s':>8} {'tokens':>6} {'prompt tok (range)':>18}",
    ]
    for users, lv in api["levels"].items():
        span = lv["prompt_tokens_range"]
        prompt = f"{fmt(lv['prompt_tokens_mean'], '.0f')} ({span[0]}-{span[1]})" if span else "-"
        lines.append(
            f"{users:>5} {lv['answers']:>7} "
            f"{lv['first_token_mean_s']:>13.2f}s {lv['first_token_p90_s']:>5.2f}s "
            f"{lv['answer_mean_s']:>10.2f}s {lv['answer_p90_s']:>5.2f}s {lv['tokens_per_s']:>8.1f} "
            f"{lv['tokens_mean']:>6.1f} {prompt:>18}"
        )
    lines.append("targets:")
    for what, got, target, met in targets(api["levels"]):
        verdict = "not run" if met is None else ("met" if met else "NOT met")
        lines.append(f"  {what}: {fmt(got)} s (target <= {target:.0f} s) {verdict}")
    return lines


def engine_lines(eng: dict) -> list[str]:
    weights = "int8" if eng["int8"] else "fp32"
    lines = [
        f"engine time to first token by prompt length (base model, {weights}, {eng['threads']} threads, "
        f"best of {eng['runs']}; ratio = engine / generate):",
        f"{'prompt tokens':>13} {'engine':>8} {'generate':>9} {'ratio':>6}",
    ]
    for row in eng["lengths"].values():
        lines.append(
            f"{row['prompt_tokens']:>13} {row['engine_s'] * 1e3:>6.0f}ms {row['generate_s'] * 1e3:>7.0f}ms "
            f"{row['ratio']:>6.2f}"
        )
    return lines


def report(res: dict) -> str:
    lines = [f"load average before {res['load_before']}, after {res['load_after']} ({os.cpu_count()} CPUs)"]
    if res.get("api"):
        lines += ["", *api_lines(res["api"])]
    if res.get("engine"):
        lines += ["", *engine_lines(res["engine"])]
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def users_list(text: str) -> list[int]:
    """`--users`: comma-separated positive integers."""
    try:
        users = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--users takes comma-separated integers, got {text!r}") from None
    if not users or min(users) < 1:
        raise argparse.ArgumentTypeError(f"--users takes positive integers, got {text!r}")
    return users


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc", default="policy", help="evaluation document under bench/knowledge/docs/")
    ap.add_argument("--users", type=users_list, default=[1, 4, 8], help="concurrent users per level")
    ap.add_argument(
        "--rounds",
        type=int,
        default=0,
        help=f"questions per user (default: ~{ANSWERS_PER_LEVEL} answers a level)",
    )
    ap.add_argument("--max-tokens", type=int, default=64, help="max_new_tokens of every answer")
    ap.add_argument("--api", choices=sorted(ASKERS), default="v1", help="which chat endpoint to ask")
    ap.add_argument("--max-steps", type=int, default=1, help="training steps of the bot")
    ap.add_argument("--ready-timeout", type=float, default=900, help="seconds the bot may take to be READY")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the engine part")
    ap.add_argument("--runs", type=int, default=3, help="engine part: repeats per length; the best is kept")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine part")
    ap.add_argument("--no-api", action="store_true", help="skip the API part")
    ap.add_argument("--json", type=Path, help="save the figures here")
    args = ap.parse_args(argv)
    if args.rounds < 0 or args.max_tokens < 1 or args.max_steps < 1 or args.threads < 1 or args.runs < 1:
        ap.error("--rounds must be >= 0; --max-tokens, --max-steps, --threads and --runs >= 1")
    if not (DOCS / args.doc / "questions.jsonl").exists():
        ap.error(f"--doc: no {DOCS / args.doc / 'questions.jsonl'}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill`/`timeout` still stop the stack

    res: dict = {"load_before": load_average()}
    if not args.no_api:
        res["api"] = api_part(args)
    # the engine part pads with the text doclora extracted when part 1 ran, else the source file
    [(_, src, questions)] = load_docs(DOCS, [args.doc])
    text = res["api"].pop("text") if "api" in res else src.read_text()
    if not args.no_engine:
        res["engine"] = engine_part(args, text, questions[0]["question"])
    res["load_after"] = load_average()
    print("\n" + report(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
        print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
