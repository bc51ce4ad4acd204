"""Accounts and share links in the web UI, in a real headless Chromium against the whole local stack:
the keyless admin (the server's own machine) makes a member key for another tenant in the admin
panel; that person signs in with it, trains a short bot, downloads its adapter and pairs, and shares
it; the link opens a chat-only page in a browser that has no key, which answers, until the owner
revokes the link. Checked through the REST API as well: the key's tenant, the share token refused
anywhere but its bot's chat, the bot gone after it is deleted."""

from __future__ import annotations

import contextlib
import io
import re
import zipfile

import httpx
import pytest

from tests.test_e2e import TIMEOUT, docs_server, stack  # noqa: F401
from tests.test_webui import CHROMIUM, SHORT_TEXT, STEPS, VIEWPORT, wait_state

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); CI installs it"
    ),
]

BOT = "Orchard guide"
QUESTION = "When was the Lumen Orchard founded?"
ANSWERED = (
    "document.querySelectorAll('.msg.bot').length === 1 && "
    "document.querySelector('.msg.bot').textContent.trim().length > 0 && "
    "!document.querySelector('#send').disabled"
)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def chromium():
    """Headless Chromium, and a function that opens a page in a fresh context (its own
    sessionStorage and cookies) collecting the script errors of all its pages."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        errors: list[str] = []

        def new_page(url: str):
            page = browser.new_context(viewport=VIEWPORT, accept_downloads=True).new_page()
            page.set_default_timeout(60_000)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            return page

        try:
            yield new_page, errors
        finally:
            browser.close()


def downloaded(page, button: str):
    """The file that clicking `button` saves: its suggested name and its bytes."""
    with page.expect_download() as info:
        page.click(button)
    download = info.value
    return download.suggested_filename, open(download.path(), "rb").read()


def test_a_member_key_from_the_admin_panel_trains_and_shares_a_bot_until_the_link_is_revoked(stack):  # noqa: F811
    """No key on the server's machine: the page shows its admin of tenant `default` and the API keys
    panel, where a member key for tenant `alice` is made and its token shown once. Signed out, the
    page asks for a key; with alice's it shows alice, no keys panel, and her own bots. Her bot,
    trained in a few steps, downloads its adapter (a zip with a model card) and its pairs, and is
    shared with citations: the link opens, in a browser without her key, a page named after the bot
    that answers a question. The share token is refused on any other route. Revoked in the owner's
    page, the link shows that it is gone. Deleted, the bot leaves the list and the API."""
    from playwright.sync_api import expect

    _, base = stack
    with chromium() as (new_page, page_errors), httpx.Client(base_url=base, timeout=TIMEOUT) as api:
        page = new_page(base + "/")
        r = api.get("/")
        assert r.headers["referrer-policy"] == "no-referrer" and r.headers["cache-control"] == "no-store"

        # --- keyless on loopback: the admin of the default tenant, with the keys panel
        expect(page.locator("#who")).to_contain_text("default · admin")
        expect(page.locator("#signin")).to_be_hidden()
        page.click("#keys-link")
        expect(page.locator("#keys")).to_be_visible()
        page.fill("#key-tenant", "alice")
        page.select_option("#key-role", "member")
        page.fill("#key-name", "alice's laptop")
        page.click("#create-key")
        expect(page.locator("#key-created")).to_be_visible()
        expect(page.locator("#key-created")).to_contain_text("shown only once")
        token = page.input_value("#key-token")
        found = re.fullmatch(r"dlk_([0-9a-f]{16})_\S+", token)
        assert found, token
        key_row = page.locator(f'#keys-table tbody tr[data-key-id="{found[1]}"]')
        expect(key_row).to_contain_text("alice")
        expect(key_row).to_contain_text("member")
        expect(key_row).to_contain_text("alice's laptop")
        me = api.get("/api/v1/me", headers=bearer(token)).json()
        assert (me["tenant"], me["role"], me["key_id"]) == ("alice", "member", found[1])

        # --- signed out, the page asks for a key; alice's key shows alice and her (empty) list
        page.click("#sign-out")
        expect(page.locator("#signin")).to_be_visible()
        expect(page.locator("#app")).to_be_hidden()
        page.fill("#key-input", "dlk_0123456789abcdef_not-a-key")
        page.click("#use-key")
        expect(page.locator("#signin-error")).to_contain_text("refused")
        page.fill("#key-input", token)
        page.click("#use-key")
        expect(page.locator("#who")).to_contain_text("alice · member")
        expect(page.locator("#keys-link")).to_be_hidden()
        expect(page.locator("#bot-list")).to_contain_text("none yet")
        assert page.evaluate("sessionStorage.getItem('doclora.apiKey')") == token

        # --- alice trains a short bot (minutes on 2 busy cores); it is hers only
        page.fill("#name", BOT)
        page.fill("#text", SHORT_TEXT)
        page.fill("#steps", str(STEPS))
        page.click("#go")
        assert wait_state(page, "READY", "FAILED", "CANCELLED", timeout=720_000) == "READY", (
            page.text_content("#session-error")
        )
        sid = page.text_content("#sid")
        assert api.get(f"/api/v1/sessions/{sid}").status_code == 404  # the default tenant's view
        assert api.get(f"/api/v1/sessions/{sid}", headers=bearer(token)).json()["name"] == BOT
        expect(page.locator("#bot-list")).to_contain_text(BOT)
        expect(page.locator("#documents tbody tr button.doc-delete")).to_have_count(1)  # finished: deletable

        # --- downloads go through fetch with her key
        name, data = downloaded(page, "#download-adapter")
        assert name.endswith(".zip")
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            assert "README.md" in [n.rsplit("/", 1)[-1] for n in z.namelist()], z.namelist()
        name, data = downloaded(page, "#download-dataset")
        assert name.endswith(".jsonl") and data.count(b"\n") >= 1

        # --- a share link with citations, shown once
        page.click("#share summary")
        page.check("#share-citations")
        page.fill("#share-name", "for Bob")
        page.click("#create-share")
        expect(page.locator("#share-created")).to_be_visible()
        url = page.input_value("#share-url")
        assert url.startswith(base + "/s/dls_"), url
        share_token = url.rsplit("/", 1)[1]
        share_row = page.locator("#shares tbody tr[data-share-id]")
        expect(share_row).to_have_count(1)
        expect(share_row).to_contain_text("for Bob")
        r = api.get(url)
        assert r.status_code == 200 and r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["cache-control"] == "no-store"

        # --- in a browser without her key the link opens the bot's chat, and it answers
        guest = new_page(url)
        expect(guest.locator("#bot-name")).to_have_text(BOT)
        expect(guest.locator("#share-gone")).to_be_hidden()
        assert guest.evaluate("sessionStorage.length") == 0
        guest.fill("#question", QUESTION)
        guest.click("#send")
        guest.wait_for_function(ANSWERED, timeout=300_000)
        assert guest.text_content(".msg.user") == f"You: {QUESTION}"

        # --- the share token opens nothing else
        assert api.get("/api/v1/sessions", headers=bearer(share_token)).status_code in (401, 403)
        assert api.get(f"/api/v1/sessions/{sid}", headers=bearer(share_token)).status_code in (401, 403)

        # --- revoked in the owner's page: the link's page says it is gone
        share_row.locator("button.revoke").click()
        expect(page.locator("#shares tbody tr[data-share-id]")).to_have_count(0)
        expect(page.locator("#share-created")).to_be_hidden()
        guest.reload()
        expect(guest.locator("#share-gone")).to_be_visible()
        expect(guest.locator("#chat")).to_be_hidden()
        assert api.get("/api/v1/me", headers=bearer(share_token)).status_code == 401

        # --- the bot deleted (after a confirm) leaves her list and the API
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#delete-bot")
        expect(page.locator("#learn")).to_be_visible()
        expect(page.locator("#bot-list")).not_to_contain_text(BOT)
        assert api.get(f"/api/v1/sessions/{sid}", headers=bearer(token)).status_code == 404
        assert page_errors == []
