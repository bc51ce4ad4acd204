"""Every benchmark under bench/, one after another, each as its own process with its own figures
printed (`make bench`). Quick sizes by default; `--full` runs each at its own defaults. The
knowledge harness (bench/knowledge, tens of minutes) runs only with `--knowledge`.

    .venv/bin/python bench/run_all.py [--full] [--knowledge] [--only ingest,qagen]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name: (script, quick arguments)
BENCHES = {
    "ingest": ("bench/bench_ingest.py", ["--pages", "30", "--rounds", "3"]),
    "qagen": ("bench/bench_qagen.py", ["--pages", "10", "--runs", "1"]),
    "upload": ("bench/bench_upload.py", ["50"]),
    "trainer": ("bench/bench_trainer.py", ["--steps", "4", "--pairs", "16"]),
    "inference": ("bench/bench_inference.py", ["--tokens", "24", "--threads", "1", "--chats", "4"]),
    "chat_api": ("bench/bench_chat_api.py", ["--users", "1,4", "--rounds", "2", "--runs", "1"]),
    "qagen_local": ("bench/bench_qagen_local.py", ["--chunks", "2"]),
    "html_extract": ("bench/bench_html_extract.py", ["--rounds", "5"]),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="each benchmark at its own default size")
    ap.add_argument("--knowledge", action="store_true", help="also the knowledge harness (long)")
    ap.add_argument("--only", default="", help="comma-separated names: " + ", ".join(BENCHES))
    args = ap.parse_args(argv)
    chosen = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        ap.error(f"unknown benchmarks: {', '.join(unknown)}")
    runs = [(n, [BENCHES[n][0], *([] if args.full else BENCHES[n][1])]) for n in chosen]
    if args.knowledge:
        runs.append(("knowledge", ["-m", "bench.knowledge.run"]))
    failed = []
    for name, cmd in runs:
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, *cmd], cwd=ROOT)
        print(f"=== {name}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
