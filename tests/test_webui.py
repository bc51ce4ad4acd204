"""The web UI in a real headless Chromium against the whole local stack: a person asks to review the
questions, edits, deletes, adds and imports pairs in the page, adds a source while reviewing,
approves, and later retrains; every change is checked through the REST API. A short session is
followed to READY with its loss chart, stage ETAs and evaluation chart, then chatted with.

With DOCLORA_SCREENSHOTS=DIR (e.g. docs/screenshots) the second test saves the README's pictures of
the learn, review, progress and chat views there; unset (CI), it saves nothing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.test_e2e import MORE_TEXT, TEXT, TIMEOUT, docs_server, stack  # noqa: F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); CI installs it"
    ),
]

ROWS = "#pairs tbody tr[data-pair-id]"
NEW_ANSWER = "In 1987, by the botanist Ilse Marrow."
ADDED = ("Who picks the glowing pears?", "Gardeners pick them by hand every October.")
DIRTY = re.compile(r"\bdirty\b")
BAD_LINK = "http://10.255.255.1/secret.pdf"
IMPORTED = ("How many gardeners work in the orchard?", "17 gardeners.")
# the first section of TEXT: few pairs, so a short exam (training to READY on 2 busy cores)
SHORT_TEXT = TEXT.split("## Harvest")[0]
STEPS = 8  # a few loss reports (one each 2 s and the first and last steps) on a fast machine
VIEWPORT = {"width": 1200, "height": 800}


@contextlib.contextmanager
def browser_page(base: str):
    """A page of the web UI in headless Chromium (1200x800), and the script errors it raises."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/")
            yield page, errors
        finally:
            browser.close()


def screenshot(page, name: str, section: str) -> None:
    """With DOCLORA_SCREENSHOTS=DIR set: the viewport, scrolled to `section` (to the top of the page
    when the section starts in its first half), as DIR/NAME.png."""
    folder = os.environ.get("DOCLORA_SCREENSHOTS")
    if not folder:
        return
    page.evaluate(
        """sel => {
          for (const t of document.querySelectorAll('textarea')) t.scrollTop = 0;
          const top = document.querySelector(sel).getBoundingClientRect().top + scrollY;
          scrollTo(0, top < innerHeight / 2 ? 0 : top - 8);
        }""",
        section,
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(Path(folder) / f"{name}.png"))


def wait_js(page, script: str, arg=None, timeout: float = 60_000) -> None:
    """Wait until `script` is true in the page; on a timeout, fail with what the page shows."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(script, arg=arg, timeout=timeout)
    except PlaywrightTimeout:
        shown = {
            k: page.text_content(k)
            for k in ("#state", "#session-notes", "#progress-text", "#session-error", "#log")
        }
        server = page.evaluate(
            "async () => view.sid ? (await fetch('/api/v1/sessions/' + view.sid)).text() : ''"
        )
        pytest.fail(
            f"timed out waiting for {script!r} ({arg!r}); the page shows {shown}; the server has {server}"
        )


def wait_state(page, *states: str, timeout: float = 240_000) -> str:
    """Wait until the page shows one of `states` and return the one it shows."""
    wait_js(
        page,
        "states => states.includes(document.querySelector('#state').textContent)",
        list(states),
        timeout,
    )
    return page.text_content("#state")


def row(page, pair_id: str):
    return page.locator(f'{ROWS}[data-pair-id="{pair_id}"]')


def wait_question_shown(page, question: str) -> None:
    wait_js(
        page,
        "q => [...document.querySelectorAll('#pairs textarea.question')].some(t => t.value === q)",
        question,
    )


def test_a_person_reviews_pairs_in_the_browser_approves_and_retrains(stack):  # noqa: F811
    """Pasted text and a link to a private address, review checked: the failed link shows its
    reason; the page waits in AWAITING_REVIEW with a table of pairs; an answer edited,
    a pair deleted, one added and one imported in the page are stored on the server; a bad edit
    shows the server's error next to its row; a source added in review regenerates pairs without
    losing the edit; approve starts TRAINING; after a cancel through the API the page offers
    Retrain, which starts the pipeline again."""
    from playwright.sync_api import expect

    _, base = stack
    with browser_page(base) as (page, page_errors), httpx.Client(base_url=base, timeout=TIMEOUT) as api:
        # --- create a session from pasted text, asking for review
        page.fill("#name", "reviewed in a browser")
        page.fill("#text", TEXT)
        page.fill("#urls", BAD_LINK)
        page.fill("#steps", "500")
        page.check("#review-check")
        page.click("#go")
        assert wait_state(page, "AWAITING_REVIEW", "FAILED") == "AWAITING_REVIEW", page.text_content(
            "#session-error"
        )
        sid = page.text_content("#sid")
        assert page.evaluate("location.hash") == f"#/s/{sid}"
        sess = api.get(f"/api/v1/sessions/{sid}").json()
        assert sess["options"]["review"] is True and sess["name"] == "reviewed in a browser"
        wait_js(page, f"document.querySelectorAll('{ROWS}').length >= 3")
        # the pasted text is ready; the link to a private address failed with its reason
        expect(page.locator("#documents tbody tr")).to_have_count(2)
        expect(page.locator("#documents tbody tr:not(.failed) .doc-status")).to_have_text("ready")
        failed = page.locator("#documents tbody tr.failed")
        expect(failed).to_contain_text(BAD_LINK)
        expect(failed.locator(".doc-error")).to_contain_text(re.compile("private|not allowed", re.I))
        # rewordings kept back for the bot's exam are counted with the pairs
        exam = sess["qa"]["exam_pairs"]
        assert int(exam) > 0
        expect(page.locator("#qa-stats")).to_contain_text(f"kept for the exam{exam}")
        expect(page.locator("#approve")).to_be_visible()
        expect(page.locator("#bot-list")).to_contain_text("reviewed in a browser")

        before = api.get(f"/api/v1/sessions/{sid}/qa", params={"page_size": 1000}).json()["pairs"]
        expect(page.locator("#pair-total")).to_have_text(f"({len(before)})")
        ids = page.eval_on_selector_all(ROWS, "rows => rows.map(r => r.dataset.pairId)")
        assert ids == [x["pair_id"] for x in before[: len(ids)]]
        edited_id, deleted_id, bad_id = ids[0], ids[1], ids[2]

        # --- edit one answer
        first = row(page, edited_id)
        expect(first.locator("button.save")).to_be_disabled()
        first.locator("textarea.answer").fill(NEW_ANSWER)
        expect(first).to_have_class(DIRTY)
        first.locator("button.save").click()
        expect(first.locator(".row-status")).to_have_text("saved")
        expect(first).not_to_have_class(DIRTY)

        # --- a bad edit: the server's error is shown next to the row, then reverted
        bad = row(page, bad_id)
        bad_question = bad.locator("textarea.question").input_value()
        bad.locator("textarea.question").fill("   ")
        bad.locator("button.save").click()
        expect(bad.locator(".row-status")).to_contain_text("the question is empty")
        expect(bad.locator(".row-status")).to_have_attribute("title", "INVALID_ARGUMENT")
        bad.locator("button.revert").click()
        expect(bad.locator("textarea.question")).to_have_value(bad_question)
        expect(page.locator("#save-all")).to_be_disabled()

        # --- delete one pair
        row(page, deleted_id).locator("button.delete").click()
        expect(row(page, deleted_id)).to_have_count(0)
        expect(page.locator("#pair-total")).to_have_text(f"({len(before) - 1})")

        # --- add one pair: an empty one is refused with the server's message, then a good one
        page.click("#add-pair")
        expect(page.locator("#add-pair-error")).to_contain_text("empty")
        page.fill("#new-question", ADDED[0])
        page.fill("#new-answer", ADDED[1])
        page.click("#add-pair")
        expect(page.locator("#add-pair-result")).to_have_text("added")
        expect(page.locator("#add-pair-error")).to_have_text("")
        wait_question_shown(page, ADDED[0])

        # --- import one pair (Alpaca JSON lines); a broken file shows its error
        page.set_input_files(
            "#import-file",
            files=[{"name": "bad.jsonl", "mimeType": "application/x-ndjson", "buffer": b"{nope\n"}],
        )
        page.click("#import")
        expect(page.locator("#import-error")).to_contain_text("line 1")
        line = json.dumps({"instruction": IMPORTED[0], "input": "", "output": IMPORTED[1]}) + "\n"
        page.set_input_files(
            "#import-file",
            files=[{"name": "more.jsonl", "mimeType": "application/x-ndjson", "buffer": line.encode()}],
        )
        page.click("#import")
        expect(page.locator("#import-result")).to_contain_text("imported 1")
        expect(page.locator("#pair-total")).to_have_text(f"({len(before) + 1})")

        # --- the changes are stored on the server
        after = api.get(f"/api/v1/sessions/{sid}/qa", params={"page_size": 1000}).json()["pairs"]
        by_id = {x["pair_id"]: x for x in after}
        assert len(after) == len(before) + 1
        assert by_id[edited_id]["answer"] == NEW_ANSWER and by_id[edited_id]["edited"] is True
        assert deleted_id not in by_id
        assert by_id[bad_id]["question"] == bad_question
        added = [x for x in after if x["question"] == ADDED[0]]
        assert len(added) == 1 and added[0]["answer"] == ADDED[1] and added[0]["strategy"] == "person"
        assert [x["answer"] for x in after if x["question"] == IMPORTED[0]] == [IMPORTED[1]]

        # --- the export links download what the server holds
        href = page.get_attribute("#export-alpaca", "href")
        assert href == f"/api/v1/sessions/{sid}/qa/export?format=alpaca"
        exported = [json.loads(x) for x in api.get(href).text.splitlines()]
        assert len(exported) == len(after) and {"instruction", "output"} <= set(exported[0])

        # --- add a text source while reviewing: pairs are generated for it, the edit stays
        page.click("#add-source summary")
        page.fill("#source-text", MORE_TEXT)
        page.fill("#source-name", "ferry.md")
        page.click("#add-source-btn")
        expect(page.locator("#source-result")).to_contain_text("ferry.md")
        wait_js(page, "document.querySelectorAll('#documents tbody tr').length === 3")
        wait_js(
            page,
            "document.querySelector('#state').textContent === 'AWAITING_REVIEW' && "
            "document.querySelector('#session-notes').textContent.includes('round 1')",
            timeout=240_000,
        )
        expect(page.locator("#documents tbody")).to_contain_text("ferry.md")
        expect(row(page, edited_id).locator("textarea.answer")).to_have_value(NEW_ANSWER)
        total = len(api.get(f"/api/v1/sessions/{sid}/qa", params={"page_size": 1000}).json()["pairs"])
        assert total > len(after)
        expect(page.locator("#pair-total")).to_have_text(f"({total})")

        # --- approve: training starts
        page.click("#approve")
        assert wait_state(page, "TRAINING", "FAILED") == "TRAINING", page.text_content("#review-error")
        assert api.get(f"/api/v1/sessions/{sid}").json()["state"] == "SESSION_STATE_TRAINING"
        expect(page.locator("#review")).to_be_hidden()
        expect(page.locator("#cancel")).to_be_visible()

        # --- cancelled through the API (training takes minutes here): the page follows
        assert api.post(f"/api/v1/sessions/{sid}/cancel").status_code == 200
        assert wait_state(page, "CANCELLED", timeout=60_000) == "CANCELLED"
        expect(page.locator("#retrain")).to_be_visible()
        expect(page.locator("#review")).to_be_visible()

        # --- retrain: the pipeline runs again (round 2); cancelled again through the API
        page.click("#retrain")
        state = wait_state(page, "QUEUED", "INGESTING", "GENERATING", "TRAINING", timeout=60_000)
        sess = api.get(f"/api/v1/sessions/{sid}").json()
        assert sess["round"] == 2, sess
        assert api.post(f"/api/v1/sessions/{sid}/cancel").status_code == 200, state
        assert wait_state(page, "CANCELLED", timeout=60_000) == "CANCELLED"
        assert page_errors == []


def test_a_short_session_charts_its_loss_etas_and_exam_then_chats(stack):  # noqa: F811
    """An empty form shows the server's error. Pasted text, eight steps, with review: the pairs wait
    in AWAITING_REVIEW; approved, each stage shows an ETA while it runs and the loss chart gets a
    point per progress report; at READY the exam shows as text and as a bar chart of base vs
    adapter (and reading passages); a question gets a streamed answer. Saves the README's pictures
    of the four views when DOCLORA_SCREENSHOTS is set."""
    _, base = stack
    with browser_page(base) as (page, page_errors):
        page.click("#go")
        wait_js(page, "document.querySelector('#learn-error').textContent.length > 0")
        assert "source" in page.text_content("#learn-error")

        page.reload()
        page.fill("#name", "Lumen Orchard")
        page.fill("#text", SHORT_TEXT)
        page.fill("#steps", str(STEPS))
        page.check("#review-check")
        screenshot(page, "learn", "#learn")
        page.click("#go")
        assert wait_state(page, "AWAITING_REVIEW", "FAILED") == "AWAITING_REVIEW"
        wait_js(page, f"document.querySelectorAll('{ROWS}').length >= 3")
        screenshot(page, "review", "#review")

        # every text the stage list shows, as the page may pass through training quickly
        page.evaluate(
            """() => { const etas = document.querySelector('#stage-etas'); window.etasSeen = [];
            new MutationObserver(() => window.etasSeen.push(etas.textContent))
              .observe(etas, {childList: true, subtree: true, characterData: true}); }"""
        )
        page.click("#approve")
        points = "document.querySelectorAll('#loss-chart circle.pt').length"
        ended = "['READY', 'FAILED', 'CANCELLED'].includes(document.querySelector('#state').textContent)"
        # the picture of the progress view: mid-training with an ETA where the machine allows
        eta = "document.querySelector('#stage-etas').textContent.includes('left')"
        wait_js(page, f"({points} >= 3 && {eta}) || {ended}", None, 480_000)
        screenshot(page, "progress", "#progress")
        assert wait_state(page, "READY", "FAILED", timeout=480_000) == "READY", page.text_content(
            "#session-error"
        )
        assert page.evaluate(points) >= 2
        etas = page.evaluate("window.etasSeen")
        assert any(re.search(rf"train: \d+ of {STEPS} · about [\d.]+ (s|min|h) left", t) for t in etas), etas
        wait_js(page, "document.querySelector('#stage-etas').textContent.includes('train: done in')")
        assert "train" in page.text_content("#log")
        # the exam, taken after READY: first as being taken, then as text and as a chart of each
        # way of answering when its figures arrive (the page polls the session until then)
        assert "reworded questions about trained facts" in page.text_content("#train-stats")
        wait_js(
            page,
            "document.querySelector('#train-stats').textContent.includes('missed (retrieval mode)')",
            timeout=300_000,
        )
        assert page.is_visible("#eval-chart")
        kinds = page.eval_on_selector_all("#eval-chart rect.bar", "bars => bars.map(b => b.classList[1])")
        assert {"base", "adapter", "retrieval", "both"} <= set(kinds), kinds

        page.fill("#question", "When was the Lumen Orchard founded?")
        page.click("#send")
        wait_js(
            page,
            "document.querySelectorAll('.msg.bot').length === 1 && "
            "document.querySelector('.msg.bot').textContent.trim().length > 0 && "
            "!document.querySelector('#send').disabled",
            timeout=300_000,
        )
        assert page.text_content(".msg.user").startswith("You: When was")
        screenshot(page, "chat", ".charts")  # the evaluation chart above the chat
        assert page_errors == []
