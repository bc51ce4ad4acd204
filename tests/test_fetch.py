"""Safe URL fetching against a real local HTTP server on a free port.

The happy-path tests opt in to loopback with `allow_private=True` or `allow_hosts`; every refusal
test uses the defaults, and the server's request log shows that refused links were never fetched.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from services.common import runtime
from services.common.errors import InvalidArgument, OutageTooLong, ResourceExhausted, Unavailable
from services.common.runtime import wait_out_outage
from services.ingest.fetch import arxiv_pdf_url, fetch_url

PDF = b"%PDF-1.4\n% a tiny stand-in\n%%EOF\n"
BIG = b"x" * 1_000_000


class Handler(BaseHTTPRequestHandler):
    hits: list[str]

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, length: bool = True) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.hits.append(self.path)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/doc.pdf":
            self._send(200, PDF, {"Content-Type": "application/pdf"})
        elif url.path == "/download":
            self._send(
                200,
                PDF,
                {
                    "Content-Type": "application/pdf; qs=0.9",
                    "Content-Disposition": 'attachment; filename="Annual Report.pdf"',
                },
            )
        elif url.path == "/redirect":
            self._send(302, headers={"Location": "/doc.pdf"})
        elif url.path == "/to":
            self._send(302, headers={"Location": query["target"][0]})
        elif url.path.startswith("/loop/"):
            self._send(302, headers={"Location": f"/loop/{int(url.path.rsplit('/', 1)[1]) + 1}"})
        elif url.path == "/big":
            self._send(200, BIG, {"Content-Type": "text/plain"})
        elif url.path == "/big-unannounced":
            self._send(200, BIG, {"Content-Type": "text/plain"}, length=False)
        elif url.path.startswith("/chunked"):
            # HTTP/1.1 chunked transfer, written by hand (http.server answers in HTTP/1.0)
            size = int(query.get("size", ["5"])[0])
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n"
            )
            for start in range(0, size, 4096):
                piece = b"y" * min(4096, size - start)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/gzip-bomb":
            self._send(200, gzip.compress(BIG), {"Content-Type": "text/plain", "Content-Encoding": "gzip"})
        elif url.path == "/gzip":
            self._send(
                200, gzip.compress(b"hello"), {"Content-Type": "text/plain", "Content-Encoding": "gzip"}
            )
        elif url.path == "/slow":
            time.sleep(3)
            self._send(200, b"late")
        elif url.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b".")
                self.wfile.flush()
                time.sleep(0.1)
        elif url.path == "/missing":
            self._send(404, b"nope")
        elif url.path == "/broken":
            self._send(503, b"down")
        elif url.path == "/flaky":  # down for the first two requests, then up
            fails = sum(1 for h in self.server.hits if h == "/flaky") <= 2
            self._send(503, b"down") if fails else self._send(200, PDF, {"Content-Type": "application/pdf"})
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.handle_error = lambda request, client_address: None  # clients that hang up on purpose
    httpd.hits = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server) -> str:
    server.hits.clear()
    return f"http://127.0.0.1:{server.server_address[1]}"


def fetch(url: str, **kw):
    kw.setdefault("max_bytes", 10_000_000)
    kw.setdefault("timeout_s", 5)
    return fetch_url(url, **kw)


# --- the happy path (loopback explicitly allowed) --------------------------------------------


def test_a_document_is_fetched_with_its_type_and_name_when_loopback_is_allowed(base):
    """Body, media type (without parameters), final URL and file name come back."""
    got = fetch(f"{base}/doc.pdf", allow_private=True)
    assert (got.data, got.content_type, got.filename, got.final_url) == (
        PDF,
        "application/pdf",
        "doc.pdf",
        f"{base}/doc.pdf",
    )


def test_the_file_name_comes_from_content_disposition_when_present(base):
    """An attachment's declared name beats the URL's last segment."""
    assert fetch(f"{base}/download", allow_private=True).filename == "Annual Report.pdf"


def test_redirects_within_allowed_hosts_are_followed(base):
    """allow_hosts lets exactly that host through, and a redirect on it is followed."""
    got = fetch(f"{base}/redirect", allow_hosts={"127.0.0.1"})
    assert got.data == PDF and got.final_url == f"{base}/doc.pdf"


def test_a_chunked_body_and_a_raw_unicode_path_are_handled(base, server):
    """Chunked transfer is reassembled; a non-ASCII path is escaped on the wire."""
    assert fetch(f"{base}/chunked?size=10000", allow_private=True).data == b"y" * 10000
    with pytest.raises(InvalidArgument, match="404"):
        fetch(f"{base}/dokument-ü.pdf", allow_private=True)
    assert server.hits[-1] == "/dokument-%C3%BC.pdf"


def test_a_gzip_body_is_unpacked(base):
    """A server that compresses although we asked for identity still gives the plain bytes."""
    assert fetch(f"{base}/gzip", allow_private=True).data == b"hello"


def test_arxiv_abstract_links_become_pdf_links():
    """/abs/ID (with or without a version, old-style IDs too) maps to /pdf/ID; other hosts are left alone."""
    assert arxiv_pdf_url("https://arxiv.org/abs/2502.13189") == "https://arxiv.org/pdf/2502.13189"
    assert (
        arxiv_pdf_url("https://arxiv.org/abs/2502.13189v2?context=cs") == "https://arxiv.org/pdf/2502.13189v2"
    )
    assert (
        arxiv_pdf_url("http://export.arxiv.org/abs/hep-th/9901001")
        == "http://export.arxiv.org/pdf/hep-th/9901001"
    )
    assert arxiv_pdf_url("https://example.org/abs/2502.13189") == "https://example.org/abs/2502.13189"


# --- refusals (defaults) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "[::1]",
        "10.1.2.3",
        "192.168.0.10",
        "172.16.5.4",
        "169.254.169.254",
        "[::ffff:127.0.0.1]",
        "[::ffff:169.254.169.254]",
        "0.0.0.0",
        "localhost",
        "2130706433",  # 127.0.0.1 as one decimal number
        "0x7f.1",  # and in legacy hex/short form
        "100.64.0.1",  # carrier-grade NAT
        "224.0.0.1",  # multicast
        "[fe80::1]",
        "[fc00::1]",
        "[2002:7f00:1::]",  # 6to4 wrapping 127.0.0.1
        "[64:ff9b::a9fe:a9fe]",  # NAT64 wrapping 169.254.169.254
    ],
)
def test_private_loopback_link_local_and_reserved_addresses_are_refused_by_default(server, base, host):
    """The check runs on the resolved address, so no request is ever sent."""
    port = server.server_address[1]
    with pytest.raises(InvalidArgument, match="only public internet addresses can be fetched"):
        fetch(f"http://{host}:{port}/doc.pdf")
    assert server.hits == []


def test_a_redirect_from_an_allowed_host_to_a_private_address_is_refused(server, base):
    """Only the first hop is allowed; its redirects to loopback by name or to the metadata address fail."""
    port = server.server_address[1]
    for target in (
        f"http://localhost:{port}/doc.pdf",
        "http://169.254.169.254/latest/meta-data/",
        f"http://[::1]:{port}/doc.pdf",
    ):
        with pytest.raises(InvalidArgument, match="only public internet addresses"):
            fetch(f"{base}/to?target={target}", allow_hosts={"127.0.0.1"})
    assert all(hit.startswith("/to?") for hit in server.hits)


def test_a_redirect_to_a_non_http_scheme_is_refused(server, base):
    """A redirect is held to the same rules as the first link."""
    with pytest.raises(InvalidArgument, match="only http and https"):
        fetch(f"{base}/to?target=file:///etc/passwd", allow_private=True)


def test_too_many_redirects_are_refused(server, base):
    """The sixth redirect is not followed."""
    with pytest.raises(InvalidArgument, match="redirects more than 5 times"):
        fetch(f"{base}/loop/0", allow_private=True)
    assert len(server.hits) == 6


@pytest.mark.parametrize("path", ["/big", "/big-unannounced", "/gzip-bomb", "/chunked?size=1000000"])
def test_a_body_over_the_cap_is_abandoned(base, path):
    """Declared, undeclared or compressed, a body past max_bytes raises ResourceExhausted."""
    with pytest.raises(ResourceExhausted, match="MB"):
        fetch(f"{base}{path}", allow_private=True, max_bytes=100_000)


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_a_slow_server_is_given_up_on_at_the_time_limit(base, path):
    """A server that stalls, or trickles its body byte by byte, is cut off at timeout_s overall."""
    started = time.monotonic()
    with pytest.raises(Unavailable, match="took longer than 0.5 s"):
        fetch(f"{base}{path}", allow_private=True, timeout_s=0.5)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/file.pdf",
        "gopher://example.com/",
        "javascript:alert(1)",
        "//example.com/no-scheme",
        "data:text/plain,hello",
    ],
)
def test_non_http_schemes_are_refused(url):
    """Only http and https links are fetched."""
    with pytest.raises(InvalidArgument, match="only http and https links can be fetched"):
        fetch(url)


def test_links_with_credentials_are_refused():
    """user:password@host links are refused rather than sent on."""
    with pytest.raises(InvalidArgument, match="user name or password"):
        fetch("http://user:secret@example.com/doc.pdf")


def test_http_errors_say_what_the_server_answered(base):
    """4xx is the link's fault (InvalidArgument); 5xx may pass (Unavailable)."""
    with pytest.raises(InvalidArgument, match="404"):
        fetch(f"{base}/missing", allow_private=True)
    with pytest.raises(Unavailable, match="503"):
        fetch(f"{base}/broken", allow_private=True)


@pytest.fixture
def quick_backoff(monkeypatch):
    monkeypatch.setattr(runtime, "OUTAGE_FIRST_DELAY_S", 0.05)


def _waited_fetch(url: str, window_s: float):
    """How the ingest worker fetches a link: `fetch_url` tried again while the server is away."""
    call = functools.partial(
        asyncio.to_thread, fetch_url, url, max_bytes=10_000, timeout_s=5, allow_private=True
    )
    return asyncio.run(wait_out_outage(call, window_s=window_s, what="fetching"))


def test_a_flaky_link_is_fetched_on_a_later_attempt(base, server, quick_backoff):
    """Two 503s then the document: fetched on the third try."""
    got = _waited_fetch(f"{base}/flaky", window_s=5)
    assert got.data == PDF and server.hits.count("/flaky") == 3


def test_retries_give_up_after_the_window_and_bad_links_are_not_retried(base, server, quick_backoff):
    with pytest.raises(OutageTooLong, match="503"):
        _waited_fetch(f"{base}/broken", window_s=0.3)
    assert server.hits.count("/broken") >= 2
    with pytest.raises(InvalidArgument, match="404"):
        _waited_fetch(f"{base}/missing", window_s=5)
    assert server.hits.count("/missing") == 1
