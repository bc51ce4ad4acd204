"""Knowledge harness: does a trained bot know its documents? Five systems, one run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.knowledge.run [--docs manual,report] [--split final]
        [--max-steps N] [--max-tokens 128] [--url http://127.0.0.1:8080] [--sample-pairs N]
        [--record "what changed"]
    .venv/bin/python -m bench.knowledge.run --report-only results/<timestamp>.json [--record "..."]

Each document in `--docs-dir` (default bench/knowledge/docs/<name>/: one source file and
questions.jsonl) is given to doclora as a user would (render.py): report.md as a PDF, manual.md as
a DOCX, policy.md as a Markdown upload, guide.html as a link to a page on a web server on
127.0.0.1 when the harness starts the stack itself (that stack is told `DOCLORA_FETCH_ALLOW=127.0.0.1`;
a stack given with `--url` would refuse a loopback link, so there the page is uploaded as a .html
file). One session per document, created with default settings (a name, and `--max-steps` only
when given), one after the other so times are not mixed. Once READY, every question of the chosen
split goes, greedy (temperature 0, seed 0) with the same `--max-tokens`, to:

    base       the base model alone (bot "base")
    retrieval  the session's bot, mode "retrieval" (base model reading doclora's passages)
    adapter    the session's bot, mode "adapter"
    both       the session's bot, mode "both" (the product default)
    script     the base model in this process reading the top 3 BM25 hits over 120-word chunks of
               the extracted text (script.py)

Scores (score.py) per system, document and split; the times, pairs, steps, tokens, held-out
evaluation and the bot's own exam come from the session record. Every answer goes to results/<timestamp>.json, the
tables to stdout, and with `--record` a section (tables + chart) to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.knowledge import render, report
from bench.knowledge.score import score
from bench.knowledge.script import BM25, Baseline, chunks
from bench.knowledge.stack import ROOT, Api, LocalStack, PageServer, ts

HERE = Path(__file__).resolve().parent
STAGES = {"STAGE_INGEST": "ingest", "STAGE_QAGEN": "qagen", "STAGE_TRAIN": "train"}


def load_docs(docs_dir: Path, names: list[str] | None) -> list[tuple[str, Path, list[dict]]]:
    """(name, source file, questions) of each chosen document folder."""
    names = names or sorted(p.name for p in docs_dir.iterdir() if (p / "questions.jsonl").exists())
    out = []
    for name in names:
        folder = docs_dir / name
        src = next(p for p in sorted(folder.iterdir()) if p.suffix in (".md", ".html", ".htm", ".txt"))
        qs = [json.loads(x) for x in (folder / "questions.jsonl").read_text().splitlines() if x.strip()]
        out.append((name, src, qs))
    return out


def give(api: Api, pages: PageServer | None, name: str, src: Path, max_steps: int | None) -> tuple[str, str]:
    """Create the document's session; (session id, how it was given)."""
    how = render.how_for(name, src)
    filename, data, ctype = render.render(src, how)
    if how == "html" and pages is not None:
        return api.create(name, max_steps, url=pages.add(filename, ctype, data)), "link (html)"
    return api.create(name, max_steps, upload_id=api.upload(filename, data, ctype)), f"upload ({how})"


def session_stats(sess: dict, given_as: str) -> dict:
    train, qa, doc = sess.get("train", {}), sess.get("qa", {}), sess["documents"][0]
    times = {}
    for t in sess.get("timings", []):
        if t.get("stage") in STAGES and t.get("started_at") and t.get("finished_at"):
            times[STAGES[t["stage"]]] = ts(t["finished_at"]) - ts(t["started_at"])
    # READY when the train stage finished: the record changes again when the exam (taken after
    # READY) ends
    finished = [ts(t["finished_at"]) for t in sess.get("timings", []) if t.get("finished_at")]
    times["ready"] = max(finished, default=ts(sess["updated_at"])) - ts(sess["created_at"])
    return {
        "session_id": sess["session_id"],
        "given_as": given_as,
        "doc_id": doc["doc_id"],
        "format": doc.get("format"),
        "pages": doc.get("pages"),
        "chars": int(doc.get("chars", 0)),
        "pairs": qa.get("pairs", 0),
        "eval_pairs": qa.get("eval_pairs", 0),
        "steps": train.get("steps", 0),
        "tokens": int(train.get("tokens", 0)),
        "train_seconds": train.get("seconds"),
        "times": times,
        "eval": {k: v for k, v in train.items() if k.startswith("eval_")},
        "exam_pairs": qa.get("exam_pairs", 0),
        "exam": train.get("exam") or {},
    }


def ask(
    api: Api, baseline, sid: str, text: str, bm25: BM25, q: dict, max_tokens: int, systems: list[str]
) -> list[dict]:
    """The answers of `systems` (report.SYSTEMS names) to one question, scored."""
    rows = []
    for system in systems:
        started, passages = time.monotonic(), None
        if system == "script":
            passages = bm25.top(q["question"])
            answer, cites, finish = baseline.answer(q["question"], passages, max_tokens), [], None
        else:
            got = api.chat(
                "base" if system == "base" else sid,
                q["question"],
                None if system == "base" else system,
                max_tokens,
            )
            answer, cites, finish = got["content"], got.get("citations", []), got.get("finish_reason")
            if system in ("retrieval", "both"):  # the cited passages in full, by their span
                passages = [text[int(c["start"]) : int(c["end"])] or c["text"] for c in cites]
        row = {**q, "system": system, "answer": answer, "finish_reason": finish}
        row["seconds"] = round(time.monotonic() - started, 2)
        if passages is not None:
            row["passages"] = passages
        rows.append({**row, **score(row)})
    return rows


def commit() -> str:
    def git(*a):
        return subprocess.run(
            ["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30
        ).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    )


def one_document(api: Api, pages, script: dict, name: str, src: Path, questions: list[dict], args, res: dict):
    """Learn one document in its own session, then ask its questions to the five systems."""
    print(f"== {name}: {src.name}", flush=True)
    sid, given_as = give(api, pages, name, src, args.max_steps)
    try:
        d = res["docs"][name] = session_stats(api.wait_ready(sid, args.ready_timeout), given_as)
    except Exception:
        api.cancel(sid)  # not left training in front of the next document
        raise
    if args.sample_pairs:
        pairs = api.pairs(sid)
        res["samples"][name] = random.Random(0).sample(pairs, min(args.sample_pairs, len(pairs)))
        for p in res["samples"][name]:
            print(f"  [{p.get('strategy')}] Q: {p['question']}\n      A: {p['answer']}")
    text = api.text(sid, d["doc_id"])
    bm25 = BM25(chunks(text))
    if "script" in args.systems and "model" not in script:  # loaded once, when the first document is ready
        script["model"] = Baseline()
    chosen = [q for q in questions if args.split in ("all", q["split"])]
    for i, q in enumerate(chosen, 1):
        rows = ask(api, script.get("model"), sid, text, bm25, q, args.max_tokens, args.systems)
        res["answers"] += [{"doc": name, **r} for r in rows]
        marks = " ".join(
            f"{r['system']}={'+' if r.get('key_fact') or r.get('declined') else '-'}" for r in rows
        )
        print(f"  {i}/{len(chosen)} {q['id']} {marks}", flush=True)
    # the exam is taken after READY, beside the questions above: its figures, before the next
    # document's training (which would queue behind it)
    d["exam"] = api.wait_exam(sid, args.ready_timeout)["train"].get("exam") or {}


def run(args, path: Path) -> dict:
    """The whole run; the results are saved to `path` after each document."""
    from services.common.config import Settings

    docs = load_docs(Path(args.docs_dir), args.docs.split(",") if args.docs else None)
    settings = {
        "docs": ",".join(d[0] for d in docs),
        "split": args.split,
        "max_tokens": args.max_tokens,
        "max_steps": args.max_steps or "default",
        "base_model": Settings.from_env().base_model,
        "stack": args.url or "started here",
        "systems": ",".join(args.systems),
        # settings changed for the stack this run started (DOCLORA_TRAIN_PASSAGES=1, ...)
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DOCLORA_")},
    }
    meta = {"timestamp": path.stem, "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit()}
    res = {"meta": {**meta, "settings": settings}, "docs": {}, "answers": [], "samples": {}, "errors": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    stack = None if args.url else LocalStack()
    pages = None if args.url else PageServer()
    script: dict = {}
    try:
        if stack:
            stack.up()
        api = Api(args.url or stack.url)
        for name, src, questions in docs:
            try:
                one_document(api, pages, script, name, src, questions, args, res)
            except Exception as exc:  # one document failing leaves the others to run
                print(f"!! {name} failed: {exc}", file=sys.stderr)
                res["errors"][name] = str(exc)
            path.write_text(json.dumps(res, indent=1, ensure_ascii=False))
        api.close()
    finally:
        if pages:
            pages.close()
        if stack:
            stack.down()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.knowledge.run", description=__doc__.split("\n")[0])
    ap.add_argument("--docs", help="comma-separated document names (default: all)")
    ap.add_argument("--docs-dir", default=str(HERE / "docs"))
    ap.add_argument("--split", choices=("tune", "final", "all"), default="all")
    ap.add_argument(
        "--systems",
        default=",".join(report.SYSTEMS),
        help=f"comma-separated systems to ask (default: all of {', '.join(report.SYSTEMS)})",
    )
    ap.add_argument("--max-steps", type=int, help="training steps (default: doclora's own choice)")
    ap.add_argument("--max-tokens", type=int, default=128, help="answer length for every system")
    ap.add_argument("--url", help="a running gateway instead of starting the stack here")
    ap.add_argument("--ready-timeout", type=float, default=6 * 3600, help="seconds a session may take")
    ap.add_argument("--sample-pairs", type=int, default=0, help="print N random generated pairs per document")
    ap.add_argument("--record", metavar="WHAT_CHANGED", help="append a section to RESULTS.md")
    ap.add_argument("--report-only", metavar="JSON", help="rebuild the tables and chart of a saved run")
    args = ap.parse_args(argv)
    asked = {s.strip() for s in args.systems.split(",") if s.strip()}
    if not asked or asked - set(report.SYSTEMS):
        ap.error(f"--systems: use names of {', '.join(report.SYSTEMS)}")
    args.systems = [s for s in report.SYSTEMS if s in asked]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill`/`timeout` still stop the stack

    if args.report_only:
        path = Path(args.report_only)
        path = path if path.exists() else HERE / path
        res = json.loads(path.read_text())
        for a in res["answers"]:  # scored again: the scoring may have changed since
            a.update(score(a))
    else:
        res = run(args, HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}.json")
        path = HERE / "results" / f"{res['meta']['timestamp']}.json"
    print("\n" + report.tables(res))
    png = path.with_suffix(".png")
    drawn = bool(res["answers"]) and report.chart(res, png)
    print(f"answers: {path}" + (f"\nchart: {png}" if drawn else ""))
    if args.record:
        report.record(res, args.record, png if drawn else None)
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
