"""Tables, chart and RESULTS.md section of a harness run, all rebuilt from its results JSON.

`tables(res)` gives the Markdown scores (one table per split; systems as columns; per document
and overall: key-fact %, token F1, recall@3 of the key fact in the passages read, decline % on
`absent` questions) and the per-document times and training numbers. `chart(res, png)` draws
key-fact % by document and system (matplotlib, when installed). `record(...)` appends a section to
RESULTS.md.
"""

from __future__ import annotations

from pathlib import Path

from bench.knowledge.score import summarise

SYSTEMS = ("base", "retrieval", "adapter", "both", "script")
SPLITS = ("tune", "final")
METRICS = (
    ("key_fact", "key-fact %", "pct"),
    ("f1", "token F1", "f1"),
    ("recall", "recall@3", "pct"),
    ("declined", "decline %", "pct"),
)
HERE = Path(__file__).resolve().parent


def _fmt(value, how: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.0f}" if how == "pct" else f"{value:.2f}"


def _secs(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def summaries(res: dict) -> dict:
    """{split: {doc or "overall": {system: summary}}}"""
    out: dict = {}
    docs = list(res["docs"])
    for split in SPLITS:
        rows = [a for a in res["answers"] if a["split"] == split]
        if not rows:
            continue
        out[split] = {}
        for doc in [*docs, "overall"]:
            mine = [a for a in rows if doc in ("overall", a["doc"])]
            if mine:
                out[split][doc] = {s: summarise([a for a in mine if a["system"] == s]) for s in SYSTEMS}
    return out


def score_tables(res: dict) -> str:
    parts = []
    for split, by_doc in summaries(res).items():
        parts += [f"**{split}** questions", "", "| document | metric | " + " | ".join(SYSTEMS) + " |"]
        parts.append("| --- | --- |" + " ---: |" * len(SYSTEMS))
        for doc, by_sys in by_doc.items():
            first = by_sys["base"]
            label = f"{doc} ({first['n']}+{first['n_absent']})"
            for key, name, how in METRICS:
                cells = [_fmt(by_sys[s][key], how) for s in SYSTEMS]
                parts.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
                label = ""
        parts.append("")
    return "\n".join(parts)


def time_table(res: dict) -> str:
    head = "| document | given as | pages | pairs (eval or exam) | steps | tokens | ingest s | QA gen s | train s | to READY s | held-out F1 base → adapter, or exam F1 base / adapter / retrieval / both |"
    lines = [head, "|" + " --- |" * 2 + " ---: |" * 9]
    for name, d in res["docs"].items():
        t, ev = d["times"], d["eval"]
        f1 = f"{_fmt(ev.get('eval_base_f1'), 'f1')} → {_fmt(ev.get('eval_adapter_f1'), 'f1')}"
        if ev.get("eval_passages_count"):
            f1 += f" (with passages {_fmt(ev.get('eval_passages_base_f1'), 'f1')} → {_fmt(ev.get('eval_passages_adapter_f1'), 'f1')})"
        exam = d.get("exam") or {}
        if exam.get("reworded"):  # the bot's exam (newer runs): reworded questions on trained facts
            ways = ("base_f1", "adapter_f1", "retrieval_f1", "both_f1")
            f1 = "exam " + " / ".join(_fmt(exam.get(k), "f1") for k in ways)
            f1 += f", {exam.get('missed', 0)} of {exam['reworded']} missed"
            if exam.get("seconds"):  # taken after READY (newer runs)
                f1 += f", {exam['seconds']:.0f} s after READY"
        cells = [
            name,
            d["given_as"],
            d["pages"],
            f"{d['pairs']} ({d['eval_pairs'] or d.get('exam_pairs', 0)})",
            d["steps"],
            d["tokens"],
            *(_secs(t.get(k)) for k in ("ingest", "qagen", "train", "ready")),
            f1,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def tables(res: dict) -> str:
    return score_tables(res) + "\n" + time_table(res) + "\n"


def chart(res: dict, png: Path) -> bool:
    """Key-fact % per document (and overall) and system, one panel per split; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    data = summaries(res)
    fig, axes = plt.subplots(1, len(data), figsize=(6 * len(data), 3.6), squeeze=False)
    for ax, (split, by_doc) in zip(axes[0], data.items(), strict=True):
        docs = list(by_doc)
        w = 0.8 / len(SYSTEMS)
        for i, s in enumerate(SYSTEMS):
            vals = [100 * (by_doc[d][s]["key_fact"] or 0) for d in docs]
            ax.bar([x + i * w for x in range(len(docs))], vals, w, label=s)
        ax.set_xticks([x + 0.4 - w / 2 for x in range(len(docs))], docs)
        ax.set_ylim(0, 100)
        ax.set_ylabel("key-fact %")
        ax.set_title(f"{split} questions")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def record(res: dict, note: str, png: Path | None, results_md: Path = HERE / "RESULTS.md") -> None:
    m = res["meta"]
    settings = ", ".join(f"{k}={v}" for k, v in m["settings"].items())
    section = [
        f"## {m['date']} — {note}",
        "",
        f"Commit `{m['commit']}`. Settings: {settings}. Answers: `results/{m['timestamp']}.json`.",
        "",
        tables(res),
    ]
    if png is not None:
        section += [f"![key-fact % by document and system](results/{png.name})", ""]
    with results_md.open("a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(section))
    print(f"appended a section to {results_md}")
