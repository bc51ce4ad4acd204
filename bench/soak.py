"""Soak: N sessions end to end through the gateway of a real local stack, then a burst of chat streams.

It starts the stack as the tests do (`doclora up --detach` in a state folder of its own, every part
on a free port: bench/knowledge/stack.py's `LocalStack`) and, through the public HTTP API only:

1. creates N sessions from pasted texts (a few made-up paragraphs, different for each session), some
   at the same time, and follows each to a final state; every READY bot gets `--chats` streamed chats,
   alternating the REST chat and the OpenAI-compatible `/v1/chat/completions`;
2. sends `--streams` concurrent streamed chats to one READY bot, to see the excess refused with 429
   and `Retry-After` (not 5xx, not hung) and the inference service's memory stay bounded.

It prints accepted / completed (READY) / failed (with reasons) / lost (accepted but not final by the
deadline, or missing from the session list) / duplicated (listed twice, or an artifact in the store
twice under different keys: tests/faults/stack.py's `assert_artifacts_once`), the peak RSS of every
part (VmHWM and sampled VmRSS of the pids in `<state>/stack.json`), and the streams' outcome. Exit
status 1 when a session is lost or duplicated, or a chat got a 5xx or hung. Run:

    .venv/bin/python bench/soak.py N [--model tiny] [--max-steps 8] [--chats 2] [--streams 100]
        [--deadline 1800]

`--model tiny` is a 2-layer Llama with SmolLM2's tokenizer (tests/test_model.py), saved to a temp
folder, so that the soak measures the system, not the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.knowledge.stack import LocalStack  # noqa: E402
from tests.faults.stack import READY, SERVICES, FaultStack  # noqa: E402
from tests.test_model import TINY_STACK_ENV  # noqa: E402

PARTS = ("nats", "s3", *SERVICES)
FINAL = {READY, "SESSION_STATE_FAILED", "SESSION_STATE_CANCELLED"}
PLACES = ["Varnholt", "Quillmere", "Orsabay", "Tennick", "Halvard", "Bremmoor", "Castelnoy", "Dunravel"]
GOODS = ["copper bells", "blue salt", "glass beads", "cedar boats", "wool rugs", "amber ink", "tin lamps"]
QUESTIONS = ["Who founded {p}?", "What does {p} make?", "How many people live in {p}?", "When is the fair?"]


def made_up_text(i: int) -> str:
    """Four paragraphs about an invented town, different for every `i` (names, numbers, goods)."""
    place = f"{PLACES[i % len(PLACES)]}-{i}"
    good, other = GOODS[i % len(GOODS)], GOODS[(i + 3) % len(GOODS)]
    people, year, month = 1200 + 37 * i, 1700 + 11 * i, ["March", "June", "August", "October"][i % 4]
    return f"""# The town of {place}

{place} is a small harbour town founded in {year} by the ferry captain Ilse Marrow-{i}. About
{people} people live there today. The town is known for its {good}, which are made in workshops
along the old canal and shipped to the islands every spring.

## Trade

Every workshop in {place} sells its {good} at the guild hall on the first Monday of each month.
The guild sets one price for the whole year, and a buyer from outside the town pays a toll of
{3 + i % 5} silver coins at the gate. Merchants also bring {other} from the mainland.

## The fair

The great fair of {place} is held every {month} on the square in front of the lighthouse. It lasts
{2 + i % 4} days and ends with a boat race around the harbour, which the rowing club of the
{["north", "south", "east", "west"][i % 4]} quarter has won {5 + i} times.

## Government

The town council has {7 + 2 * (i % 3)} members, elected every four years. The mayor lives in the
house with the green door next to the lighthouse and keeps the town's only copy of the charter.
"""


# -- memory --------------------------------------------------------------------------------------


def proc_kib(pid: int, field_name: str) -> int:
    """A `VmHWM` / `VmRSS` line of /proc/<pid>/status, in KiB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples every part's VmRSS and VmHWM from the pids in `stack.json` twice a second, in a
    thread; a part restarted under a new pid keeps the largest figure of all its pids."""

    def __init__(self, stack: FaultStack, every_s: float = 0.5):
        self.stack, self.every_s = stack, every_s
        self.peak: dict[str, int] = dict.fromkeys(PARTS, 0)  # KiB
        self.pids: dict[str, set[int]] = {p: set() for p in PARTS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def sample(self) -> None:
        for part in PARTS:
            try:
                pid = self.stack.pid(part)
            except (OSError, KeyError, ValueError):
                continue
            self.pids[part].add(pid)
            got = max(proc_kib(pid, "VmHWM"), proc_kib(pid, "VmRSS"))
            self.peak[part] = max(self.peak[part], got)

    def rss(self, part: str) -> int:
        """The part's current VmRSS in KiB."""
        try:
            return proc_kib(self.stack.pid(part), "VmRSS")
        except (OSError, KeyError, ValueError):
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()


# -- phase 1: sessions ---------------------------------------------------------------------------


@dataclass
class Outcome:
    accepted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # creations the gateway did not accept
    ready: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)
    duplicated: dict[str, str] = field(default_factory=dict)
    chats: Counter = field(default_factory=Counter)
    chat_errors: list[str] = field(default_factory=list)


def create(base: str, i: int, max_steps: int) -> tuple[int, str | None, str]:
    """POST one session from pasted text: (i, its id or None, what went wrong)."""
    body = {"name": f"soak-{i}", "text": made_up_text(i), "max_steps": max_steps}
    try:
        with httpx.Client(base_url=base, timeout=httpx.Timeout(30.0, read=120.0)) as c:
            resp = c.post("/api/v1/sessions", json=body)
    except httpx.HTTPError as exc:
        return i, None, f"{type(exc).__name__}: {exc}"
    if resp.status_code != 201:
        return i, None, f"HTTP {resp.status_code}: {resp.text[:200]}"
    return i, resp.json()["session_id"], ""


def create_all(base: str, n: int, max_steps: int, out: Outcome) -> None:
    """Half the sessions in one burst (all at once), the rest one after another."""
    burst = (n + 1) // 2
    with ThreadPoolExecutor(max_workers=max(1, burst)) as pool:
        results = list(pool.map(lambda i: create(base, i, max_steps), range(burst)))
    results += [create(base, i, max_steps) for i in range(burst, n)]
    for i, sid, err in results:
        if sid:
            out.accepted.append(sid)
        else:
            out.refused.append(f"session {i}: {err}")


def follow(stack: FaultStack, out: Outcome, deadline: float) -> dict[str, dict]:
    """Poll every accepted session until all are final or the deadline passes; their last records."""
    last: dict[str, dict] = {}
    waiting, shown = set(out.accepted), 0.0
    while waiting and time.monotonic() < deadline:
        for sid in list(waiting):
            sess = stack.session(sid)
            if sess is not None:
                last[sid] = sess
                if sess["state"] in FINAL:
                    waiting.discard(sid)
        if time.monotonic() - shown > 30:
            states = Counter(s["state"].removeprefix("SESSION_STATE_") for s in last.values())
            print(f"  {time.strftime('%H:%M:%S')} {dict(states)}", flush=True)
            shown = time.monotonic()
        time.sleep(2)
    for sid in out.accepted:
        sess = last.get(sid)
        if sess is None or sess["state"] not in FINAL:
            out.lost[sid] = f"still {sess['state'] if sess else 'unreadable'} at the deadline"
        elif sess["state"] == READY:
            out.ready.append(sid)
        else:
            out.failed[sid] = f"{sess['state'].removeprefix('SESSION_STATE_')}: {sess.get('error')}"
    return last


def check_listed_once(stack: FaultStack, out: Outcome) -> None:
    """Every accepted session is in GET /api/v1/sessions exactly once."""
    resp = stack.http.get("/api/v1/sessions", params={"limit": len(out.accepted) + 1000})
    resp.raise_for_status()
    seen = Counter(s["session_id"] for s in resp.json()["sessions"])
    for sid in out.accepted:
        if seen[sid] == 0:
            out.lost.setdefault(sid, "missing from the session list")
        elif seen[sid] > 1:
            out.duplicated[sid] = f"listed {seen[sid]} times"


def check_artifacts(stack: FaultStack, records: dict[str, dict], out: Outcome) -> None:
    """Each READY session's objects in the store are each artifact once (keys.py's layout)."""
    for sid in out.ready:
        try:
            stack.assert_artifacts_once(records[sid])
        except AssertionError as exc:
            out.duplicated.setdefault(sid, str(exc).splitlines()[0][:300])


def sse_data(resp: httpx.Response) -> list[tuple[str, str]]:
    """A Server-Sent Events body as (event kind, data) pairs."""
    got, kind = [], ""
    for line in resp.iter_lines():
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            got.append((kind, line[5:].strip()))
    return got


def chat_once(base: str, bot: str, question: str, openai: bool, max_tokens: int, timeout: float) -> str:
    """One streamed chat; '' when it ended properly, else what went wrong."""
    msgs = [{"role": "user", "content": question}]
    if openai:
        path, body = "/v1/chat/completions", {"model": bot, "messages": msgs, "stream": True}
    else:
        path, body = f"/api/v1/bots/{bot}/chat", {"messages": msgs, "stream": True}
    body["max_tokens"] = max_tokens
    try:
        with httpx.Client(base_url=base, timeout=httpx.Timeout(30.0, read=timeout)) as c:
            with c.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    return f"HTTP {resp.status_code}: {resp.read()[:200]!r}"
                events = sse_data(resp)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if openai:
        errors = [d for _, d in events if d.startswith('{"error"')]
        done = bool(events) and events[-1][1] == "[DONE]"
    else:
        errors = [d for k, d in events if k == "error"]
        done = bool(events) and events[-1][0] == "done"
    return errors[0][:200] if errors else "" if done else "the stream ended without its last event"


def chat_with_ready(base: str, out: Outcome, chats: int, max_tokens: int) -> None:
    """`chats` streamed chats with every READY bot, REST and OpenAI in turn, the bots in parallel."""

    def one_bot(k_sid: tuple[int, str]) -> None:
        k, sid = k_sid
        for j in range(chats):
            openai = j % 2 == 1
            question = QUESTIONS[j % len(QUESTIONS)].format(p=f"{PLACES[k % len(PLACES)]}")
            err = chat_once(base, sid, question, openai, max_tokens, timeout=300)
            api = "openai" if openai else "rest"
            out.chats[f"{api} ok" if not err else f"{api} failed"] += 1
            if err:
                out.chat_errors.append(f"{sid} ({api}): {err}")

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(out.ready)))) as pool:
        list(pool.map(one_bot, enumerate(out.ready)))


# -- phase 2: a burst of streams ----------------------------------------------------------------


async def one_stream(c: httpx.AsyncClient, bot: str, max_tokens: int, timeout: float) -> str:
    """One OpenAI-style streamed chat, classified: ok, 429, 429-no-retry-after, 5xx, hang, error."""
    body = {"model": bot, "messages": [{"role": "user", "content": "Tell me about the fair."}]}
    body.update(stream=True, max_tokens=max_tokens)
    try:
        async with asyncio.timeout(timeout):
            async with c.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code == 429:
                    return "429" if resp.headers.get("Retry-After") else "429 without Retry-After"
                if resp.status_code >= 500:
                    return "5xx"
                if resp.status_code != 200:
                    return f"HTTP {resp.status_code}"
                last = ""
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        last = line[5:].strip()
                        if last.startswith('{"error"'):
                            code = json.loads(last)["error"].get("code") or ""
                            return (
                                "429 in stream"
                                if "rate" in code or "exhausted" in code
                                else "error in stream"
                            )
                return "ok" if last == "[DONE]" else "ended without [DONE]"
    except TimeoutError:
        return "hang"
    except httpx.HTTPError as exc:
        return f"transport error ({type(exc).__name__})"


async def burst(base: str, bot: str, streams: int, max_tokens: int, timeout: float) -> Counter:
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(30.0, read=None)) as c:
        got = await asyncio.gather(*(one_stream(c, bot, max_tokens, timeout) for _ in range(streams)))
    return Counter(got)


# -- the whole run --------------------------------------------------------------------------------


def tiny_model_folder() -> Path:
    from tests.test_model import save_tiny_model

    return save_tiny_model(Path(tempfile.mkdtemp(prefix="doclora-soak-model-")))


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB" if kib else "-"


def report(out: Outcome, rss: RssSampler, streams: Counter | None, inf_mem: tuple[int, ...]) -> None:
    print("\n== sessions")
    rows = [
        ("accepted", len(out.accepted)),
        ("refused at creation", len(out.refused)),
        ("completed (READY)", len(out.ready)),
        ("failed", len(out.failed)),
        ("lost", len(out.lost)),
        ("duplicated", len(out.duplicated)),
    ]
    for name, value in rows:
        print(f"  {name:<22}{value:>6}")
    for title, items in (
        ("refused", {str(k): v for k, v in enumerate(out.refused)}),
        ("failed", out.failed),
        ("lost", out.lost),
        ("duplicated", out.duplicated),
    ):
        for sid, why in items.items():
            print(f"    {title} {sid}: {why}")
    print("== chats with READY bots")
    for name, value in sorted(out.chats.items()):
        print(f"  {name:<22}{value:>6}")
    for err in out.chat_errors[:10]:
        print(f"    {err}")
    print("== peak RSS per part (VmHWM / sampled VmRSS, every pid the part had)")
    for part in PARTS:
        print(f"  {part:<22}{mib(rss.peak[part]):>10}   pids {sorted(rss.pids[part])}")
    if streams is not None:
        print("== concurrent chat streams")
        for name, value in sorted(streams.items()):
            print(f"  {name:<26}{value:>6}")
        before, peak_before, peak, after = inf_mem
        print(
            f"  inference RSS before {mib(before)} (peak so far {mib(peak_before)}), "
            f"peak after the streams {mib(peak)}, RSS after {mib(after)}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sessions", type=int, help="how many sessions to run end to end")
    ap.add_argument(
        "--model", default="", help="base model: empty = the product's default; 'tiny'; or a path"
    )
    ap.add_argument("--max-steps", type=int, default=8, help="training steps per session")
    ap.add_argument("--chats", type=int, default=2, help="streamed chats per READY bot")
    ap.add_argument("--streams", type=int, default=100, help="concurrent chat streams in phase 2 (0: skip)")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens of each chat")
    ap.add_argument("--deadline", type=float, default=1800, help="seconds for all sessions to end")
    ap.add_argument("--stream-timeout", type=float, default=300, help="a stream longer than this hangs")
    args = ap.parse_args(argv)
    if args.sessions < 1:
        ap.error("sessions must be at least 1")

    started = time.monotonic()
    extra = {"DOCLORA_INFERENCE_MAX_NEW_TOKENS": str(args.tokens)}
    model_dir = None
    if args.model == "tiny":
        model_dir = tiny_model_folder()
        extra["DOCLORA_BASE_MODEL"] = str(model_dir)
        extra.update(TINY_STACK_ENV)
    elif args.model:
        extra["DOCLORA_BASE_MODEL"] = args.model

    local = LocalStack(prefix="doclora-soak-", **extra)
    local.up()
    stack = FaultStack(local.env, local.state)
    rss = RssSampler(stack).start()
    out, streams, inf_mem = Outcome(), None, (0, 0, 0, 0)
    try:
        t0 = time.monotonic()
        create_all(local.url, args.sessions, args.max_steps, out)
        print(f"{len(out.accepted)} sessions accepted in {time.monotonic() - t0:.1f} s", flush=True)
        records = follow(stack, out, time.monotonic() + args.deadline)
        final = len(out.accepted) - len(out.lost)
        print(
            f"{final} of {len(out.accepted)} sessions final after {time.monotonic() - t0:.0f} s", flush=True
        )
        check_listed_once(stack, out)
        check_artifacts(stack, records, out)
        chat_with_ready(local.url, out, args.chats, args.tokens)
        if args.streams and not out.ready:
            print("no READY bot: the concurrent streams are skipped", flush=True)
        if args.streams and out.ready:
            rss.sample()
            before = (rss.rss("inference"), rss.peak["inference"])
            t1 = time.monotonic()
            streams = asyncio.run(
                burst(local.url, out.ready[0], args.streams, args.tokens, args.stream_timeout)
            )
            print(f"{args.streams} streams in {time.monotonic() - t1:.1f} s", flush=True)
            rss.sample()
            inf_mem = (*before, rss.peak["inference"], rss.rss("inference"))
    finally:
        rss.stop()
        stack.close()
        local.down()
        if model_dir:
            shutil.rmtree(model_dir, ignore_errors=True)
    report(out, rss, streams, inf_mem)
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    bad_streams = sum(v for k, v in (streams or {}).items() if k in ("5xx", "hang"))
    bad_chats = sum(1 for e in out.chat_errors if "HTTP 5" in e or "Timeout" in e)
    return 1 if out.lost or out.duplicated or bad_streams or bad_chats else 0


if __name__ == "__main__":
    sys.exit(main())
